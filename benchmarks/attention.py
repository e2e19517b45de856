"""CPU SDPA kernels side by side: forward + backward time of the fused (flash) kernel and the math path
at SmolLM2-135M's attention shapes (batch 8, 9 heads of 64, causal), by sequence length. Where the
lines cross is tunelab.attention.CPU_MATH_BELOW.

    python -m benchmarks.attention [--lengths 40,64,128,192,256,384,512] [--repeats 10]

Prints a markdown table of medians (ms) and the ratio math / fused.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"fused": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def forward_backward_ms(backend: SDPBackend, length: int, dtype: torch.dtype, repeats: int) -> float:
    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 9, length, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(8, 9, length, 64, dtype=dtype)
    times = []
    for _ in range(repeats + 1):  # the first warms up
        start = time.perf_counter()
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(grad)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="40,64,128,192,256,384,512")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| dtype | tokens | fused ms | math ms | math / fused |")
    print("|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for length in map(int, args.lengths.split(",")):
            ms = {name: forward_backward_ms(b, length, dtype, args.repeats) for name, b in BACKENDS.items()}
            ratio = ms["math"] / ms["fused"]
            name = str(dtype).removeprefix("torch.")
            print(f"| {name} | {length} | {ms['fused']:.1f} | {ms['math']:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
