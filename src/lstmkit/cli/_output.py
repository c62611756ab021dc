"""Output directories of runs: never mix our files into a user's folder, never half-write."""

import json
from pathlib import Path

from ._errors import UsageError

MARKER = "config.json"            # every run directory holds one, with an "lstmkit" key


def check_output_dir(path) -> Path:
    """Accept a directory that does not exist, is empty, or holds an earlier lstmkit run.

    Anything else (a file, a folder of the user's own files) is refused before any work is
    done, so nothing is written and nothing is overwritten.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"output path {str(path)!r} is a file, not a directory; choose another "
                         "--out")
    if path.is_dir() and any(path.iterdir()) and not is_run_dir(path):
        raise UsageError(f"output directory {str(path)!r} holds files that lstmkit did not write; "
                         "choose another --out (nothing was written)")
    return path


def is_run_dir(path: Path) -> bool:
    try:
        return "lstmkit" in json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False
