"""Datasets: load rows (built-in tasks or local files), render them by format, tokenize with
the loss on response tokens only.

Formats (`data.format`, `auto` detects from the columns):
  alpaca             instruction, output (+ optional input)
  prompt-completion  prompt, completion
  messages           messages: [{role, content}, ...] rendered with the tokenizer's chat template
  text               text (every token trains)
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tunelab.config import DataConfig
from tunelab.errors import TunelabError
from tunelab.tasks import Task, parse_builtin

FORMAT_FIELDS = {
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
IGNORE_INDEX = -100

Row = tuple[str, dict]  # (where it came from: "file:line", the row)


# -- loading ---------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TunelabError(
                    f"{path}:{number}: invalid JSON ({exc.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(row, dict):
                raise TunelabError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((f"{path}:{number}", row))
    return rows


def _read_table(path: Path) -> list[Row]:
    """JSON as a list of objects (or JSON lines); CSV as strings (no type guessing, so ' 5' stays
    ' 5'); Parquet through `datasets`."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return _read_jsonl(path)  # a .json file holding JSON lines
        if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
            data = next(iter(data.values()))  # {"data": [...]}
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise TunelabError(f"{path}: expected a JSON list of objects (or one object per line)")
        return [(f"{path} row {i + 1}", row) for i, row in enumerate(data)]
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            try:
                return [(f"{path}:{reader.line_num}", row) for row in reader]
            except csv.Error as exc:
                raise TunelabError(f"{path}:{reader.line_num}: invalid CSV ({exc})") from None
    from datasets import load_dataset

    try:
        table = load_dataset("parquet", data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise TunelabError(f"{path}: cannot read as parquet: {str(exc).splitlines()[0]}") from None
    return [(f"{path} row {i + 1}", dict(row)) for i, row in enumerate(table)]


def load_rows(spec: str) -> tuple[list[Row], Task | None]:
    """Rows of a built-in task (`gsm8k:train`) or a local file, and the task when built in."""
    builtin = parse_builtin(spec)
    if builtin is not None:
        task, split = builtin
        return [(f"{spec} row {i + 1}", row) for i, row in enumerate(task.rows(split))], task
    path = Path(spec).expanduser()
    if not path.is_file():
        from tunelab.tasks import builtin_tasks

        names = ", ".join(f"{name}:train" for name in builtin_tasks())
        raise TunelabError(
            f"dataset not found: '{spec}' is neither a file nor a built-in ({names}, or :eval)"
        )
    if path.suffix not in FILE_SUFFIXES:
        raise TunelabError(
            f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(FILE_SUFFIXES)}"
        )
    rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_table(path)
    if not rows:
        raise TunelabError(f"{path}: the dataset has no rows")
    return rows, None


def detect_format(rows: list[Row], requested: str) -> str:
    where, first = rows[0]
    if requested != "auto":
        return requested
    for fmt, fields in FORMAT_FIELDS.items():
        if all(field in first for field in fields):
            return fmt
    needs = "; ".join(f"{fmt}: {', '.join(fields)}" for fmt, fields in FORMAT_FIELDS.items())
    raise TunelabError(f"{where}: cannot tell the format from columns {sorted(first)}; rows need ({needs})")


# -- rendering -------------------------------------------------------------------------------------


def _text(where: str, row: dict, field: str, fmt: str) -> str:
    value = row.get(field)
    if value is None:
        raise TunelabError(
            f"{where}: row has no '{field}' field (format {fmt} needs {', '.join(FORMAT_FIELDS[fmt])})"
        )
    if not isinstance(value, str):
        raise TunelabError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _alpaca_prompt(instruction: str, context: str) -> str:
    if context:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _message_segments(where: str, messages: object, tokenizer) -> list[tuple[str, bool]]:
    """Render a conversation with the chat template; assistant turns are the responses.

    Each assistant turn's text is what the template adds between the generation prompt of the
    turns before it and the conversation including it, so no template-specific markers are needed.
    """
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise TunelabError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    if tokenizer.chat_template is None:
        raise TunelabError(
            f"{where}: format messages needs a tokenizer with a chat template; this one has none"
        )
    segments, rendered = [], ""
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: turn + 1], tokenize=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise TunelabError(
                f"{where}: the chat template does not render turns as prefixes; use format text"
            )
        segments += [(prompt[len(rendered) :], False), (full[len(prompt) :], True)]
        rendered = full
    final = tokenizer.apply_chat_template(messages, tokenize=False)
    if final[len(rendered) :]:
        segments.append((final[len(rendered) :], False))
    return segments


def render(where: str, row: dict, fmt: str, tokenizer) -> list[tuple[str, bool]]:
    """A row as (text, is_response) segments, in order."""
    eos = tokenizer.eos_token or ""
    if fmt == "alpaca":
        context = row.get("input") or ""
        prompt = _alpaca_prompt(
            _text(where, row, "instruction", fmt), context if isinstance(context, str) else ""
        )
        return [(prompt, False), (_text(where, row, "output", fmt) + eos, True)]
    if fmt == "prompt-completion":
        return [(_text(where, row, "prompt", fmt), False), (_text(where, row, "completion", fmt) + eos, True)]
    if fmt == "messages":
        return _message_segments(where, row.get("messages"), tokenizer)
    return [(_text(where, row, "text", fmt) + eos, True)]


def tokenize_segments(
    segments: list[tuple[str, bool]], tokenizer, max_length: int, train_on_prompt: bool
) -> dict[str, list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    for position, (text, is_response) in enumerate(segments):
        # special tokens (e.g. a BOS) only at the very start of the example
        ids = tokenizer(text, add_special_tokens=position == 0)["input_ids"]
        input_ids += ids
        labels += ids if (is_response or train_on_prompt) else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}


# -- datasets --------------------------------------------------------------------------------------


@dataclass
class Example:
    where: str
    prompt: str  # the text before the first response (what generation starts from)
    reference: str  # the first response (what exact match compares against)


class TokenizedDataset(torch.utils.data.Dataset):
    def __init__(
        self, features: list[dict[str, list[int]]], examples: list[Example], task: Task | None, fmt: str
    ) -> None:
        self.features, self.examples, self.task, self.format = features, examples, task, fmt

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


def build_dataset(
    spec: str, tokenizer, options: DataConfig | None = None, limit: int | None = None
) -> TokenizedDataset:
    """Load, render and tokenize `spec` as `options` (format, max_length, train_on_prompt) say;
    examples with no response token left after truncation are dropped (an error when none is left)."""
    options = options or DataConfig()
    max_length, train_on_prompt = options.max_length, options.train_on_prompt
    rows, task = load_rows(spec)
    if limit is not None:
        rows = rows[:limit]
    fmt = detect_format(rows, options.format)
    features, examples = [], []
    for where, row in rows:
        segments = render(where, row, fmt, tokenizer)
        feature = tokenize_segments(segments, tokenizer, max_length, train_on_prompt)
        if all(label == IGNORE_INDEX for label in feature["labels"]):
            continue
        features.append(feature)
        prompt = next((text for text, is_response in segments if not is_response), "")
        reference = next((text for text, is_response in segments if is_response), "")
        examples.append(Example(where, prompt, reference.removesuffix(tokenizer.eos_token or "")))
    if not features:
        raise TunelabError(
            f"dataset '{spec}': no example keeps a response token within data.max_length="
            f"{max_length}; raise data.max_length"
        )
    return TokenizedDataset(features, examples, task, fmt)


def collator(tokenizer):
    """Pads a batch to its longest example: inputs with the pad token, labels with -100."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
    )
