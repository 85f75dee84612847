"""The one base of every error a user causes, and how a command line reports it.

Every error type of this package that describes bad *input* (a flag value, a file, a
model path, an infeasible request: `ConfigError`, `OptiqFileError`, `ModelError`, ...)
derives from `OptiqError`. Its message already names what is wrong (file, field, flag)
and what was expected, so a command line prints that one line and exits non-zero,
like argparse's own errors, instead of a traceback that buries it. Anything else that
escapes (a bug, an mlx failure) is *not* an `OptiqError` and keeps its traceback:
`user_errors` catches only this base.

Subclasses of `ValueError` (as every one of them was before): callers that caught
ValueError keep working.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

# What a one-line report keeps of a message (a file's contents can end up in one).
MAX_MESSAGE_CHARS = 2000


class OptiqError(ValueError):
    """Bad input whose message says what is wrong and where; a CLI prints it without a traceback."""


class UsageError(OptiqError):
    """A command-line usage error already worded with the user's flags (a rendered ConfigError)."""


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` on one line (lines joined with "; "), cut to `limit` characters."""
    text = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def brief(value: object, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters, for quoting a bad value inside an error message."""
    try:
        text = repr(value)
    except RecursionError:  # a value nested too deeply to print
        text = f"<{type(value).__name__} nested too deeply>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def user_errors(prog: str, render: Callable[[OptiqError], str] | None = None) -> Iterator[None]:
    """Report an `OptiqError` raised inside as `PROG: error: MESSAGE` on stderr and exit 1.

    render: how to word the error (e.g. a ConfigError with the command's flag names);
    default `str(e)`. Every other exception propagates unchanged, traceback and all.
    """
    try:
        yield
    except OptiqError as e:
        message = render(e) if render is not None else str(e)
        print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
