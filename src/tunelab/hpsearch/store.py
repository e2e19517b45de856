"""Sweep results: a SQLite store (one row per config × dataset × seed; a dylora trial's row per rank
is a config of its own) and a reader for results tables.

Both give a `ScoreMatrix`, the input of `tunelab.hpsearch.cbs` (orient it there first).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from tunelab.console import plural
from tunelab.errors import TunelabError, shell_word
from tunelab.hpsearch.spec import HIGHER_IS_BETTER

_SCHEMA = """
CREATE TABLE IF NOT EXISTS trials (
    config_id TEXT NOT NULL,
    config_json TEXT NOT NULL,
    dataset TEXT NOT NULL,
    seed INTEGER NOT NULL,
    metric TEXT NOT NULL,
    rank INTEGER,
    score REAL,
    test_score REAL,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    error TEXT,
    duration_s REAL,
    step_time_s REAL,
    peak_memory_bytes INTEGER,
    started_at TEXT,
    finished_at TEXT,
    data_sha256 TEXT,
    PRIMARY KEY (config_id, dataset, seed)
)
"""
_COLUMNS = (
    "config_id", "config_json", "dataset", "seed", "metric", "rank", "score", "test_score", "status",
    "error", "duration_s", "step_time_s", "peak_memory_bytes", "started_at", "finished_at", "data_sha256",
)  # fmt: skip
# columns added after databases had been written: added when such a database is opened to write, read as
# NULL when it is only read
_ADDED_COLUMNS = {"data_sha256": "TEXT"}
_KEY = ("config_id", "dataset", "seed")


class ScoreMatrix(NamedTuple):
    config_ids: list[str]
    datasets: list[str]
    scores: np.ndarray  # (configs, datasets), dev scores, mean over seeds; NaN where missing or failed
    higher_is_better: np.ndarray  # one bool per dataset
    configs: dict[str, dict[str, Any]]  # config id -> its config (or its hyperparameter columns)
    # a sweep database's extras (None for a results table):
    test_scores: np.ndarray | None = None  # like `scores`, on the test split
    spread: np.ndarray | None = None  # sample standard deviation of the dev score over seeds (0 for one)
    test_spread: np.ndarray | None = None  # the same for the test score
    seeds: np.ndarray | None = None  # how many seeds each cell averages
    costs: dict[str, dict[str, float | None]] | None = None  # config id -> step_time_s, peak_memory_bytes


def select(matrix: ScoreMatrix, config_ids: set[str], datasets: list[str]) -> ScoreMatrix:
    """The part of `matrix` with these configs and datasets (each kept in the matrix's order)."""
    rows = [i for i, config in enumerate(matrix.config_ids) if config in config_ids]
    columns = [j for j, dataset in enumerate(matrix.datasets) if dataset in datasets]

    def cut(values: np.ndarray | None) -> np.ndarray | None:
        return None if values is None else values[np.ix_(rows, columns)]

    kept = [matrix.config_ids[i] for i in rows]
    return ScoreMatrix(
        config_ids=kept,
        datasets=[matrix.datasets[j] for j in columns],
        scores=cut(matrix.scores),
        higher_is_better=matrix.higher_is_better[columns],
        configs={config: matrix.configs[config] for config in kept},
        test_scores=cut(matrix.test_scores),
        spread=cut(matrix.spread),
        test_spread=cut(matrix.test_spread),
        seeds=cut(matrix.seeds),
        costs=None if matrix.costs is None else {config: matrix.costs[config] for config in kept},
    )


def _sample_std(values: list[float]) -> float:
    """The sample standard deviation (n - 1); 0 for a single value."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _metric_direction(metric: str, where: str) -> bool:
    if metric not in HIGHER_IS_BETTER:
        raise TunelabError(f"{where}: unknown metric '{metric}'; use one of: {', '.join(HIGHER_IS_BETTER)}")
    return HIGHER_IS_BETTER[metric]


def _matrix(rows: list[dict[str, Any]], directions: dict[str, bool], configs: dict[str, dict]) -> ScoreMatrix:
    """rows: {config, dataset, score (None = missing)}, configs and datasets kept in first-seen order."""
    config_ids = list(dict.fromkeys(row["config"] for row in rows))
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    row_of = {config: i for i, config in enumerate(config_ids)}
    col_of = {dataset: j for j, dataset in enumerate(datasets)}
    scores = np.full((len(config_ids), len(datasets)), np.nan)
    for row in rows:
        if row["score"] is not None:
            scores[row_of[row["config"]], col_of[row["dataset"]]] = row["score"]
    higher = np.array([directions[dataset] for dataset in datasets], dtype=bool)
    return ScoreMatrix(config_ids, datasets, scores, higher, configs)


class ResultsStore:
    """Trial results in SQLite. Each `record` is one transaction, so a crash never leaves half a trial.

    An existing file is checked to be a tunelab results database before anything is written to it;
    `read_only` opens only an existing one and never writes (recommend reads a sweep's results).
    """

    def __init__(self, path: str | Path, *, read_only: bool = False):
        self.path, self.writes = Path(path), not read_only
        self._selected = list(_COLUMNS)  # what rows() selects: a column an older database lacks as NULL
        new = not self.path.is_file() or self.path.stat().st_size == 0
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # mode=rw never creates the file: reading a missing database must not leave an empty one
        mode, source = "rw" if read_only else "rwc", self.path
        self._copy: tempfile.TemporaryDirectory | None = None
        if read_only and self.path.is_file() and not os.access(self.path.parent, os.W_OK):
            mode, source = self._readable_here()
        with self._sqlite_errors():
            self._conn = sqlite3.connect(f"{source.resolve().as_uri()}?mode={mode}", uri=True)
        try:
            with self._sqlite_errors():
                if read_only or not new:  # never add tables to (or change the mode of) another file
                    self._check_schema()
                if not read_only:
                    self._conn.execute("PRAGMA journal_mode=WAL")  # recommend reads while a sweep writes
                    with self._conn:
                        self._conn.execute(_SCHEMA)
        except TunelabError:
            self.close()
            raise

    def _not_ours(self, reason: str) -> TunelabError:
        fix = (
            "give --db a new file, or the .sqlite file an earlier `tunelab sweep` wrote"
            if self.writes
            else "pass the .sqlite file that `tunelab sweep` writes (SPEC.sqlite by default), or a "
            "CSV/parquet table as --results"
        )
        return TunelabError(f"{self.path} is not a tunelab results database ({reason}); {fix}")

    @contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        """SQLite's errors as one-line TunelabErrors naming the file."""
        try:
            yield
        except sqlite3.OperationalError as exc:  # locked, unreadable, no space: the file may be fine
            raise TunelabError(f"{self.path}: cannot use the results database: {exc}") from None
        except sqlite3.DatabaseError as exc:  # not SQLite at all, or truncated / corrupt
            raise self._not_ours(f"SQLite: {exc}") from None

    def _check_schema(self) -> None:
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(trials)")}
        if not columns:
            raise self._not_ours("it has no 'trials' table")
        missing = [column for column in _COLUMNS if column not in columns]
        if missing and "config_json" in columns and "seed" not in columns:
            raise TunelabError(
                f"{self.path} was written by an earlier tunelab (no seeds, ranks or test scores); sweep "
                "again into a new --db"
            )
        if [column for column in missing if column not in _ADDED_COLUMNS]:
            raise self._not_ours(f"its 'trials' table lacks {', '.join(missing)}")
        for column in missing:
            if self.writes:
                try:
                    with self._conn:
                        self._conn.execute(f"ALTER TABLE trials ADD COLUMN {column} {_ADDED_COLUMNS[column]}")
                except sqlite3.OperationalError as exc:  # another sweep opening it added it first
                    if "duplicate column" not in str(exc):
                        raise
            else:
                self._selected[self._selected.index(column)] = f"NULL AS {column}"

    def _readable_here(self) -> tuple[str, Path]:
        """How to read a database in a folder this process cannot write (a read-only mount, a colleague's
        results): SQLite reads a WAL database through a -shm file it cannot create there. Without a
        write-ahead log to merge, the file is read as it is (immutable); with one (a sweep still running,
        or killed), a copy of both is read, so that no recorded result is missed."""
        wal = self.path.with_name(self.path.name + "-wal")
        if not (wal.is_file() and wal.stat().st_size):
            return "ro&immutable=1", self.path
        self._copy = tempfile.TemporaryDirectory(prefix="tunelab-results-")
        copy = Path(self._copy.name) / self.path.name
        shutil.copyfile(self.path, copy)
        shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        return "rw", copy

    def close(self) -> None:
        self._conn.close()
        if self._copy is not None:
            self._copy.cleanup()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(
        self,
        config_id: str,
        config: dict[str, Any],
        dataset: str,
        metric: str,
        score: float | None,
        status: str = "done",
        **extra: Any,
    ) -> None:
        """Insert or replace one result row (a retry overwrites the earlier attempt); `extra`: seed,
        rank, test_score, error, duration_s, step_time_s, peak_memory_bytes, started_at, finished_at."""
        row = {"config_id": config_id, "config": config, "dataset": dataset, "metric": metric}
        self.record_rows([{**row, "score": score, "status": status, **extra}])

    def record_rows(self, rows: list[dict[str, Any]]) -> None:
        """Insert or replace result rows (dicts of the columns, `config` for config_json), in one
        transaction: a trial's rows are all there or none is."""
        values = [self._values(row) for row in rows]
        updates = ", ".join(f"{column} = excluded.{column}" for column in _COLUMNS if column not in _KEY)
        # upsert keeps the row's position, so matrix order stays the sweep's order
        with self._sqlite_errors(), self._conn:
            self._conn.executemany(
                f"INSERT INTO trials ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
                f"ON CONFLICT ({', '.join(_KEY)}) DO UPDATE SET {updates}",
                values,
            )

    def _values(self, row: dict[str, Any]) -> tuple:
        _metric_direction(row["metric"], str(self.path))
        status, score = row.get("status", "done"), row.get("score")
        if status not in ("done", "failed"):
            raise TunelabError(f"trial status must be 'done' or 'failed'; got {status!r}")
        if status == "done" and (score is None or math.isnan(score)):
            raise TunelabError(
                f"trial {row['config_id']} on {row['dataset']} is 'done' without a score; record it as "
                "'failed'"
            )
        failed = status == "failed"
        cells = {
            **{column: row.get(column) for column in _COLUMNS},
            "config_json": json.dumps(row["config"], sort_keys=True),
            "seed": row.get("seed", 0),
            "score": None if failed else float(score),
            "test_score": None if failed or row.get("test_score") is None else float(row["test_score"]),
            "status": status,
            "finished_at": row.get("finished_at") or _now(),
        }
        return tuple(cells[column] for column in _COLUMNS)

    def trial_state(
        self, config_ids: list[str], dataset: str, seed: int, data_sha256: str | None = None
    ) -> str | None:
        """'done' when every row of a trial (its config ids) completed with a score, 'failed' when one
        failed (failed trials are run again), None when the trial is not (all) here, or ran on other data
        than `data_sha256` (a row without one, from a built-in dataset or an older tunelab, is taken as
        run on today's)."""
        sha = self._selected[_COLUMNS.index("data_sha256")]
        with self._sqlite_errors():
            statuses = self._conn.execute(
                f"SELECT status, {sha} FROM trials WHERE dataset = ? AND seed = ? "
                f"AND config_id IN ({', '.join('?' * len(config_ids))})",
                (dataset, seed, *config_ids),
            ).fetchall()
        found = [status for status, ran_on in statuses if not ran_on_other_data(ran_on, data_sha256)]
        if "failed" in found:
            return "failed"
        return "done" if len(found) == len(set(config_ids)) else None

    def finished(
        self, config_ids: list[str], dataset: str, seed: int, data_sha256: str | None = None
    ) -> bool:
        return self.trial_state(config_ids, dataset, seed, data_sha256) == "done"

    def rows(self) -> list[dict[str, Any]]:
        """Every trial as a dict of its columns (config_json parsed into `config`), in insertion order."""
        with self._sqlite_errors():  # a truncated file can pass the schema check and fail here
            values = self._conn.execute(
                f"SELECT {', '.join(self._selected)} FROM trials ORDER BY rowid"
            ).fetchall()
        rows = []
        for row_values in values:
            row = dict(zip(_COLUMNS, row_values, strict=True))
            row["config"] = json.loads(row.pop("config_json"))
            rows.append(row)
        return rows

    def rows_on(self, data_versions: dict[str, str | None]) -> list[dict[str, Any]]:
        """The rows that ran on each dataset's files as they are now (`data_versions`: dataset ->
        data_fingerprint): the results recommend ranks."""
        return [
            row
            for row in self.rows()
            if not ran_on_other_data(row["data_sha256"], data_versions.get(row["dataset"]))
        ]

    def score_matrix(self, data_versions: dict[str, str | None] | None = None) -> ScoreMatrix:
        """Dev scores of every recorded config × dataset, the mean over its seeds (failed trials left
        out; NaN when none finished: it covers nothing in CBS), with the test scores, the spread over
        seeds and each config's cost. `data_versions` (dataset -> data_fingerprint): results that ran
        on other files than these are left out too."""
        rows = self.rows_on(data_versions or {})
        metrics: dict[str, Counter[str]] = {}
        for row in rows:
            _metric_direction(row["metric"], str(self.path))
            metrics.setdefault(row["dataset"], Counter())[row["metric"]] += 1
        directions: dict[str, bool] = {}
        for dataset, counts in metrics.items():
            if len(counts) > 1:  # scores on two scales: no ratio to the best means anything
                fewest = min(counts, key=counts.__getitem__)
                listed = " and ".join(
                    f"{metric} ({plural(count, 'trial')})" for metric, count in counts.most_common()
                )
                raise TunelabError(
                    f"{self.path}: dataset '{dataset}' has results scored by {listed}, and a dataset is "
                    f"ranked by one metric; remove the others' rows, e.g. sqlite3 {shell_word(self.path)} "
                    f"\"DELETE FROM trials WHERE dataset = '{dataset}' AND metric = '{fewest}'\""
                )
            directions[dataset] = HIGHER_IS_BETTER[next(iter(counts))]
        configs = {row["config_id"]: row["config"] for row in rows}
        cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for row in rows:
            cells.setdefault((row["config_id"], row["dataset"]), []).append(row)
        summary = []
        for (config, dataset), group in cells.items():
            done = [row for row in group if row["status"] == "done"]
            dev = [row["score"] for row in done]
            test = [row["test_score"] for row in done if row["test_score"] is not None]
            summary.append(
                {
                    "config": config,
                    "dataset": dataset,
                    "score": float(np.mean(dev)) if dev else None,
                    "test": float(np.mean(test)) if test and len(test) == len(dev) else None,
                    "spread": _sample_std(dev) if dev else None,
                    "test_spread": _sample_std(test) if test and len(test) == len(dev) else None,
                    "seeds": len(dev),
                }
            )
        # every matrix is built from the same cells in the same order: they line up
        matrix = _matrix(summary, directions, configs)
        extra = {
            name: _matrix([{**cell, "score": cell[name]} for cell in summary], directions, configs).scores
            for name in ("test", "spread", "test_spread", "seeds")
        }
        costs = {}
        for config in matrix.config_ids:
            done = [row for row in rows if row["config_id"] == config and row["status"] == "done"]
            times = [row["step_time_s"] for row in done if row["step_time_s"] is not None]
            memory = [row["peak_memory_bytes"] for row in done if row["peak_memory_bytes"] is not None]
            costs[config] = {
                "step_time_s": float(np.median(times)) if times else None,
                "peak_memory_bytes": max(memory) if memory else None,
            }
        return matrix._replace(
            test_scores=extra["test"],
            spread=extra["spread"],
            test_spread=extra["test_spread"],
            seeds=extra["seeds"],
            costs=costs,
        )


def ran_on_other_data(ran_on: str | None, today: str | None) -> bool:
    """Whether a result recorded on files with fingerprint `ran_on` is not on today's (`today`): a
    result or a dataset without one (built-in data, an older tunelab) counts as today's."""
    return bool(ran_on and today and ran_on != today)


# ---------------------------------------------------------------------------------------------
# results tables (e.g. a published grid): long format, one row per config × dataset

_REQUIRED = ("config", "dataset", "score")
_NOT_HYPERPARAMETERS = (*_REQUIRED, "metric", "higher_is_better")


def _cell(text: str) -> Any:
    """A CSV cell as the value it spells: '' -> None, '8' -> 8, '1e-4' -> 0.0001, 'true' -> True."""
    text = text.strip()
    if text == "":
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _utf8_text(path: Path) -> str:
    """The file as text; a UTF-8 BOM (as Excel writes it) is dropped, other encodings are an error."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise TunelabError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the table as UTF-8 "
            "(e.g. 'CSV UTF-8' in Excel)"
        ) from None


def _read_csv(path: Path) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(_utf8_text(path), newline=""))
    rows = []
    try:
        for row in reader:
            if None in row:  # DictReader files surplus cells under the key None
                raise TunelabError(
                    f"{path}:{reader.line_num}: more cells than the header's {len(reader.fieldnames)} "
                    "columns; quote values that contain a comma"
                )
            rows.append({key: _cell(value or "") for key, value in row.items()})
    except csv.Error as exc:
        raise TunelabError(f"{path}:{reader.line_num}: invalid CSV ({exc})") from None
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise TunelabError(
            f"{path}: reading parquet needs pyarrow: pip install pyarrow (or use CSV)"
        ) from None
    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TunelabError(
            f"{path}: cannot read as parquet ({first_line}); check the file or use CSV"
        ) from None


def _read_table(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise TunelabError(f"{path}: unknown results table format '{suffix}'; use .csv or .parquet")


def _separator_hint(columns: list[str]) -> str:
    """A hint when the header is one column holding every name: the file is not comma-separated."""
    if len(columns) == 1:
        for separator in ";\t|":
            if separator in columns[0]:
                return f" (the header looks separated by {separator!r}: save the table comma-separated)"
    return ""


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def load_results_table(path: str | Path) -> ScoreMatrix:
    """Read a long-format results table (CSV or parquet) into a score matrix.

    Columns: config, dataset, score (empty = missing/failed); optionally `higher_is_better` (bool) or
    `metric` (exact_match, accuracy, loss, perplexity) per row; without either, higher is better.
    Every other column is a hyperparameter of the row's config.
    """
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"results table not found: {path}")
    table = _read_table(path)
    if not table:
        raise TunelabError(f"{path}: the results table has no rows")
    absent = [column for column in _REQUIRED if column not in table[0]]
    if absent:
        raise TunelabError(
            f"{path}: missing column(s) {', '.join(absent)}; need config, dataset, score"
            + _separator_hint(list(table[0]))
        )
    rows, directions, configs, seen = [], {}, {}, set()
    for line, record in enumerate(table, start=2):  # line numbers as in the CSV, after the header
        where = f"{path} (row {line})"
        if _is_missing(record["config"]) or _is_missing(record["dataset"]):
            raise TunelabError(f"{where}: empty config or dataset cell; every row names both")
        config, dataset = str(record["config"]), str(record["dataset"])
        if (config, dataset) in seen:
            raise TunelabError(
                f"{where}: config '{config}' appears twice for dataset '{dataset}'; keep one row"
            )
        seen.add((config, dataset))
        if not _is_missing(record.get("higher_is_better")):
            higher = record["higher_is_better"]
            if higher not in (True, False):  # also admits 1 and 0
                raise TunelabError(f"{where}: higher_is_better is {higher!r}; write true or false")
            higher = bool(higher)
        elif not _is_missing(record.get("metric")):
            higher = _metric_direction(str(record["metric"]), where)
        else:
            higher = True
        if directions.setdefault(dataset, higher) != higher:
            raise TunelabError(f"{where}: dataset '{dataset}' mixes higher- and lower-is-better rows")
        hyperparameters = {k: v for k, v in record.items() if k not in _NOT_HYPERPARAMETERS}
        if configs.setdefault(config, hyperparameters) != hyperparameters:
            raise TunelabError(
                f"{where}: config '{config}' has different hyperparameters than on its first row"
            )
        score = record["score"]
        if not _is_missing(score) and not isinstance(score, int | float):
            raise TunelabError(f"{where}: score {score!r} is not a number; leave it empty for a failed trial")
        rows.append(
            {"config": config, "dataset": dataset, "score": None if _is_missing(score) else float(score)}
        )
    return _matrix(rows, directions, configs)
