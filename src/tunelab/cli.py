"""The `tunelab` command line. Heavy imports (torch, transformers) happen inside the commands, so
light commands (recommend, datasets) start fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tunelab.errors import RunInterrupted, TunelabError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune open causal LMs: LoRA, QLoRA, QDyLoRA, SpIEL, full FT; coverage-based search.",
)
# emoji=False: ':train:' in 'gsm8k:train:' is a dataset name, not an emoji code
console = Console(emoji=False)
err_console = Console(stderr=True, emoji=False)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        console.print(f"tunelab {version('tunelab')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    show_version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """Fine-tune open causal LMs: LoRA, QLoRA, QDyLoRA, SpIEL, full FT; coverage-based search."""


@app.command()
def train(
    config: Path = typer.Argument(..., help="run config YAML (or a run directory, with --resume)"),
    overrides: list[str] = typer.Argument(None, help="dotted overrides, e.g. train.lr=1e-4 method.r=16"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in output_dir"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace the tunelab run in output_dir (never other files)"
    ),
) -> None:
    """Fine-tune a model as CONFIG says."""
    from tunelab.config import load_config
    from tunelab.rundir import CONFIG_FILE, RunDir
    from tunelab.train import train as run_training

    if config.is_dir():
        config = config / CONFIG_FILE
    run_config = load_config(config, overrides or [])
    run = RunDir(config.parent)
    if (
        config.name == CONFIG_FILE
        and run.is_run()
        and not any(o.startswith("output_dir=") for o in overrides or [])
    ):
        # a run's own config trains that folder, wherever it was moved or copied to
        run_config.output_dir = str(run.path.resolve())
    run_dir = run_training(run_config, resume=resume, overwrite=overwrite).run_dir
    err_console.print(f"[green]done[/green]: run directory {run_dir}")


def _metrics_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    columns = [key for key in rows[0] if key not in ("tokens",)]
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    return table


@app.command("eval")
def eval_command(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    data: str = typer.Option(None, "--data", help="dataset name or file (default: the run's data.eval)"),
    ranks: str = typer.Option(None, "--ranks", help="dylora runs: all | 1,2,4,8 | 1-64"),
    limit: int = typer.Option(None, "--limit", min=1, help="evaluate only the first N examples"),
    exact_match: bool = typer.Option(
        None,
        "--exact-match/--no-exact-match",
        help="generate and score answers (default: on for built-in tasks)",
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    json_path: Path = typer.Option(None, "--json", help="write the results as JSON here"),
) -> None:
    """Loss, perplexity (and exact match) of a run; with --ranks, of each rank of a DyLoRA run."""
    from rich.progress import Progress

    from tunelab.assemble import load_run, read_run_config
    from tunelab.data import build_dataset
    from tunelab.evaluate import evaluate_ranks, parse_ranks, summarize_ranks
    from tunelab.plots import rank_curve
    from tunelab.rundir import check_writable

    if json_path:  # before the evaluation, not after it
        if json_path.is_dir():
            raise TunelabError(f"--json {json_path} is a directory; name a file, e.g. {json_path}/eval.json")
        if json_path.exists() and json_path.suffix != ".json":  # e.g. the run's own config.yaml
            raise TunelabError(f"--json {json_path} exists and is not a .json file; name another file")
        check_writable(json_path.parent)
    # the request is checked against the run before its model loads
    rank_list = parse_ranks(ranks, read_run_config(run_dir).method.evaluable_ranks()) if ranks else None
    config, built = load_run(run_dir)
    spec = data or config.data.eval
    if not spec:
        raise TunelabError("the run has no data.eval; pass --data NAME|PATH")
    dataset = build_dataset(
        spec,
        built.tokenizer,
        config.data.model_copy(update={"format": "auto"}) if data else config.data,  # another file: detect
        limit=limit,
    )
    with_exact_match = dataset.task is not None if exact_match is None else exact_match
    with Progress(console=err_console, transient=True) as progress:
        rows = evaluate_ranks(built, dataset, rank_list, with_exact_match, batch_size, progress)
    result: dict = {"data": spec, "examples": len(dataset)}
    if ranks:
        summary = summarize_ranks(rows)
        plot = rank_curve(summary, run_dir / "rank_curve.png", title=f"{run_dir.name}: eval on {spec}")
        result.update(summary, plot=str(plot))
        console.print(_metrics_table(rows, f"{run_dir.name} on {spec} ({len(dataset)} examples)"))
        console.print(
            f"best rank [bold]{summary['best_rank']}[/bold] (by {summary['metric']}), "
            f"elbow rank [bold]{summary['elbow_rank']}[/bold]; plot: {plot}"
        )
    else:
        result.update(rows[0])
        console.print(_metrics_table(rows, f"{run_dir.name} on {spec} ({len(dataset)} examples)"))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        err_console.print(f"wrote {json_path}")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="a finished run directory"),
    fmt: str = typer.Option(..., "--format", help="peft | merged | spiel (what the run's method supports)"),
    out: Path = typer.Option(..., "--out", help="directory to write (must not exist or be empty)"),
    rank: int = typer.Option(None, "--rank", help="dylora runs: export this rank (1..r)"),
) -> None:
    """Export a run as a PEFT adapter, a merged HF model, or a method's own format."""
    from tunelab.export import export_run

    export_run(run_dir, fmt, out, rank)
    console.print(f"[green]exported[/green] {fmt} to {out}")


@app.command()
def quickstart(
    steps: int = typer.Option(None, "--steps", min=1, help="optimizer steps (default: the example config's)"),
    eval_examples: int = typer.Option(None, "--eval-examples", min=1, help="eval slice size"),
    config: Path = typer.Option(None, "--config", help="a quickstart config (default: the built-in one)"),
) -> None:
    """Fine-tune the embedded SmolLM2-135M on GSM8K for a few minutes and compare before/after."""
    from tunelab.quickstart import run_quickstart

    run_quickstart(config, steps, eval_examples)


@app.command()
def models() -> None:
    """The built-in models (shipped as PyPI wheels, no hub needed)."""
    from tunelab.models import BUILTIN_MODELS, tunelab_home

    table = Table(title="built-in models")
    for column in ("name", "package", "converted copy"):
        table.add_column(column)
    for name, (dist, _) in BUILTIN_MODELS.items():
        cache = tunelab_home() / "models" / name
        table.add_row(
            name, dist, str(cache) if (cache / "config.json").is_file() else "(converted on first use)"
        )
    console.print(table)
    console.print("model: also takes a local Hugging Face model directory or a hub id.")


@app.command()
def datasets() -> None:
    """The built-in datasets (NAME:train / NAME:eval)."""
    from tunelab.tasks import builtin_tasks

    table = Table(title="built-in datasets")
    for column in ("name", "splits", "metric", "description"):
        table.add_column(column)
    for task in builtin_tasks().values():
        table.add_row(
            task.name, f"{task.name}:train, {task.name}:eval", "exact_match, loss", task.description
        )
    console.print(table)
    console.print("data.train / data.eval also take .jsonl, .json, .csv or .parquet files.")


from tunelab.hpsearch.commands import recommend, sweep  # noqa: E402  (imports no torch)

app.command()(sweep)
app.command()(recommend)


def main() -> None:
    # transformers' per-tensor loading bars are noise next to our own progress display
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app()
    except RunInterrupted as exc:
        err_console.print(escape(str(exc)), highlight=False, soft_wrap=True)
        sys.exit(130)
    except TunelabError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
