"""Does bf16 train as well as fp32? LoRA, QDyLoRA and SpIEL-AG on the embedded SmolLM2, gsm8k:train,
the same seed and data order in both precisions; reports both loss curves (a plot) and the final eval
loss on gsm8k:eval (each run evaluated in the precision it trained in, as `tunelab eval` would).

    python -m benchmarks.precision_quality [--steps 100] [--eval-examples 64] [--out bench-out/precision]

Writes OUT/precision_quality.json, OUT/precision_quality.md and OUT/precision_quality.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tunelab.config import validate
from tunelab.data import eval_dataset
from tunelab.evaluate import evaluate_ranks
from tunelab.rundir import RunDir
from tunelab.train import train

# each method at the learning rate of its example config for a short run (examples/*.yaml)
METHODS = {
    "lora": ({"method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.05}}, 1e-3),
    "qdylora": (
        {"quantization": "nf4", "method": {"name": "dylora", "r": 16, "alpha": 16, "dropout": 0.05}},
        1e-3,
    ),
    "spiel-ag": (
        {
            "method": {
                "name": "spiel",
                "num_tunable": 2442240,
                "reselection_steps": 20,
                "accumulation_steps": 5,
            }
        },
        1e-4,
    ),
}


def run(name: str, precision: str, steps: int, eval_examples: int, out: Path) -> dict:
    extra, lr = METHODS[name]
    config = validate(
        {
            "model": "smollm2-135m",
            **extra,
            "data": {"train": "gsm8k:train", "eval": "gsm8k:eval", "max_length": 256},
            "train": {
                "lr": lr,
                "max_steps": steps,
                "batch_size": 4,
                "scheduler": "constant_with_warmup",
                "warmup_ratio": 0.05,
                "seed": 42,
                "precision": precision,
                "log_steps": 25,
            },
            "output_dir": str(out / f"{name}-{precision}"),
        }
    )
    started = time.perf_counter()
    result = train(config, overwrite=True)
    seconds = time.perf_counter() - started
    dataset = eval_dataset(config.data, result.tuned.tokenizer, limit=eval_examples)
    metrics = evaluate_ranks(result.tuned, dataset, None, with_exact_match=False)[0]
    records = RunDir(result.run_dir).metrics()
    curve = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    return {
        "method": name,
        "precision": precision,
        "eval_loss": metrics["loss"],
        "seconds": seconds,
        "curve": curve,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METHODS), figsize=(4 * len(METHODS), 3.2), sharey=True)
    for ax, name in zip(axes, METHODS, strict=True):
        for r in (r for r in results if r["method"] == name):
            steps, losses = zip(*r["curve"], strict=True)
            ax.plot(steps, losses, lw=1, label=f"{r['precision']} (eval {r['eval_loss']:.3f})")
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("train loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=Path("bench-out/precision"))
    args = parser.parse_args()
    results = [
        run(name, precision, args.steps, args.eval_examples, args.out)
        for name in args.methods.split(",")
        for precision in ("fp32", "bf16")
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision_quality.json").write_text(json.dumps(results, indent=2))
    plot(results, args.out / "precision_quality.png")
    lines = ["| method | eval loss fp32 | eval loss bf16 | bf16 / fp32 | train time fp32 (s) | bf16 (s) |"]
    lines.append("|---|---|---|---|---|---|")
    for name in args.methods.split(","):
        fp32, bf16 = (
            next(r for r in results if r["method"] == name and r["precision"] == p) for p in ("fp32", "bf16")
        )
        lines.append(
            f"| {name} | {fp32['eval_loss']:.4f} | {bf16['eval_loss']:.4f} | "
            f"{bf16['eval_loss'] / fp32['eval_loss']:.4f} | {fp32['seconds']:.0f} | {bf16['seconds']:.0f} |"
        )
    table = (
        "\n".join(lines)
        + f"\n\n{args.steps} steps, batch 4, max_length 256, seed 42; eval loss on the first "
        f"{args.eval_examples} examples of gsm8k:eval.\n"
    )
    (args.out / "precision_quality.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
