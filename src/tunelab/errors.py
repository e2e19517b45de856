"""The one exception type the CLI turns into a single clear line and exit code 2."""


class TunelabError(Exception):
    """A user-facing error: the message says what is wrong, where, and how to fix it."""
