"""Datasets: load rows (built-in tasks or local files), render them by format, tokenize with
the loss on response tokens only.

Formats (`data.format`, `auto` detects from the columns):
  alpaca             instruction, output (+ optional input)
  prompt-completion  prompt, completion
  messages           messages: [{role, content}, ...] rendered with the tokenizer's chat template
  sharegpt           conversations: [{from, value}, ...] (human/gpt/system/tool), read as messages
  text               text (every token trains)
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from tunelab.config import DataConfig, read_utf8
from tunelab.errors import TunelabError
from tunelab.tasks import Task, parse_builtin

FORMAT_FIELDS = {
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "text": ("text",),
}
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
IGNORE_INDEX = -100

Row = tuple[str, dict]  # (where it came from: "file:line", the row)


# -- loading ---------------------------------------------------------------------------------------


class BadRow(TunelabError):
    """A malformed row; `reason` groups rows in the summary when `data.skip_bad_rows` skips them."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _read_jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
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


def _read_csv(path: Path, text: str) -> list[Row]:
    """Strings only (no type guessing, so ' 5' stays ' 5'); the delimiter (, ; tab) is read off the
    header line, so a semicolon CSV from a European spreadsheet works as is."""
    header = text.split("\n", 1)[0]
    delimiter = max(",;\t", key=header.count)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows = []
    try:
        for row in reader:
            if None in row or None in row.values():
                fields = len(row) - (None in row) + len(row.get(None) or [])
                raise TunelabError(
                    f"{path}:{reader.line_num}: row has {fields} fields, the header has "
                    f"{len(reader.fieldnames)}; quote fields that contain '{delimiter}'"
                )
            rows.append((f"{path}:{reader.line_num}", row))
    except csv.Error as exc:
        raise TunelabError(f"{path}:{reader.line_num}: invalid CSV ({exc})") from None
    return rows


def _read_json(path: Path, text: str) -> list[Row]:
    """A JSON list of objects, {"data": [...]}, or JSON lines in a .json file."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("["):  # one JSON array, not JSON lines: say where it breaks
            raise TunelabError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from None
        return _read_jsonl(path, text)
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise TunelabError(f"{path}: expected a JSON list of objects (or one object per line)")
    return [(f"{path} row {i + 1}", row) for i, row in enumerate(data)]


def _read_parquet(path: Path) -> list[Row]:
    from datasets import load_dataset
    from datasets.utils.logging import disable_progress_bar, set_verbosity_error

    disable_progress_bar()  # its "Generating train split" bar would be a second line on the terminal
    set_verbosity_error()
    try:
        table = load_dataset("parquet", data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise TunelabError(f"{path}: cannot read as parquet: {str(exc).splitlines()[0]}") from None
    return [(f"{path} row {i + 1}", dict(row)) for i, row in enumerate(table)]


def _read_file(path: Path) -> list[Row]:
    if path.suffix == ".parquet":
        return _read_parquet(path)
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}
    return readers[path.suffix](path, read_utf8(path))


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
    rows = _read_file(path)
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

CHAT_ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's `from` -> a chat role: the community names (LLaMA-Factory, axolotl, Unsloth read these),
# and OpenAI's own names, which some ShareGPT files use
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
}
SKIP_HINT = "; fix the row, or set data.skip_bad_rows=true to skip such rows"


def _as_text(where: str, value: object, field: str) -> str:
    """A text field's value: strings as they are, numbers as written (`output: 42`)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if value is None:
        raise BadRow(f"{where}: field '{field}' is null; give it a text value{SKIP_HINT}", "null field")
    raise BadRow(
        f"{where}: field '{field}' must be text, got {type(value).__name__}{SKIP_HINT}", "non-text field"
    )


def _text(where: str, row: dict, field: str, fmt: str) -> str:
    if field not in row:
        raise BadRow(
            f"{where}: row has no '{field}' field (format {fmt} needs {', '.join(FORMAT_FIELDS[fmt])})"
            f"{SKIP_HINT}",
            "missing field",
        )
    return _as_text(where, row[field], field)


def _alpaca_prompt(instruction: str, context: str) -> str:
    if context:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _message_content(where: str, turn: int, message: dict) -> str | None:
    """A message's text: a string, or OpenAI's list of parts (text parts joined). None only for an
    assistant message that carries tool calls instead."""
    content = message.get("content")
    if content is None:
        if message.get("tool_calls"):
            return None
        raise BadRow(f"{where}: message {turn + 1} has no content{SKIP_HINT}", "message without content")
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
            raise BadRow(
                f"{where}: message {turn + 1}: only text content parts can be trained (found "
                f"{sorted({str(p.get('type')) for p in content if isinstance(p, dict)})}){SKIP_HINT}",
                "non-text content",
            )
        return "".join(_as_text(where, part.get("text"), "text") for part in content)
    return _as_text(where, content, f"messages[{turn}].content")


def _clean_messages(where: str, messages: object, tokenizer) -> tuple[list[dict], list[bool]]:
    """Messages as the chat template takes them, and for each whether it is a trained response
    (an assistant turn whose OpenAI-style `weight` is not 0)."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRow(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} objects{SKIP_HINT}",
            "malformed messages",
        )
    cleaned, trained = [], []
    for turn, message in enumerate(messages):
        role = message.get("role")
        if role not in CHAT_ROLES:
            sharegpt = " (ShareGPT's human/gpt turns go under 'conversations' as {from, value})"
            raise BadRow(
                f"{where}: message {turn + 1} has role {role!r}; roles are "
                f"{', '.join(CHAT_ROLES)}{sharegpt if role in SHAREGPT_ROLES else ''}{SKIP_HINT}",
                "unknown role",
            )
        weight = message.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise BadRow(
                f"{where}: message {turn + 1}: weight must be 0 or 1, got {weight!r}{SKIP_HINT}", "bad weight"
            )
        clean = {key: value for key, value in message.items() if key != "weight"}
        clean["content"] = _message_content(where, turn, message)
        if clean.get("tool_calls") and "tool_calls" not in (tokenizer.chat_template or ""):
            raise BadRow(
                f"{where}: message {turn + 1} has tool_calls, which this model's chat template cannot "
                f"render; drop the tool turns or use a model whose template supports tools{SKIP_HINT}",
                "tool calls unsupported",
            )
        cleaned.append(clean)
        trained.append(role == "assistant" and weight == 1)
    if not any(trained):
        raise BadRow(
            f"{where}: the conversation has no assistant turn to train on{SKIP_HINT}", "no assistant turn"
        )
    return cleaned, trained


def sharegpt_messages(where: str, conversations: object) -> list[dict]:
    """ShareGPT turns ({from, value}) as chat messages ({role, content}); other keys (weight) kept."""
    if not isinstance(conversations, list) or not all(isinstance(t, dict) for t in conversations):
        raise BadRow(
            f"{where}: 'conversations' must be a list of {{from, value}} objects{SKIP_HINT}",
            "malformed messages",
        )
    messages = []
    for turn, item in enumerate(conversations):
        speaker = item.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise BadRow(
                f"{where}: turn {turn + 1} has from {speaker!r}; ShareGPT speakers are "
                f"{', '.join(SHAREGPT_ROLES)}{SKIP_HINT}",
                "unknown role",
            )
        if "value" not in item:
            raise BadRow(f"{where}: turn {turn + 1} has no 'value'{SKIP_HINT}", "message without content")
        rest = {key: value for key, value in item.items() if key not in ("from", "value")}
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": item["value"], **rest})
    return messages


def _chat(where: str, tokenizer, messages: list[dict], **options) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **options)
    except Exception as exc:  # jinja raises TemplateError and friends for what a template refuses
        raise BadRow(
            f"{where}: the chat template cannot render this conversation ({str(exc).splitlines()[0]})"
            f"{SKIP_HINT}",
            "template error",
        ) from None


def _message_segments(where: str, messages: object, tokenizer) -> tuple[list[tuple[str, bool]], str]:
    """Render a conversation with the chat template; trained assistant turns are the responses.
    Returns the segments and the first response's own text (the exact-match reference).

    Each assistant turn's text is what the template adds between the generation prompt of the
    turns before it and the conversation including it, so no template-specific markers are needed.
    """
    if tokenizer.chat_template is None:
        raise TunelabError(
            f"{where}: chat rows (messages, sharegpt) need a tokenizer with a chat template; this one has "
            "none"
        )
    messages, trained = _clean_messages(where, messages, tokenizer)
    segments, rendered = [], ""
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _chat(where, tokenizer, messages[:turn], add_generation_prompt=True)
        full = _chat(where, tokenizer, messages[: turn + 1])
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise TunelabError(
                f"{where}: the chat template does not render turns as prefixes; use format text"
            )
        segments += [(prompt[len(rendered) :], False), (full[len(prompt) :], trained[turn])]
        rendered = full
    final = _chat(where, tokenizer, messages)
    if final[len(rendered) :]:
        segments.append((final[len(rendered) :], False))
    reference = next(m["content"] or "" for m, t in zip(messages, trained, strict=True) if t)
    return segments, reference


def render(where: str, row: dict, fmt: str, tokenizer) -> tuple[list[tuple[str, bool]], str]:
    """A row as (text, is_response) segments, in order, and the first response's own text (what
    exact match compares a generation with: no template markers, no end-of-sequence token)."""
    eos = tokenizer.eos_token or ""
    if fmt == "alpaca":
        context = _as_text(where, row["input"], "input") if row.get("input") is not None else ""
        prompt = _alpaca_prompt(_text(where, row, "instruction", fmt), context)
        output = _text(where, row, "output", fmt)
        return [(prompt, False), (output + eos, True)], output
    if fmt == "prompt-completion":
        completion = _text(where, row, "completion", fmt)
        return [(_text(where, row, "prompt", fmt), False), (completion + eos, True)], completion
    if fmt == "messages":
        return _message_segments(where, row.get("messages"), tokenizer)
    if fmt == "sharegpt":
        return _message_segments(where, sharegpt_messages(where, row.get("conversations")), tokenizer)
    text = _text(where, row, "text", fmt)
    return [(text + eos, True)], text


def tokenize_segments(
    segments: list[tuple[str, bool]], tokenizer, max_length: int, train_on_prompt: bool
) -> tuple[dict[str, list[int]], bool]:
    """input_ids and labels (-100 where no loss is taken), cut to max_length; and whether it was cut."""
    input_ids: list[int] = []
    labels: list[int] = []
    for position, (text, is_response) in enumerate(segments):
        # special tokens (e.g. a BOS) only at the very start of the example
        ids = tokenizer(text, add_special_tokens=position == 0)["input_ids"]
        input_ids += ids
        labels += ids if (is_response or train_on_prompt) else [IGNORE_INDEX] * len(ids)
    cut = len(input_ids) > max_length
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length]}, cut


# -- datasets --------------------------------------------------------------------------------------


@dataclass
class Example:
    prompt: str  # the text before the first response (what generation starts from)
    reference: str  # the first response's own text (what exact match compares against)


class RowReport:
    """Rows skipped or shortened while building a dataset, by reason, with the first place of each."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.first.setdefault(reason, where)

    def summary(self, spec: str, total: int, used: int) -> str | None:
        if not self.counts:
            return None
        parts = [f"{count} {reason} (first: {self.first[reason]})" for reason, count in self.counts.items()]
        return f"data {spec}: {used} of {total} rows used; " + "; ".join(parts)


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
    """Load, render and tokenize `spec` as `options` say (format, max_length, train_on_prompt,
    skip_bad_rows). Examples with no response token left after truncation are dropped; every dropped,
    skipped or truncated row is counted in one summary line on stderr."""
    options = options or DataConfig()
    max_length, train_on_prompt = options.max_length, options.train_on_prompt
    rows, task = load_rows(spec)
    if limit is not None:
        rows = rows[:limit]
    fmt = detect_format(rows, options.format)
    features, examples, report = [], [], RowReport()
    for where, row in rows:
        try:
            segments, reference = render(where, row, fmt, tokenizer)
        except BadRow as bad:
            if not options.skip_bad_rows:
                raise
            report.add(f"skipped: {bad.reason}", where)
            continue
        feature, cut = tokenize_segments(segments, tokenizer, max_length, train_on_prompt)
        if all(label == IGNORE_INDEX for label in feature["labels"]):
            report.add(f"dropped: response beyond data.max_length={max_length}", where)
            continue
        if cut:
            report.add(f"truncated to data.max_length={max_length}", where)
        features.append(feature)
        prompt = next((text for text, is_response in segments if not is_response), "")
        examples.append(Example(prompt, reference))
    if not features:
        if any(reason.startswith("skipped") for reason in report.counts):  # not a length problem
            raise TunelabError(f"dataset '{spec}': no usable row ({report.summary(spec, len(rows), 0)})")
        raise TunelabError(
            f"dataset '{spec}': no example keeps a response token within data.max_length="
            f"{max_length}; raise data.max_length"
            + (f" ({report.summary(spec, len(rows), 0)})" if report.counts else "")
        )
    summary = report.summary(spec, len(rows), len(features))
    if summary:
        report_console = Console(stderr=True, emoji=False, soft_wrap=True, highlight=False)
        report_console.print(f"[yellow]{escape(summary)}[/yellow]")
    return TokenizedDataset(features, examples, task, fmt)


def padded_fraction(lengths: list[int], order: list[int], batch_size: int) -> float:
    """Share of the tokens of the batches (examples taken in `order`, each batch padded to its longest
    example, as `collator` pads) that are padding."""
    padded = total = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        total += max(batch) * len(batch)
        padded += max(batch) * len(batch) - sum(batch)
    return padded / max(total, 1)


def collator(tokenizer):
    """Pads a batch to its longest example: inputs with the pad token, labels with -100."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(
        tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt"
    )
