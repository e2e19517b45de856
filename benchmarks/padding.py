"""How much of each batch is padding: random batches against batches grouped by length (the sampler
tunelab's trainer uses with `train.group_by_length: true`), on a real dataset.

    python -m benchmarks.padding [--data gsm8k:train] [--batch 8] [--max-length 256,512] [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from tunelab.config import DataConfig
from tunelab.data import build_dataset, padded_fraction
from tunelab.models import load_tokenizer, resolve_model
from tunelab.train import SeededLengthGroupedSampler


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="gsm8k:train")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", default="256,512")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    tokenizer = load_tokenizer(resolve_model(args.model))
    print(f"| {args.data}, batch {args.batch} | examples | mean tokens | padded: random | padded: grouped |")
    print("|---|---|---|---|---|")
    for max_length in map(int, args.max_length.split(",")):
        dataset = build_dataset(args.data, tokenizer, DataConfig(max_length=max_length))
        lengths = [len(f["input_ids"]) for f in dataset.features]
        fractions = {"random": [], "grouped": []}
        for seed in range(args.seeds):
            generator = torch.Generator().manual_seed(seed)
            shuffled = torch.randperm(len(lengths), generator=generator).tolist()
            fractions["random"].append(padded_fraction(lengths, shuffled, args.batch))
            grouped = list(SeededLengthGroupedSampler(args.batch, lengths, seed))
            fractions["grouped"].append(padded_fraction(lengths, grouped, args.batch))
        print(
            f"| max_length {max_length} | {len(lengths)} | {statistics.mean(lengths):.0f} | "
            f"{statistics.median(fractions['random']):.1%} | {statistics.median(fractions['grouped']):.1%} |"
        )


if __name__ == "__main__":
    main()
