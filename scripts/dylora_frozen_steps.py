"""How large DyLoRA's `frozen`-mode updates are with torch AdamW (README, "Frozen mode and Adam's step
counter"). Each step draws one rank row b uniformly, only row b gets a gradient (constant 1, so Adam's
own step would be exactly lr), and every other row and its moments are put back after the step, as
`DyLoraMethod` does. Prints update/lr of a row's first update and over whole runs.

    .venv/bin/python scripts/dylora_frozen_steps.py
"""

from __future__ import annotations

import statistics

import numpy as np
import torch

LR, STEPS, SEEDS = 1e-3, 1000, 20


def frozen_run(rank: int, seed: int) -> tuple[list[float], list[float]]:
    """update/lr of each row's first update, and of every update, in one run."""
    rng = np.random.default_rng(seed)
    rows = torch.zeros(rank, 1, requires_grad=True)
    optimizer = torch.optim.AdamW([rows], lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
    first, every, seen = [], [], set()
    for _ in range(STEPS):
        b = int(rng.integers(rank))
        rows.grad = torch.zeros_like(rows)
        rows.grad[b] = 1.0
        kept = [rows.detach().clone()] + [v.clone() for v in optimizer.state[rows].values() if v.dim()]
        before = rows[b].item()
        optimizer.step()
        ratio = abs(rows[b].item() - before) / LR
        with torch.no_grad():  # put back every row but b, and its moments
            live = [rows] + [v for v in optimizer.state[rows].values() if v.dim()]
            for tensor, saved in zip(live[: len(kept)], kept, strict=False):
                trained = tensor[b].clone()
                tensor.copy_(saved)
                tensor[b] = trained
        every.append(ratio)
        if b not in seen:
            seen.add(b)
            first.append(ratio)
    return first, every


def main() -> None:
    for rank in (64, 16, 8):
        runs = [frozen_run(rank, seed) for seed in range(SEEDS)]
        first = [r for f, _ in runs for r in f]
        every = [r for _, e in runs for r in e]
        print(
            f"r={rank:2d}: first update/lr {min(first):.2f}-{max(first):.2f} "
            f"(median {statistics.median(first):.2f}); all updates over {STEPS}-step runs: "
            f"median {statistics.median(every):.2f}"
        )


if __name__ == "__main__":
    main()
