"""The `tunelab` command line. Heavy imports (torch, transformers) happen inside the commands, so
light commands (recommend, datasets) start fast."""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tunelab.console import stdout_console
from tunelab.errors import RunInterrupted, TunelabError, shell_word

if TYPE_CHECKING:
    from tunelab.config import DataConfig
    from tunelab.rundir import RunDir

try:  # typer 0.2x carries its own click; earlier versions use click itself
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors
NO_ARGS_HELP = getattr(click_errors, "NoArgsIsHelpError", ())  # click >= 8.2; before, help exited 0

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune open causal LMs: LoRA, QLoRA, QDyLoRA, SpIEL, full FT; coverage-based search.",
)
# eval, export, generate and chat read a run's trained weights: the final ones, or a checkpoint's
RUN_DIR = typer.Argument(
    ..., help="a finished run directory, or one of its checkpoints (RUN/checkpoints/checkpoint-N)"
)
# emoji=False: ':train:' in 'gsm8k:train:' is a dataset name, not an emoji code
console = stdout_console()
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
    auto_resume: bool = typer.Option(
        False,
        "--auto-resume",
        help="resume when output_dir holds this run, else start it (one command for a job that may be "
        "requeued)",
    ),
) -> None:
    """Fine-tune a model as CONFIG says."""
    from tunelab.config import check_saved_model, load_config
    from tunelab.rundir import CONFIG_FILE, RunDir, runs_in
    from tunelab.train import end_process_group, is_main_process
    from tunelab.train import train as run_training

    if config.is_dir():
        if not (config / CONFIG_FILE).is_file():
            raise TunelabError(
                f"{config} is a folder with no {CONFIG_FILE}, not a run{runs_in(config)}; give a config "
                "file, or a run folder to resume"
            )
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
        check_saved_model(run_config.model, config)
    if resume and overwrite:  # (a sweep's trial asks for both: resume if it can, else replace)
        output = run_config.resolved_output_dir()
        raise TunelabError(f"--resume continues the run in {output} and --overwrite replaces it; give one")
    if auto_resume:
        if resume or overwrite:
            given = "--resume" if resume else "--overwrite"
            raise TunelabError(f"--auto-resume decides whether to resume by itself; drop {given}")
        # every process of a distributed run decides alike: the main process writes a new run's config.yaml
        # only once all have joined the trainer, after each has looked here
        resume = RunDir(run_config.resolved_output_dir()).is_run()
    option = "--auto-resume" if auto_resume else "--resume"
    run_dir = run_training(run_config, resume=resume, overwrite=overwrite, resume_option=option).run_dir
    end_process_group()
    if not is_main_process():
        return
    err_console.print(f"[green]done[/green]: run directory {run_dir}")
    quoted_run, merged = shell_word(run_dir), shell_word(f"{run_dir}-merged")
    evaluate = f"tunelab eval {quoted_run}" + ("" if run_config.data.eval_name else " --data NAME|PATH")
    err_console.print(
        f"next: {evaluate} | tunelab chat {quoted_run} | tunelab export {quoted_run} --format merged "
        f"--out {merged}",
        highlight=False,
        soft_wrap=True,
        markup=False,
    )


@app.command("data")
def data_command(
    config: str = typer.Argument(..., help="run config YAML, or a data file or built-in dataset alone"),
    overrides: list[str] = typer.Argument(None, help="dotted overrides, e.g. data.max_length=256"),
    examples: int = typer.Option(2, "--examples", min=0, help="examples to print with trained tokens marked"),
) -> None:
    """Check data before training: rows used and skipped, token lengths, examples as trained.

    Given a run directory (or one of its checkpoints), checks the data of its config.yaml. Given a data
    file (.jsonl, .json, .csv, .tsv, .parquet; the text ones also .gz, .bz2, .xz), a datasets folder or
    a built-in dataset (gsm8k:train) instead, checks it as `data.train` of a default config; overrides
    still apply (model=..., data.format=...)."""
    from tunelab.config import FILE_SUFFIXES, check_run_source, is_hub_id, load_config
    from tunelab.data import eval_dataset, train_dataset
    from tunelab.models import load_tokenizer, resolve_model
    from tunelab.preview import print_dataset_report
    from tunelab.rundir import CHECKPOINTS_DIR, CONFIG_FILE, RunDir, runs_in

    path = Path(config)
    if path.parent.name == CHECKPOINTS_DIR and (path.parent.parent / CONFIG_FILE).is_file():
        path = path.parent.parent  # a run's checkpoint: the run's data
    if (path / CONFIG_FILE).is_file():
        path = path / CONFIG_FILE
    # anything but a YAML file is data: a file of any other type (its reader says which types it reads),
    # a folder, a built-in or a hub dataset
    other_type = path.suffix.lower() not in (".yaml", ".yml", "")
    named = not path.exists() and (":" in config or is_hub_id(config))
    if path.is_dir() and (inside := runs_in(path)):
        raise TunelabError(
            f"{path} is a folder of runs{inside}, not a dataset; give one run, or a data file or a "
            "datasets folder"
        )
    is_data = other_type or path.is_dir() or named
    if path.is_file() and path.suffix.lower() == ".txt":
        raise TunelabError(
            f"{path} is neither a run config (.yaml) nor a data file ({', '.join(FILE_SUFFIXES)}); a .txt "
            "of prompts goes to tunelab generate --file"
        )
    if is_data:
        run_config = load_config(None, [f"data.train={config}", *(overrides or [])])
    else:
        run_config = load_config(path, overrides or [])
    options = run_config.data
    if path.name == CONFIG_FILE and RunDir(path.parent).is_run():
        for key, spec in (("data.train", options.train), ("data.eval", options.eval)):
            if spec:
                check_run_source(key, spec)
    tokenizer = load_tokenizer(resolve_model(run_config.model), options.chat_template)
    print_dataset_report(
        console,
        "data.train",
        options.train,
        train_dataset(options, tokenizer, quiet=True),
        tokenizer,
        options.max_length,
        examples,
    )
    if options.eval_name:
        dataset = eval_dataset(options, tokenizer, limit=options.eval_limit, quiet=True)
        print_dataset_report(
            console, "data.eval", options.eval_name, dataset, tokenizer, options.max_length, 0
        )


def _check_eval_overrides(overrides: list[str], trained: DataConfig) -> None:
    """Which rows are a run's eval set is the run's: data.holdout's own rows, or none of data.train (all of
    it trained). An override of data.holdout, or of data.eval beside it, would score other rows."""
    keys = {item.split("=", 1)[0] for item in overrides}
    for key in ("data.holdout", "data.eval"):
        if key in keys and (key == "data.holdout" or trained.holdout is not None):
            held = (
                "the run trained on all of data.train"
                if trained.holdout is None
                else f"the run's eval set is the rows data.holdout={trained.holdout:g} kept out of data.train"
            )
            raise TunelabError(
                f"{key}: {held}, and other rows may include rows it trained on; drop the override, or pass "
                "--data NAME|PATH to evaluate on other data"
            )


def _note_trained_on(data: str, trained: DataConfig, run: RunDir) -> None:
    """Say so when --data names the file the run trained on, there or moved or copied (its rows are
    those the run recorded in data.json): its scores are on trained rows."""
    from tunelab.data import compare_data

    same = Path(data).exists() and Path(data).resolve() == Path(trained.train).resolve()
    if not same and Path(data).exists():
        try:
            compared = compare_data(trained.model_copy(update={"train": data, "eval": None}), run.data_file)
        except TunelabError:  # read as the run read its own data, it is not that data
            return
        same = "data.train" in compared and compared["data.train"] is None
    if same:
        err_console.print(
            f"[yellow]note:[/yellow] {escape(data)} holds the rows the run trained on: these scores include "
            "rows it trained on",
            soft_wrap=True,
        )


def _metrics_table(rows: list[dict]) -> Table:
    table = Table()
    columns = [key for key in rows[0] if key not in ("tokens",)]
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns))
    return table


@app.command("eval")
def eval_command(
    run_dir: Path = RUN_DIR,
    overrides: list[str] = typer.Argument(
        None, help="data.* settings for the evaluated data, e.g. data.skip_bad_rows=true"
    ),
    data: str = typer.Option(None, "--data", help="dataset name or file (default: the run's eval set)"),
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
    from tunelab.config import check_run_source, check_source, with_data_overrides
    from tunelab.data import check_held_out, eval_dataset
    from tunelab.evaluate import evaluate_ranks, parse_ranks, summarize_ranks
    from tunelab.plots import rank_curve
    from tunelab.rundir import check_writable, json_report, rank_curve_file, trained_weights

    if json_path:  # before the evaluation, not after it; an earlier `tunelab eval --json` is replaced
        check_writable(json_path, "--json", folder=False, ours=json_report("run"))
    # the request and the data are checked against the run before its model loads
    trained = read_run_config(run_dir)
    _check_eval_overrides(overrides or [], trained.data)
    config = with_data_overrides(trained, overrides or [])
    rank_list = parse_ranks(ranks, config.method.evaluable_ranks()) if ranks else None
    if not (data or config.data.eval_name):
        raise TunelabError("the run has no data.eval; pass --data NAME|PATH")
    key, source = (
        ("data.eval", config.data.eval) if config.data.holdout is None else ("data.train", config.data.train)
    )
    if data:
        check_source(data)
    else:
        check_run_source(key, source, "; --data PATH evaluates on another")
        check_held_out(
            config.data,
            trained_weights(run_dir)[0].holdout_file,
            "evaluate on the file as it was (moved: data.train=NEWPATH), or pass --data NAME|PATH",
        )
    _, built = load_run(run_dir)  # `config` stays the run's with the data.* overrides
    options = config.data
    if data:  # another dataset: its format is detected, and read whole (the run's eval split is its own)
        options = options.model_copy(
            update={"format": "auto", "eval": data, "eval_split": None, "holdout": None}
        )
    spec = options.eval_name
    dataset = eval_dataset(options, built.tokenizer, limit=limit)  # data.columns where it has them
    if data:  # once it has read: a bad file's error stays the one line said
        _note_trained_on(data, trained.data, trained_weights(run_dir)[0])
    with_exact_match = dataset.task is not None if exact_match is None else exact_match
    with Progress(console=err_console, transient=True, disable=not err_console.is_terminal) as progress:
        generated: list[list[str]] = []
        rows = evaluate_ranks(built, dataset, rank_list, with_exact_match, batch_size, progress, generated)
    result: dict = {"run": str(run_dir.resolve()), "data": options.eval or options.train}
    if options.holdout is not None:
        result["holdout"] = options.holdout
    result["examples"] = len(dataset)
    # a line of its own, not the table's title: a title wraps to the table's width, inside a path
    # 'on x.jsonl (data.holdout=0.1): 20 examples', no second parenthesis beside the holdout's
    console.print(f"{run_dir.name} on {spec}: {len(dataset)} examples", soft_wrap=True, markup=False)
    if not ranks and config.method.name == "dylora":  # which of its ranks these figures are
        console.print(f"at rank {config.method.r} (the run's r; --ranks all evaluates every rank)")
    console.print(_metrics_table(rows))
    if ranks:
        summary = summarize_ranks(rows)
        plot = rank_curve(
            summary, rank_curve_file(*trained_weights(run_dir)), title=f"{run_dir.name}: eval on {spec}"
        )
        result.update(summary, plot=str(plot))
        console.print(
            f"best rank [bold]{summary['best_rank']}[/bold] (by {summary['metric']}), "
            f"elbow rank [bold]{summary['elbow_rank']}[/bold]; plot: {plot}"
        )
    else:
        result.update(rows[0])
    if json_path:
        if with_exact_match:  # what was scored: each example's prompt, reference and generations
            result["generations"] = [
                {"prompt": example.prompt, "reference": example.reference}
                | {
                    f"rank {row['rank']}" if ranks else "generated": texts[i]
                    for row, texts in zip(rows, generated, strict=True)
                }
                for i, example in enumerate(dataset.examples)
            ]
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
        err_console.print(f"wrote {json_path}")


@app.command()
def export(
    run_dir: Path = RUN_DIR,
    fmt: str = typer.Option(
        ..., "--format", help="peft | merged | gguf | spiel (what the run's method supports)"
    ),
    out: Path = typer.Option(..., "--out", help="directory to write (must not exist or be empty)"),
    rank: int = typer.Option(None, "--rank", help="dylora runs: export this rank (1..r)"),
    dtype: str = typer.Option(None, "--dtype", help="merged: weight type, fp32 (default) | bf16 | fp16"),
    gguf_type: str = typer.Option(None, "--gguf-type", help="gguf: f16 (default) | q8_0"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace an earlier export in --out (never a folder of other files)"
    ),
) -> None:
    """Export a run as a PEFT adapter, a merged HF model, a GGUF file (+ Ollama Modelfile), or a
    method's own format."""
    from tunelab.assemble import read_run_config
    from tunelab.export import export_run
    from tunelab.gguf_export import ollama_name
    from tunelab.models import resolve_model
    from tunelab.quant import NF4_STORAGE

    for option, value, applies in (("--dtype", dtype, "merged"), ("--gguf-type", gguf_type, "gguf")):
        if value is not None and fmt.lower() != applies:  # GGUF, Merged: what other tools write
            raise TunelabError(f"{option} applies to --format {applies}, not {fmt}; drop it")
    export_run(run_dir, fmt, out, rank, dtype or "fp32", gguf_type or "f16", overwrite)
    fmt = fmt.lower()
    console.print(f"[green]exported[/green] {fmt} to {out}")
    config = read_run_config(run_dir)
    method = config.method
    if rank is None and method.name == "dylora":
        console.print(f"at rank {method.r} (the run's r; --rank N exports another)")
    name = ollama_name(out.name)
    nf4 = config.quantization == "nf4"
    next_step = {
        "peft": f"load it: peft.AutoPeftModelForCausalLM.from_pretrained({str(out)!r}"
        + (  # the adapter learned the 4-bit base's rounding: the base stored as it trained
            ", quantization_config=transformers.BitsAndBytesConfig("
            + ", ".join(f"{key}={value!r}" for key, value in NF4_STORAGE.items())
            + "))"
            if nf4
            else ")"
        )
        + " (its base model is named in adapter_config.json)",
        "merged": f"load it: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}), or serve it: "
        f"vllm serve {shell_word(out)}",
        "gguf": f"try it: cd {shell_word(out)} && ollama create {name} -f Modelfile && ollama run {name}",
    }
    if fmt == "spiel":  # the base's path: a built-in's converted folder
        as_trained = " (deltas trained on the 4-bit base: --format merged adds them to it as trained)"
        next_step["spiel"] = (
            "load it: tunelab.methods.spiel.method.apply_deltas(transformers.AutoModelForCausalLM"
            f".from_pretrained({resolve_model(config.model)!r}), {str(out)!r})" + (as_trained if nf4 else "")
        )
    if fmt in next_step:
        console.print(next_step[fmt], highlight=False, soft_wrap=True, markup=False)


def _load_for_generation(run_dir: Path, rank: int | None):
    """A finished run's model at `rank` (checked before the model loads) and its prompt template."""
    from tunelab.assemble import load_run, read_run_config
    from tunelab.data import resolve_template

    read_run_config(run_dir).method.check_rank(rank)
    config, built = load_run(run_dir)
    built.method.set_rank(built.model, rank)
    return built, resolve_template(config.data.template, built.tokenizer)


@app.command()
def generate(
    run_dir: Path = RUN_DIR,
    prompt: list[str] = typer.Option(None, "--prompt", help="a prompt (repeat for several)"),
    file: Path = typer.Option(
        None,
        "--file",
        help="prompts: .jsonl/.json/.csv/.parquet rows (prompt, instruction or messages), or .txt lines",
    ),
    prompt_column: str = typer.Option(
        None, "--prompt-column", help="the column of --file that holds the prompt (as data.columns.prompt)"
    ),
    out: Path = typer.Option(None, "--out", help="write the rows with their 'generated' text here (.jsonl)"),
    rank: int = typer.Option(None, "--rank", help="dylora runs: generate at this rank"),
    system: str = typer.Option(None, "--system", help="a system prompt (chat template runs)"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
) -> None:
    """Generate with a trained run: prompts rendered as the run trained (its data.template)."""
    from rich.progress import Progress

    from tunelab.assemble import read_run_config
    from tunelab.console import plural
    from tunelab.evaluate import generate_answers
    from tunelab.generate import is_generations, prompt_text, read_prompt_rows, row_messages, write_jsonl
    from tunelab.rundir import check_writable

    if bool(prompt) == bool(file):
        raise TunelabError("give prompts with --prompt TEXT (repeatable) or --file FILE, one of the two")
    if prompt_column and not file:
        raise TunelabError("--prompt-column names a column of --file FILE; give the file, or drop the option")
    if out is not None:
        if out.suffix != ".jsonl" and not out.is_dir():
            raise TunelabError(f"--out {out}: name a .jsonl file to write")
        check_writable(out, "--out", folder=False, ours=is_generations)
    rows = (
        read_prompt_rows(file, read_run_config(run_dir).data.columns, prompt_column)
        if file
        else [(f"--prompt {i + 1}", {"prompt": p}) for i, p in enumerate(prompt)]
    )
    built, template = _load_for_generation(run_dir, rank)
    texts = [
        prompt_text(row_messages(where, row, system, built.tokenizer), template, built.tokenizer)
        for where, row in rows
    ]
    with Progress(console=err_console, transient=True, disable=not err_console.is_terminal) as progress:
        generated = generate_answers(
            built.model, built.tokenizer, texts, max_new_tokens, batch_size, progress, temperature
        )
    if out is not None:
        write_jsonl(out, [{**row, "generated": text} for (_, row), text in zip(rows, generated, strict=True)])
        err_console.print(f"wrote {plural(len(rows), 'generation')} to {out}")
        return
    for (where, _), text in zip(rows, generated, strict=True):
        console.rule(where, style="dim")
        console.print(text, markup=False, highlight=False, soft_wrap=True)  # as generated: no wrapping


@app.command()
def chat(
    run_dir: Path = RUN_DIR,
    rank: int = typer.Option(None, "--rank", help="dylora runs: chat at this rank"),
    system: str = typer.Option(None, "--system", help="a system prompt"),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0: greedy"),
) -> None:
    """Talk to a trained run on the terminal; replies stream as they are generated."""
    from tunelab.generate import chat as chat_loop

    built, template = _load_for_generation(run_dir, rank)
    if system and template != "chat":
        err_console.print(
            f"[yellow]--system is ignored: this run trained with data.template {template}[/yellow]"
        )
        system = None
    chat_loop(built, template, console, system, max_new_tokens, temperature)


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
    """The built-in datasets (NAME:train, NAME:eval and its halves NAME:dev, NAME:test)."""
    from tunelab.tasks import builtin_tasks

    table = Table(title="built-in datasets")
    for column in ("name", "splits", "metric", "description"):
        table.add_column(column)
    for task in builtin_tasks().values():
        table.add_row(
            task.name,
            ", ".join(f"{task.name}:{split}" for split in ("train", "eval", "dev", "test")),
            "exact_match, loss",
            task.description,
        )
    console.print(table)
    console.print(
        "data.train / data.eval also take .jsonl, .json, .csv, .tsv or .parquet files (the text ones also "
        "compressed: .gz, .bz2, .xz), a datasets folder (save_to_disk), or a hub dataset id; NAME:dev and "
        "NAME:test are the two halves of NAME:eval (a sweep chooses on dev and reports test)."
    )


from tunelab.hpsearch.commands import recommend, sweep  # noqa: E402  (imports no torch)

app.command()(sweep)
app.command()(recommend)


_FILE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


_DISK_FULL = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))


def _disk_full(exc: BaseException) -> NoReturn:
    """A write failed for want of space, in a library that names no file: say so in one line."""
    err_console.print(
        f"[red]error:[/red] the disk is full ({escape(str(exc).splitlines()[0])}); free some space and run "
        "it again",
        highlight=False,
        soft_wrap=True,
    )
    sys.exit(2)


def main() -> None:
    # transformers' per-tensor loading bars are noise next to our own progress display
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        # standalone_mode=False: click's usage errors reach us, to be told in one line like ours
        code = app(standalone_mode=False, prog_name="tunelab")
    except NO_ARGS_HELP as exc:  # bare `tunelab`: the help, as before
        exc.show()
        sys.exit(exc.exit_code)
    except typer.Abort:  # an older typer's Ctrl-C; an end of input at a prompt
        err_console.print("interrupted")
        sys.exit(130)
    except click_errors.UsageError as exc:  # a mistyped command or option, a missing argument, --top 0
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        option = getattr(exc, "option_name", None) or ""
        if option.startswith("--") and "." in option:  # --train.lr=1e-3: an override written as an option
            hint = f"; overrides take no dashes: {option.lstrip('-')}=VALUE"
        message = exc.format_message().rstrip(".") + hint
        err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except RunInterrupted as exc:
        err_console.print(escape(str(exc)), highlight=False, soft_wrap=True)
        sys.exit(130)
    except TunelabError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as exc:  # a write the checks before the work could not foresee (disk full, a mount)
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)  # raised by write(), which names no file
        if exc.errno not in _FILE_ERRNOS or not (exc.filename or full):
            raise
        if not exc.filename:
            _disk_full(exc)
        message = f"{exc.filename}: {exc.strerror or os.strerror(exc.errno)}"
        hint = "; free some space and run it again" if full else ""
        err_console.print(f"[red]error:[/red] {escape(message + hint)}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as exc:  # safetensors and torch.save report a full disk in errors of their own
        if not any(reason in str(exc) for reason in _DISK_FULL):
            raise
        _disk_full(exc)
    if code == 130:  # typer turns a Ctrl-C that no command handles into exit code 130
        err_console.print("interrupted")
    if isinstance(code, int) and code:  # typer.Exit(1), or that Ctrl-C
        sys.exit(code)
