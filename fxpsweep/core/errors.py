"""The one exception type that fxpsweep raises for bad user input, and how a command reports it."""

from collections.abc import Iterator
from contextlib import contextmanager


class ConfigError(ValueError):
    """Bad input from the user: the message names the bad value and what is allowed.

    ``run.py`` and the other commands print it without a traceback; everything else is a bug.
    """


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Inside it, a ConfigError ends the command with ``fxpsweep: error: MESSAGE`` and no traceback."""
    try:
        yield
    except ConfigError as err:
        raise SystemExit(f"fxpsweep: error: {err}") from None
