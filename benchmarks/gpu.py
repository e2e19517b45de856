"""The side-by-side comparisons on a CUDA GPU, in bf16, on a random model with Llama-3-8B layer
shapes (hidden 4096, MLP 14336, 32/8 heads, 128k vocabulary; `--layers` of them, 4 by default so a
run fits any 40 GB+ GPU): tokens/s, MFU and peak memory, ours / reference.

    python -m benchmarks.gpu [--layers 4] [--batch 4] [--length 1024] [--rounds 3]

Needs a CUDA GPU; no hub (the weights are random). Writes bench-out/gpu.md.
"""

from __future__ import annotations

import sys

import torch

from benchmarks import run


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks.gpu needs a CUDA GPU; on CPU run `make bench` (python -m benchmarks.run)")
    defaults = [
        "--models",
        "llama3-8b-shapes",
        "--batch",
        "4",
        "--length",
        "1024",
        "--steps",
        "10",
        "--warmup",
        "3",
        "--out",
        str(run.ROOT / "bench-out" / "gpu.md"),
    ]
    sys.argv = [sys.argv[0], *defaults, *sys.argv[1:]]  # later options override the defaults
    run.main()


if __name__ == "__main__":
    main()
