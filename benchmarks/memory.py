"""Where the memory of a training step goes on CPU: peak RSS while loading, what stays resident after
loading (and how much of it is the checkpoint file's pages, from /proc/self/smaps), and the peak
during a few training steps (the kernel's high-water mark is reset when training begins,
/proc/self/clear_refs). The steps are `tunelab train`'s own (make_trainer: hooks, loss, optimizer).

    python -m benchmarks.memory --quantization nf4 [--gradient-checkpointing] [--model smollm2-135m]

Batch 8 × 128 tokens, first half a masked prompt, LoRA r8 all-linear.
"""

from __future__ import annotations

import argparse

from transformers import TrainerCallback

from benchmarks.worker import StepTimer, run_config, train_on_fixed_batches
from tunelab.assemble import build


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="none", choices=("none", "nf4"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    config = run_config(
        args.model,
        {
            "quantization": args.quantization,
            "method": {"name": "lora", "r": 8},
            "train": {"gradient_checkpointing": args.gradient_checkpointing, "precision": args.precision},
        },
        batch=8,
        steps=args.steps,
    )
    built = build(config)
    loaded_peak, resident = status_bytes("VmHWM"), status_bytes("VmRSS")
    checkpoint_pages = resident_file_bytes(".safetensors")
    timer = StepTimer()
    train_on_fixed_batches(config, built, 128, [ResetPeakAtStart(), timer])
    print(
        f"quantization={args.quantization} gradient_checkpointing={args.gradient_checkpointing} "
        f"precision={args.precision}: "
        f"peak while loading {loaded_peak / 2**30:.2f} GiB, "
        f"resident after loading {resident / 2**30:.2f} GiB "
        f"(checkpoint file pages {checkpoint_pages / 2**30:.2f} GiB), "
        f"peak while training {status_bytes('VmHWM') / 2**30:.2f} GiB, "
        f"last step {timer.times[-1]:.2f} s"
    )


if __name__ == "__main__":
    main()
