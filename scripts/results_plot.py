"""Tables and plots for RESULTS.md from the JSON files the results_*.sh scripts write.

python scripts/results_plot.py qdylora|spiel [--dir results]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from tunelab.plots import plt  # Agg backend already selected
from tunelab.rundir import RunDir


def run_stats(run_dir: Path) -> dict:
    records = RunDir(run_dir).metrics()
    times = [r["step_time_s"] for r in records if "step_time_s" in r][3:]  # skip warm-up steps
    summary = next(r for r in records if r.get("event") == "summary")
    return {
        "median_step_s": statistics.median(times),
        "peak_memory_gib": summary["peak_memory_bytes"] / 2**30,
    }


def qdylora(folder: Path) -> None:
    dylora = json.loads((folder / "qdylora-r16.json").read_text())
    qlora = {r: json.loads((folder / f"qlora-r{r}.json").read_text()) for r in (2, 8, 16)}
    print("| rank | QDyLoRA (one run) eval loss | QLoRA (own run) eval loss |\n|---|---|---|")
    for row in dylora["ranks"]:
        other = qlora.get(row["rank"])
        print(
            f"| {row['rank']} | {row['loss']:.4f} | {other['loss']:.4f} |"
            if other
            else f"| {row['rank']} | {row['loss']:.4f} | |"
        )
    print(f"\nQDyLoRA best rank {dylora['best_rank']}, elbow rank {dylora['elbow_rank']}")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(
        [r["rank"] for r in dylora["ranks"]],
        [r["loss"] for r in dylora["ranks"]],
        "o-",
        label="QDyLoRA, one run, truncated to rank b",
    )
    ax.plot(list(qlora), [v["loss"] for v in qlora.values()], "s", ms=8, label="QLoRA, a run per rank")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank")
    ax.set_ylabel(f"eval loss ({dylora['examples']} gsm8k:eval examples)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "qdylora_vs_qlora.png", dpi=120)
    print(f"plot: {folder / 'qdylora_vs_qlora.png'}")


def spiel(folder: Path) -> None:
    print("| method | eval loss | perplexity | median s/step | peak memory (GiB) |\n|---|---|---|---|---|")
    for name in ("spiel-ag", "spiel-ma", "lora-r16", "full"):
        metrics = json.loads((folder / f"{name}.json").read_text())
        stats = run_stats(folder / name)
        print(
            f"| {name} | {metrics['loss']:.4f} | {metrics['perplexity']:.3f} | "
            f"{stats['median_step_s']:.2f} | {stats['peak_memory_gib']:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("which", choices=("qdylora", "spiel"))
    parser.add_argument("--dir", type=Path, default=Path("results"))
    args = parser.parse_args()
    {"qdylora": qdylora, "spiel": spiel}[args.which](args.dir)


if __name__ == "__main__":
    main()
