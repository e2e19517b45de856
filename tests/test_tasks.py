"""The procedurally generated tasks: deterministic, disjoint splits, correct reference answers."""

import re

import pytest

from tunelab.tasks import builtin_tasks, parse_builtin, synthetic
from tunelab.tasks.synthetic import EVAL_ROWS, SYNTHETIC_TASKS, TRAIN_ROWS

TASKS = {task.name: task for task in SYNTHETIC_TASKS}
UNIT_FACTORS = {
    ("km", "m"): 1000, ("m", "cm"): 100, ("kg", "g"): 1000,
    ("h", "min"): 60, ("min", "s"): 60, ("L", "mL"): 1000,
}  # fmt: skip


def solve(name: str, question: str) -> str:
    """An independent solver for each task, from the question text alone."""
    if name == "addition":
        a, b = re.fullmatch(r"What is (\d+) \+ (\d+)\?", question).groups()
        return str(int(a) + int(b))
    if name == "reverse":
        return re.fullmatch(r"Reverse the letters of '([a-z]+)'\.", question).group(1)[::-1]
    if name == "sort":
        numbers = re.fullmatch(r"Sort from smallest to largest: ([\d ]+)", question).group(1).split()
        return " ".join(str(n) for n in sorted(int(n) for n in numbers))
    if name == "units":
        amount, source, target = re.fullmatch(r"Convert (\d+) (\w+) to (\w+)\.", question).groups()
        if (source, target) in UNIT_FACTORS:
            return str(int(amount) * UNIT_FACTORS[source, target])
        factor = UNIT_FACTORS[target, source]
        assert int(amount) % factor == 0
        return str(int(amount) // factor)
    if name == "parity":
        number = int(re.fullmatch(r"Is (\d+) odd or even\?", question).group(1))
        return "odd" if number % 2 else "even"
    if name == "lookup":
        context, asked = re.fullmatch(r"Given (.+), what is ([a-z])\?", question).groups()
        return dict(pair.split("=") for pair in context.split(", "))[asked]
    raise AssertionError(f"no solver for {name}")


def test_at_least_six_registered_tasks():
    assert len(TASKS) >= 6 and len(TASKS) == len(SYNTHETIC_TASKS)
    registered = builtin_tasks()
    for name, task in TASKS.items():
        assert registered[name] is task
        assert parse_builtin(f"{name}:eval") == (task, "eval")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_sizes_disjoint_and_deterministic(name):
    task = TASKS[name]
    train, evaluation = task.rows("train"), task.rows("eval")
    assert (len(train), len(evaluation)) == (TRAIN_ROWS, EVAL_ROWS)
    prompts = [row["prompt"] for row in train + evaluation]
    assert len(set(prompts)) == len(prompts)  # unique, so train and eval share no prompt
    synthetic._examples.cache_clear()  # generate from scratch: the same rows again
    assert task.rows("train") == train and task.rows("eval") == evaluation


@pytest.mark.parametrize("name", sorted(TASKS))
def test_rows_are_well_formed_and_correct(name):
    task = TASKS[name]
    for row in task.rows("train")[:300] + task.rows("eval"):
        prompt, completion = row["prompt"], row["completion"]
        assert prompt.endswith("\nAnswer:") and not prompt.endswith(" ")
        assert completion.startswith(" ") and "\n" not in completion
        answer = task.extract_answer(completion)
        assert answer is not None
        assert answer == solve(name, prompt.removesuffix("\nAnswer:"))
        assert task.extract_answer(f"{completion}\nmore text the model rambled") == answer


def test_rows_are_the_same_on_every_machine():
    # string seeds hash the same everywhere: this pins the generator, not just self-consistency
    assert TASKS["addition"].rows("eval")[0] == {
        "prompt": "What is 574 + 663?\nAnswer:",
        "completion": " 1237",
    }
