"""Files that never end up half-written, and checkpoints that never execute code on load.

A checkpoint is two files side by side:
    NAME.safetensors   every tensor: model weights, optimizer buffers, random-number states
    NAME.json          everything else: configuration, data scaling, vocabulary, counters
Both are written to a temporary file in the same directory and moved in place with
`os.replace`, so a reader sees the old file or the new one, never a mix. The tensor file carries
a `token` in its metadata that must match the JSON's, so a pair written by two different saves
(a crash between the two renames) is detected instead of silently mixed.
"""

import json
import os
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as _safetensors_bytes

TENSORS_SUFFIX = ".safetensors"
JSON_SUFFIX = ".json"


def _default_mode() -> int:
    """The permissions `open()` would give a new file: 0o666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same directory and os.replace.

    The file gets the permissions a plain `open(path, "w")` would give it (mkstemp's are
    owner-only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, value) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, allow_nan=True) + "\n")


def save_checkpoint(stem, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write `stem`.safetensors (tensors) and `stem`.json (meta, JSON-serialisable), atomically.

    Returns the path of the JSON file.
    """
    stem = Path(stem)
    token = uuid.uuid4().hex
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    atomic_write_bytes(stem.with_name(stem.name + TENSORS_SUFFIX),
                       _safetensors_bytes(plain, metadata={"token": token}))
    return atomic_write_json(stem.with_name(stem.name + JSON_SUFFIX), {"token": token, **meta})


def checkpoint_exists(stem) -> bool:
    stem = Path(stem)
    return (stem.with_name(stem.name + JSON_SUFFIX).is_file()
            and stem.with_name(stem.name + TENSORS_SUFFIX).is_file())


def load_checkpoint(stem, device="cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint written by `save_checkpoint`: (tensors, meta). Executes no code."""
    stem = Path(stem)
    json_path = stem.with_name(stem.name + JSON_SUFFIX)
    tensor_path = stem.with_name(stem.name + TENSORS_SUFFIX)
    for path in (json_path, tensor_path):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"checkpoint file {str(json_path)!r} is not valid JSON: {exc}") from None
    tensors = {}
    with safe_open(str(tensor_path), framework="pt", device=str(device)) as handle:
        token = (handle.metadata() or {}).get("token")
        for name in handle.keys():
            tensors[name] = handle.get_tensor(name)
    if token != meta.get("token"):
        raise ValueError(f"checkpoint {str(stem)!r}: {tensor_path.name} and {json_path.name} come "
                         "from different saves (interrupted write?); delete them and retrain")
    del meta["token"]
    return tensors, meta
