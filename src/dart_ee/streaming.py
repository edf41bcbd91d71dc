"""Images decoded on demand: an ImageFolder tree read in batches by worker processes.

The in-memory path (``dart_ee.data``) decodes a whole dataset into one uint8 array: right for
CIFAR-10 and MNIST, wrong for a tree of hundreds of thousands of images. ``FileImages`` stands in
for that array. It holds only the file names (one fixed-width byte string each, so that forked
workers share the pages instead of touching a Python object per file), and indexing it decodes the
files asked for. ``batches`` hands a sequence of index batches to a ``torch.utils.data.DataLoader``
whose workers decode them ahead of the training step, in order: memory is bounded by
workers x prefetch x batch, not by the dataset.

Both paths decode and resize with the same function (``data.decode_image``), so a streamed run sees
the very pixels an in-memory run of the same tree sees.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dart_ee.errors import DataError


class FileImages:
    """A lazily decoded (N, C, H, W) uint8 "array" of image files under ``root``.

    Supports what the pipeline does with an image array: ``len``, ``shape``, ``dtype``, ``ndim`` and
    indexing by an integer, a slice or an index array (which decodes those files).
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, root: Path, names: np.ndarray, channels: int, size: int) -> None:
        self.root = Path(root)
        self.names = np.asarray(names, dtype=np.bytes_)  # paths relative to root, UTF-8
        self.channels, self.size = int(channels), int(size)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.names), self.channels, self.size, self.size)

    def __getitem__(self, idx: int | slice | np.ndarray | Sequence[int]) -> np.ndarray:
        from dart_ee.data import decode_image

        if isinstance(idx, (int, np.integer)):
            return self[np.array([idx])][0]
        names = self.names[idx]
        out = np.empty((len(names), self.channels, self.size, self.size), np.uint8)
        for i, name in enumerate(names):
            path = self.root / name.decode()
            try:
                raw = path.read_bytes()
            except OSError as e:
                raise DataError(f"{path}: cannot read the image ({e.strerror or e}); the tree changed since it was "
                                "listed: restore the file or start a new run") from e
            out[i] = decode_image(raw, str(path), self.size, self.channels)
        return out

    def subset(self, idx: np.ndarray) -> FileImages:
        return FileImages(self.root, self.names[idx], self.channels, self.size)

    def fingerprint(self) -> str:
        """A hash of the file names, sizes and modification times (the pixels are never all read at once)."""
        h = hashlib.sha256(f"{self.channels}|{self.size}".encode())
        for name in self.names:
            st = os.stat(self.root / name.decode())
            h.update(name + f"|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def list_image_folder(split_dir: Path, suffixes: Sequence[str]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """File names (relative to ``split_dir``'s parent), labels and class names of ``split_dir/<class>/*``."""
    if not split_dir.is_dir():
        raise DataError(f"ImageFolder split directory not found: {split_dir}")
    classes = tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir()))
    if not classes:
        raise DataError(f"{split_dir}: no class folders found; expected {split_dir}/<class>/<image>")
    names: list[bytes] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        with os.scandir(split_dir / cls) as it:
            files = sorted(e.name for e in it if e.is_file() and os.path.splitext(e.name)[1].lower() in suffixes)
        if not files:
            raise DataError(f"{split_dir / cls}: empty class folder; add images or remove the folder")
        names += [f"{split_dir.name}/{cls}/{f}".encode() for f in files]
        labels += [label] * len(files)
    return np.array(names, dtype=np.bytes_), np.asarray(labels, np.int64), classes


class _Batches(Dataset):
    """A map-style dataset whose items are whole batches: the DataLoader passes an index array."""

    def __init__(self, images: FileImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: np.ndarray) -> torch.Tensor:  # type: ignore[override]  # a batch, not one index
        return torch.from_numpy(self.images[idx])


def batches(images: np.ndarray | FileImages, order: Iterable[np.ndarray], workers: int = 0,
            pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """uint8 tensors of ``images[i]`` for each index array ``i`` in ``order``, in order.

    An in-memory array is sliced; ``FileImages`` are decoded by ``workers`` processes (0: in this
    one), two batches ahead per worker.
    """
    if not isinstance(images, FileImages):
        for idx in order:
            yield torch.from_numpy(np.ascontiguousarray(images[idx]))
        return
    # its own generator: a DataLoader otherwise draws its worker seed from torch's global one, which
    # would shift the training's dropout masks and make a streamed run differ from an in-memory one
    loader = DataLoader(_Batches(images), batch_size=None, sampler=list(order), num_workers=workers,
                        prefetch_factor=2 if workers else None, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(0))
    yield from loader


def in_order(n: int, batch_size: int) -> list[np.ndarray]:
    """Index arrays 0..n-1 in batches of ``batch_size`` (the last may be shorter)."""
    return [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
