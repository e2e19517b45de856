"""`tunelab quickstart`: fine-tune the embedded model on GSM8K briefly, evaluate before and after."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tunelab.assemble import build
from tunelab.config import load_config
from tunelab.data import eval_dataset
from tunelab.errors import shell_word
from tunelab.evaluate import evaluate, evaluate_ranks, summarize_ranks
from tunelab.plots import loss_curve, rank_curve
from tunelab.rundir import RunDir
from tunelab.train import train

DEFAULT_CONFIG = Path(__file__).with_name("quickstart.yaml")
DEFAULT_EVAL_EXAMPLES = 16  # one generation batch
console = Console(emoji=False, soft_wrap=True)  # paths and commands stay whole, to copy


def _free_run_dir(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... : a quickstart never overwrites an earlier run."""
    candidate, n = path, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _eval_set(config, tokenizer, eval_examples: int):
    return eval_dataset(config.data, tokenizer, limit=eval_examples)


def _evaluate(model, tokenizer, config, eval_examples: int, label: str) -> dict[str, float]:
    """Loss and perplexity only: exact match generates up to 256 tokens an answer, which took 40% of the
    quickstart's time, and on 16 examples after 30 steps it moves by one example either way."""
    dataset = _eval_set(config, tokenizer, eval_examples)
    console.print(f"evaluating {label} on {eval_examples} examples of {config.data.eval_name} ...")
    with Progress(console=console, transient=True) as progress:
        return evaluate(model, tokenizer, dataset, with_exact_match=False, progress=progress)


def _rank_table(trained, config, eval_examples: int, run_dir: Path) -> int | None:
    """Eval loss of the one adapter truncated to a few ranks: the point of DyLoRA. Returns the best rank
    (None: a method that trains one rank)."""
    evaluable = config.method.evaluable_ranks()
    if not evaluable:
        return None
    ranks = [b for b in (1, 2, 4, 8, 16, 32, 64) if b in evaluable]
    dataset = _eval_set(config, trained.tokenizer, eval_examples)
    console.print(f"evaluating the one adapter at ranks {', '.join(map(str, ranks))} ...")
    with Progress(console=console, transient=True) as progress:
        rows = evaluate_ranks(trained, dataset, ranks, with_exact_match=False, progress=progress)
    summary = summarize_ranks(rows)
    plot = rank_curve(summary, run_dir / "rank_curve.png", title="quickstart: one QDyLoRA run at each rank")
    # a line of its own, not the table's title: the narrow table would wrap it
    console.print(f"the same adapter truncated to rank b ({config.data.eval_name}, {eval_examples} examples)")
    table = Table()
    for column in ("rank", "loss", "perplexity"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["rank"]), f"{row['loss']:.4f}", f"{row['perplexity']:.3f}")
    console.print(table)
    console.print(f"best rank {summary['best_rank']}, elbow rank {summary['elbow_rank']}; plot: {plot}")
    return summary["best_rank"]


def run_quickstart(
    config_path: Path | None = None, steps: int | None = None, eval_examples: int | None = None
) -> Path:
    started = time.perf_counter()
    overrides = [f"train.max_steps={steps}"] if steps else []
    config = load_config(config_path or DEFAULT_CONFIG, overrides)
    config.output_dir = str(_free_run_dir(config.resolved_output_dir()))
    eval_examples = eval_examples or DEFAULT_EVAL_EXAMPLES

    console.rule(f"tunelab quickstart: {config.method.name} on {config.model}, {config.data.train}")
    # the method starts as the identity (LoRA's B = 0), so this is the base model's score
    untrained = build(config)
    before = _evaluate(untrained.model, untrained.tokenizer, config, eval_examples, "the base model")

    train_started = time.perf_counter()
    result = train(config, untrained=untrained)
    train_time = time.perf_counter() - train_started
    run_dir, trained = result.run_dir, result.tuned
    after = _evaluate(trained.model, trained.tokenizer, config, eval_examples, "the fine-tuned model")
    plot = loss_curve(RunDir(run_dir).metrics(), run_dir / "loss_curve.png")

    table = Table(title=f"{config.data.eval_name}, first {eval_examples} examples")
    for column in ("metric", "before", "after"):
        table.add_column(column, justify="right")
    for metric in before:
        table.add_row(metric, f"{before[metric]:.4f}", f"{after[metric]:.4f}")
    table.add_row("train time (s)", "", f"{train_time:.0f}")
    console.print(table)
    best_rank = _rank_table(trained, config, eval_examples, run_dir)
    console.print(
        f"run directory: [bold]{run_dir}[/bold] (config.yaml, metrics.jsonl, final/"
        f"{', loss_curve.png' if plot else ''})"
    )
    run, rank_option = shell_word(run_dir), f" --rank {best_rank}" if best_rank else ""
    fmt = config.method.export_formats[0]  # peft for adapters; a --config of another method has its own
    export_dir = shell_word(f"{run_dir}-{fmt}" + (f"-r{best_rank}" if best_rank else ""))
    # exact match generates up to 256 tokens an answer (every rank: hours on a CPU): loss, on more examples
    limit = max(64, eval_examples)
    eval_options = (" --ranks all" if best_rank else "") + f" --no-exact-match --limit {limit}"
    console.print(
        f"next: tunelab eval {run}{eval_options} | "
        f"tunelab export {run}{rank_option} --format {fmt} --out {export_dir}"
    )
    console.print(f"total time {time.perf_counter() - started:.0f} s")
    return run_dir
