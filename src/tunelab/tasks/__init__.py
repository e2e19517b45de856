"""Built-in tasks: datasets addressed as `NAME:train` / `NAME:eval`, each with an exact-match rule.

Rows are prompt/completion pairs. `extract_answer` pulls the comparable answer out of a completion
(reference or generated); exact match = the two extracted answers are equal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tunelab.errors import TunelabError

# dev and test are the first and second half of eval: choose on dev, report on test
SPLITS = ("train", "eval", "dev", "test")


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    rows: Callable[[str], list[dict]]  # split -> [{"prompt": ..., "completion": ...}]
    extract_answer: Callable[[str], str | None]
    max_new_tokens: int = 32


def first_line(text: str) -> str | None:
    """The default answer: the completion's first non-empty line, stripped."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return None


def builtin_tasks() -> dict[str, Task]:
    """The built-in tasks by name."""
    from tunelab.tasks.gsm8k import GSM8K
    from tunelab.tasks.synthetic import SYNTHETIC_TASKS

    return {task.name: task for task in (GSM8K, *SYNTHETIC_TASKS)}


def builtin_task_names() -> tuple[str, ...]:
    return tuple(builtin_tasks())


def split_rows(task: Task, split: str) -> list[dict]:
    """The rows of one of SPLITS."""
    if split in ("dev", "test"):
        rows = task.rows("eval")
        return rows[: len(rows) // 2] if split == "dev" else rows[len(rows) // 2 :]
    return task.rows(split)


def parse_builtin(spec: str) -> tuple[Task, str] | None:
    """'gsm8k:train' -> (task, 'train'); None when `spec` does not name a built-in task."""
    name, sep, split = spec.partition(":")
    tasks = builtin_tasks()
    if not sep or name not in tasks:
        return None
    if split not in SPLITS:
        raise TunelabError(
            f"dataset '{spec}': unknown split '{split}'; use {', '.join(f'{name}:{s}' for s in SPLITS)}"
        )
    return tasks[name], split
