"""Output directories of runs: never mix our files into a user's folder, never half-write."""

import json
import math
import os
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


def check_output_file(path) -> Path:
    """Refuse an output file that could not be written, before the work that produces it (a
    benchmark grid, a backtest): a directory, or a place under a file or an unwritable folder.
    Missing folders are fine (the atomic write creates them)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"output file {str(path)!r} is a directory; give a file name")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot write {str(path)!r}: {str(existing)!r} is a file, not a "
                         "directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write {str(path)!r}: no permission to write in "
                         f"{str(existing)!r}")
    return path


def is_run_dir(path: Path) -> bool:
    """A finished run (its MARKER) or an interrupted one (only a training checkpoint, whose
    JSON names the lstmkit.train format): both may be rerun or resumed into."""
    if "lstmkit" in _json_keys(path / MARKER):
        return True
    return any(_json_keys(p).get("format", "").startswith("lstmkit.train/")
               for p in path.glob("*checkpoint.json"))


def _json_keys(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def strict_json(value):
    """`value` with every non-finite float replaced by None, so that the file is standard JSON
    (a MASE is infinite on a constant series; Python's `Infinity` breaks other readers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value
