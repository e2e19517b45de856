"""Ctrl-C and SIGTERM: one handler for both while a training or a sweep runs; and a reader of the
training's output that went away, told to the same handler."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def handling_stop_signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """`handler` for Ctrl-C and SIGTERM inside the block, the previous handlers after it. Only the main
    thread can handle signals: elsewhere nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, earlier in previous.items():
            signal.signal(sig, earlier)


class _UntilReaderGone:
    """sys.stderr that, once its reader has gone (a pipe into `head` that exited), calls `on_gone` and
    sends the rest to /dev/null, where the next print would raise BrokenPipeError and end the process
    with its steps since the last checkpoint lost."""

    def __init__(self, stream, on_gone: Callable[[], None]) -> None:
        self._stream, self._on_gone, self._gone = stream, on_gone, False

    def write(self, text: str) -> int:
        try:
            self._stream.write(text)
            self._stream.flush()  # a closed pipe is found at this print, not at exit
        except BrokenPipeError:
            self._reader_gone()
        return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._reader_gone()

    def _reader_gone(self) -> None:
        if self._gone:
            return
        self._gone = True
        # the descriptor itself: later writes (the buffer's rest, on_gone's own, other writers, the exit's
        # flush) succeed
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):  # a stream without a descriptor: its writes are dropped here only
            pass
        self._on_gone()

    def __getattr__(self, name: str):  # isatty, fileno, encoding, ... as the stream's
        return getattr(self._stream, name)


@contextmanager
def stopping_when_reader_gone(on_gone: Callable[[], None]) -> Iterator[None]:
    """Inside the block, a closed reader of stderr calls `on_gone` once instead of failing a print."""
    original = sys.stderr
    if original is not None:  # None: started with stderr closed (2>&-), nothing to write to
        sys.stderr = _UntilReaderGone(original, on_gone)
    try:
        yield
    finally:
        sys.stderr = original
