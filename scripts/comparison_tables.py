"""RESULTS.md's gsm8k comparison tables, from the sweep database of one dataset: one row per trial (a
QDyLoRA trial at its dev-best rank), then the QDyLoRA adapters' dev / test loss at every rank.

python scripts/comparison_tables.py results/comparison-gsm8k.sqlite [--notes NOTES.json]

NOTES.json maps "ARM LR" (e.g. "LoRA r8 1e-3") to a mark put after that trial's step time and minutes,
for what RESULTS.md says about how the trial ran.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from pathlib import Path

ARMS = (
    "LoRA r8",
    "QLoRA r8",
    "QLoRA r16",
    "QDyLoRA r16",
    "SpIEL-AG",
    "SpIEL-MA",
    "full fine-tuning",
    "SpIEL-AG reference recipe",
)
RANKS = (1, 2, 4, 8, 16)


def arm(config: dict) -> str:
    method, train = config["method"], config["train"]
    if method["name"] == "lora":
        return f"{'QLoRA' if config['quantization'] == 'nf4' else 'LoRA'} r{method['r']}"
    if method["name"] == "dylora":
        return f"QDyLoRA r{method['r']}"
    if method["name"] == "full":
        return "full fine-tuning"
    if train["weight_decay"] == 30:  # the SpIEL reference recipe arm of the spec
        return "SpIEL-AG reference recipe"
    return f"SpIEL-{method['regrowth'].upper()}"


def short(lr: float) -> str:
    """0.0003 -> '3e-4', 0.00025 -> '2.5e-4'."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def figure(value: float | None, scale: float = 1.0, digits: int = 4) -> str:
    """A nullable column (a trial that failed to measure it) as text."""
    return "–" if value is None else f"{value / scale:.{digits}f}"


def tables(db: Path, notes: dict[str, str]) -> str:
    connection = sqlite3.connect(db)
    connection.row_factory = sqlite3.Row
    trials: dict[tuple[str, float, int], list[sqlite3.Row]] = {}
    for row in connection.execute("select * from trials where status = 'done'"):
        config = json.loads(row["config_json"])
        trials.setdefault((arm(config), config["train"]["lr"], config["train"]["seed"]), []).append(row)
    lines = [
        "| arm | lr | dev loss | test loss | s/step | peak GiB | minutes |",
        "|---|---|---|---|---|---|---|",
    ]

    def arm_order(name: str) -> int:  # an arm the spec did not have goes last
        return ARMS.index(name) if name in ARMS else len(ARMS)

    for (name, lr, seed), rows in sorted(trials.items(), key=lambda item: (arm_order(item[0][0]), item[0])):
        row = min(rows, key=lambda row: row["score"])  # a QDyLoRA trial: its dev-best rank
        label = (
            name + (f" (rank {row['rank']})" if row["rank"] else "") + (f", seed {seed}" if seed != 1 else "")
        )
        mark = notes.get(f"{name} {short(lr)}", "")
        lines.append(
            f"| {label} | {short(lr)} | {figure(row['score'])} | {figure(row['test_score'])} | "
            f"{figure(row['step_time_s'], digits=2)}{mark} | {figure(row['peak_memory_bytes'], 2**30, 2)} | "
            f"{figure(row['duration_s'], 60, 1)}{mark} |"
        )
    lines += [
        "",
        "| QDyLoRA r16 lr | " + " | ".join(f"rank {b}" for b in RANKS) + " |",
        "|---|" + "---|" * len(RANKS),
    ]
    for (name, lr, seed), rows in sorted(trials.items(), key=lambda item: item[0][1:]):
        if name == "QDyLoRA r16":
            at = {row["rank"]: row for row in rows}
            scores = " | ".join(
                f"{figure(at[b]['score'])} / {figure(at[b]['test_score'])}" if b in at else "–" for b in RANKS
            )
            lines.append(f"| {short(lr)}{f', seed {seed}' if seed != 1 else ''} | {scores} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("db", type=Path)
    parser.add_argument("--notes", type=Path, help="JSON: 'ARM LR' -> the mark of a note about that trial")
    args = parser.parse_args()
    print(tables(args.db, json.loads(args.notes.read_text()) if args.notes else {}))


if __name__ == "__main__":
    main()
