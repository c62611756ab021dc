"""`lstmkit <command>`: the command-line interface.

Each command lives in its own module exposing `register(subparsers)`, which adds its parser and
sets `run(args) -> int`. Bad input ends with exit code 2 and one line on stderr.
"""

import argparse
import sys

from . import _errors
from ._errors import UsageError

COMMAND_MODULES: tuple[str, ...] = ("demo", "forecast", "bench", "check")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = _Parser(prog="lstmkit", description="LSTM, GRU and RNN from first principles.")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"lstmkit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (UsageError, ValueError, TypeError, FileNotFoundError) as exc:
        return _errors.fail(exc)


__all__ = ["UsageError", "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
