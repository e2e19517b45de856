"""Profile one training step before optimizing it: where the time goes (torch profiler, top operators
by self CPU time) and where the activation memory goes (every tensor autograd saves for the backward
pass, deduplicated by storage, grouped by the module that saved it).

    python -m benchmarks.profile [--model smollm2-135m] [--quantization nf4] [--method lora|dylora|full|spiel]

Batch 8 × 128 tokens, first half a masked prompt (as in benchmarks.run). Prints two markdown tables.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch import nn

from benchmarks.memory import masked_prompt_batch
from tunelab.assemble import build
from tunelab.config import validate
from tunelab.loss import causal_lm_loss


def module_labels(model: nn.Module) -> dict[nn.Module, str]:
    """A short label per module: its class, plus the attribute name for linear-like leaves."""
    labels = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        labels[module] = (
            f"{type(module).__name__}({leaf})" if leaf.endswith("proj") else type(module).__name__
        )
    return labels


def saved_tensor_census(model: nn.Module, batch: dict) -> dict[str, int]:
    """Bytes of the tensors autograd keeps for backward, by the innermost module that saved them."""
    labels = module_labels(model)
    stack: list[str] = []
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights are not activations
    by_module: dict[str, int] = defaultdict(int)

    def push(module, _args):
        stack.append(labels[module])

    def pop(module, _args, _output):
        stack.pop()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            by_module[stack[-1] if stack else "(outside modules)"] += storage.nbytes()
        return tensor

    handles = [m.register_forward_pre_hook(push) for m in model.modules()]
    handles += [m.register_forward_hook(pop) for m in model.modules()]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = causal_lm_loss(model, batch)
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    return dict(by_module)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="none", choices=("none", "nf4"))
    parser.add_argument("--method", default="lora")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    method = {"name": args.method}
    if args.method in ("lora", "dylora"):
        method |= {"r": 8, "dropout": args.dropout}
    config = validate({"model": args.model, "quantization": args.quantization, "method": method})
    model = build(config).model
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = masked_prompt_batch()
    causal_lm_loss(model, batch).backward()  # warm-up

    census = saved_tensor_census(model, batch)
    total = sum(census.values())
    print(f"\n### Saved for backward: {total / 2**20:.0f} MiB ({args.method}, {args.quantization})\n")
    print("| module | MiB | share |\n|---|---|---|")
    for label, nbytes in sorted(census.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {label} | {nbytes / 2**20:.0f} | {nbytes / total:.0%} |")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        causal_lm_loss(model, batch).backward()
    events = profiler.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    print(f"\n### Self CPU time of one step: {total_us / 1e6:.2f} s\n")
    print("| operator | calls | self CPU ms | share |\n|---|---|---|---|")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        share = event.self_cpu_time_total / total_us
        print(f"| {event.key} | {event.count} | {event.self_cpu_time_total / 1e3:.0f} | {share:.0%} |")


if __name__ == "__main__":
    main()
