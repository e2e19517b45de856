"""Where the memory of a training step goes on CPU: peak RSS while loading, what stays resident after
loading (and how much of it is the checkpoint file's pages, from /proc/self/smaps), and the peak
during a few training steps (the kernel's high-water mark is reset after loading, /proc/self/clear_refs).

    python -m benchmarks.memory --quantization nf4 [--gradient-checkpointing] [--model smollm2-135m]

Batch 8 × 128 tokens, first half a masked prompt, LoRA r8 all-linear, tunelab's chunked loss.
"""

from __future__ import annotations

import argparse
import time

import torch

from tunelab.assemble import build
from tunelab.config import validate
from tunelab.loss import causal_lm_loss


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


def masked_prompt_batch(batch: int = 8, length: int = 128) -> dict[str, torch.Tensor]:
    """Fixed random tokens; the first half of each sequence is a prompt without labels."""
    input_ids = torch.randint(3, 40000, (batch, length), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, : length // 2] = -100
    return {"input_ids": input_ids, "labels": labels}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quantization", default="none", choices=("none", "nf4"))
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    config = validate(
        {"model": args.model, "quantization": args.quantization, "method": {"name": "lora", "r": 8}}
    )
    model = build(config).model
    loaded_peak, resident = status_bytes("VmHWM"), status_bytes("VmRSS")
    checkpoint_pages = resident_file_bytes(".safetensors")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak: what follows is the training steps alone
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = masked_prompt_batch()
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        causal_lm_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
    print(
        f"quantization={args.quantization} gradient_checkpointing={args.gradient_checkpointing}: "
        f"peak while loading {loaded_peak / 2**30:.2f} GiB, "
        f"resident after loading {resident / 2**30:.2f} GiB "
        f"(checkpoint file pages {checkpoint_pages / 2**30:.2f} GiB), "
        f"peak while training {status_bytes('VmHWM') / 2**30:.2f} GiB, "
        f"last step {times[-1]:.2f} s"
    )


if __name__ == "__main__":
    main()
