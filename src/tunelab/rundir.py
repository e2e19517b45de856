"""The run folder: its layout, how a run is recognised, the lock held while training, crash-safe writes.

A run folder is self-contained: everything tunelab needs to resume, evaluate or export a run is in
it, wherever it was moved. tunelab only ever deletes what it wrote itself (`RUN_ENTRIES`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import yaml

from tunelab.config import RunConfig, override_hint
from tunelab.errors import TunelabError, did_you_mean, shell_word

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
CHECKPOINTS_DIR = "checkpoints"
LOGS_DIR = "logs"  # train.report_to: tensorboard's event files
CHECKPOINT_PREFIX = "checkpoint-"  # checkpoints/checkpoint-N, as transformers' Trainer names them
COMPLETE_MARKER = "COMPLETE"  # written last into a checkpoint directory
LOCK_FILE = ".tunelab.lock"
HOLDOUT_FILE = "holdout.json"  # data.holdout: which rows the run held out (their count and sha256)
DATA_FILE = "data.json"  # data.train's and data.eval's row counts and sha256, when they are local files
WEIGHTS_FILE = "trained.safetensors"  # what Method.save writes into final/ and each checkpoint
STATE_FILE = "method_state.pt"
FINAL_FILES = (WEIGHTS_FILE, STATE_FILE)
# what a checkpoint is written with: the trained tensors and method state, and transformers' Trainer's
# files (its OPTIMIZER_NAME, SCHEDULER_NAME, SCALER_NAME, TRAINER_STATE_NAME, TRAINING_ARGS_NAME, and
# rng_state.pth or one rng_state_N.pth per process)
CHECKPOINT_FILES = (
    *FINAL_FILES,
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "trainer_state.json",
    "training_args.bin",
)
# what training and `tunelab eval`/quickstart write into a run folder: all that --overwrite may remove
RUN_ENTRIES = (
    CONFIG_FILE,
    METRICS_FILE,
    FINAL_DIR,
    CHECKPOINTS_DIR,
    LOGS_DIR,
    LOCK_FILE,
    HOLDOUT_FILE,
    DATA_FILE,
    "rank_curve.png",
    "loss_curve.png",
)


def _is_checkpoint_plot(name: str) -> bool:
    """rank_curve-checkpoint-N.png, written by `tunelab eval --ranks` of a checkpoint."""
    stem = name.removeprefix("rank_curve-").removesuffix(".png")
    return f"rank_curve-{stem}.png" == name and checkpoint_step(Path(stem)) is not None


def _written_by_tunelab(name: str) -> bool:
    """A name in a run folder that tunelab writes (what --overwrite may remove)."""
    return name in RUN_ENTRIES or _is_temporary(name) or _is_checkpoint_plot(name)


def rank_curve_file(run: RunDir, weights: Path) -> Path:
    """Where `tunelab eval --ranks` draws its plot: in the run's folder, one per checkpoint evaluated, so
    a checkpoint's curve does not replace the finished model's."""
    return run.path / ("rank_curve.png" if weights == run.final_dir else f"rank_curve-{weights.name}.png")


def _is_temporary(name: str) -> bool:
    """Leftovers of an interrupted atomic write: `.final.tmp-123`, `.metrics.jsonl.tmp-123`, ..."""
    return name.startswith(".") and any(f".{kind}-" in name for kind in ("tmp", "old"))


class RunDir:
    """One run folder and the names of everything in it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_file = self.path / CONFIG_FILE
        self.metrics_file = self.path / METRICS_FILE
        self.final_dir = self.path / FINAL_DIR
        self.checkpoints_dir = self.path / CHECKPOINTS_DIR
        self.logs_dir = self.path / LOGS_DIR
        self.lock_file = self.path / LOCK_FILE
        self.holdout_file = self.path / HOLDOUT_FILE
        self.data_file = self.path / DATA_FILE

    def __str__(self) -> str:
        return str(self.path)

    # -- what is there ---------------------------------------------------------------------------
    def is_run(self) -> bool:
        """A tunelab run: a config.yaml as tunelab writes it (every top-level key of a run config, no
        other), so a user's own config.yaml never makes a folder look like a run."""
        try:
            saved = yaml.safe_load(self.config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return False
        return isinstance(saved, dict) and set(saved) == set(RunConfig.model_fields)

    def is_finished(self) -> bool:
        return self.final_dir.is_dir()

    def entries(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir()) if self.path.is_dir() else []

    def foreign_entries(self) -> list[str]:
        """What tunelab did not write (exports, notes, a user's own files), also inside final/ and
        checkpoints/, which --overwrite removes whole."""
        foreign = [name for name in self.entries() if not _written_by_tunelab(name)]
        if self.final_dir.is_dir():
            final = self.final_dir.iterdir()
            foreign += [f"{FINAL_DIR}/{p.name}" for p in final if p.name not in FINAL_FILES]
        if self.checkpoints_dir.is_dir():
            foreign += [
                f"{CHECKPOINTS_DIR}/{p.name}"
                for p in self.checkpoints_dir.iterdir()
                if not (p.is_dir() and checkpoint_step(p) is not None)
            ]
        return sorted(foreign)

    def complete_checkpoints(self) -> list[Path]:
        """The checkpoints written completely (a kill mid-save leaves no marker), oldest first."""
        # not a copy such as "checkpoint-5 copy", nor a link to a folder elsewhere: those are the user's
        complete = [
            p
            for p in self.checkpoints_dir.glob("*")
            if checkpoint_step(p) is not None and not p.is_symlink() and (p / COMPLETE_MARKER).is_file()
        ]
        return sorted(complete, key=checkpoint_step)

    def latest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def remove_old_checkpoints(self, keep: int) -> list[str]:
        """All but the newest `keep` complete checkpoints removed, each as far as its marker lists the
        files it was written with; returns what was left in place (a file the user added, a checkpoint
        whose marker lists nothing)."""
        kept_back = []
        for old in self.complete_checkpoints()[:-keep]:
            marker = old / COMPLETE_MARKER
            written = marker.read_text().split("\n")
            if not any(written):  # an empty marker, as tunelab wrote them before it listed the files
                kept_back.append(f"{old.name} (from an older tunelab: which files are its own is unknown)")
                continue
            marker.unlink()  # first: a half-removed checkpoint is never resumed from
            for name in filter(None, written):
                if name != COMPLETE_MARKER and "/" not in name:
                    (old / name).unlink(missing_ok=True)
            left = sorted(p.name for p in old.iterdir())
            if left:
                kept_back += [f"{old.name}/{name}" for name in left]
            else:
                old.rmdir()
        return kept_back

    def remove_incomplete_checkpoints(self) -> tuple[list[str], list[str]]:
        """The checkpoints a stop or a kill left half-written (no marker), which a resumed run redoes,
        removed as far as they hold what a checkpoint is written with; only when nothing is being
        written (a resumed run's start). Returns the folders removed, and what was left in place."""
        removed, left = [], []
        for folder in self.checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*"):
            if checkpoint_step(folder) is None or folder.is_symlink() or not folder.is_dir():
                continue  # a user's copy, or a link to a folder elsewhere
            if (folder / COMPLETE_MARKER).is_file():
                continue
            for path in folder.iterdir():
                if path.is_file() and is_checkpoint_file(path.name):
                    path.unlink()
            rest = sorted(p.name for p in folder.iterdir())
            if rest:
                left += [f"{folder.name}/{name}" for name in rest]
            else:
                folder.rmdir()
                removed.append(folder.name)
        return sorted(removed, key=lambda name: checkpoint_step(Path(name))), sorted(left)

    def require_run(self) -> None:
        """A folder tunelab trained into, or a clear error."""
        if not self.path.exists():
            raise TunelabError(
                f"run folder {self.path} not found{override_hint(self.path) or did_you_mean(self.path)}"
            )
        if not self.config_file.is_file():
            raise TunelabError(f"{self.path} is not a tunelab run directory (no {CONFIG_FILE})")
        if not self.is_run():
            raise TunelabError(
                f"{self.path} is not a tunelab run directory (its {CONFIG_FILE} is not one tunelab wrote)"
            )

    def require_finished(self) -> None:
        """For eval and export: a finished run, or a clear error (naming its latest checkpoint, usable
        as it is)."""
        self.require_run()
        if not self.is_finished():
            latest = self.latest_checkpoint()
            as_far = f", or use it as far as it got: give {shell_word(latest)} instead" if latest else ""
            raise TunelabError(
                f"{self.path} has no finished model ({FINAL_DIR}/); did the training finish? "
                f"resume it with: tunelab train {shell_word(self.config_file)} --resume{as_far}"
            )

    # -- changing it -------------------------------------------------------------------------------
    def check_can_start(self, overwrite: bool) -> None:
        """A new run may start here: the folder is empty, or holds a tunelab run and --overwrite was given."""
        found = [name for name in self.entries() if name != LOCK_FILE]
        if not found:
            return
        if not self.is_run():
            raise TunelabError(
                f"output directory {self.path} is not empty and is not a tunelab run (it holds "
                f"{_listing(found)}); set output_dir=... to a new or empty directory"
            )
        foreign = self.foreign_entries()
        if foreign:
            raise TunelabError(
                f"output directory {self.path} holds a run and files tunelab did not write "
                f"({_listing(foreign)}); move them out first, or set output_dir=... to another directory"
            )
        if not overwrite:
            raise TunelabError(
                f"output directory {self.path} already holds a run; use --resume to continue it, "
                "--overwrite to replace it, or set output_dir=... to another directory"
            )

    def clear(self) -> None:
        """Remove a run's own files (--overwrite), keeping the lock held by this process."""
        for name in self.entries():
            if name == LOCK_FILE or not _written_by_tunelab(name):
                continue
            entry = self.path / name
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    def metrics(self) -> list[dict]:
        """The records of metrics.jsonl so far (none before the first step)."""
        return read_metrics(self.metrics_file) if self.metrics_file.is_file() else []

    def truncate_metrics(self, last_step: int) -> None:
        """On resume, drop the lines of steps after the checkpoint: they are about to be redone."""
        if not self.metrics_file.is_file():
            return
        # step lines, eval lines and method events carry a step; the final summary does not
        kept = [record for record in self.metrics() if record.get("step", math.inf) <= last_step]
        write_atomically(self.metrics_file, "".join(json.dumps(record) + "\n" for record in kept))

    @contextmanager
    def lock(self):
        """Hold an exclusive lock on the run for the whole block; a second tunelab process training into
        the same folder gets a clear error. Creating the folder here also finds an unwritable output
        before any model is loaded. If no run was written, the lock file (and a folder this call created)
        is removed again."""
        created = not self.path.exists()
        created_lock = not self.lock_file.exists()
        if self.path.is_file():
            raise TunelabError(f"output directory {self.path} is a file; set output_dir=... to a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.lock_file, "a+")  # noqa: SIM115 (held open for the whole block)
        except OSError as exc:
            raise TunelabError(
                f"cannot write to output directory {self.path}: {exc.strerror or exc}; "
                "choose a writable output_dir=..."
            ) from None
        try:
            _acquire(
                handle,
                f"output directory {self.path} is in use by another tunelab process (pid {{pid}}); wait for "
                "it to finish or set output_dir=... to another directory",
            )
            yield self
        finally:
            handle.close()
            # nothing of ours stays in a folder that did not become a run (a failed start, a user's folder)
            if created_lock and not self.is_run():
                self.lock_file.unlink(missing_ok=True)
            if created and not self.entries():
                self.path.rmdir()


def check_writable(
    path: Path, option: str, *, folder: bool, ours: Callable[[Path], bool] | None = None
) -> None:
    """Fail now, naming `option`, when `path` (a file, or a folder when `folder`) cannot be written
    later: before any long work, and leaving nothing behind. Missing parent folders are fine (the
    writer creates them) as long as the nearest existing one is a writable folder. An existing file is
    replaced only when `ours` says, from its first bytes, that tunelab wrote it (a re-run's output):
    a file of the user's, a data file say, is never overwritten."""
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if existing == path and folder and not path.is_dir():
        raise TunelabError(f"{option} {path} is a file, not a folder; give a folder (created if missing)")
    if existing == path and not folder and path.is_dir():
        raise TunelabError(f"{option} {path} is a folder; give a file path")
    if existing != path and not existing.is_dir():
        raise TunelabError(f"{option} {path}: {existing} is a file, not a folder; choose another path")
    try:
        if existing == path and not folder and ours is not None and path.stat().st_size:
            if not ours(path):
                raise TunelabError(
                    f"{option} {path} exists and tunelab did not write it; name a new file (tunelab "
                    "replaces only its own output)"
                )
        # a real write, not os.access: root passes access() where writes still fail (/sys, some mounts)
        if existing.is_dir():
            tempfile.TemporaryFile(dir=existing).close()  # unnamed where the filesystem allows
        else:
            path.open("a").close()  # appending nothing changes neither the file nor its times
    except OSError as exc:
        raise TunelabError(
            f"{option} {path}: cannot write in {existing} ({exc.strerror}); choose another path"
        ) from None


def json_report(*first_keys: str) -> Callable[[Path], bool]:
    """Recognises a JSON report tunelab wrote (json.dumps with indent=2) by its first key, one of
    `first_keys`: what `check_writable` may replace on a re-run."""
    heads = [f'{{\n  "{key}": '.encode() for key in first_keys]

    def written_by_tunelab(path: Path) -> bool:
        with path.open("rb") as handle:
            head = handle.read(max(map(len, heads)))
        return any(head.startswith(expected) for expected in heads)

    return written_by_tunelab


@contextmanager
def sweep_lock(runs_folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on a sweep's runs folder (created if missing) for the whole sweep: a second
    sweep into it, which would start the same trials into the same run folders, gets a clear error."""
    created = not runs_folder.exists()
    runs_folder.mkdir(parents=True, exist_ok=True)
    try:
        with open(runs_folder / LOCK_FILE, "a+") as handle:  # kept while runs are there: tunelab's folder
            _acquire(
                handle,
                f"the sweep's runs folder {runs_folder} is in use by another tunelab sweep (pid {{pid}}); "
                "wait for it to finish, or give this sweep another --db",
            )
            yield
    finally:
        if created and [entry.name for entry in runs_folder.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(runs_folder)  # no trial started: nothing of the sweep's is left behind


def sweep_running(runs_folder: Path) -> str | None:
    """The pid of the tunelab sweep that holds `runs_folder`'s lock now (as its lock file says); None when
    no sweep does."""
    try:
        handle = open(runs_folder / LOCK_FILE)  # read only: asking changes nothing
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return handle.read().strip() or "unknown"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def _acquire(handle: IO[str], busy: str) -> None:
    """Lock `handle`'s file, writing our pid into it; else `busy` (its {pid}: the holder's) as the error.
    Tried for half a second: `sweep_running` holds the lock for a moment to ask."""
    deadline = time.monotonic() + 0.5
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() > deadline:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise TunelabError(busy.format(pid=holder))
        time.sleep(0.05)
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()


def runs_in(folder: Path) -> str:
    """' (runs in it: runs/a, runs/b, ...)' for a folder that holds runs one level down; else ''."""
    runs = sorted(
        str(found.parent) for found in folder.glob(f"*/{CONFIG_FILE}") if RunDir(found.parent).is_run()
    )
    return f" (runs in it: {', '.join(runs[:3])}{', ...' if len(runs) > 3 else ''})" if runs else ""


def _listing(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def checkpoint_step(checkpoint: Path) -> int | None:
    """N of a folder named checkpoint-N (transformers' name for it); None for any other name, also
    for 'checkpoint-05' or other digits than 0-9 (a user's copy, never one the Trainer wrote)."""
    number = checkpoint.name.removeprefix(CHECKPOINT_PREFIX)
    # isdecimal first: int() refuses digits such as '²'
    written = checkpoint.name.startswith(CHECKPOINT_PREFIX) and number.isdecimal()
    return int(number) if written and number == str(int(number)) else None


def is_checkpoint_file(name: str) -> bool:
    """A file a checkpoint is written with (CHECKPOINT_FILES, or one process's RNG state)."""
    return name in CHECKPOINT_FILES or re.fullmatch(r"rng_state(_[0-9]+)?\.pth", name) is not None


def mark_complete(checkpoint: Path) -> None:
    """The COMPLETE marker, listing the files the checkpoint was written with (what removing it may
    delete: anything else is the user's, also a file left in a half-written checkpoint of this step)."""
    names = sorted(p.name for p in checkpoint.iterdir() if p.is_file() and is_checkpoint_file(p.name))
    write_atomically(checkpoint / COMPLETE_MARKER, "".join(f"{name}\n" for name in names))


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. Every record is written as one line ending in a newline, so a last
    line without one is a record still being written, or cut off when the process was killed: left out.
    """
    lines = path.read_text().split("\n")[:-1]  # what follows the last newline is not a whole record
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise TunelabError(
                f"{path}:{number}: not a JSON record (the file was edited or damaged); remove that line"
            ) from None
    return records


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def default_permissions(path: Path) -> None:
    """Give `path` (and everything below it) the permissions the umask gives new files and folders:
    safetensors writes its files 0600, which a server running as another user cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for entry in [path, *path.rglob("*")] if path.is_dir() else [path]:
        entry.chmod((0o777 if entry.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_directory(target: Path):
    """Yield a temporary sibling of `target`; on success it replaces `target` in one rename, so a
    crash never leaves a half-written directory under the final name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        default_permissions(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def trained_weights(path: Path) -> tuple[RunDir, Path]:
    """The run that `path` names and the folder of the trained weights to use: a finished run's final/,
    or one of a run's complete checkpoints when `path` is that checkpoint (RUN/checkpoints/checkpoint-N),
    so a stopped run can be evaluated and exported as far as it got."""
    path = Path(path).absolute()  # `tunelab eval .` inside a checkpoint: its parent's name is needed
    if checkpoint_step(path) is None or path.parent.name != CHECKPOINTS_DIR:
        run = RunDir(path)
        run.require_finished()
        return run, run.final_dir
    run = RunDir(path.parent.parent)
    run.require_run()
    if not (path / COMPLETE_MARKER).is_file():
        latest = run.latest_checkpoint()
        other = f"; use {shell_word(latest)}" if latest else ""
        if not path.exists():
            steps = [checkpoint_step(folder) for folder in run.complete_checkpoints()]
            saved = f" (this run saved steps {', '.join(map(str, steps))})" if steps else ""
            raise TunelabError(f"{path} not found{saved}{other}")
        raise TunelabError(f"{path} was not written completely (no {COMPLETE_MARKER} marker){other}")
    return run, path
