"""Profile one training step before optimizing it: where the time goes (torch profiler, top operators
by self CPU time) and where the activation memory goes (every tensor autograd saves for the backward
pass, deduplicated by storage, grouped by the module that saved it). The steps are `tunelab train`'s
own (make_trainer: the method's hooks and optimizer, tunelab's loss).

    python -m benchmarks.profile [--model smollm2-135m] [--quantization nf4 --gradient-checkpointing]
        [--method lora|dylora|full|spiel] [--rank 8] [--dropout 0.05]
        [--precision auto|fp32|bf16] [--length 128] [--shapes N]

Batch 8 × LENGTH tokens, first half a masked prompt (as in benchmarks.run). Step 1 warms up, step 2
counts saved tensors, step 3 is profiled. Prints two markdown tables. With --shapes, a fourth step is
profiled recording input shapes, for a third table. Recording shapes made that step's large
elementwise operators several times slower (NF4 LoRA r64: bitwise_and on 8 × 256 × 1536 took 820 ms
there, against 98 ms for all its shapes in step 3; the cause was not looked into), so its times only
rank the shapes; the operator table's times always come from step 3.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from contextlib import ExitStack

import torch
from torch import nn
from transformers import TrainerCallback

from benchmarks.worker import run_config, train_on_fixed_batches
from tunelab.assemble import build


def module_labels(model: nn.Module) -> dict[nn.Module, str]:
    """A short label per module: its class, plus the attribute name for linear-like leaves."""
    labels = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        labels[module] = (
            f"{type(module).__name__}({leaf})" if leaf.endswith("proj") else type(module).__name__
        )
    return labels


class SavedTensorCensus(TrainerCallback):
    """Bytes of the tensors autograd keeps for backward during step `at_step`, by the innermost module
    that saved them."""

    def __init__(self, model: nn.Module, at_step: int) -> None:
        self.model, self.at_step = model, at_step
        self.by_module: dict[str, int] = defaultdict(int)
        self.stack: list[str] = []
        self.context = ExitStack()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step != self.at_step:
            return
        labels = module_labels(self.model)
        seen = {p.untyped_storage().data_ptr() for p in self.model.parameters()}  # weights aren't activations

        def push(module, _args):
            self.stack.append(labels[module])

        def pop(module, _args, _output):
            self.stack.pop()

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                self.by_module[self.stack[-1] if self.stack else "(outside modules)"] += storage.nbytes()
            return tensor

        for module in self.model.modules():
            self.context.callback(module.register_forward_pre_hook(push).remove)
            self.context.callback(module.register_forward_hook(pop).remove)
        self.context.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))

    def on_step_end(self, args, state, control, **kwargs):
        self.context.close()  # global_step is already the next step here


class ProfileStep(TrainerCallback):
    def __init__(self, at_step: int, record_shapes: bool = False) -> None:
        self.at_step, self.record_shapes = at_step, record_shapes
        self.profiler: torch.profiler.profile | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            self.profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=self.record_shapes
            )
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and state.global_step == self.at_step + 1:
            self.profiler.__exit__(None, None, None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="none", choices=("none", "nf4"))
    parser.add_argument("--method", default="lora")
    parser.add_argument("--rank", type=int, default=8, help="LoRA / DyLoRA rank")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--shapes", type=int, default=0, help="each top operator's N heaviest input shapes")
    args = parser.parse_args()
    method = {"name": args.method}
    if args.method in ("lora", "dylora"):
        method |= {"r": args.rank, "dropout": args.dropout}
    train = {"gradient_checkpointing": args.gradient_checkpointing, "precision": args.precision}
    overrides = {"quantization": args.quantization, "method": method, "train": train}
    config = run_config(args.model, overrides, batch=8, steps=4 if args.shapes else 3)
    built = build(config)
    census = SavedTensorCensus(built.model, at_step=1)
    profile = ProfileStep(at_step=2)
    shapes = ProfileStep(at_step=3, record_shapes=True)
    train_on_fixed_batches(config, built, args.length, [census, profile] + ([shapes] if args.shapes else []))

    by_module = census.by_module
    total = sum(by_module.values())
    print(f"\n### Saved for backward: {total / 2**20:.0f} MiB ({args.method}, {args.quantization})\n")
    print("| module | MiB | share |\n|---|---|---|")
    for label, nbytes in sorted(by_module.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {label} | {nbytes / 2**20:.0f} | {nbytes / total:.0%} |")

    events = profile.profiler.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    print(f"\n### Self CPU time of one step: {total_us / 1e6:.2f} s\n")
    print("| operator | calls | self CPU ms | share |\n|---|---|---|---|")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        share = event.self_cpu_time_total / total_us
        print(f"| {event.key} | {event.count} | {event.self_cpu_time_total / 1e3:.0f} | {share:.0%} |")
    if args.shapes:
        print("\n### The heaviest input shapes of those operators (from a step recording shapes)\n")
        print("| operator | input shapes | calls | self CPU ms, inflated |\n|---|---|---|---|")
        top = {e.key for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]}
        by_shape = [e for e in shapes.profiler.key_averages(group_by_input_shape=True) if e.key in top]
        for key in sorted(top, key=lambda k: -sum(e.self_cpu_time_total for e in by_shape if e.key == k)):
            heaviest = sorted((e for e in by_shape if e.key == key), key=lambda e: -e.self_cpu_time_total)
            for event in heaviest[: args.shapes]:
                ms = event.self_cpu_time_total / 1e3
                print(f"| {key} | {event.input_shapes} | {event.count} | {ms:.0f} |")


if __name__ == "__main__":
    main()
