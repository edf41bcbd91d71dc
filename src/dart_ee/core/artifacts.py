"""Atomic artifact writes: a crash mid-write never leaves a half-written file behind.

Each writer writes to a temporary file in the same directory, fsyncs it and renames it over the
target, so readers only ever see the old complete file or the new complete file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dart_ee.core.errors import ArtifactError

_UMASK = os.umask(0)  # read once (os.umask can only be read by setting it) and put back at once
os.umask(_UMASK)


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; an artifact gets the mode any new file would
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` and atomically move the result to ``path``."""
    with _atomic_path(Path(path)) as tmp:
        write(tmp)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{what} {path} is not valid JSON ({e}); delete it and regenerate it") from e


def save_torch(path: str | Path, obj: Any) -> Path:
    import torch  # imported here: the ONNX runner reads artifacts in processes without torch

    return atomic_write(path, lambda p: torch.save(obj, p))


def load_torch(path: str | Path, what: str = "checkpoint") -> Any:
    """Load a torch artifact with ``weights_only=True``: never unpickle arbitrary code."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise ArtifactError(f"{what} {path} could not be loaded ({type(e).__name__}: {e}); "
                            "it may be truncated: delete it and regenerate it") from e


def file_fingerprint(path: str | Path) -> str:
    """A short hash of a file's bytes (a model's weights, as the traces made from it record)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def fingerprint(obj: Any) -> str:
    """A short stable hash of a JSON-able object (configs, manifests)."""
    blob = json.dumps(obj, sort_keys=True, default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
