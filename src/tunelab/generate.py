"""Trying a trained model: prompts rendered the way the run trained (`data.template`), generated in
batches (`tunelab generate`) or as a streaming chat (`tunelab chat`)."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import torch
from rich.console import Console

from tunelab.assemble import TunedModel
from tunelab.config import read_utf8
from tunelab.data import (
    Row,
    adds_special_tokens,
    alpaca_prompt,
    as_text,
    clean_messages,
    columns_present,
    first_row,
    load_rows,
    map_columns,
    render_chat,
)
from tunelab.errors import TunelabError, closest, did_you_mean
from tunelab.evaluate import generation_options

COMMANDS = "/reset clears the conversation, /exit or /quit (or Ctrl-D) quits; Ctrl-C stops a reply"


def prompt_text(messages: list[dict], template: str, tokenizer) -> str:
    """A conversation ending with a user turn as the text the model continues: the chat template's
    generation prompt, or (alpaca, none: single-turn templates) the last user turn as the run trained."""
    if template == "chat":
        return render_chat("prompt", tokenizer, messages, add_generation_prompt=True)
    user = messages[-1]["content"]
    return alpaca_prompt(user, "") if template == "alpaca" else user


def row_messages(where: str, row: dict, system: str | None, tokenizer) -> list[dict]:
    """A prompt row ({prompt}, {instruction, input} or {messages} ending with a user turn) as chat
    messages, `system` first unless the row has its own system turn."""
    if "messages" in row:
        messages, _ = clean_messages(where, row["messages"], tokenizer, need_assistant=False)
        if messages[-1]["role"] != "user":
            raise TunelabError(f"{where}: the conversation must end with a user turn to be continued")
    elif "prompt" in row or "instruction" in row:
        field = "prompt" if "prompt" in row else "instruction"
        user = as_text(where, row[field], field)
        if row.get("input"):
            user += "\n\n" + as_text(where, row["input"], "input")
        messages = [{"role": "user", "content": user}]
    else:
        raise TunelabError(
            f"{where}: a prompt row needs a 'prompt', 'instruction' or 'messages' field (this one has "
            f"{', '.join(map(str, row))}); name the column that holds the prompt with --prompt-column NAME"
        )
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


def read_prompt_rows(
    path: Path, columns: dict[str, str] | None = None, prompt_column: str | None = None
) -> list[Row]:
    """Prompt rows of a .jsonl/.json/.csv/.parquet file, or one prompt per line of a .txt file. The
    run's `data.columns` apply to the columns of theirs the file has (a file like the training data);
    `prompt_column` names the column that holds the prompt, in place of a 'prompt' field."""
    if not path.is_file():
        raise TunelabError(f"--file {path}: file not found{did_you_mean(path)}")
    if path.suffix == ".txt":
        if prompt_column:
            raise TunelabError(
                f"--prompt-column: {path} is a .txt file, one prompt per line; drop the option"
            )
        lines = read_utf8(path).splitlines()
        return [(f"{path}:{n}", {"prompt": line}) for n, line in enumerate(lines, 1) if line.strip()]
    rows = load_rows(str(path))[0]
    columns = columns_present(rows, columns or {})
    if prompt_column:
        where, first = first_row(rows)
        if prompt_column not in first:
            near = closest(prompt_column, map(str, first))
            raise TunelabError(
                f"--prompt-column {prompt_column}: {where} has no such column (its columns: "
                f"{', '.join(map(str, first))}){f'; did you mean {near}?' if near else ''}"
            )
        columns["prompt"] = prompt_column
    return map_columns(rows, columns)


def is_generations(path: Path) -> bool:
    """Whether `path` is what `write_jsonl` wrote: JSON lines whose first row has a 'generated' text."""
    with path.open("rb") as handle:
        first = handle.readline(1 << 20)
    try:
        row = json.loads(first)
    except ValueError:
        return False
    return isinstance(row, dict) and "generated" in row


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Rows as JSON lines, written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)


@torch.no_grad()
def chat(
    tuned: TunedModel,
    template: str,
    console: Console,
    system: str | None,
    max_new_tokens: int,
    temperature: float,
) -> None:
    """An interactive conversation on the terminal, each reply streamed as it is generated."""
    from transformers import TextStreamer

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # inherited from what started this process (a background job, some runners): Ctrl-C, which stops
        # a reply, would do nothing
        signal.signal(signal.SIGINT, signal.default_int_handler)
    model, tokenizer = tuned.model, tuned.tokenizer
    model.eval()
    device = next(model.parameters()).device
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    positions = getattr(model.config, "max_position_embeddings", None)
    console.print(f"[dim]template {template}; {COMMANDS}[/dim]")
    while True:
        try:
            line = console.input("[bold]you>[/bold] ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: done
            console.print()
            return
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            messages = list(start)
            console.print("[dim]conversation cleared[/dim]")
            continue
        if re.fullmatch(r"/\w+", command):  # /help, or a mistyped command: not a prompt for the model
            unknown = "" if command == "/help" else f"unknown command {command}; "
            console.print(f"[dim]{unknown}commands: {COMMANDS}[/dim]")
            continue
        if not command:
            continue
        text = prompt_text([*messages, {"role": "user", "content": line}], template, tokenizer)
        ids = tokenizer(
            text, return_tensors="pt", add_special_tokens=adds_special_tokens(tokenizer, text)
        ).to(device)
        # a reply ends where the model's positions do (--max-new-tokens may ask for more)
        room = (
            max_new_tokens
            if positions is None
            else min(max_new_tokens, positions - ids["input_ids"].shape[1])
        )
        if room < 1:
            console.print(
                f"[yellow]the conversation fills the model's {positions} positions; /reset[/yellow]"
            )
            continue
        messages.append({"role": "user", "content": line})
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            output = model.generate(
                **ids, **generation_options(tokenizer, room, temperature), streamer=streamer
            )
        except KeyboardInterrupt:  # the reply stops, the conversation goes on without this turn
            console.print("\n[dim](stopped; this turn is left out of the conversation)[/dim]")
            messages.pop()
            continue
        reply = tokenizer.decode(output[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        # single-turn templates (alpaca, none) see only the latest message
        messages = [*messages, {"role": "assistant", "content": reply}] if template == "chat" else list(start)
