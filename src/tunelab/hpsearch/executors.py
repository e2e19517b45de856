"""Sweep executors: run trials, each in its own `python -m tunelab.hpsearch.trial` process, and hand each
result to a callback in this process as soon as that trial finishes (so only this process writes the db).

- local: up to `max_parallel` trial processes on this machine. Each one's torch gets
  cores // max_parallel threads (OMP_NUM_THREADS, unless already set): threads that outnumber the
  cores (other work on the machine included) slow training down many times over, not by a fraction.
- ray: Ray Tune trials (`pip install 'tunelab[ray]'`) on a local Ray or an existing cluster (`address`),
  each reserving `cpus_per_trial` / `gpus_per_trial`; the Tune trial runs the same trial process with as
  many threads as CPUs it reserved (and the GPUs Ray gave it). On a multi-node cluster a trial's run
  directory is written on the node that ran it, at the same path, and relative paths in the spec are read
  from the sweep's working directory there too (use a shared filesystem, or absolute paths present on
  every node).

A trial's files, under the sweep's work dir: <dataset>/<config_id>-s<seed>/ (the run), and beside it
the same name with .yaml (its train config, `tunelab train` can run it again), .log (its output),
.result.json, .data_sha256 (the fingerprint of the data files its run trained on: after an edit the
run starts over), and while a stopped or failed attempt waits for the next, .attempts.json (the earlier
attempts' start, wall time and peak memory, which the trial's recorded row adds up).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import TunelabError
from tunelab.hpsearch.spec import Trial, config_id, rank_config
from tunelab.hpsearch.store import ResultsStore
from tunelab.rundir import write_atomically


@dataclass
class TrialResult:
    score: float | None = None  # the dataset's metric on dev (first row); None when the trial failed
    error: str | None = None
    metrics: dict[str, float] | None = None  # everything the evaluation measured (first row)
    rows: list[dict[str, Any]] | None = None  # per evaluated rank: rank, score, test_score, metrics, ...
    peak_memory_bytes: int | None = None
    step_time_s: float | None = None  # median optimizer step
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None  # wall time of the trial's processes (all its attempts), imports included
    data_error: bool = False  # failed reading its data: so will every trial with the same model and data

    @property
    def failed(self) -> bool:
        return self.error is not None


NOT_STARTED = "not started: the sweep was stopping"


class TrialProcesses:
    """The trial processes a local sweep has running. After stop() no new one starts: a trial about to
    start gets a failed result instead (`stopping` tells it from a real failure)."""

    def __init__(self) -> None:
        # a process starts, or the stop reaches it, never a mix; reentrant, since a second signal may
        # run the handler's stop() inside the first one's
        self._lock = threading.RLock()
        self._running: set[subprocess.Popen] = set()
        self.stopping = False

    def start(self, command: list[str], log_path: Path, **popen_args: Any) -> subprocess.Popen | None:
        """`command` started with its output appended to `log_path` (an earlier attempt's lines stay
        above), or None once stopping."""
        with self._lock:
            if self.stopping:
                return None
            with open(log_path, "a") as log:
                if log.tell():
                    log.write(f"\n--- attempt started {_now()} ---\n")
                    log.flush()  # before the child's output
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **popen_args)
            self._running.add(process)
            return process

    def wait(self, process: subprocess.Popen) -> None:
        try:
            process.wait()
        finally:
            with self._lock:
                self._running.discard(process)

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Start no more trials, and send `signum` to the running ones: on SIGTERM a trial finishes its
        optimizer step and saves a checkpoint, which its next attempt resumes; a SIGINT after that
        stops it at once."""
        with self._lock:
            self.stopping = True
            for process in self._running:
                process.send_signal(signum)


OnResult = Callable[[Trial, TrialResult], None]
OnStart = Callable[[Trial, Path], None]  # a trial and its log file, as it starts


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def available_cores() -> int:
    """CPU cores this process may run on (the container's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def trial_dir(work_dir: Path, trial: Trial) -> Path:
    return work_dir / trial.dataset / trial.run_name


def trial_log(run_dir: Path) -> Path:
    """The trial processes' stdout and stderr (every attempt's), beside the run folder."""
    return run_dir.with_name(f"{run_dir.name}.log")


def run_trial_process(
    trial: Trial,
    run_dir: Path,
    threads: int,
    cwd: str | None = None,
    processes: TrialProcesses | None = None,
) -> TrialResult:
    """Train and evaluate `trial` in a child process writing into `run_dir`; a failed trial does not raise.

    Relative paths in the trial's config are read from `cwd` (default: this process's). The process is
    one of `processes` (default: a set of its own), so it does not start once they are stopping.
    """
    processes = processes or TrialProcesses()
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    config_path = run_dir.with_name(f"{run_dir.name}.yaml")
    result_path = run_dir.with_name(f"{run_dir.name}.result.json")
    log_path = trial_log(run_dir)
    result_path.unlink(missing_ok=True)  # from an earlier attempt
    attempts_path = run_dir.with_name(f"{run_dir.name}.attempts.json")
    earlier = _read_attempts(attempts_path)
    config_path.write_text(yaml.safe_dump({**trial.config, "output_dir": str(run_dir)}, sort_keys=False))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [
        sys.executable,
        "-m",
        "tunelab.hpsearch.trial",
        str(config_path),
        trial.metric,
        str(result_path),
        json.dumps({"ranks": list(trial.ranks), "test": trial.test, "data_sha256": trial.data_sha256}),
    ]
    started_at, start = _now(), time.perf_counter()
    process = processes.start(command, log_path, env=env, cwd=cwd)
    if process is None:
        return TrialResult(error=NOT_STARTED)
    processes.wait(process)
    elapsed = time.perf_counter() - start
    if result_path.is_file():
        result = TrialResult(**json.loads(result_path.read_text()))
    else:  # killed (e.g. out of memory) or crashed before writing its result
        error = f"trial process exited with code {process.returncode} without a result; see {log_path}"
        result = TrialResult(error=error)
    # what the trial cost is the sum of its attempts: a stopped one resumes, a failed one is retried
    result.started_at = earlier.get("started_at", started_at)
    result.finished_at = _now()
    result.duration_s = earlier.get("duration_s", 0.0) + elapsed
    peaks = [peak for peak in (earlier.get("peak_memory_bytes"), result.peak_memory_bytes) if peak]
    result.peak_memory_bytes = max(peaks, default=None)
    scores = [value for row in result.rows or [] for value in (row["score"], row["test_score"])]
    if result.error is None and not all(math.isfinite(score) for score in scores):
        result.error, result.score = f"{trial.metric} is not finite (did training diverge?)", None
    if result.failed:
        attempts = {key: getattr(result, key) for key in ("started_at", "duration_s", "peak_memory_bytes")}
        write_atomically(attempts_path, json.dumps(attempts))  # never half a file, even on a kill
    else:
        attempts_path.unlink(missing_ok=True)
    return result


def _read_attempts(path: Path) -> dict[str, Any]:
    """The earlier attempts' start, wall time and peak; {} when there were none (or the file is
    unreadable: a trial's cost is worth less than the sweep going on)."""
    try:
        attempts = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return attempts if isinstance(attempts, dict) else {}


def record(store: ResultsStore, trial: Trial, result: TrialResult) -> None:
    """One trial's result rows (one per evaluated rank) into the store, in one transaction."""
    rows = result.rows if not result.failed else [{"rank": rank} for rank in trial.ranks or [None]]
    store.record_rows(
        [
            {
                "config_id": config_id(rank_config(trial.config, row["rank"])),
                "config": rank_config(trial.config, row["rank"]),
                "dataset": trial.dataset,
                "seed": trial.seed,
                "metric": trial.metric,
                "rank": row["rank"],
                "score": row.get("score"),
                "test_score": row.get("test_score"),
                "status": "failed" if result.failed else "done",
                "error": result.error,
                "duration_s": result.duration_s,
                "step_time_s": result.step_time_s,
                "peak_memory_bytes": result.peak_memory_bytes,
                "started_at": result.started_at,
                "finished_at": result.finished_at,
                "data_sha256": trial.data_sha256,
            }
            for row in rows
        ]
    )


def run_local(
    trials: Iterable[Trial],
    work_dir: Path,
    on_result: OnResult,
    max_parallel: int = 1,
    on_start: OnStart | None = None,
    processes: TrialProcesses | None = None,
) -> None:
    """Run `trials`, at most `max_parallel` at once, as `processes` (default: a set of its own);
    `on_result` and `on_start` run in this thread as each one finishes or starts. A trial starts only
    after the one it replaces is handed to `on_result`, so "done A" is told before "started B".

    Once `processes` are stopping, no trial starts and this returns when the running ones have ended;
    their failed results (stopped, or not started) are not handed on: the next attempt resumes them."""
    processes = processes or TrialProcesses()
    # OMP_NUM_THREADS set by the user (e.g. on a machine shared with other work) wins
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, available_cores() // max_parallel))
    queued = iter(trials)
    running: dict[Future, Trial] = {}

    def start_next() -> None:
        trial = None if processes.stopping else next(queued, None)
        if trial is None:
            return
        run_dir = trial_dir(work_dir, trial)
        if on_start is not None:
            on_start(trial, trial_log(run_dir))
        running[pool.submit(run_trial_process, trial, run_dir, threads, processes=processes)] = trial

    pool = ThreadPoolExecutor(max_parallel)
    try:
        for _ in range(max_parallel):
            start_next()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                trial, result = running.pop(future), future.result()
                if not (processes.stopping and result.failed):
                    on_result(trial, result)
                start_next()
    finally:
        pool.shutdown(wait=False)


def check_ray() -> None:
    """Fail before the sweep writes anything when Ray is not installed."""
    if importlib.util.find_spec("ray") is None:
        raise TunelabError(
            "--executor ray needs Ray, which is not installed: pip install 'tunelab[ray]' "
            "(or run the trials here with --executor local)"
        )


def _start_ray(address: str | None) -> None:
    import ray

    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, RuntimeError, ValueError) as exc:  # Ray's errors for an address it cannot use
        where = f" at {address}" if address else " locally"
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunelabError(
            f"--executor ray: cannot start or reach Ray{where} ({message}); check --address"
        ) from None


def run_ray(
    trials: list[Trial],
    work_dir: Path,
    on_result: OnResult,
    address: str | None = None,
    max_parallel: int | None = None,
    cpus_per_trial: float = 1,
    gpus_per_trial: float = 0,
    on_start: OnStart | None = None,
) -> None:
    """Run `trials` as Ray Tune trials; `on_result` and `on_start` run in this process as each one
    completes or starts (the log file `on_start` names is on the node that runs the trial)."""
    check_ray()
    import ray
    from ray import tune

    # Ray runs each trial function in a directory of its own: paths must not depend on it
    work_dir, cwd = work_dir.resolve(), os.getcwd()
    threads = max(1, int(cpus_per_trial))

    def trainable(params: dict[str, Any]) -> dict[str, Any]:
        trial = trials[params["index"]]
        return asdict(run_trial_process(trial, trial_dir(work_dir, trial), threads, cwd))

    result_keys = [field.name for field in fields(TrialResult)]

    class RecordResults(tune.Callback):
        """Hands each completed Tune trial's result to `on_result`, and each started one's log to
        `on_start`, in this (the driver's) process. Both are attributes, not closure variables: Tune
        pickles this class by value."""

        def __init__(self, on_result: OnResult, on_start: OnStart | None, trials: list[Trial]) -> None:
            self.on_result, self.on_start, self.trials = on_result, on_start, trials

        def __getstate__(self) -> dict:
            # Tune pickles its run config for Tuner.restore, which tunelab does not use (the db is what
            # resumes a sweep); the store and display behind on_result cannot be pickled.
            return {}

        def on_trial_start(self, iteration, trials, trial, **info):
            if self.on_start is not None:
                started = self.trials[trial.config["index"]]
                self.on_start(started, trial_log(trial_dir(work_dir, started)))

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = TrialResult(**{key: trial.last_result.get(key) for key in result_keys})
            self.on_result(self.trials[trial.config["index"]], result)

        def on_trial_error(self, iteration, trials, trial, **info):  # the Ray worker itself died
            error = TrialResult(error=f"Ray trial failed: {trial.get_error()}")
            self.on_result(self.trials[trial.config["index"]], error)

    _start_ray(address)
    try:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": cpus_per_trial, "gpu": gpus_per_trial}),
            param_space={"index": tune.grid_search(list(range(len(trials))))},
            tune_config=tune.TuneConfig(max_concurrent_trials=max_parallel),
            run_config=tune.RunConfig(
                storage_path=str(work_dir / "ray"),
                verbose=0,
                callbacks=[RecordResults(on_result, on_start, trials)],
            ),
        )
        tuner.fit()
    finally:
        ray.shutdown()
