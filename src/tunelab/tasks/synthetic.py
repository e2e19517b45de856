"""Procedurally generated tasks: small, exact-match, learnable by a 135M model in minutes on a CPU.

Each task draws unique prompts from a seeded generator: the first 200 are `NAME:eval`, the next
2000 `NAME:train`, so the splits are disjoint and identical on every machine. Prompts end in
"Answer:" and completions are one short line starting with a space.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from functools import cache

from tunelab.tasks import Task, first_line

SEED = 1234
TRAIN_ROWS = 2000
EVAL_ROWS = 200

Example = tuple[str, str]  # (question, answer)


def _addition(rng: random.Random) -> Example:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"What is {a} + {b}?", str(a + b)


def _reverse(rng: random.Random) -> Example:
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 6)))
    return f"Reverse the letters of '{word}'.", word[::-1]


def _sort(rng: random.Random) -> Example:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    listed = " ".join(map(str, numbers))
    return f"Sort from smallest to largest: {listed}", " ".join(map(str, sorted(numbers)))


# (larger unit, smaller unit, how many smaller units make one larger)
_UNITS = [
    ("km", "m", 1000),
    ("m", "cm", 100),
    ("kg", "g", 1000),
    ("h", "min", 60),
    ("min", "s", 60),
    ("L", "mL", 1000),
]


def _units(rng: random.Random) -> Example:
    large, small, factor = rng.choice(_UNITS)
    amount = rng.randint(1, 999)
    if rng.random() < 0.5:
        return f"Convert {amount} {large} to {small}.", str(amount * factor)
    return f"Convert {amount * factor} {small} to {large}.", str(amount)  # whole answers only


def _parity(rng: random.Random) -> Example:
    number = rng.randint(0, 99999)
    return f"Is {number} odd or even?", "even" if number % 2 == 0 else "odd"


def _lookup(rng: random.Random) -> Example:
    keys = rng.sample(string.ascii_lowercase, k=rng.randint(3, 5))
    values = {key: rng.randint(0, 99) for key in keys}
    context = ", ".join(f"{key}={value}" for key, value in values.items())
    asked = rng.choice(keys)
    return f"Given {context}, what is {asked}?", str(values[asked])


@cache
def _examples(name: str, generate: Callable[[random.Random], Example]) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples with unique questions; a string seed is stable across runs and machines."""
    rng = random.Random(f"{name}-{SEED}")
    needed = EVAL_ROWS + TRAIN_ROWS
    unique: dict[str, str] = {}
    for _ in range(100 * needed):  # a generator with too few distinct questions fails instead of hanging
        question, answer = generate(rng)
        unique.setdefault(question, answer)
        if len(unique) == needed:
            break
    else:
        raise RuntimeError(
            f"task '{name}' produced only {len(unique)} distinct questions; {needed} are needed"
        )
    examples = list(unique.items())
    return examples[EVAL_ROWS:], examples[:EVAL_ROWS]


def _task(name: str, description: str, generate: Callable[[random.Random], Example]) -> Task:
    def rows(split: str) -> list[dict]:
        train, evaluation = _examples(name, generate)
        chosen = evaluation if split == "eval" else train
        return [{"prompt": f"{question}\nAnswer:", "completion": f" {answer}"} for question, answer in chosen]

    return Task(name=name, description=description, rows=rows, extract_answer=first_line, max_new_tokens=16)


SYNTHETIC_TASKS: tuple[Task, ...] = (
    _task("addition", "add two numbers of up to three digits", _addition),
    _task("reverse", "reverse a 3-6 letter string", _reverse),
    _task("sort", "sort 3-5 numbers below 100 in ascending order", _sort),
    _task("units", "convert between metric / time units (km-m, kg-g, h-min, ...), whole answers", _units),
    _task("parity", "classify a number below 100000 as odd or even", _parity),
    _task("lookup", "read a key's value from a short list of key=value pairs", _lookup),
)
