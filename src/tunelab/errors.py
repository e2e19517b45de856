"""The one exception type the CLI turns into a single clear line and exit code 2."""


class TunelabError(Exception):
    """A user-facing error: the message says what is wrong, where, and how to fix it.

    Messages quote user input (keys, values, file contents); line breaks in that input are escaped
    here so that every error stays on one line, whatever the input was.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


class RunInterrupted(TunelabError):
    """Training stopped on Ctrl-C/SIGTERM after saving a resumable checkpoint (exit code 130)."""


class ResumeFailed(TunelabError):
    """A resumed training failed before its first step: its checkpoint did not load."""
