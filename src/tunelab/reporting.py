"""What a run reports: metrics.jsonl (one line per optimizer step, eval results, method events, a final
summary), the progress display, and peak memory."""

from __future__ import annotations

import json
import math
import resource
import statistics
import time
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from transformers import TrainerCallback

from tunelab.console import plural
from tunelab.methods.base import Method

console = Console(stderr=True, soft_wrap=True, emoji=False)  # one message, one line, whatever the width


def time_left(step_times: list[float] | deque[float], steps_left: int) -> timedelta:
    """The median of the recent steps' times, times the steps left: a step that took long because the
    process was suspended (Ctrl-Z, SIGSTOP) or the machine busy does not swing the estimate."""
    return timedelta(seconds=round(statistics.median(step_times) * steps_left))


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated when on a GPU, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as out:
            out.write(json.dumps(record) + "\n")


class Reporter(TrainerCallback):
    """metrics.jsonl (one line per optimizer step, eval results, method events, a final summary)
    and the progress display. Only the main process writes."""

    def __init__(self, method: Method, metrics: MetricsWriter, log_steps: int) -> None:
        self.method, self.metrics, self.log_steps = method, metrics, log_steps
        self.step_started = 0.0
        self.tokens_before = 0  # tokens seen when the current step began
        # the recent steps, for a log line's ETA: at least 5, so that one slow step is not the median
        self.step_times: deque[float] = deque(maxlen=max(log_steps, 5))
        self.pending: dict[str, Any] = {}
        self.progress: Progress | None = None
        self.task = None
        self.first_step = 0  # the step a resumed run goes on from

    def on_train_begin(self, args, state, control, **kwargs):
        self.first_step = state.global_step
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=state.max_steps, completed=state.global_step, info=""
        )

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started = time.perf_counter()
        self.tokens_before = state.num_input_tokens_seen or 0

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            self.method.pop_events()
            return
        seconds = time.perf_counter() - self.step_started
        tokens = (state.num_input_tokens_seen or 0) - self.tokens_before
        self.pending = {
            "step": state.global_step,
            "step_time_s": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
            **self.method.step_metrics(),
        }
        for event in self.method.pop_events():
            self.metrics.write(event)
            console.print(f"[dim]step {event.get('step')}: {_describe(event)}[/dim]")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            record = {
                **self.pending,
                "loss": logs["loss"],
                "lr": logs.get("learning_rate"),
                "grad_norm": logs.get("grad_norm"),
            }
            self.metrics.write(record)
            extra = "".join(f" {k} {v}" for k, v in self.method.step_metrics().items())
            speed = f" {record['tokens_per_s']:.0f} tok/s" if record.get("tokens_per_s") else ""
            info = f"loss {logs['loss']:.4f} lr {logs.get('learning_rate') or 0:.2e}{speed}{extra}"
            self.progress.update(self.task, completed=state.global_step, info=info)
            self.step_times.append(record["step_time_s"])
            if not console.is_terminal and (
                state.global_step % self.log_steps == 0 or state.global_step == 1
            ):
                # on a terminal the bar shows the ETA; a log line computes it from the steps so far
                eta = time_left(self.step_times, state.max_steps - state.global_step)
                step = f"step {state.global_step}/{state.max_steps}"
                console.print(f"{step} {info} {record['step_time_s']:.2f}s/step eta {eta}")
        elif any(key.startswith("eval_") for key in logs):
            record = {"step": state.global_step, **{k: v for k, v in logs.items() if k.startswith("eval_")}}
            self.metrics.write(record)
            console.print(f"step {state.global_step}: eval loss {logs.get('eval_loss', math.nan):.4f}")
        elif "train_runtime" in logs:
            self.metrics.write(
                {
                    "event": "summary",
                    "train_runtime_s": logs["train_runtime"],
                    "train_loss": logs.get("train_loss"),
                    "steps": state.global_step,
                    "peak_memory_bytes": peak_memory_bytes(),
                }
            )

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            console.print(f"[dim]step {state.global_step}: checkpoint saved[/dim]")

    def on_train_end(self, args, state, control, **kwargs):
        self.close()
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry][-self.log_steps :]
        # transformers 5 puts the elapsed train_runtime into every step's log too: the last is the total
        runtimes = [entry["train_runtime"] for entry in state.log_history if "train_runtime" in entry]
        runtime = runtimes[-1] if runtimes else None
        if state.is_world_process_zero and losses:
            took = f" in {runtime:.{1 if runtime < 10 else 0}f} s" if runtime else ""
            steps = plural(state.global_step - self.first_step, "step")
            if self.first_step:  # this process trained only the steps after the checkpoint
                steps += f" (steps {self.first_step + 1}-{state.global_step}, resumed)"
            over = f"mean of the last {len(losses)} steps" if len(losses) > 1 else "the last step"
            loss = sum(losses) / len(losses)
            where = "GPU memory" if torch.cuda.is_available() else "memory"  # as peak_memory_bytes counts
            peak = f"peak {where} {peak_memory_bytes() / 2**30:.2f} GiB"
            console.print(f"trained {steps}{took}; loss {loss:.4f} ({over}); {peak}")

    def close(self) -> None:
        """Stop the progress display (also when training ends by an exception: no frozen bar)."""
        if self.progress is not None:
            self.progress.stop()


def _describe(event: dict[str, Any]) -> str:
    return " ".join(f"{k} {v}" for k, v in event.items() if k != "step")
