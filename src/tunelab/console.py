"""The console commands print their tables and results to (stdout)."""

from __future__ import annotations

import os
import sys

from rich.console import Console

# Printed into a pipe or a log file, rich would wrap at 80 columns and squeeze a table's columns into
# fragments of a word: there each row stays on one line, as wide as this at most (COLUMNS still wins).
PIPED_WIDTH = 200


def stdout_console() -> Console:
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(emoji=False, width=PIPED_WIDTH if piped else None)


def plural(count: int, noun: str) -> str:
    """'1 step', '2 steps'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
