"""The one exception type the CLI turns into a single clear line and exit code 2, and the hints its
messages give for a likely typo."""

from __future__ import annotations

import difflib
import functools
import os
import shlex
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path


class TunelabError(Exception):
    """A user-facing error: the message says what is wrong, where, and how to fix it.

    Messages quote user input (keys, values, file contents); line breaks in that input are escaped
    here so that every error stays on one line, whatever the input was.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


class DataError(TunelabError):
    """A dataset that cannot be read or used as the run's data options and tokenizer say: every run with
    the same model and data options fails the same way (a sweep skips its other trials on that data)."""


class DatasetNotFound(TunelabError):
    """A dataset named by path or name that is nowhere: no file, folder, hub id or built-in."""


class RunInterrupted(TunelabError):
    """Training stopped on Ctrl-C/SIGTERM after saving a resumable checkpoint (exit code 130)."""


class ResumeFailed(TunelabError):
    """A resumed training failed before its first step: its checkpoint did not load."""


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate that `word`, a likely typo, was probably meant to be; None when none is close."""
    candidates = list(candidates)
    matches = difflib.get_close_matches(word, candidates, n=1)
    if matches:
        return matches[0]
    # difflib's ratio misses two letters swapped in a short word (tyni: 0.5 to tiny)
    return next((other for other in candidates if len(word) > 2 and one_edit_apart(word, other)), None)


def one_edit_apart(a: str, b: str) -> bool:
    """Whether `b` is `a` with one letter changed, added or dropped, or two letters swapped."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) != len(b):
        short, long = sorted((a, b), key=len)
        return any(long[:i] + long[i + 1 :] == short for i in range(len(long)))
    differ = [i for i in range(len(a)) if a[i] != b[i]]
    if len(differ) != 2:
        return len(differ) == 1
    i, j = differ
    return a[i] == b[j] and a[j] == b[i]


def note_near_hub_id(name: str) -> None:
    """A hub id that is also a local path's near miss ('models/tinyy' beside models/tiny) may be a typo;
    said at once on stderr, since reaching the hub without a network takes a minute of retries."""
    _note_near_hub_id(name, os.getcwd())


@functools.cache  # once per name and folder: a training resolves its model and data more than once
def _note_near_hub_id(name: str, cwd: str) -> None:
    near, folder = did_you_mean(name), Path(name).expanduser().parent
    if not near and folder.is_dir() and folder != Path("."):  # runs/typo beside a local runs/
        near = f"; {folder}{os.sep} has no {Path(name).name}"
    if near:
        from rich.console import Console

        Console(stderr=True, emoji=False, soft_wrap=True, highlight=False).print(
            f"[yellow]note:[/yellow] {name} is no local path, so it is tried as a hub id{near}"
        )


def folders_or(*suffixes: str) -> Callable[[Path], bool]:
    """A `keep` for did_you_mean: folders, and files with one of `suffixes` (a config's typo is not
    meant to name the script beside it)."""
    return lambda entry: entry.is_dir() or entry.suffix.lower() in suffixes


def did_you_mean(path: str | Path, keep: Callable[[Path], bool] | None = None) -> str:
    """'; did you mean NEAR?' for a path that does not exist, where one near it does; else ''.

    The first missing part of the path is compared with the names in the folder above it, so a
    typo in a folder's name is found as well as one in the file's; `keep`: which entries may be meant
    (a data file or a folder, not the config beside it)."""
    path = Path(path).expanduser()
    parts = path.parts
    for depth in range(1, len(parts) + 1):
        if not Path(*parts[:depth]).exists():
            break
    else:
        return ""
    parent = Path(*parts[: depth - 1]) if depth > 1 else Path(".")
    try:
        entries = list(islice(parent.iterdir(), 10_000))  # a huge folder: its first
    except OSError:
        return ""
    names = [entry.name for entry in entries if keep is None or keep(entry)]
    near = _closest_name(parts[depth - 1], names)
    if near is None:
        return ""
    suggestion = parent.joinpath(near, *parts[depth:])
    return f"; did you mean {suggestion}?" if suggestion.exists() else ""


def _closest_name(name: str, names: list[str]) -> str | None:
    """The file or folder name that `name` was probably meant to be, compared by stems, so that a shared
    '.jsonl' does not make 'openai.jsonl' look like 'nothere.jsonl': the same stem with another suffix
    first (alp_eval.json for alp_eval.jsonl, before chat_eval.jsonl), then a near stem with the same
    suffix, then with another."""
    suffix = Path(name).suffix
    if not suffix:
        return closest(name, names)
    # qa.json for qa.jsonl, sweep.yaml for sweep.yml: a near suffix, not any (sweep.sqlite, qa.py)
    suffixes = {Path(other).suffix: other for other in names if Path(other).stem == Path(name).stem}
    near_suffix = closest(suffix, suffixes)
    if near_suffix is not None:
        return suffixes[near_suffix]
    for same in (True, False):
        stems = {Path(other).stem: other for other in names if (Path(other).suffix == suffix) == same}
        near = closest(Path(name).stem, stems)
        if near is not None:
            return stems[near]
    return None


def shell_word(value: str | Path) -> str:
    """`value` as a shell reads it back in a command we print to copy: quoted only when it needs to be
    (a space, `~`, `*`, a quote: anything the shell would change)."""
    return shlex.quote(str(value))
