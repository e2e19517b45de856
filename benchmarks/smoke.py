"""Every benchmark case and side trained for 2 steps on a tiny random Llama, in one process: what breaks
on a new machine (a GPU lent for half an hour, say) shows up in a minute, before the timed runs.

    python -m benchmarks.smoke [--models llama3-8b-shapes]

Prints one line per case and side, and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from benchmarks.run import MODEL_CASES, ROOT, TINY_LLAMA, random_llama_dir
from benchmarks.worker import CASES, measure

SMOKE_LLAMA = TINY_LLAMA | dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--models", default="llama3-8b-shapes", help="whose cases to try: " + ", ".join(MODEL_CASES)
    )
    args = parser.parse_args()
    model_dir = random_llama_dir(ROOT / "bench-out", "smoke-llama", SMOKE_LLAMA)
    cases = dict.fromkeys(case for name in args.models.split(",") for case in MODEL_CASES[name])
    failed = 0
    for case in cases:
        sides = ["ours", "ref"] + (["ref-bf16"] if CASES[case]["ref"][0] != "tunelab-lora" else [])
        for side in sides:
            try:
                result = measure(case, side, model_dir, steps=2, warmup=1, batch=2, length=64)
            except Exception:
                failed += 1
                print(f"FAIL {case}/{side}\n{traceback.format_exc()}", flush=True)
            else:
                print(f"ok   {case}/{side}: {result['median_step_s']:.3f} s/step", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
