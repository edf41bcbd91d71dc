"""Images decoded on demand: an ImageFolder tree (a directory, or an uncompressed tar) read in batches by
worker processes.

The in-memory path (``dart_ee.data.datasets``) decodes a whole dataset into one uint8 array: right for
CIFAR-10 and MNIST, wrong for a tree of hundreds of thousands of images. ``FileImages`` stands in
for that array. It holds only the file names (one fixed-width byte string each, so that forked
workers share the pages instead of touching a Python object per file), and for a tar each member's
byte offset and size; indexing it decodes the files asked for. ``batches`` hands a sequence of
index batches to a ``torch.utils.data.DataLoader`` whose workers decode them ahead of the training
step, in order: memory is bounded by workers x prefetch x batch, not by the dataset.

Both paths decode and resize with the same function (``decode.decode_image``), so a streamed run sees
the very pixels an in-memory run of the same tree sees.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dart_ee.core.errors import DataError
from dart_ee.data.decode import decode_image


class FileImages:
    """A lazily decoded (N, C, H, W) uint8 "array" of image files: under a directory ``root``, or the
    members of an uncompressed tar file ``root`` at byte ``spans`` (offset, size).

    Supports what the pipeline does with an image array: ``len``, ``shape``, ``dtype``, ``ndim`` and
    indexing by an integer, a slice or an index array (which decodes those files).
    """

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, root: Path, names: np.ndarray, channels: int, size: int, spans: np.ndarray | None = None) -> None:
        self.root = Path(root)
        self.names = np.asarray(names, dtype=np.bytes_)  # relative paths or member names, os.fsencode-d
        self.channels, self.size = int(channels), int(size)
        self.spans = None if spans is None else np.asarray(spans, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.names), self.channels, self.size, self.size)

    def _files(self, idx: slice | np.ndarray | Sequence[int]) -> Iterator[tuple[str, bytes]]:
        """(where, bytes) of the files at ``idx``."""
        if self.spans is None:
            for name in self.names[idx]:
                path = self.root / os.fsdecode(name)
                try:
                    yield str(path), path.read_bytes()
                except OSError as e:
                    raise DataError(f"{path}: cannot read the image ({e.strerror or e}); the tree changed since it was "
                                    "listed: restore the file or start a new run") from e
            return
        with open(self.root, "rb") as f:  # one open per batch; a seek and a read per member
            for name, (offset, size) in zip(self.names[idx], self.spans[idx]):
                f.seek(offset)
                raw = f.read(size)
                if len(raw) != size:
                    raise DataError(f"{self.root}: truncated at member {os.fsdecode(name)!r}; the tar file changed since it "
                                    "was listed: re-copy it or start a new run")
                yield f"{self.root}:{os.fsdecode(name)!r}", raw

    def __getitem__(self, idx: int | slice | np.ndarray | Sequence[int]) -> np.ndarray:
        if isinstance(idx, (int, np.integer)):
            return self[np.array([idx])][0]
        n = len(self.names[idx])
        out = np.empty((n, self.channels, self.size, self.size), np.uint8)
        for i, (where, raw) in enumerate(self._files(idx)):
            out[i] = decode_image(raw, where, self.size, self.channels)
        return out

    def subset(self, idx: np.ndarray) -> FileImages:
        return FileImages(self.root, self.names[idx], self.channels, self.size,
                          None if self.spans is None else self.spans[idx])

    def fingerprint(self) -> str:
        """A hash of the file names, sizes and modification times (the pixels are never all read at once)."""
        h = hashlib.sha256(f"{self.channels}|{self.size}".encode())
        if self.spans is not None:  # one file: its size and time, and where each member lies in it
            st = os.stat(self.root)
            h.update(f"{st.st_size}|{st.st_mtime_ns}".encode() + self.names.tobytes() + self.spans.tobytes())
            return h.hexdigest()[:16]
        for name in self.names:
            st = os.stat(self.root / os.fsdecode(name))
            h.update(name + f"|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


Listing = tuple[np.ndarray, np.ndarray, tuple[str, ...], "np.ndarray | None"]  # names, labels, classes, byte spans


def tree_place(member: str) -> tuple[str, tuple[str, ...]] | None:
    """Where a tar member lies in an ImageFolder tree (``*/train/<class>/<file>``): its split and the path parts
    after it (``(class,)`` for a class folder, ``(class, file)`` for an image), or None outside train/ and test/."""
    parts = Path(member).parts
    k = max((i for i, p in enumerate(parts) if p in ("train", "test")), default=-1)
    return None if k < 0 else (parts[k], parts[k + 1:])


def list_image_tar(path: Path, suffixes: Sequence[str]) -> dict[str, Listing]:
    """Per split (``train``, ``test``): member names, labels, classes and byte spans of an uncompressed tar of an
    ImageFolder tree (``*/train/<class>/<file>``), listed in one pass without reading the images."""
    found: dict[str, dict[str, list[tuple[str, int, int]]]] = {"train": {}, "test": {}}
    try:
        with tarfile.open(path, "r:") as tar:  # "r:" alone: a compressed tar cannot be read at an offset
            for m in tar:
                place = tree_place(m.name)
                if place is None or len(place[1]) != 2 or not m.isfile() or Path(m.name).suffix.lower() not in suffixes:
                    continue
                found[place[0]].setdefault(place[1][0], []).append((m.name, m.offset_data, m.size))
    except tarfile.ReadError as e:
        raise DataError(f"{path}: not an uncompressed tar ({e}); streaming reads members at their offsets, which a "
                        f"compressed archive does not allow: decompress it first (gunzip {path.name} gives a .tar) "
                        "or extract it, or set data.stream: false") from e
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: cannot read tarball ({e}); it is corrupt or truncated, re-copy it") from e
    out: dict[str, Listing] = {}
    for split, by_class in found.items():
        classes = tuple(sorted(by_class))
        if not classes:
            raise DataError(f"{path}: no {split}/<class>/<image> members; expected an ImageFolder tree inside")
        rows = [(name, off, size, label) for label, c in enumerate(classes) for name, off, size in sorted(by_class[c])]
        out[split] = (np.array([os.fsencode(r[0]) for r in rows], dtype=np.bytes_), np.array([r[3] for r in rows], np.int64),
                      classes, np.array([(r[1], r[2]) for r in rows], dtype=np.int64))
    return out


def list_image_folder(split_dir: Path, suffixes: Sequence[str]) -> Listing:
    """File names (relative to ``split_dir``'s parent), labels and class names of ``split_dir/<class>/*`` (no spans)."""
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
        names += [os.fsencode(f"{split_dir.name}/{cls}/{f}") for f in files]  # any name the OS allows
        labels += [label] * len(files)
    return np.array(names, dtype=np.bytes_), np.asarray(labels, np.int64), classes, None


class _Batches(Dataset):
    """A map-style dataset whose items are whole batches: the DataLoader passes an index array."""

    def __init__(self, images: FileImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: np.ndarray | slice) -> torch.Tensor:  # type: ignore[override]  # a batch, not one index
        return torch.from_numpy(self.images[idx])


def batches(images: np.ndarray | torch.Tensor | FileImages, order: Iterable[np.ndarray | slice], workers: int = 0,
            pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """uint8 tensors of ``images[i]`` for each index array or slice ``i`` in ``order``, in order.

    An array or tensor in memory is indexed in place; ``FileImages`` are decoded by ``workers``
    processes (0: in this one), two batches ahead per worker.
    """
    if not isinstance(images, FileImages):
        for idx in order:
            yield torch.as_tensor(images[idx])
        return
    # its own generator: a DataLoader otherwise draws its worker seed from torch's global one, which
    # would shift the training's dropout masks and make a streamed run differ from an in-memory one
    loader = DataLoader(_Batches(images), batch_size=None, sampler=list(order), num_workers=workers,
                        prefetch_factor=2 if workers else None, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(0))
    yield from loader


def in_order(n: int, batch_size: int) -> list[slice]:
    """0..n-1 in slices of ``batch_size`` (the last may be shorter)."""
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
