"""Datasets: load rows (built-in tasks, local files, Hugging Face datasets), render them by format,
tokenize with the loss on response tokens only.

Formats (`data.format`, `auto` detects from the columns; `data.columns` renames a dataset's own):
  alpaca             instruction, output (+ optional input)
  prompt-completion  prompt, completion
  messages           messages: [{role, content}, ...] rendered with the tokenizer's chat template
  sharegpt           conversations: [{from, value}, ...] (human/gpt/system/tool), read as messages
  text               text (every token trains)
Alpaca and prompt-completion rows become text as `data.template` says: a chat turn pair (the
tokenizer's chat template), the ### Instruction / ### Response template, or as written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tunelab.config import ROW_FIELDS as FORMAT_FIELDS
from tunelab.config import DataConfig, check_source, data_suffix, read_utf8
from tunelab.errors import DataError, TunelabError
from tunelab.hub import offline_unless_reachable
from tunelab.tasks import Task, parse_builtin, split_rows

IGNORE_INDEX = -100

# (where it came from: "file:line", the row); with data.skip_bad_rows, a line that is no row (invalid
# JSON) stays in place as its BadRow, to be skipped and counted with the other bad rows
Row = tuple[str, "dict | BadRow"]


# -- loading ---------------------------------------------------------------------------------------


class BadRow(DataError):
    """A malformed row; `reason` groups rows in the summary when `data.skip_bad_rows` skips them."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _read_jsonl(path: Path, text: str, keep_bad: bool = False) -> list[Row]:
    rows: list[Row] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            # a JSON array cut into lines by hand keeps the comma after each object
            comma = "; remove the ',' after the object" if line.rstrip().endswith(("},", "} ,")) else ""
            message = f"{where}: invalid JSON ({exc.msg}){comma}; each line must be one JSON object"
            row = BadRow(message + LINE_SKIP_HINT, "invalid JSON")
        if not isinstance(row, dict | BadRow):
            message = f"{where}: expected a JSON object, got {type(row).__name__}"
            row = BadRow(message + LINE_SKIP_HINT, "not a JSON object")
        if isinstance(row, BadRow) and not keep_bad:
            raise row
        rows.append((where, row))
    return rows


def columns_present(rows: list[Row], columns: dict[str, str]) -> dict[str, str]:
    """The entries of a run's `data.columns` whose column the rows have: another file, given to eval or
    generate, may use the run's column names (a file like the training data) or the format's own."""
    first = first_row(rows)[1]
    return {field: column for field, column in columns.items() if column in first}


def columns_line(where: str) -> str:
    """Where a row's columns are named: a CSV/TSV file's header line (`qa.csv:2` -> `qa.csv:1, its
    header`), else the row itself."""
    path, _, line = where.rpartition(":")
    return f"{path}:1, its header" if line.isdigit() and data_suffix(path) in (".csv", ".tsv") else where


def first_row(rows: list[Row]) -> tuple[str, dict]:
    """The first row that is one (what the format is told from), passing over lines kept as bad."""
    for where, row in rows:
        if not isinstance(row, BadRow):
            return where, row
    where, bad = rows[0]
    raise DataError(
        f"{where}: no line holds a row ({len(rows)} skipped as bad, the first for {bad.reason}); fix the file"
    )


def _read_csv(path: Path, text: str, delimiter: str | None = None, keep_bad: bool = False) -> list[Row]:
    """Strings only (no type guessing, so ' 5' stays ' 5'); the delimiter (, ; tab), unless given, is
    read off the header line, so a semicolon CSV from a European spreadsheet works as is. A cell of
    several lines (Excel writes CRLF inside quotes) keeps plain newlines, and a row is named by the line
    it starts on. A row with more or fewer cells than the header is bad (kept as such with `keep_bad`)."""
    header = text.split("\n", 1)[0]
    delimiter = delimiter or max(",;\t", key=header.count)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows, start = [], 2  # the line after the header
    try:
        for row in reader:
            # DictReader puts extra cells under the key None, and gives missing ones the value None
            count = sum(value is not None for key, value in row.items() if key is not None)
            count += len(row.get(None) or [])
            if count != len(reader.fieldnames):
                fix = (
                    f"quote cells that contain '{delimiter}'"
                    if count > len(reader.fieldnames)
                    else "fill in the missing cells (an empty one is two delimiters in a row)"
                )
                message = f"{path}:{start}: row has {count} cells, the header has {len(reader.fieldnames)}"
                bad = BadRow(f"{message}; {fix}{SKIP_HINT}", "wrong number of cells")
                if not keep_bad:
                    raise bad
                rows.append((f"{path}:{start}", bad))
            else:
                cells = {key: value.replace("\r\n", "\n") for key, value in row.items()}
                if any(value.strip() for value in cells.values()):  # a spreadsheet's empty row (,,,) is none
                    rows.append((f"{path}:{start}", cells))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: invalid CSV ({exc})") from None
    return rows


def _read_json(path: Path, text: str, keep_bad: bool = False) -> list[Row]:
    """A JSON list of objects, {"data": [...]}, or JSON lines in a .json file."""
    if not text.strip():  # empty: told as an empty .jsonl or .csv is, not as invalid JSON
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        first = text.lstrip().split("\n", 1)[0].rstrip()
        if not (first.startswith("{") and first.endswith("}")):
            # one document (an array, a pretty-printed object), not JSON lines: say where it breaks
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from None
        return _read_jsonl(path, text, keep_bad)
    if isinstance(data, dict) and ("messages" in data or "conversations" in data):
        data = [data]  # one chat row, not a wrapper around its turns
    elif isinstance(data, dict):  # {"data": [...]}, also beside other keys ({"version": 2, "data": [...]})
        lists = [value for value in data.values() if isinstance(value, list)]
        data = lists[0] if len(lists) == 1 else data
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DataError(
            f"{path}: expected a JSON list of objects, an object holding one such list, or one object "
            "per line"
        )
    return [(f"{path} row {i + 1}", row) for i, row in enumerate(data)]


def _quiet_datasets():
    import datasets
    from datasets.utils.logging import disable_progress_bar, set_verbosity_error
    from huggingface_hub.utils import logging as hub_logging

    disable_progress_bar()  # its "Generating train split" bar would be a second line on the terminal
    set_verbosity_error()
    hub_logging.set_verbosity_error()  # without a network, one "Retrying in 4s" line per retry
    return datasets


def _first_line(exc: BaseException) -> str:
    """The first line of what went wrong at the bottom of `exc`'s chain: datasets wraps the cause (a
    column missing from one of a folder's files) in 'An error occurred while generating the dataset'."""
    while True:  # `raise ... from None` ends the chain where its author chose the message
        cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if cause is None:
            break
        exc = cause
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    # Arrow's cast errors end with the reason ("... because column names don't match")
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def _read_parquet(path: Path) -> list[Row]:
    datasets = _quiet_datasets()
    try:
        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DataError(f"{path}: cannot read as parquet: {_first_line(exc)}") from None
    return [(f"{path} row {i + 1}", dict(row)) for i, row in enumerate(table)]


def _read_file(path: Path, keep_bad: bool) -> list[Row]:
    suffix = data_suffix(path)  # DATA.CSV from a Windows tool reads as .csv
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        text = read_utf8(path)
    except TunelabError as exc:  # not UTF-8, a damaged archive: the data, whichever run reads it
        raise DataError(str(exc)) from None
    if suffix in (".csv", ".tsv"):
        return _read_csv(path, text, "\t" if suffix == ".tsv" else None, keep_bad)
    read = _read_jsonl if suffix == ".jsonl" else _read_json
    return read(path, text, keep_bad)


def _read_hf_dataset(
    spec: str, local: bool, split: str | None, subset: str | None, split_key: str
) -> list[Row]:
    """A `save_to_disk` folder, a dataset repository folder, or a hub id, through `datasets`. With
    several splits, `split` picks one (None: validation, else test)."""
    datasets = _quiet_datasets()
    if not local:
        offline_unless_reachable()
    saved = local and any((Path(spec) / name).is_file() for name in ("dataset_dict.json", "state.json"))
    try:
        loaded = datasets.load_from_disk(spec) if saved else datasets.load_dataset(spec, subset)
    except Exception as exc:  # datasets raises many types (missing files, no hub, bad config name)
        where = "the folder" if local else "the hub"
        # not a DataError: a hub out of reach now says nothing of the data (the next trial may reach it)
        raise TunelabError(
            f"dataset '{spec}': datasets could not load it from {where} ({_first_line(exc)}); "
            "check the path or id" + ("" if local else ", data.subset, and that the hub is reachable")
        ) from None
    label = spec
    if not isinstance(loaded, datasets.DatasetDict):
        _note_no_split(spec, split, split_key)
    else:
        chosen = split or next((name for name in ("validation", "test") if name in loaded), None)
        if chosen not in loaded:
            raise DataError(
                f"dataset '{spec}' has splits {', '.join(loaded)}, not {chosen or 'validation or test'}; "
                f"set {split_key} to one of them"
            )
        loaded, label = loaded[chosen], f"{spec} [{chosen}]"
    return [(f"{label} row {i + 1}", dict(row)) for i, row in enumerate(loaded)]


def map_columns(rows: list[Row], columns: dict[str, str]) -> list[Row]:
    """Rows with each format field read from the dataset's own column (`data.columns`)."""
    if not columns:
        return rows
    where, first = first_row(rows)
    header = columns_line(where)
    for field, column in columns.items():
        if column not in first:
            raise DataError(
                f"{header}: data.columns.{field} names column '{column}', which the data does not have "
                f"(its columns: {', '.join(map(str, first))})"
            )
    mapped = []
    for where, row in rows:
        if isinstance(row, dict):
            row = {**row, **{field: row[column] for field, column in columns.items() if column in row}}
        mapped.append((where, row))
    return mapped


def _note_no_split(spec: str, split: str | None, split_key: str) -> None:
    """A split named for data that has none (one file, one saved Dataset) is read as all of the data: said,
    not refused (a sweep's base may name a split that only some of its datasets have)."""
    if split not in (None, "train"):
        Console(stderr=True, emoji=False, soft_wrap=True, highlight=False).print(
            f"[yellow]note:[/yellow] {split_key}={escape(split)} does not apply to '{escape(spec)}', which "
            "has no splits (a hub dataset or a saved DatasetDict has them): all of it is read"
        )


def load_rows(
    spec: str, options: DataConfig | None = None, split: str | None = None, split_key: str = "data.split"
) -> tuple[list[Row], Task | None]:
    """Rows of a built-in task (`gsm8k:train`), a local file or folder, or a hub dataset, with
    `options.columns` applied; and the task when built in. `split` picks a Hugging Face dataset's
    split (None: its validation or test split)."""
    options = options or DataConfig()
    builtin = parse_builtin(spec)
    if builtin is not None:
        task, builtin_split = builtin
        rows = [(f"{spec} row {i + 1}", row) for i, row in enumerate(split_rows(task, builtin_split))]
        return map_columns(rows, options.columns), task
    path = check_source(spec)
    if path is None:
        rows = _read_hf_dataset(spec, False, split, options.subset, split_key)
    elif path.is_dir():
        rows = _read_hf_dataset(str(path), True, split, options.subset, split_key)
    else:
        _note_no_split(str(path), split, split_key)
        rows = _read_file(path, options.skip_bad_rows)
    if not rows:
        raise DataError(f"{spec}: the dataset has no rows")
    return map_columns(rows, options.columns), None


def detect_format(rows: list[Row], requested: str) -> str:
    where, first = first_row(rows)
    header = columns_line(where)
    if requested != "auto":
        missing = [field for field in FORMAT_FIELDS[requested] if field not in first]
        if missing:  # the first row already disagrees: the setting, not the rows, is wrong
            raise DataError(
                f"{header}: data.format={requested} reads {', '.join(FORMAT_FIELDS[requested])}, but the "
                f"data has columns {sorted(first)}; set data.format=auto, or map yours with data.columns"
            )
        return requested
    for fmt, fields in FORMAT_FIELDS.items():
        if all(field in first for field in fields):
            return fmt
    needs = "; ".join(f"{fmt}: {', '.join(fields)}" for fmt, fields in FORMAT_FIELDS.items())
    suggested = suggested_columns(first)
    mapping = suggested or {"instruction": "question", "output": "answer"}
    in_yaml = ", ".join(f"{field}: {column}" for field, column in mapping.items())
    raise DataError(
        f"{header}: cannot tell the format from columns {sorted(first)}; rows need ({needs}), or name yours "
        f"with data.columns, {'' if suggested else 'e.g. '}{{{in_yaml}}} (on the command line: "
        f"{' '.join(f'data.columns.{field}={column}' for field, column in mapping.items())})"
    )


# other datasets' names for the prompt, the response and alpaca's context (Dolly, gsm8k, Q&A sheets)
PROMPT_COLUMNS = ("instruction", "prompt", "question", "query", "input")
RESPONSE_COLUMNS = ("response", "answer", "output", "completion", "target")
CONTEXT_COLUMNS = ("context", "input")


def suggested_columns(row: dict) -> dict[str, str]:
    """The data.columns that read `row` as alpaca, when it has a prompt and a response column under
    common names other than the format's ({} when it has not)."""
    present = {str(name).lower(): name for name in row}
    prompt = next((present[c] for c in PROMPT_COLUMNS if c in present), None)
    response = next((present[c] for c in RESPONSE_COLUMNS if c in present and present[c] != prompt), None)
    if prompt is None or response is None:
        return {}
    context = next(
        (present[c] for c in CONTEXT_COLUMNS if c in present and present[c] not in (prompt, response)), None
    )
    mapping = {"instruction": prompt, "output": response, **({"input": context} if context else {})}
    return {field: column for field, column in mapping.items() if field != column}


# -- rendering -------------------------------------------------------------------------------------

CHAT_ROLES = ("system", "user", "assistant", "tool")  # and "developer", read as system
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
    "developer": "system",
}
SKIP_HINT = "; fix the row, or set data.skip_bad_rows=true to skip such rows"
LINE_SKIP_HINT = "; fix the line, or set data.skip_bad_rows=true to skip such lines"


def as_text(where: str, value: object, field: str) -> str:
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
    return as_text(where, row[field], field)


def alpaca_prompt(instruction: str, context: str) -> str:
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
        return "".join(as_text(where, part.get("text"), "text") for part in content)
    return as_text(where, content, f"messages[{turn}].content")


def clean_messages(
    where: str, messages: object, tokenizer, need_assistant: bool = True
) -> tuple[list[dict], list[bool]]:
    """Messages as the chat template takes them, and for each whether it is a trained response
    (an assistant turn whose OpenAI-style `weight` is not 0); with `need_assistant`, at least one."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise BadRow(
            f"{where}: 'messages' must be a non-empty list of {{role, content}} objects{SKIP_HINT}",
            "malformed messages",
        )
    cleaned, trained = [], []
    for turn, message in enumerate(messages):
        # parquet and datasets folders give every turn every key a turn has, as None where it had none
        message = {key: value for key, value in message.items() if value is not None or key == "content"}
        if "role" not in message and "from" in message:  # ShareGPT's turn shape under 'messages'
            message = _sharegpt_turn(where, turn, message)
        role = message.get("role")
        if role == "developer":  # OpenAI's newer name for the system message
            role, message = "system", {**message, "role": "system"}
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
        # a greeting that opens a conversation answers nothing: context for the turns after it
        trained.append(role == "assistant" and weight == 1 and turn > 0)
    if need_assistant and not any(trained):
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
    # turns in OpenAI's {role, content} shape (many hub datasets keep them under 'conversations') as they are
    return [
        item if item.get("role") is not None else _sharegpt_turn(where, turn, item)
        for turn, item in enumerate(conversations)
    ]


def _sharegpt_turn(where: str, turn: int, item: dict) -> dict:
    """A ShareGPT turn ({from, value}) as a chat message ({role, content}); other keys (weight) kept."""
    speaker = item.get("from")
    if speaker not in SHAREGPT_ROLES:
        found = (
            f"from {speaker!r}" if "from" in item else f"no 'from' (its keys: {', '.join(map(str, item))})"
        )
        raise BadRow(
            f"{where}: turn {turn + 1} has {found}; ShareGPT speakers are "
            f"{', '.join(SHAREGPT_ROLES)}{SKIP_HINT}",
            "unknown role",
        )
    if "value" not in item:
        raise BadRow(f"{where}: turn {turn + 1} has no 'value'{SKIP_HINT}", "message without content")
    rest = {key: value for key, value in item.items() if key not in ("from", "value")}
    return {"role": SHAREGPT_ROLES[speaker], "content": item["value"], **rest}


def render_chat(where: str, tokenizer, messages: list[dict], **options) -> str:
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

    The conversation is rendered once. An assistant turn starts where the template's generation prompt
    for the turns before it ends, and ends where the conversation up to it ends, so no template
    markers are needed. Templates that render the last assistant turn differently from earlier ones
    (Qwen3 adds a reasoning block to it alone) break the second rule: such a turn ends after the
    first end-of-sequence token that follows it.
    """
    if tokenizer.chat_template is None:
        raise DataError(
            f"{where}: chat rows need a tokenizer with a chat template; this one has none: set "
            "data.chat_template to a template file"
        )
    messages, trained = clean_messages(where, messages, tokenizer)
    full = render_chat(where, tokenizer, messages)
    segments, position = [], 0
    for turn, message in enumerate(messages):
        if message["role"] != "assistant" or turn == 0:  # an opening greeting: prompt of the next turn
            continue
        prompt = render_chat(where, tokenizer, messages[:turn], add_generation_prompt=True)
        if not full.startswith(prompt) or len(prompt) < position:
            raise DataError(
                f"{where}: the chat template renders the turns before assistant turn {turn + 1} "
                "differently in the whole conversation; use format text, or a chat template "
                "(data.chat_template) that renders earlier turns the same"
            )
        upto, eos = render_chat(where, tokenizer, messages[: turn + 1]), tokenizer.eos_token or ""
        if full.startswith(upto):
            end = len(upto)
        elif eos and eos in full[len(prompt) :]:
            end = full.index(eos, len(prompt)) + len(eos)
        else:
            raise DataError(
                f"{where}: cannot tell where assistant turn {turn + 1} ends: the chat template renders it "
                "differently in the whole conversation and no end-of-sequence token follows it"
            )
        closing = full.rfind(eos, len(prompt), end) if eos else -1
        if closing >= 0 and not full[closing + len(eos) : end].strip():
            end = closing + len(eos)  # the newline a template writes after a turn's end is not trained
        segments += [(full[position : len(prompt)], False), (full[len(prompt) : end], trained[turn])]
        position = end
    if full[position:]:
        segments.append((full[position:], False))
    reference = next(m["content"] or "" for m, t in zip(messages, trained, strict=True) if t)
    return segments, reference


# a run trained with data.template alpaca or none, as a chat template: its exports carry this one, so
# what serves them prompts the model the way it was trained
TRAINED_CHAT_TEMPLATES = {
    "alpaca": (
        "{% for m in messages %}{% if m.role == 'user' %}### Instruction:\n{{ m.content }}\n\n### Response:\n"
        "{% elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
    ),
    "none": (
        "{% for m in messages %}{{ m.content }}{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}


def resolve_template(template: str, tokenizer) -> str:
    """`data.template` with auto decided: the chat template when the tokenizer has one."""
    if template == "auto":
        return "chat" if tokenizer.chat_template else "alpaca"
    if template == "chat" and not tokenizer.chat_template:
        raise DataError(
            "data.template: chat needs a tokenizer with a chat template; this one has none: set "
            "data.chat_template to a template file, or data.template: alpaca"
        )
    return template


def _instruction_segments(
    where: str, instruction: str, context: str, response: str, template: str, tokenizer
) -> tuple[list[tuple[str, bool]], str]:
    """An instruction (+ context) and its response as text, by `template` (chat, alpaca or none)."""
    if template == "chat":
        user = f"{instruction}\n\n{context}" if context else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
        return _message_segments(where, messages, tokenizer)
    eos = tokenizer.eos_token or ""
    if template == "alpaca":
        return [(alpaca_prompt(instruction, context), False), (response + eos, True)], response
    prompt = f"{instruction}\n\n{context}" if context else instruction
    return [(prompt, False), (response + eos, True)], response


def row_content(where: str, row: dict, fmt: str, tokenizer) -> tuple[str, str, str] | list[dict] | str:
    """A row's texts, checked (its fields there and text, its chat turns well formed) before any template
    runs: (instruction or prompt, context, response), the messages, or the text. Cheap, so that a bad row
    anywhere in a large file is found before the rows before it are tokenized."""
    if fmt == "alpaca":
        context = as_text(where, row["input"], "input") if row.get("input") is not None else ""
        return _text(where, row, "instruction", fmt), context, _text(where, row, "output", fmt)
    if fmt == "prompt-completion":
        return _text(where, row, "prompt", fmt), "", _text(where, row, "completion", fmt)
    if fmt in ("messages", "sharegpt"):
        messages = (
            row.get("messages") if fmt == "messages" else sharegpt_messages(where, row.get("conversations"))
        )
        clean_messages(where, messages, tokenizer)
        return messages
    return _text(where, row, "text", fmt)


def render(
    where: str, row: dict, fmt: str, tokenizer, template: str = "alpaca"
) -> tuple[list[tuple[str, bool]], str]:
    """A row as (text, is_response) segments, in order, and the first response's own text (what
    exact match compares a generation with: no template markers, no end-of-sequence token).
    `template` (chat, alpaca, none) is how alpaca and prompt-completion rows become text."""
    content = row_content(where, row, fmt, tokenizer)
    if fmt in ("alpaca", "prompt-completion"):
        return _instruction_segments(where, *content, template, tokenizer)
    if fmt in ("messages", "sharegpt"):
        return _message_segments(where, content, tokenizer)
    return [(content + (tokenizer.eos_token or ""), True)], content


def adds_special_tokens(tokenizer, text: str) -> bool:
    """Whether the tokenizer should add its special tokens (a BOS) before `text`: not when a chat
    template has already written the BOS into it (Llama 3), which would make it two."""
    return not (tokenizer.bos_token and text.startswith(tokenizer.bos_token))


def tokenize_examples(
    examples: list[list[tuple[str, bool]]], tokenizer, max_length: int, train_on_prompt: bool
) -> list[tuple[dict[str, list[int]], bool]]:
    """Each example's (text, is_response) segments as input_ids and labels (-100 where no loss is taken),
    cut to max_length, and whether it was cut. Every segment is tokenized on its own (special tokens, a
    BOS, only at the very start of an example), all of them in two batch calls: a call per segment spent
    more time in Python than in the tokenizer."""

    def special(position: int, text: str) -> bool:
        return position == 0 and adds_special_tokens(tokenizer, text)

    texts = {True: [], False: []}
    for segments in examples:
        for position, (text, _) in enumerate(segments):
            texts[special(position, text)].append(text)
    ids = {
        flag: iter(tokenizer(batch, add_special_tokens=flag)["input_ids"] if batch else [])
        for flag, batch in texts.items()
    }
    tokenized = []
    for segments in examples:
        input_ids: list[int] = []
        labels: list[int] = []
        for position, (text, is_response) in enumerate(segments):
            segment_ids = next(ids[special(position, text)])
            input_ids += segment_ids
            labels += segment_ids if (is_response or train_on_prompt) else [IGNORE_INDEX] * len(segment_ids)
        tokenized.append(
            (
                {"input_ids": input_ids[:max_length], "labels": labels[:max_length]},
                len(input_ids) > max_length,
            )
        )
    return tokenized


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
        self,
        features: list[dict[str, list[int]]],
        examples: list[Example],
        task: Task | None,
        fmt: str,
        template: str = "none",
        rows: int = 0,
        report: RowReport | None = None,
    ) -> None:
        self.features, self.examples, self.task, self.format = features, examples, task, fmt
        self.template = template  # how the rows became text: chat, alpaca or none
        self.rows, self.report = rows, report or RowReport()  # rows read; those skipped, cut, dropped
        self.held_out = 0  # rows of the file that data.holdout kept out of these

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]

    def subset(self, indices: list[int]) -> TokenizedDataset:
        """The examples at `indices`, in that order (a dev or test part of an eval set)."""
        return TokenizedDataset(
            [self.features[i] for i in indices],
            [self.examples[i] for i in indices],
            self.task,
            self.format,
            self.template,
            len(indices),
        )


# from this many rows on, tokenizing takes long enough to show progress (~1 ms a chat row on 2 cores)
PROGRESS_ROWS = 2000
TOKENIZE_BATCH_ROWS = 512  # rows rendered, then tokenized in one batch
EMPTY_RESPONSE = "with an empty response (only its end token is a target)"


def _with_progress(rows: list[Row], spec: str) -> Iterator[Row]:
    """`rows`, with a progress bar on a terminal while a large dataset is tokenized (a minute of silence
    for 40,000 rows before), or one line saying so in a log; under a launcher, by its first process only."""
    if len(rows) < PROGRESS_ROWS or int(os.environ.get("RANK", "0")) != 0:
        yield from rows
        return
    progress_console = Console(stderr=True, emoji=False, highlight=False)
    if not progress_console.is_terminal:
        progress_console.print(f"tokenizing {len(rows)} rows of {escape(spec)} ...", soft_wrap=True)
        yield from rows
        return
    columns = (
        TextColumn(f"tokenizing {escape(spec)}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=progress_console, transient=True) as progress:
        task = progress.add_task("rows", total=len(rows))
        for row in rows:
            yield row
            progress.advance(task)


HOLDOUT_SEED = 0  # the permutation whose first rows data.holdout keeps out of training


def holdout_indices(n: int, holdout: float) -> list[int]:
    """Which of `n` rows data.holdout keeps out of training, in file order: the first `holdout` (a count,
    or a share of `n`, rounded, at least 1) of a seeded permutation, the same rows in every run."""
    count = int(holdout) if holdout >= 1 else max(1, round(holdout * n))
    if count >= n:
        raise DataError(
            f"data.holdout={holdout:g} keeps {count} of data.train's {n} rows for eval, which leaves none "
            "to train on; hold out fewer, or name an eval set of its own in data.eval"
        )
    return sorted(np.random.default_rng(HOLDOUT_SEED).permutation(n)[:count].tolist())


def rows_digest(rows: list[Row]) -> str:
    """sha256 of the rows' contents, not their places: the same rows read from a moved file match."""
    digest = hashlib.sha256()
    for _, row in rows:
        content = row if isinstance(row, dict) else row.reason  # a BadRow kept in place: its reason
        digest.update(json.dumps(content, sort_keys=True, default=str).encode() + b"\n")
    return digest.hexdigest()


def _part(rows: list[Row], holdout: float, held_out: bool) -> list[Row]:
    """The rows data.holdout keeps for eval (`held_out`), or the others."""
    kept = set(holdout_indices(len(rows), holdout))
    return [row for i, row in enumerate(rows) if (i in kept) == held_out]


def build_dataset(
    spec: str,
    tokenizer,
    options: DataConfig | None = None,
    limit: int | None = None,
    split: str | None = None,
    quiet: bool = False,
    split_key: str = "data.split",
    part: Literal["all", "trained", "held out"] = "all",
) -> TokenizedDataset:
    """Load, render and tokenize `spec` as `options` say (columns, format, template, max_length,
    train_on_prompt, skip_bad_rows); `split` picks a Hugging Face dataset's split; `part`: all rows, or
    those data.holdout trains on or keeps out. Examples with no response token left after truncation are
    dropped; every dropped, skipped or truncated row is counted in one summary line on stderr (unless
    `quiet`: the caller reports them)."""
    options = options or DataConfig()
    max_length, train_on_prompt = options.max_length, options.train_on_prompt
    rows, task = load_rows(spec, options, split, split_key)
    held_out = 0
    if part != "all":
        every_row, rows = rows, _part(rows, options.holdout, part == "held out")
        held_out = len(every_row) - len(rows) if part == "trained" else 0
        spec = options.eval_name if part == "held out" else spec  # as messages name it from here on
    if limit is not None:  # the first `limit` rows, with the bad lines kept among them (skipped below)
        good = [i for i, (_, row) in enumerate(rows) if not isinstance(row, BadRow)]
        rows = rows[: good[limit - 1] + 1] if len(good) >= limit else rows
    fmt = detect_format(rows, options.format)
    # data.template shapes alpaca and prompt-completion rows; chat rows always use the chat template
    if fmt in ("alpaca", "prompt-completion"):
        template = resolve_template(options.template, tokenizer)
    else:
        template = "none" if fmt == "text" else "chat"
    if not options.skip_bad_rows:  # the first bad row in seconds, not after a minute of tokenizing
        for where, row in rows:
            if isinstance(row, BadRow):
                raise row
            row_content(where, row, fmt, tokenizer)
    features, examples, report = [], [], RowReport()
    rendered: list[tuple[str, list[tuple[str, bool]], str]] = []  # rendered rows not yet tokenized

    def tokenize_rendered() -> None:
        segment_lists = [segments for _, segments, _ in rendered]
        tokenized = tokenize_examples(segment_lists, tokenizer, max_length, train_on_prompt)
        for (where, segments, reference), (feature, cut) in zip(rendered, tokenized, strict=True):
            if all(label == IGNORE_INDEX for label in feature["labels"]):
                report.add(f"dropped: response beyond data.max_length={max_length}", where)
                continue
            if cut:
                report.add(f"truncated to data.max_length={max_length}", where)
            if fmt != "text" and not reference.strip():  # kept, but it teaches only to stop at once
                report.add(EMPTY_RESPONSE, where)
            features.append(feature)
            prompt = next((text for text, is_response in segments if not is_response), "")
            examples.append(Example(prompt, reference))
        rendered.clear()

    # closing: a bad row ends the loop with an exception, and the progress bar with it
    with closing(_with_progress(rows, spec)) as rows_shown:
        for where, row in rows_shown:
            try:
                if isinstance(row, BadRow):
                    raise row
                rendered.append((where, *render(where, row, fmt, tokenizer, template)))
            except BadRow as bad:
                if not options.skip_bad_rows:
                    raise
                report.add(f"skipped: {bad.reason}", where)
            if len(rendered) == TOKENIZE_BATCH_ROWS:  # batches, so that the progress bar moves evenly
                tokenize_rendered()
    tokenize_rendered()
    empty = report.counts.get(EMPTY_RESPONSE, 0)
    if features and empty == len(features) and fmt in ("alpaca", "prompt-completion"):  # one reply a row
        raise DataError(
            f"dataset '{spec}': every response is empty ({empty} rows, the first "
            f"{report.first[EMPTY_RESPONSE]}): there is nothing to learn but the end token; check which "
            f"column holds the responses (format {fmt}; data.columns maps yours)"
        )
    if not features:
        if any(reason.startswith("skipped") for reason in report.counts):  # not a length problem
            raise DataError(f"dataset '{spec}': no usable row ({report.summary(spec, len(rows), 0)})")
        raise DataError(
            f"dataset '{spec}': no example keeps a response token within data.max_length="
            f"{max_length}; raise data.max_length"
            + (f" ({report.summary(spec, len(rows), 0)})" if report.counts else "")
        )
    summary = report.summary(spec, len(rows), len(features))
    if summary and not quiet:
        report_console = Console(stderr=True, emoji=False, soft_wrap=True, highlight=False)
        report_console.print(f"[yellow]{escape(summary)}[/yellow]")
    dataset = TokenizedDataset(features, examples, task, fmt, template, len(rows), report)
    dataset.held_out = held_out
    return dataset


def train_dataset(options: DataConfig, tokenizer, quiet: bool = False) -> TokenizedDataset:
    """data.train (its data.split) less the rows data.holdout keeps out, as `options` say."""
    part = "all" if options.holdout is None else "trained"
    return build_dataset(options.train, tokenizer, options, split=options.split, quiet=quiet, part=part)


def _held_out_rows(options: DataConfig) -> tuple[list[Row], int]:
    """The rows data.holdout keeps out of data.train, and how many rows data.train has."""
    rows = load_rows(options.train, options, options.split)[0]
    return _part(rows, options.holdout, held_out=True), len(rows)


def eval_rows(options: DataConfig) -> list[Row]:
    """The eval set's rows, before rendering: data.eval's, or those data.holdout keeps out of data.train."""
    if options.holdout is not None:
        return _held_out_rows(options)[0]
    return load_rows(options.eval, eval_columns(options), options.eval_split, "data.eval_split")[0]


def holdout_record(options: DataConfig) -> dict[str, int | str]:
    """What a run keeps of the rows data.holdout held out, to evaluate on those and no others later: how
    many of how many rows of data.train, and the sha256 of their contents."""
    held, train_rows = _held_out_rows(options)
    return {"train_rows": train_rows, "held_out": len(held), "sha256": rows_digest(held)}


def data_record(options: DataConfig) -> dict[str, dict[str, int | str]]:
    """What a run keeps of its local data files (data.train, and data.eval beside it), to know them
    again on resume wherever they have moved: per key, how many rows and the sha256 of their contents.
    Built-ins and hub datasets are named, not placed, so they have no entry."""
    sources = {"data.train": (options.train, options, options.split, "data.split")}
    if options.eval and options.holdout is None:
        sources["data.eval"] = (options.eval, eval_columns(options), options.eval_split, "data.eval_split")
    record: dict[str, dict[str, int | str]] = {}
    for key, (spec, key_options, split, split_key) in sources.items():
        if check_source(spec) is not None:
            rows = load_rows(spec, key_options, split, split_key)[0]
            record[key] = {"rows": len(rows), "sha256": rows_digest(rows)}
    return record


def compare_data(options: DataConfig, recorded_file: Path) -> dict[str, str | None]:
    """Each key of `recorded_file` (a run's data_record) with how its rows differ now, or None where they
    are the same; {} when the run recorded nothing (built-in or hub data, or a run from before the record)."""
    if not recorded_file.is_file():
        return {}
    recorded, now = json.loads(recorded_file.read_text()), data_record(options)
    compared: dict[str, str | None] = {}
    for key, then in recorded.items():
        rows = now.get(key, {}).get("rows")
        if rows is None:
            compared[key] = "not a local file now"
        elif now[key]["sha256"] == then["sha256"]:
            compared[key] = None
        else:
            compared[key] = f"{rows} rows now, {then['rows']} then" if rows != then["rows"] else "rows edited"
    return compared


def check_held_out(options: DataConfig, recorded_file: Path, fix: str) -> None:
    """The rows data.holdout picks are those a run recorded it held out (`recorded_file`, its
    holdout.json), or an error ending in `fix`: from a file grown or edited since, they would be other
    rows, which may include rows the run trained on."""
    if options.holdout is None or not recorded_file.is_file():
        return
    recorded, now = json.loads(recorded_file.read_text()), holdout_record(options)
    if now["sha256"] != recorded["sha256"]:
        rows = (
            f"the file has {now['train_rows']} now"
            if now["train_rows"] != recorded["train_rows"]
            else "their contents changed"
        )
        raise TunelabError(
            f"data.train is not as the run trained on it: the rows data.holdout picks now are not the "
            f"{recorded['held_out']} it held out of {recorded['train_rows']} ({rows}), and may include rows "
            f"it trained on; {fix}"
        )


def eval_columns(options: DataConfig) -> DataConfig:
    """`options` with data.columns cut to the columns data.eval has: an eval file may be in the format's
    own names (chat rows) beside training rows that need the mapping."""
    if not options.columns or options.holdout is not None:  # held-out rows are data.train's own
        return options
    rows = load_rows(
        options.eval, options.model_copy(update={"columns": {}}), options.eval_split, "data.eval_split"
    )
    return options.model_copy(update={"columns": columns_present(rows[0], options.columns)})


def eval_dataset(
    options: DataConfig, tokenizer, limit: int | None = None, quiet: bool = False
) -> TokenizedDataset:
    """data.eval (its data.eval_split), or the rows data.holdout keeps out of data.train; its first `limit`
    rows, as `options` say (data.columns where the file has those columns)."""
    if options.holdout is not None:
        return build_dataset(options.train, tokenizer, options, limit, options.split, quiet, part="held out")
    options = eval_columns(options)
    return build_dataset(
        options.eval, tokenizer, options, limit, options.eval_split, quiet, split_key="data.eval_split"
    )


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
