"""How the CLI reports bad input: one line on stderr, exit code 2."""

import sys


class UsageError(Exception):
    """Bad input from the user (a file, a column, a value): reported in one line, exit code 2."""


def fail(exc: BaseException) -> int:
    message = str(exc).replace("\n", " ") or type(exc).__name__
    print(f"lstmkit: error: {message}", file=sys.stderr)
    return 2
