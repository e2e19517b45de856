"""The `tunelab sweep` and `tunelab recommend` commands (registered in tunelab.cli).

Trials train in their own processes and `recommend` only reads results, so neither imports torch for
itself (sweep's data check reads the supported file types from tunelab.data, which does).

Both check every input and output path before doing any work: a bad one ends the command with one
line and nothing written.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tunelab.config import YOUR_DATA, check_model, dump_config, flatten, model_location, nest, validate
from tunelab.console import plural, stdout_console
from tunelab.errors import RunInterrupted, TunelabError, closest, did_you_mean, folders_or, shell_word
from tunelab.hpsearch.executors import (
    TrialProcesses,
    TrialResult,
    check_ray,
    record,
    run_local,
    run_ray,
)
from tunelab.hpsearch.published import HUB_IDS, published_configs, to_train_config
from tunelab.hpsearch.ranking import (
    arms,
    best_lr_at_grid_edge,
    best_per_arm,
    hyperparameters,
    rank_matrix,
    scores_by_lr,
    usual_values,
    varying_keys,
)
from tunelab.hpsearch.spec import (
    EVAL_RANK_KEY,
    SweepSpec,
    Trial,
    beside_the_spec,
    bookkeeping_changes,
    check_datasets,
    data_fingerprint,
    expand,
    load_spec,
    rank_config,
    training_id,
)
from tunelab.hpsearch.store import ResultsStore, ScoreMatrix, load_results_table, ran_on_other_data, select
from tunelab.hpsearch.trial import check_eval_rows, trained_on
from tunelab.rundir import RunDir, check_writable, json_report, sweep_lock, sweep_running
from tunelab.signals import handling_stop_signals, stopping_when_reader_gone

console = stdout_console()
err_console = Console(stderr=True, soft_wrap=True, emoji=False)  # log lines stay whole

# ---------------------------------------------------------------------------------------------
# output paths, checked before any work


def _check_not_edited(files: dict[Path, str]) -> None:
    """Refuse to replace a config file that holds something else than what would be written: the user
    set its data.train, or it is another recommendation's (the same name from another sweep)."""
    for path, text in files.items():
        if path.is_file() and path.read_text(encoding="utf-8", errors="replace") != text:
            raise TunelabError(
                f"--write-config: {path} exists and differs from the config recommend writes (edited, or "
                "from another recommendation); move it, or choose another --write-config folder"
            )


def _write_text(path: Path, text: str) -> None:
    """Write `path`, creating its folder (checked by _check_writable before any work)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    err_console.print(f"wrote {path}", highlight=False)


# ---------------------------------------------------------------------------------------------
# sweep


class LazyStore:
    """The sweep's results database, created only when the first trial result arrives, so a sweep that
    stops before any trial finished (Ray unreachable, Ctrl-C) leaves no empty database behind.
    An existing database is opened (and checked to be tunelab's) at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = ResultsStore(path) if path.is_file() else None

    def finished(self, trial: Trial) -> bool:
        return self.store is not None and self.store.finished(
            trial.row_ids(), trial.dataset, trial.seed, trial.data_sha256
        )

    def record(self, trial: Trial, result: TrialResult) -> None:
        if self.store is None:
            self.store = ResultsStore(self.path)
        record(self.store, trial, result)

    def __enter__(self) -> LazyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.store is not None:
            self.store.close()


def _refuse_retraining_for_bookkeeping(trials: list[Trial], store: LazyStore, spec_path: Path) -> None:
    """A finished trial whose config now differs only in logging or checkpoint keys would train the same
    model again (config ids hold every key): stop before any trial, saying what changed."""
    if store.store is None:
        return
    sha = {trial.dataset: trial.data_sha256 for trial in trials}
    done = {  # results on the data as it is now (on edited data a trial trains again anyway)
        (row["dataset"], row["seed"], training_id(row["config"])): row["config"]
        for row in store.store.rows()
        if row["status"] == "done" and row["data_sha256"] in (None, sha.get(row["dataset"]))
    }
    for trial in trials:
        if store.finished(trial):
            continue
        for rank in trial.ranks or [None]:
            ours = rank_config(trial.config, rank)
            recorded = done.get((trial.dataset, trial.seed, training_id(ours)))
            changes = recorded and bookkeeping_changes(ours, recorded)
            if changes:
                changed = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changes.items())
                raise TunelabError(
                    f"{spec_path}: finished trials would train again only because {changed} changed; "
                    "these keys change what a run logs, saves or holds in memory, not what it learns: set "
                    "them back to keep the finished results, or give this sweep another --db"
                )


def _ranked_rows(store: LazyStore, versions: dict[str, str | None]) -> list[dict[str, Any]]:
    """The results in the database that recommend ranks: none on a dataset's files as they were before
    an edit (`versions`: each dataset's data_fingerprint)."""
    return [] if store.store is None else store.store.rows_on(versions)


def _check_metrics(trials: list[Trial], ranked: list[dict[str, Any]], db: Path) -> None:
    """A dataset is ranked by one metric: a spec that scores it by another than the results already in
    `db` (`ranked`) would leave them unrankable together, so it stops before any trial."""
    recorded: dict[str, set[str]] = {}
    for row in ranked:
        recorded.setdefault(row["dataset"], set()).add(row["metric"])
    for trial in trials:
        others = recorded.get(trial.dataset, set()) - {trial.metric}
        if others:
            raise TunelabError(
                f"{db}: dataset '{trial.dataset}' has results there scored by {', '.join(sorted(others))}, "
                f"and this spec scores it by {trial.metric}; recommend ranks a dataset by one metric: use "
                f"metric: {sorted(others)[0]}, name the dataset otherwise, or give this sweep another --db"
            )


def _note_results_not_in_spec(trials: list[Trial], ranked: list[dict[str, Any]], db: Path) -> None:
    """Say at the start, not after it, that finished results (`ranked`) of configs the spec no longer has
    (it was edited) stay in `db`, and that recommend ranks them beside this spec's."""
    others = {row["config_id"] for row in ranked if row["status"] == "done"} - _row_ids(trials)
    if others:
        err_console.print(
            f"note: {db} holds finished results of {plural(len(others), 'config')} this spec does not have "
            "(an earlier version of it, or another spec); they stay, and tunelab recommend ranks them "
            "beside this spec's, saying how many; give this sweep another --db to rank it alone",
            highlight=False,
        )


def _on_old_data(trial: Trial, store: LazyStore) -> bool:
    """Whether `trial` finished, but on its dataset's files as they were before an edit."""
    if store.store is None or trial.data_sha256 is None:
        return False
    ran = store.store.trial_state(trial.row_ids(), trial.dataset, trial.seed) == "done"
    return ran and not store.finished(trial)


def _data_versions(spec: SweepSpec) -> dict[str, str | None]:
    """Each dataset's data_fingerprint: results recorded on other data are not today's."""
    return {dataset.name: data_fingerprint(dataset) for dataset in spec.datasets}


def _on_data(trials: list[Trial], versions: dict[str, str | None]) -> list[Trial]:
    return [replace(trial, data_sha256=versions[trial.dataset]) for trial in trials]


def _data_key(trial: Trial) -> str:
    """What a trial's data loads with (its model's tokenizer, its data options): trials that share it
    read their data the same way, and fail on it the same way."""
    return json.dumps([trial.config["model"], trial.config["data"]], sort_keys=True)


def _work_dir(db: Path) -> Path:
    """Where the trials' runs go: next to the database."""
    return db.parent / f"{db.stem}-runs"


def _check_sweep(
    spec: SweepSpec,
    spec_path: Path,
    executor: str,
    address: str | None,
    db: Path,
    db_given: bool,
    trials: list[Trial],
) -> None:
    """Everything a sweep needs, checked before it writes anything or starts a trial."""
    for model in dict.fromkeys(trial.config["model"] for trial in trials):
        try:
            check_model(model)
        except TunelabError as exc:
            raise TunelabError(f"{spec_path}: {exc}{beside_the_spec(model, spec_path.parent)}") from None
    if executor == "local" and address:
        raise TunelabError("--address is for --executor ray; drop it or add --executor ray")
    if executor == "ray":
        check_ray()
    check_writable(db, "--db" if db_given else "the results database (--db)", folder=False)
    if _work_dir(db).exists() and not _work_dir(db).is_dir():  # its parent is db's: writable, as checked
        raise TunelabError(
            f"--db {db}: the trials' runs folder {_work_dir(db)} is a file; move it or choose another --db"
        )
    check_datasets(spec)
    _check_rows(spec_path, trials)


def _check_rows(spec_path: Path, trials: list[Trial]) -> None:
    """Each dataset's local files read as its trials' data options say (data.columns, data.format, eval
    rows enough to split into dev and test), before any trial: a trial would find a mistake there only
    after the trials before it, which may be hours."""
    from tunelab.config import DataConfig, check_source
    from tunelab.data import detect_format, load_rows

    checked: set[str] = set()
    for trial in trials:
        key = json.dumps(trial.config["data"], sort_keys=True)
        if key in checked:
            continue
        checked.add(key)
        options = DataConfig.model_validate(trial.config["data"])
        try:
            if check_source(options.train) is not None:
                detect_format(load_rows(options.train, options, options.split)[0], options.format)
            local = [options.train if options.holdout is not None else options.eval, trial.test]
            if options.eval_name and all(check_source(spec) is not None for spec in filter(None, local)):
                check_eval_rows(options, trial.test)
        except TunelabError as exc:
            raise TunelabError(f"{spec_path}: dataset '{trial.dataset}': {exc}") from None


STOPPING = (
    b"stopping: no new trial starts, and each running trial saves a checkpoint after its current step; "
    b"press Ctrl-C again to stop them at once\n"
)


@contextmanager
def _stopping_on_signals(processes: TrialProcesses) -> Iterator[None]:
    """Ctrl-C or SIGTERM stops a sweep the way it stops a training: each running trial finishes its
    optimizer step and saves a checkpoint, which the next sweep resumes. A Ctrl-C in the terminal
    reaches the trials too, a signal sent to the sweep alone does not: each is passed on as SIGTERM
    (a trial ignores a second one). A second Ctrl-C is passed on as SIGINT: the trials stop at once.

    The handler only passes signals on and writes one line (not through rich, whose console it may
    have interrupted): the sweep sees `processes.stopping` when its running trials have ended."""

    def handle(signum, frame) -> None:
        again = processes.stopping
        processes.stop(signal.SIGINT if again and signum == signal.SIGINT else signal.SIGTERM)
        if not again:  # on a terminal, over the progress bar's line (it is drawn again below)
            os.write(sys.stderr.fileno(), (b"\r\x1b[2K" if sys.stderr.isatty() else b"") + STOPPING)

    # the output's reader gone (`| head` exited): stopped as by SIGTERM, where a print would end the sweep
    with handling_stop_signals(handle), stopping_when_reader_gone(lambda: handle(signal.SIGTERM, None)):
        yield


class SweepProgress:
    """done / failed / remaining with an ETA: a progress bar on a terminal, one line per trial otherwise."""

    def __init__(self, label: str, trials: list[Trial], already_done: int, to_run: int) -> None:
        self.total, self.to_run = len(trials), to_run
        # what tells this sweep's trials apart, for the start lines (and the lr, which a confirmation
        # round's few trials may share)
        self.keys = list(
            dict.fromkeys([*varying_keys([hyperparameters(t.config) for t in trials]), "train.lr"])
        )
        self.seed_count = len({trial.seed for trial in trials})
        self.done, self.failed, self.finished_now, self.skipped = already_done, 0, 0, 0
        self.started = time.perf_counter()
        self.bar = Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeElapsedColumn(),
            console=err_console,
            disable=not err_console.is_terminal,
        )
        self.task = self.bar.add_task(
            "sweep", total=self.total, completed=already_done, counts=self._counts()
        )

    def _counts(self) -> str:
        remaining = self.to_run - self.finished_now - self.skipped
        eta = "?"
        if self.finished_now:  # the pace so far, parallelism included
            seconds = (time.perf_counter() - self.started) / self.finished_now * remaining
            eta = str(timedelta(seconds=round(seconds)))
        return f"done {self.done}, failed {self.failed}, remaining {remaining}, eta {eta}"

    def update(self, trial: Trial, result: TrialResult) -> None:
        self.finished_now += 1
        if result.failed:
            self.failed += 1
            line = f"[red]failed[/red] {trial.dataset} {trial.config_id}: {escape(result.error)}"
        else:
            self.done += 1
            seed = f" (seed {trial.seed})" if self.seed_count > 1 else ""  # else its lines would read alike
            line = f"done {trial.dataset} {trial.config_id}{seed}: {trial.metric} {result.score:.4f}"
            if len(result.rows or []) > 1:  # a dylora trial: a score at each rank it was evaluated at
                line = f"done {trial.dataset} {trial.config_id}{seed}: {trial.metric} at rank " + ", ".join(
                    f"{row['rank']} {row['score']:.4f}" for row in result.rows
                )
        line += f" ({result.duration_s or 0:.1f} s)"
        counts = self._counts()
        self.bar.update(self.task, completed=self.done + self.failed, counts=counts)
        if self.bar.disable:  # no bar to show the counts
            line = f"[{self.done + self.failed}/{self.total}] {line} | {counts}"
        err_console.print(line, highlight=False)

    def skip(self, count: int) -> None:
        """`count` trials will not run (their data failed to load in another trial)."""
        self.skipped += count
        self.bar.update(self.task, total=self.total - self.skipped, counts=self._counts())

    def start(self, trial: Trial, log: Path) -> None:
        """Which trial runs now and where its log is: a trial can take longer than a person waits for."""
        settings = hyperparameters(trial.config)
        varying = [f"{key}={settings[key]}" for key in self.keys if settings.get(key) is not None]
        what = " ".join(varying) or _describe(settings)
        run = RunDir(log.with_name(log.stem))  # the run folder beside its log
        checkpoint = run.latest_checkpoint()
        if trial.data_sha256 is not None and trained_on(run.path) != trial.data_sha256:  # starts it over
            goes_on = ", its run trained on other data: training anew" if run.is_run() else ""
        elif run.is_finished():
            goes_on = ", trained: evaluating"
        else:
            goes_on = f", resuming from {checkpoint.name}" if checkpoint else ""
        line = f"started {trial.dataset} {trial.config_id} ({what}, seed {trial.seed}){goes_on}: log {log}"
        err_console.print(escape(line), highlight=False)

    def __enter__(self) -> SweepProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()


def sweep(
    spec_path: Path = typer.Argument(
        ...,
        help="sweep spec YAML: base config, grid, zip, arms, datasets, seeds, confirm_seeds, ranks (README: "
        "Hyperparameter sweeps; examples/sweep.yaml)",
    ),
    db: Path = typer.Option(None, "--db", help="results database (default: SPEC.sqlite next to the spec)"),
    executor: Literal["local", "ray"] = typer.Option(
        "local",
        "--executor",
        help="local: subprocesses here; ray: Ray Tune trials (pip install 'tunelab\\[ray]')",
    ),
    address: str = typer.Option(
        None, "--address", help="ray: an existing cluster, e.g. ray://head:10001 (default: a local Ray)"
    ),
    max_parallel: int = typer.Option(
        None,
        "--max-parallel",
        min=1,
        help="trials at once (local: default 1, each with cores // N torch threads unless OMP_NUM_THREADS "
        "is set; ray: default what fits)",
    ),
    cpus_per_trial: float = typer.Option(1, "--cpus-per-trial", min=0, help="ray: CPUs each trial reserves"),
    gpus_per_trial: float = typer.Option(0, "--gpus-per-trial", min=0, help="ray: GPUs each trial reserves"),
) -> None:
    """Train and evaluate every (config, dataset) trial of SPEC, each in its own process.

    Run it again to resume: finished trials are skipped, failed and missing ones run again.
    """
    spec = load_spec(spec_path)
    trials = expand(spec)
    # expanded now, so that a bad confirm_seeds stops the sweep before the grid, not after it
    confirmations = expand(spec, seeds=spec.confirm_seeds) if spec.confirm_seeds else []
    db_given, db = db is not None, db or spec_path.with_suffix(".sqlite")
    work_dir = _work_dir(db)
    _check_sweep(spec, spec_path, executor, address, db, db_given, trials)
    versions = _data_versions(spec)
    trials, confirmations = _on_data(trials, versions), _on_data(confirmations, versions)
    processes = TrialProcesses()

    def run(what: str, label: str, trials: list[Trial], store: LazyStore) -> tuple[int, int, int]:
        """Run the unfinished `trials`: how many failed, of how many run, and how many were skipped."""
        if processes.stopping:  # stopped while the confirmations were being chosen
            return 0, 0, 0
        pending = [trial for trial in trials if not store.finished(trial)]
        err_console.print(
            f"{what}: {plural(len(trials), 'trial')}, {len(trials) - len(pending)} already done, "
            f"{len(pending)} to run -> {db} (runs in {work_dir})",
            highlight=False,
        )
        with SweepProgress(label, trials, len(trials) - len(pending), len(pending)) as progress:
            failed_data: set[str] = set()  # the model and data options of trials whose data did not load
            started: set[int] = set()

            def on_start(trial: Trial, log: Path) -> None:
                started.add(id(trial))
                progress.start(trial, log)

            def on_result(trial: Trial, result: TrialResult) -> None:
                store.record(trial, result)
                progress.update(trial, result)
                if executor == "local" and result.data_error and _data_key(trial) not in failed_data:
                    failed_data.add(_data_key(trial))
                    # the trials still to start on this data would each load the model, then fail the same way
                    waiting = [
                        t for t in pending if id(t) not in started and _data_key(t) == _data_key(trial)
                    ]
                    progress.skip(len(waiting))
                    others = "its other trial" if len(waiting) == 1 else f"its {len(waiting)} other trials"
                    skipping = f"; skipping {others} on this data" if waiting else ""
                    err_console.print(
                        f"the data of {trial.dataset} did not load{skipping}: fix what the error says, then "
                        "run the same command",
                        highlight=False,
                    )

            if executor == "local":
                # lazily, so that trials on data that failed to load are passed over
                queue = (trial for trial in pending if _data_key(trial) not in failed_data)
                run_local(queue, work_dir, on_result, max_parallel or 1, on_start, processes)
            else:
                run_ray(
                    pending, work_dir, on_result, address, max_parallel, cpus_per_trial, gpus_per_trial,
                    progress.start,
                )  # fmt: skip
        return progress.failed, len(pending) - progress.skipped, progress.skipped

    stopping = _stopping_on_signals(processes) if executor == "local" else nullcontext()
    with LazyStore(db) as store, sweep_lock(work_dir), stopping:  # an unusable --db: no runs folder
        _refuse_retraining_for_bookkeeping([*trials, *confirmations], store, spec_path)
        ranked = _ranked_rows(store, versions)
        _check_metrics(trials, ranked, db)
        _note_results_not_in_spec([*trials, *confirmations], ranked, db)
        halved = [dataset.name for dataset in spec.datasets if dataset.test is None]
        if halved:  # the split is the sweep's own doing: said once, not left to a footnote of recommend
            have = "has" if len(halved) == 1 else "have"
            err_console.print(
                f"note: {', '.join(halved)} {have} no test set: the eval rows are split in two by a fixed "
                "seed, dev (where configs are chosen) and test (only reported)",
                highlight=False,
            )
        for dataset in versions:
            stale = [trial for trial in trials if trial.dataset == dataset and _on_old_data(trial, store)]
            if stale:
                err_console.print(
                    f"note: the data of {dataset} changed since {len(stale)} of its trials ran: they run "
                    "again",
                    highlight=False,
                )
        failed, ran, skipped = run(f"sweep {spec_path}", "sweep", trials, store)
        confirmed: set[str] = set()
        # a best config's new seeds move its mean, and another config may become its arm's best: confirm
        # until every arm's best has all confirm_seeds (each round adds a config, so this ends)
        while confirmations and store.store is not None and not processes.stopping:
            confirming = _best_of_each_arm(confirmations, spec, store.store)
            if {trial.config_id for trial in confirming} <= confirmed:
                break
            confirmed |= {trial.config_id for trial in confirming}
            seeds = ", ".join(map(str, spec.confirm_seeds))
            what = f"confirm each arm's best config with seeds {seeds}"
            more_failed, more_ran, more_skipped = run(what, "confirm", confirming, store)
            failed, ran, skipped = failed + more_failed, ran + more_ran, skipped + more_skipped
    if processes.stopping:
        raise RunInterrupted(
            f"sweep stopped; its finished trials are in {db}. Run the same command to go on: it skips them, "
            "and each stopped trial resumes from its checkpoint"
        )
    if failed:
        also = f", and {skipped} more on the same data were skipped" if skipped else ""
        err_console.print(
            f"[red]{failed} of {plural(ran, 'trial')} failed[/red]{also} (errors in {db}, logs in "
            f"{work_dir}); run the same command again to retry {'them' if not skipped else 'all of them'}"
        )
        raise typer.Exit(1)
    err_console.print(
        f"[green]sweep finished[/green]: {plural(len(trials), 'trial')} and "
        f"{plural(sum(trial.config_id in confirmed for trial in confirmations), 'confirmation')} done; rank "
        f"them with tunelab recommend --db {shell_word(db)}",
        highlight=False,
    )


def _best_of_each_arm(confirmations: list[Trial], spec: SweepSpec, store: ResultsStore) -> list[Trial]:
    """The `confirmations` of each arm's best config so far: the highest mean dev s/best among the spec's
    own configs on its own datasets (a database may hold other sweeps' trials too)."""
    ids = _row_ids(confirmations)
    matrix = select(store.score_matrix(), ids, [dataset.name for dataset in spec.datasets])
    if not matrix.config_ids:
        return []
    entries = rank_matrix(matrix, tau=0.05).entries  # tau orders the ranking, not the mean s/best
    # an arm whose best config has a failed or missing trial is not confirmed: it would fail again
    best = {
        entry["config"]
        for entry in best_per_arm(arms(entries)).values()
        if all(score is not None for score in entry["dev"].values())
    }
    return [trial for trial in confirmations if best & set(trial.row_ids())]


# ---------------------------------------------------------------------------------------------
# recommend


def _train_config(config: dict[str, Any], source: str, comment: str) -> str:
    """A validated train config as YAML, under a comment saying where it comes from."""
    return f"# {comment}\n" + dump_config(validate(config, source))


def _recommend_published(model: str, method: str, json_path: Path | None, write_config: Path | None) -> None:
    configs = published_configs(model, method)
    table = Table(title=f"published CBS starting configs: {model} {method}")
    columns = [key for key in configs[0] if key not in ("model", "method", "source")]
    for column in ["#", *columns]:
        table.add_column(column, justify="right")
    for rank, config in enumerate(configs, start=1):
        table.add_row(str(rank), *(str(config[column]) for column in columns))
    console.print(table)
    console.print(
        f"batch_size is the effective batch (per device x grad_accum x devices); base model "
        f"{HUB_IDS[model.lower()]}",
        highlight=False,
    )
    console.print(f"source: {configs[0]['source']}", highlight=False)
    files = {}  # validated before anything is written
    if write_config:
        for rank, config in enumerate(configs, start=1):
            path = write_config / f"{config['model']}-{config['method']}-{rank}.yaml"
            train_config = {"model": HUB_IDS[config["model"]], **to_train_config(config)}
            train_config["data"] = {**train_config.get("data", {}), "train": YOUR_DATA}
            comment = f"{config['source']}; set data.train (now {YOUR_DATA}) and data.eval to your data"
            files[path] = _train_config(train_config, str(path), comment)
    _check_not_edited(files)
    if json_path:
        _write_text(json_path, json.dumps({"published": configs}, indent=2))
    for path, text in files.items():
        _write_text(path, text)


def _ranking_table(ranking: list[dict[str, Any]], n_datasets: int, top: int, title: str) -> Table:
    keys = varying_keys([entry["hyperparameters"] for entry in ranking])
    usual = usual_values([entry["hyperparameters"] for entry in ranking], keys)
    with_test = any(entry["test_mean_normalized"] is not None for entry in ranking)
    table = Table(title=title)
    if usual:
        table.caption = "where a row does not say: " + " ".join(f"{k}={v}" for k, v in usual.items())
    # top-K: the configs ranked this high together, the row's and those above it
    columns = ["#", "config", "hyperparameters", "newly covers", "top-K covers", "mean s/best", "top-K score"]
    for column in columns + (["test s/best"] if with_test else []):
        left = column in ("hyperparameters", "newly covers")
        # ids are copied from here: never cut one short; long values wrap instead of ending in "…"
        table.add_column(
            column, justify="left" if left else "right", no_wrap=column == "config", overflow="fold"
        )
    for entry in ranking[:top]:
        # a key another method has and this one lacks reads None: leave it out
        settings = " ".join(
            f"{key}={value}"
            for key in keys
            if (value := entry["hyperparameters"].get(key)) is not None
            and (key not in usual or value != usual[key])
        )
        if all(score is None for score in entry["dev"].values()):  # its 0 s/best is no score it reached
            settings += " (every trial failed)"
        table.add_row(
            str(entry["rank"]),
            entry["config"],
            settings,
            ", ".join(entry["covers"]) or "-",
            f"{entry['covered_total']}/{n_datasets}",
            f"{entry['mean_normalized']:.3f}",
            f"{entry['top_k']:.3f}",
            *([_score(entry["test_mean_normalized"])] if with_test else []),
        )
    return table


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _start_from(entry: dict[str, Any], datasets: list[str]) -> Table:
    """The top config on each dataset: dev score (mean ± spread over seeds), how close to the dataset's
    best, and the test score it reports."""
    table = Table()  # under the "start from" line, which names the config
    for column in ("dataset", "dev", "dev s/best", "test", "seeds"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for dataset in datasets:
        dev, spread, test = (
            entry["dev"].get(dataset),
            entry["spread"].get(dataset),
            entry["test"].get(dataset),
        )
        table.add_row(
            dataset,
            "-" if dev is None else f"{dev:.4f}" + (f" ± {spread:.4f}" if spread else ""),
            f"{entry['dev_normalized'][dataset]:.3f}",
            "-" if test is None else f"{test:.4f}",
            str(int(entry["seeds"].get(dataset) or 0)),
        )
    return table


def _describe(hyperparameters: dict[str, Any], brief: bool = False) -> str:
    """The hyperparameters a reader looks for first; `brief`: those that differ within a method."""
    keys = ("method.rank", "train.lr")
    if not brief:
        keys = ("method.name", "method.r", "method.num_tunable", "quantization", *keys)
    return " ".join(f"{key}={hyperparameters[key]}" for key in keys if hyperparameters.get(key) is not None)


def _relative_spread(entry: dict[str, Any]) -> float | None:
    """How much the test score moves with the seed: the mean over datasets of its standard deviation over
    seeds relative to its mean; None until some dataset has two seeds."""
    ratios = [
        spread / abs(entry["test"][dataset])
        for dataset, spread in entry["test_spread"].items()
        if spread is not None and (entry["seeds"].get(dataset) or 0) > 1 and entry["test"][dataset]
    ]
    return statistics.mean(ratios) if ratios else None


def _arms_table(groups: dict[str, list[dict[str, Any]]]) -> Table:
    """Which method: each arm's best config (highest mean dev s/best), its test s/best, how much that
    moves with the seed, and what the arm costs (median step time and peak memory over its configs)."""
    table = Table(title="each arm at its best config (chosen on dev)")
    columns = ("arm", "configs", "best config", "dev s/best", "test s/best", "seeds", "seed spread")
    for column in (*columns, "s/step", "peak GiB"):
        table.add_column(column, justify="left" if column in ("arm", "best config") else "right")
    for arm, best in best_per_arm(groups).items():
        costs = [entry["cost"] for entry in groups[arm] if entry["cost"]]
        times = [cost["step_time_s"] for cost in costs if cost["step_time_s"] is not None]
        memory = [cost["peak_memory_bytes"] for cost in costs if cost["peak_memory_bytes"]]
        test, spread = best["test_mean_normalized"], _relative_spread(best)
        table.add_row(
            arm,
            str(len(groups[arm])),
            f"{best['config']} {_describe(best['hyperparameters'], brief=True)}",
            f"{best['mean_normalized']:.3f}",
            _score(test),
            str(int(min(seeds))) if (seeds := [n for n in best["seeds"].values() if n]) else "-",
            "-" if spread is None else f"±{spread:.1%}",
            f"{statistics.median(times):.2f}" if times else "-",
            f"{statistics.median(memory) / 2**30:.2f}" if memory else "-",
        )
    return table


def _held_out_table(ranking: Any, top: int) -> Table:
    table = Table(title="does the ranking transfer? leave one dataset out, rank on the rest")
    for column in ("K", "mean s/best, ranked on all", "on the held-out dataset"):
        table.add_column(column, justify="right")
    for k in range(min(top, len(ranking.top_k_curve))):
        table.add_row(str(k + 1), f"{ranking.top_k_curve[k]:.3f}", f"{ranking.held_out_curve[k]:.3f}")
    return table


def _recommend_cbs(
    matrix: ScoreMatrix,
    source: Path,
    tau: float,
    top: int,
    json_path: Path | None,
    write_config: Path | None,
    plot_dir: Path | None,
    cross_validate: bool = False,
    progress: SweepStatus | None = None,
) -> None:
    result = rank_matrix(matrix, tau, cross_validate)
    ranking = result.entries

    # every config is validated before anything is written: a bad one leaves no partial output
    files = _cbs_config_files(ranking[:top], matrix, source, write_config) if write_config else {}
    _check_not_edited(files)

    from tunelab.plots import coverage_curve, lr_curve  # matplotlib: only when there is a curve to draw

    plot = None
    if plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
        plot = coverage_curve(
            result.top_k_curve,
            plot_dir / f"{source.stem}-coverage.png",
            title=f"{source.name}: top-K coverage (tau={tau})",
            held_out=result.held_out_curve,
        )
    shape = f"{plural(len(matrix.config_ids), 'config')} x {plural(len(matrix.datasets), 'dataset')}"
    if len(ranking) > top:  # the title counts them all: say where the rest went
        shape += f"; the top {top} shown, --top {len(ranking)} shows all"
    if progress and progress.finished is False:
        shape += "; provisional, the sweep is not finished"
    console.print(
        _ranking_table(ranking, len(matrix.datasets), top, f"CBS ranking of {source.name} ({shape})")
    )
    if ranking[0]["test"]:  # a sweep database: ranked on dev, test reported
        entry = ranking[0]
        console.print(
            f"[bold]start from[/bold] config {entry['config']}: {_describe(entry['hyperparameters'])}",
            highlight=False,
            soft_wrap=True,
        )
        console.print(_start_from(entry, result.datasets))
        console.print(
            "[dim]dev: each dataset's eval set, where configs are chosen; test: its test set, only "
            "reported (a dataset without one has its eval rows split in two by a fixed seed, dev the first "
            "half)[/dim]",
            highlight=False,
            soft_wrap=True,
        )
    # a results table without tunelab's config keys has no arms
    groups = arms(ranking) if any("method.name" in entry["hyperparameters"] for entry in ranking) else {}
    if groups:
        console.print(_arms_table(groups))
    curves = {arm: points for arm, points in scores_by_lr(groups).items() if len(points) > 1}
    for arm, edge in best_lr_at_grid_edge(curves).items():
        lrs = ", ".join(f"{lr:g}".replace("e-0", "e-") for lr, _ in curves[arm])
        beyond = "higher" if edge == "highest" else "lower"
        console.print(
            f"[yellow]note[/yellow]: {escape(arm)} is best at the {edge} lr it tried ({lrs}); its best may "
            f"lie {beyond}: try a {beyond} lr",
            highlight=False,
        )
    if result.held_out_curve is not None:
        console.print(_held_out_table(result, top))
    if result.uncovered:
        console.print(
            f"no config covers: {', '.join(result.uncovered)} (no positive score recorded)", highlight=False
        )
    if result.missing_trials:
        verb = "counts" if result.missing_trials == 1 else "count"
        console.print(
            f"{plural(result.missing_trials, 'result')} of the ranked configs missing (failed or not run; a "
            f"dylora trial gives one per rank) {verb} as covering nothing",
            highlight=False,
        )
    if progress and progress.finished is False:
        console.print(
            f"[yellow]provisional[/yellow]: {escape(progress.text)}; the ranking covers the trials done",
            highlight=False,
            soft_wrap=True,  # one line: the command in it stays whole for copying
        )
    elif progress:
        console.print(f"note: {escape(progress.text)}", highlight=False, soft_wrap=True)
    if plot_dir is None:
        console.print(
            f"plots not drawn: cannot write in {source.parent}; give --out DIR to draw them there",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print(f"coverage curve: {plot}", highlight=False)
    if curves and plot_dir is not None:
        lr_plot = lr_curve(curves, plot_dir / f"{source.stem}-lr.png", f"{source.name}: dev score vs lr")
        console.print(f"learning-rate curves: {lr_plot}", highlight=False)
    if json_path:
        _write_text(json_path, json.dumps(result.as_json(), indent=2))
    for path, text in files.items():
        _write_text(path, text)
    earlier = (
        sorted(path.name for path in write_config.glob("cbs-*.yaml") if path not in files) if files else []
    )
    if earlier:
        console.print(
            f"note: {write_config} also holds {len(earlier)} config(s) of an earlier recommendation "
            f"({', '.join(earlier[:3])}{', ...' if len(earlier) > 3 else ''})",
            highlight=False,
            soft_wrap=True,
        )
    if files:
        first = next(iter(files))
        data = " data.train=PATH/TO/your_data.jsonl" if f"train: {YOUR_DATA}" in files[first] else ""
        console.print(
            f"next: tunelab train {shell_word(first)}{data}", highlight=False, soft_wrap=True, markup=False
        )
    elif ranking:
        console.print(
            f"next: add --write-config DIR to write the top {min(top, len(ranking))} as train configs",
            highlight=False,
        )


def _cbs_config_files(
    ranking: list[dict[str, Any]], matrix: ScoreMatrix, source: Path, folder: Path
) -> dict[Path, str]:
    """The train YAML of each ranked config, by the path it goes to: its hyperparameters and the seed of
    one of its trials; the sweep's data when it had one dataset, else a placeholder to replace."""
    files = {}
    for entry in ranking:
        path = folder / f"cbs-{entry['rank']}-{entry['config']}.yaml"
        covers = ", ".join(entry["covers"]) or "nothing new"
        comment = f"ranked {entry['rank']} by CBS in {source.name} (covers {covers})"
        where = f"{source}: config {entry['config']} (hyperparameters must be config keys, e.g. train.lr)"
        hyperparameters = dict(entry["hyperparameters"])
        rank = hyperparameters.pop(EVAL_RANK_KEY, None)
        if rank is not None:  # a dylora row: the config trains every rank; this one was chosen
            comment += f"; evaluate and export its adapter at rank {rank} (--rank {rank})"
        trial = flatten(matrix.configs[entry["config"]])  # one of its trials (a results table: none)
        if "model" in hyperparameters:  # as the trials read it: from the working directory
            hyperparameters["model"] = model_location(hyperparameters["model"])
        if "train.seed" in trial:
            hyperparameters["train.seed"] = trial["train.seed"]
        if len(matrix.datasets) == 1 and "data.train" in trial:
            hyperparameters |= {key: trial.get(key) for key in ("data.train", "data.eval", "data.holdout")}
            hyperparameters |= {key: value for key, value in trial.items() if key.startswith("data.columns.")}
            comment += (
                f"; trains on the sweep's dataset {matrix.datasets[0]}: set data.train / data.eval (or "
                "data.holdout) for yours"
            )
        else:
            hyperparameters |= {"data.train": YOUR_DATA, "data.eval": None}
            comment += f"; set data.train (now {YOUR_DATA}) and data.eval to your data"
        if "train.max_steps" in trial:  # the budget it was chosen at; trials evaluated after training
            comment += (
                f"; train.max_steps {trial['train.max_steps']} as the sweep's trials; set train.eval_steps "
                "to evaluate on data.eval while training, or run tunelab eval RUN after"
            )
        files[path] = _train_config(nest(hyperparameters), where, comment)
    return files


_INPUT_SUFFIXES = {"--db": (".sqlite",), "--results": (".csv", ".parquet")}
_INPUT_HINTS = {
    "--db": "pass the .sqlite file that `tunelab sweep` writes (SPEC.sqlite by default)",
    "--results": "pass a .csv or .parquet table with columns config, dataset, score",
}


def _spec_beside(db: Path) -> Path | None:
    """SPEC.yaml for SPEC.sqlite (as `tunelab sweep` names its database), if it is there."""
    return next((path for path in map(db.with_suffix, (".yaml", ".yml")) if path.is_file()), None)


def _what_next(db: Path, spec: Path | None) -> str:
    """What to do while `db` holds no result to rank: run its sweep, or wait for the sweep running into it
    (which refuses a second one)."""
    running = sweep_running(_work_dir(db))
    if running:
        return f"recommend again once the tunelab sweep running into it (pid {running}) has finished a trial"
    return f"run tunelab sweep {shell_word(spec)}" if spec else "run `tunelab sweep` first"


def _check_input(path: Path, option: str) -> None:
    if not path.exists():
        if option == "--db" and path.suffix != ".sqlite" and path.parent.is_dir():  # spec.sqllite
            near = closest(path.name, [database.name for database in path.parent.glob("*.sqlite")])
            if near:
                raise TunelabError(f"--db: file not found: {path}; did you mean {path.with_name(near)}?")
        spec = _spec_beside(path) if option == "--db" else None
        if spec is not None:  # the sweep has not written it yet: the fix is to run it, not another file
            raise TunelabError(
                f"--db {path} does not exist yet: no trial of {spec} has finished; {_what_next(path, spec)}"
            )
        hint = did_you_mean(path, keep=folders_or(*_INPUT_SUFFIXES[option])) or f"; {_INPUT_HINTS[option]}"
        raise TunelabError(f"{option}: file not found: {path}{hint}")
    if not path.is_file():
        raise TunelabError(f"{option} {path} is a folder, not a file; {_INPUT_HINTS[option]}")


def recommend(
    model: str = typer.Option(None, "--model", help="published configs for: llama-3-8b | mistral-7b"),
    method: str = typer.Option(None, "--method", help="published configs for: lora | full"),
    db: Path = typer.Option(None, "--db", help="rank the trials of a `tunelab sweep` database"),
    results: Path = typer.Option(
        None,
        "--results",
        help="rank a long-format table (.csv/.parquet): config, dataset, score, optional metric or "
        "higher_is_better; other columns are the config's hyperparameters",
    ),
    tau: float = typer.Option(
        0.05, "--tau", help="a config covers a dataset within this fraction of its best"
    ),
    top: int = typer.Option(5, "--top", min=1, help="configs to show and to write with --write-config"),
    json_path: Path = typer.Option(None, "--json", help="write the full ranking and top-K curve as JSON"),
    write_config: Path = typer.Option(
        None, "--write-config", help="write the top configs as train YAMLs here"
    ),
    out: Path = typer.Option(
        None, "--out", help="folder for the coverage-curve PNG (default: next to the input)"
    ),
    cross_validate: bool = typer.Option(
        False,
        "--cross-validate",
        help="also rank without each dataset in turn and score the top K on it: does the ranking transfer?",
    ),
) -> None:
    """Hyperparameters to start from: published configs, or the CBS ranking of a sweep or results table.

    --model M --method M: the CBS paper's configs. --db / --results: coverage-based ranking of your grid.
    """
    given = {"--model/--method": model or method, "--db": db, "--results": results}
    sources = [name for name, value in given.items() if value]
    if len(sources) != 1:
        raise TunelabError(
            "give one of: --model M --method M (published configs), --db RESULTS.sqlite, --results TABLE.csv"
            + (f"; got {' and '.join(sources)}" if sources else "")
        )
    if json_path:
        check_writable(json_path, "--json", folder=False, ours=json_report("tau", "published"))
    if write_config:
        check_writable(write_config, "--write-config", folder=True)
    if model or method:
        if not (model and method):
            raise TunelabError(
                "published configs need both --model (llama-3-8b, mistral-7b) and --method (lora, full)"
            )
        _recommend_published(model, method, json_path, write_config)
        return
    source = db or results
    _check_input(source, sources[0])
    plot_dir: Path | None = out or source.parent
    try:
        check_writable(plot_dir, "--out", folder=True)
    except TunelabError:
        if out:
            raise
        plot_dir = None  # the input's folder is read-only, or a colleague's: the tables still show
    progress = None
    if db:
        spec = _spec_beside(db)
        run_it = f"tunelab sweep {shell_word(spec)}" if spec else "`tunelab sweep` first"
        if db.stat().st_size == 0:  # created by a sweep stopped as its first result was being written
            raise TunelabError(f"{db} holds no trials yet; {_what_next(db, spec)}")
        versions = _spec_data_versions(spec)
        with ResultsStore(db, read_only=True) as store:
            matrix = store.score_matrix(versions)
            progress = _sweep_status(db, store, versions)
            rows = store.rows()
        on_today = [not ran_on_other_data(row["data_sha256"], versions.get(row["dataset"])) for row in rows]
        stale = [row for row, today in zip(rows, on_today, strict=True) if not today]
        if stale:
            edited = ", ".join(sorted({row["dataset"] for row in stale}))
            count = f"{len(stale)} result{'s' if len(stale) > 1 else ''}"
            listed = _spec_row_ids(spec)
            unlisted = sum(listed is not None and row["config_id"] not in listed for row in stale)
            again = f"; {run_it} runs them again" if not unlisted else ""
            if unlisted:  # a sweep runs what its spec lists: not the configs it has since dropped
                rerun = len(stale) - unlisted
                again = f"; {run_it} runs the {rerun} it still lists again" if rerun else ""
                dropped = f"of configs {spec} no longer lists, which it does not run"
                again += f"; {unlisted} {_are(unlisted)} {dropped}"
            err_console.print(
                f"note: {count} in {db} ran on data of {edited} since edited: left out of the ranking{again}",
                highlight=False,
                soft_wrap=True,
            )
            rows = [row for row, today in zip(rows, on_today, strict=True) if today]
        if not any(row["status"] == "done" for row in rows):
            if stale and not rows:
                raise TunelabError(f"every result in {db} ran on data since edited; {_what_next(db, spec)}")
            if rows:  # a ranking of nothing but failures would still name a config to start from
                latest = max(rows, key=lambda row: row["finished_at"] or "")
                raise TunelabError(
                    f"no trial in {db} has finished; the latest failed with: {latest['error']}; fix that, "
                    f"then {_what_next(db, spec)}"
                )
            raise TunelabError(f"{db} holds no trials yet; {_what_next(db, spec)}")
    else:
        matrix = load_results_table(results)
    _recommend_cbs(matrix, source, tau, top, json_path, write_config, plot_dir, cross_validate, progress)


def _are(count: int) -> str:
    """The verb after "N of the M trials": "1 of the 3 trials is done", "2 of the 3 trials are done"."""
    return "is" if count == 1 else "are"


class SweepStatus(NamedTuple):
    finished: bool | None  # None: not known
    text: str


def _spec_data_versions(spec_path: Path | None) -> dict[str, str | None]:
    """The data_fingerprint of each dataset of the spec at `spec_path`; none when there is no spec or it
    does not load (_sweep_status says so)."""
    try:
        return _data_versions(load_spec(spec_path)) if spec_path else {}
    except TunelabError:
        return {}


def _expanded(spec_path: Path) -> tuple[SweepSpec, list[Trial], list[Trial]]:
    """A spec, its grid's trials and its confirmation trials."""
    spec = load_spec(spec_path)
    return spec, expand(spec), expand(spec, seeds=spec.confirm_seeds) if spec.confirm_seeds else []


def _spec_row_ids(spec_path: Path | None) -> set[str] | None:
    """The config ids of the result rows a spec's sweep writes; None without a spec, or one that does not
    load."""
    if spec_path is None:
        return None
    try:
        _, grid, confirmations = _expanded(spec_path)
    except TunelabError:
        return None
    return _row_ids([*grid, *confirmations])


def _row_ids(trials: list[Trial]) -> set[str]:
    return {row_id for trial in trials for row_id in trial.row_ids()}


def _sweep_status(db: Path, store: ResultsStore, versions: dict[str, str | None]) -> SweepStatus | None:
    """How much of its sweep is still to run, when the spec lies beside the database (SPEC.yaml for
    SPEC.sqlite, as `tunelab sweep` names it), its data as `versions` (_spec_data_versions); None when it
    is all done or there is no spec."""
    spec_path = _spec_beside(db)
    if spec_path is None:
        return None
    try:
        spec, grid, confirmations = _expanded(spec_path)
    except TunelabError as exc:
        return SweepStatus(None, f"{spec_path} does not load ({exc}): how much of its sweep ran is unknown")

    def state(trial: Trial) -> str | None:
        return store.trial_state(trial.row_ids(), trial.dataset, trial.seed, versions.get(trial.dataset))

    states = [state(trial) for trial in grid]
    done, failed = states.count("done"), states.count("failed")
    if not done + failed:
        return SweepStatus(None, f"no trial of {spec_path} is in {db}: is that another sweep's spec?")
    # configs of an earlier version of the spec (a grid value since removed) are results too: ranked
    spec_ids = _row_ids([*grid, *confirmations])
    ranked = {row["config_id"] for row in store.rows_on(versions)}  # none on data since edited
    others = len(ranked - spec_ids)
    other = (
        f"; {others} of the configs in {db} {_are(others)} not in {spec_path} (ranked too)" if others else ""
    )
    resume = f"tunelab sweep {shell_word(spec_path)} runs what is missing or failed"
    if done < len(grid):
        failures = f", {failed} failed" if failed else ""
        return SweepStatus(
            False,
            f"{done} of the {len(grid)} trials of {spec_path} {_are(done)} done{failures} ({resume}){other}",
        )
    confirming = _best_of_each_arm(confirmations, spec, store) if confirmations else []
    confirmed = sum(state(trial) == "done" for trial in confirming)
    if confirmed < len(confirming):
        text = (
            f"the grid of {spec_path} is done; {confirmed} of the {len(confirming)} trials confirming each "
            f"arm's best with more seeds {_are(confirmed)} done ({resume}){other}"
        )
        return SweepStatus(False, text)
    return SweepStatus(True, other.removeprefix("; ")) if other else None
