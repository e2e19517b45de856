"""PNG plots a person would rather look at than read: loss curve, metric vs rank, coverage curve, lr curve."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def loss_curve(records: list[dict], path: Path) -> Path | None:
    """Training loss per step (and eval loss where it ran) from a run's metrics.jsonl records."""
    train = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def rank_curve(summary: dict, path: Path, title: str = "") -> Path:
    """Eval metric(s) against the rank an adapter is truncated to, best and elbow marked."""
    rows = summary["ranks"]
    ranks = [row["rank"] for row in rows]
    metrics = [m for m in ("loss", "exact_match") if all(m in row for row in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        ax.plot(ranks, [row[metric] for row in rows], "o-", ms=3)
        ax.set_xlabel("rank b")
        ax.set_ylabel(f"eval {metric}")
        ax.grid(alpha=0.3)
        if metric == summary["metric"]:
            for key, style in (("best_rank", "g--"), ("elbow_rank", "r:")):
                ax.axvline(
                    summary[key], color=style[0], ls=style[1:], label=f"{key.split('_')[0]} = {summary[key]}"
                )
            ax.legend()
    if len(ranks) > 8 and max(ranks) / max(min(ranks), 1) >= 16:
        for ax in axes[0]:
            ax.set_xscale("log", base=2)
    fig.suptitle(title or "eval metric vs rank (one DyLoRA run)")
    return _save(fig, path)


def coverage_curve(
    top_k: list[float], path: Path, title: str = "", held_out: list[float] | None = None
) -> Path:
    """CBS: mean over datasets of the best normalized score among the top-K configs, against K; with
    `held_out`, the same for rankings that never saw the dataset scored (recommend --cross-validate)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ks = list(range(1, len(top_k) + 1))
    ax.plot(ks, top_k, "o-", ms=3, label="ranked on every dataset")
    if held_out is not None:
        ax.plot(ks, held_out, "s--", ms=3, label="ranked without the dataset scored")
        ax.legend(loc="lower right")
    ax.set_xlabel("K (top configurations tried)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # K counts configs: no tick at 1.5
    ax.set_ylabel("mean best score / dataset best")
    ax.set_ylim(min(0.0, min(top_k, default=0)), 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or "coverage-based search: top-K curve")
    return _save(fig, path)


def lr_curve(curves: dict[str, list[tuple[float, float]]], path: Path, title: str = "") -> Path:
    """Each arm's dev score (mean s/best over datasets) against its learning rate, its best starred: a
    curve still rising at an end of its grid says the best lies beyond it."""
    fig, ax = plt.subplots(figsize=(9, 4))
    for index, (label, points) in enumerate(curves.items()):
        # arms can score alike (one run's LoRA and DyLoRA at full rank): their own marker and dash keep a
        # line drawn over another in sight
        style = f"{'osD^vPX'[index % 7]}{['-', '--', ':', '-.'][index % 4]}"
        (line,) = ax.plot(*zip(*points, strict=True), style, ms=5, alpha=0.8, label=label)
        ax.plot(*max(points, key=lambda point: point[1]), "*", ms=12, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("mean dev score / dataset best")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside: lines stay clear
    ax.set_title(title or "each arm's dev score against its learning rate")
    return _save(fig, path)
