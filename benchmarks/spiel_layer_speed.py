"""Forward + backward time of one SpIEL layer against a frozen nn.Linear and a LoRA layer (CPU or GPU).

.venv/bin/python benchmarks/spiel_layer_speed.py [--out 2048 --in 2048 --tokens 2048 --density 0.01]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from tunelab.methods.lora.layer import LoRALinear
from tunelab.methods.spiel.layer import SparseDeltaLinear
from tunelab.methods.spiel.selection import index_dtype


def time_pass(
    layer: nn.Module, x: torch.Tensor, repeats: int, before: Callable[[], None] = lambda: None
) -> float:
    """Median seconds of forward + backward (input gradient and the layer's trainable gradients)."""
    times = []
    for _ in range(repeats + 1):  # the first pass warms up
        before()
        start = time.perf_counter()
        layer(x).sum().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        x.grad = None
        layer.zero_grad(set_to_none=True)
    return sorted(times[1:])[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=int, default=2048)
    parser.add_argument("--in", dest="in_features", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    def frozen_linear() -> nn.Linear:
        return nn.Linear(args.in_features, args.out, bias=False).requires_grad_(False)

    numel = args.out * args.in_features
    k = int(args.density * numel)
    indices = torch.randperm(numel)[:k].sort().values.to(index_dtype(numel))
    spiel_ag = SparseDeltaLinear(frozen_linear(), indices).to(device)
    layers = {
        "frozen nn.Linear": frozen_linear().to(device),
        f"LoRA r={args.rank}": LoRALinear(frozen_linear(), args.rank, 16.0).to(device),
        f"SpIEL k={k}": SparseDeltaLinear(frozen_linear(), indices).to(device),
    }
    x = torch.randn(args.tokens, args.in_features, device=device, requires_grad=True)

    lora_params = args.rank * (args.out + args.in_features)
    print(
        f"{device}, {torch.get_num_threads()} threads, W {args.out}x{args.in_features}, "
        f"{args.tokens} tokens, SpIEL density {args.density:.1%}, LoRA {lora_params} params"
    )
    for name, layer in layers.items():
        print(f"{name:>28}: {1e3 * time_pass(layer, x, args.repeats):7.1f} ms")

    def start_phase() -> None:  # the first micro-batch of an AG phase computes the dense gradient
        spiel_ag.start_phase()

    milliseconds = 1e3 * time_pass(spiel_ag, x, args.repeats, start_phase)
    print(f"{'SpIEL, AG phase 1st batch':>28}: {milliseconds:7.1f} ms")


if __name__ == "__main__":
    main()
