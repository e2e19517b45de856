"""One sweep trial, run in its own process: train a config, evaluate it on its dev and test sets (at
each of its ranks, for dylora), write a result JSON.

    python -m tunelab.hpsearch.trial CONFIG.yaml METRIC RESULT.json [OPTIONS_JSON]

OPTIONS_JSON: {"ranks": [...], "test": SPEC or null, "data_sha256": FINGERPRINT or null}.
RESULT.json holds {"score", "rows", "metrics", "peak_memory_bytes", "step_time_s"} on success (one row
per evaluated rank: rank, score, test_score, metrics, test_metrics; `score` and `metrics` are the first
row's), {"error", "data_error"} on failure (data_error: the data failed to load, as it will for every
trial on the same data). The executor
(tunelab.hpsearch.executors) starts this process and records the result; it never trains in its own
process, so a crash or an out-of-memory kill of one trial leaves the sweep running.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.config import DataConfig
from tunelab.errors import DataError, ResumeFailed, RunInterrupted, TunelabError
from tunelab.rundir import write_atomically

DEV_TEST_SEED = 0  # the permutation that splits an eval set without a test split into dev and test


def dev_test_indices(n: int, seed: int = DEV_TEST_SEED) -> tuple[list[int], list[int]]:
    """Rows of an eval set of `n` split in two: dev (the first half of a seeded permutation, rounded
    up) and test (the rest)."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    return sorted(order[: (n + 1) // 2]), sorted(order[(n + 1) // 2 :])


def check_eval_rows(data: DataConfig, test: str | None) -> None:
    """The rows a trial evaluates on read as `data` says (format, columns), and without a `test` split
    are enough to halve into dev and test (counted before tokenizing, which may drop more)."""
    from tunelab.data import detect_format, eval_rows

    rows = eval_rows(data)
    detect_format(rows, data.format)
    if test:
        detect_format(
            eval_rows(data.model_copy(update={"eval": test, "eval_split": None, "holdout": None})),
            data.format,
        )
    else:
        check_halvable(data, min(len(rows), data.eval_limit or len(rows)))


def check_halvable(data: DataConfig, rows: int) -> None:
    """An eval set split into dev and test needs a row for each (`rows`: those it has, or at most has)."""
    if rows < 2:
        limit = f" (data.eval_limit is {data.eval_limit})" if data.eval_limit == rows else ""
        raise DataError(
            f"{data.eval_name}: {rows} usable eval row{limit} cannot be split into dev and test halves; give "
            "at least 2, or the dataset a test set of its own (test:)"
        )


def data_marker(run_dir: Path) -> Path:
    """Beside a trial's run folder: the fingerprint of the data it trained on (`data_fingerprint`)."""
    return run_dir.with_name(f"{run_dir.name}.data_sha256")


def trained_on(run_dir: Path) -> str | None:
    """The fingerprint of the data a trial's run trained on; None: no record (not begun, or begun by an
    older tunelab)."""
    marker = data_marker(run_dir)
    return marker.read_text() if marker.is_file() else None


def median_step_time(records: list[dict]) -> float | None:
    """The median optimizer step time of a run, from its metrics.jsonl records."""
    times = [record["step_time_s"] for record in records if "step_time_s" in record]
    return statistics.median(times) if times else None


def run_trial(config_path: Path, metric: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `config_path` (resuming an earlier attempt's run in its output_dir, else replacing what is
    there) and score it on dev and test."""
    # torch comes in here, not at import: the sweep and recommend commands import this module
    from tunelab.assemble import load_run
    from tunelab.config import load_config
    from tunelab.data import eval_dataset
    from tunelab.evaluate import evaluate_ranks
    from tunelab.reporting import peak_memory_bytes
    from tunelab.rundir import RunDir
    from tunelab.train import can_resume, train

    options = options or {}
    config = load_config(config_path)
    check_eval_rows(config.data, options.get("test"))  # before training
    # an attempt at this trial that a stopped sweep left (Ctrl-C, SIGTERM) goes on from its checkpoint;
    # one that finished training but not its evaluation is only evaluated; but never a run that trained
    # on the dataset's files as they were before an edit
    resume = can_resume(config)
    fingerprint = options.get("data_sha256")
    if fingerprint is not None:
        run = RunDir(config.resolved_output_dir())
        recorded = trained_on(run.path)
        if recorded != fingerprint:
            if resume:
                why = (  # none: a run an older tunelab began, before it kept the record
                    "the data changed since this trial's run trained"
                    if recorded
                    else "there is no record of the data this trial's run trained on"
                )
                print(f"{why}: starting it over", flush=True)
                resume = False
            if run.is_run():  # cleared before the new fingerprint is written: a stop from here on never
                run.check_can_start(overwrite=True)  # finds the old run under the new data's name
                data_marker(run.path).unlink(missing_ok=True)
                with run.lock():
                    run.clear()
            write_atomically(data_marker(run.path), fingerprint)
    try:
        trained = train(config, resume=resume, overwrite=True)
    except ResumeFailed as exc:
        print(f"{exc}\nstarting this trial over", flush=True)
        trained = train(config, overwrite=True)
    built = trained.tuned or load_run(trained.run_dir)[1]
    dev = eval_dataset(config.data, built.tokenizer, limit=config.data.eval_limit)
    if options.get("test"):
        # read as the dev set is: data.columns where the file has those columns
        test_data = config.data.model_copy(
            update={"eval": options["test"], "eval_split": None, "holdout": None}
        )
        test = eval_dataset(test_data, built.tokenizer, limit=config.data.eval_limit)
    else:
        check_halvable(config.data, len(dev))  # rows can be dropped (no response token within max_length)
        dev_rows, test_rows = dev_test_indices(len(dev))
        dev, test = dev.subset(dev_rows), dev.subset(test_rows)
    ranks = options.get("ranks") or None
    with_exact_match = metric == "exact_match"
    dev_metrics = evaluate_ranks(built, dev, ranks, with_exact_match)
    test_metrics = evaluate_ranks(built, test, ranks, with_exact_match)
    rows = [
        {"rank": rank, "score": on_dev[metric], "test_score": on_test[metric], "metrics": on_dev,
         "test_metrics": on_test}
        for rank, on_dev, on_test in zip(ranks or [None], dev_metrics, test_metrics, strict=True)
    ]  # fmt: skip
    return {
        "score": rows[0]["score"],
        "metrics": rows[0]["metrics"],
        "rows": rows,
        "peak_memory_bytes": peak_memory_bytes(),
        "step_time_s": median_step_time(RunDir(trained.run_dir).metrics()),
    }


def _exit_with_parent() -> None:
    """End this process when the sweep that started it dies (e.g. kill -9), so no orphan keeps training
    into a run directory that the resumed sweep runs again."""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def main(argv: list[str]) -> int:
    config_path, metric, result_path = Path(argv[0]), argv[1], Path(argv[2])
    options = json.loads(argv[3]) if len(argv) > 3 else {}
    threading.Thread(target=_exit_with_parent, daemon=True).start()
    try:
        result = run_trial(config_path, metric, options)
    except Exception as exc:  # any failure is the trial's result, recorded with its message
        if isinstance(exc, TunelabError):  # a stop, or bad input: its message says all
            print(exc if isinstance(exc, RunInterrupted) else f"error: {exc}", flush=True)
        else:
            traceback.print_exc()
        message = str(exc) if isinstance(exc, TunelabError) else f"{type(exc).__name__}: {exc}"
        result = {"error": message, "data_error": isinstance(exc, DataError)}
        reporting = sys.modules.get("tunelab.reporting")  # imported with torch, before training
        if reporting is not None:  # a stopped attempt's peak counts in the row of the attempt that resumes it
            result["peak_memory_bytes"] = reporting.peak_memory_bytes()
    write_atomically(result_path, json.dumps(result))  # the executor never reads half a file
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
