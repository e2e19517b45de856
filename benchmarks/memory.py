"""Where the memory of a training step goes on CPU: peak RSS while loading, what stays resident after
loading (and how much of it is the checkpoint file's pages, from /proc/self/smaps), and the peak
during a few training steps (the kernel's high-water mark is reset when training begins,
/proc/self/clear_refs). The steps are `tunelab train`'s own (make_trainer: hooks, loss, optimizer).

    python -m benchmarks.memory --quantization nf4 [--gradient-checkpointing [--every N]] [--rank R]
    python -m benchmarks.memory --data gsm8k:train --max-length 384 --steps 60

Batch 8 × 128 tokens, first half a masked prompt, LoRA all-linear (r8, or --rank). With --data,
batches of that data as `tunelab train` makes them (its collator, lengths grouped), and a line per
step: the batch's padded length, the resident memory after the step and the peak so far. Allocator
settings come from the environment (e.g. MALLOC_MMAP_THRESHOLD_), so one command compares them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from benchmarks.worker import StepTimer, run_config, train_on_fixed_batches
from tunelab.assemble import TunedModel, build
from tunelab.config import RunConfig
from tunelab.data import collator, train_dataset
from tunelab.train import make_trainer


def status_bytes(field: str) -> int:
    """VmHWM (peak resident) or VmRSS (resident now) of this process."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status[field].split()[0]) * 1024


def resident_file_bytes(suffix: str) -> int:
    """Resident bytes of this process's memory mappings of files whose path ends with `suffix`."""
    total, mapped = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            mapped = fields[-1].endswith(suffix)
        elif mapped and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


class ResetPeakAtStart(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak: what follows is the training steps alone


class MemoryTrace(TrainerCallback):
    """Per step: the padded length of the batch just trained, resident memory now, the peak so far."""

    def __init__(self, collate: Callable[[list[dict]], dict]) -> None:
        self.collate, self.lengths = collate, []

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate(examples)
        self.lengths.append(batch["input_ids"].shape[1])  # the loader collates a batch ahead
        return batch

    def on_step_end(self, args, state, control, **kwargs):
        length = self.lengths[state.global_step - 1]  # grad_accum 1: one batch a step
        resident, peak = status_bytes("VmRSS") / 2**30, status_bytes("VmHWM") / 2**30
        memory = f"resident {resident:.2f} GiB peak {peak:.2f} GiB"
        print(f"step {state.global_step:4d} length {length:4d} {memory}")


def train_on_data(config: RunConfig, built: TunedModel, callbacks: list[TrainerCallback]) -> None:
    """`config.train.max_steps` steps on config.data.train, batched as `tunelab train` batches it."""
    trace = MemoryTrace(collator(built.tokenizer))
    data = train_dataset(config.data, built.tokenizer, quiet=True)
    with tempfile.TemporaryDirectory() as out:
        callbacks = [*callbacks, trace]
        trainer = make_trainer(config, built, Path(out), data, callbacks=callbacks, data_collator=trace)
        trainer.args.logging_strategy = "no"
        trainer.train()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="none", choices=("none", "nf4"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--every", type=int, default=1, help="train.gradient_checkpointing_every")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--data", help="train on this data (a tunelab data spec) instead of fixed batches")
    parser.add_argument("--max-length", type=int, default=384, help="data.max_length, with --data")
    args = parser.parse_args()
    if args.every != 1 and not args.gradient_checkpointing:
        parser.error(
            "--every picks the layers gradient checkpointing recomputes; give --gradient-checkpointing too"
        )
    if args.max_length != parser.get_default("max_length") and not args.data:
        parser.error("--max-length sets the length of --data's rows; give --data too")
    config = run_config(
        args.model,
        {
            "quantization": args.quantization,
            "method": {"name": "lora", "r": args.rank},
            "train": {
                "gradient_checkpointing": args.gradient_checkpointing,
                "gradient_checkpointing_every": args.every,
                "precision": args.precision,
            },
            **({"data": {"train": args.data, "max_length": args.max_length}} if args.data else {}),
        },
        batch=8,
        steps=args.steps,
    )
    built = build(config)
    loaded_peak, resident = status_bytes("VmHWM"), status_bytes("VmRSS")
    checkpoint_pages = resident_file_bytes(".safetensors")
    timer = StepTimer()
    if args.data:
        train_on_data(config, built, [ResetPeakAtStart(), timer])
    else:
        train_on_fixed_batches(config, built, 128, [ResetPeakAtStart(), timer])
    print(
        f"quantization={args.quantization} r={args.rank} gradient_checkpointing="
        f"{args.gradient_checkpointing} every={args.every} precision={args.precision}: "
        f"peak while loading {loaded_peak / 2**30:.2f} GiB, "
        f"resident after loading {resident / 2**30:.2f} GiB "
        f"(checkpoint file pages {checkpoint_pages / 2**30:.2f} GiB), "
        f"peak while training {status_bytes('VmHWM') / 2**30:.2f} GiB, "
        f"last step {timer.times[-1]:.2f} s, median step {statistics.median(timer.times):.2f} s"
    )


if __name__ == "__main__":
    main()
