"""Dataset readers, the cached decoded arrays, the calibration split and batched augmentation.

Every reader returns uint8 images in NCHW layout and int64 labels; models receive float pixels in
[0, 1] (they normalise internally), so the difficulty estimator and the model see the same input.

Supported on-disk formats (no downloads, ever):
- CIFAR-10's official python format (``cifar-10-batches-py/``);
- IDX files, gzipped or not (MNIST, Fashion-MNIST, KMNIST);
- ImageFolder trees (``train/<class>/*.png|jpg`` and ``test/<class>/...``), or a ``.tar.gz`` of one.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pickle
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dart_ee.core import artifacts
from dart_ee.core.console import log
from dart_ee.core.errors import DataError
from dart_ee.data.decode import decode_image, resize_images
from dart_ee.data.streaming import FileImages, list_image_folder, list_image_tar, tree_place

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset without reading it."""

    name: str
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool  # horizontal flips are label-preserving (not for digits)
    crop_pad: int  # random-crop padding used in training
    folders: tuple[str, ...]  # where to look under the data root


_MNIST_NORM = dict(mean=(0.1307,), std=(0.3081,))
DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           True, 4, ("cifar-10-batches-py", "cifar10", "cifar10-jpeg.tar.gz", ".")),
    "mnist": DatasetSpec("mnist", 1, 28, 10, **_MNIST_NORM, flip=False, crop_pad=2,
                         folders=("mnist-10k", "mnist", "MNIST/raw", ".")),
    "fashion-mnist": DatasetSpec("fashion-mnist", 1, 28, 10, (0.2860,), (0.3530,), False, 2,
                                 ("fashion-mnist", "FashionMNIST/raw", ".")),
    "kmnist": DatasetSpec("kmnist", 1, 28, 10, (0.1918,), (0.3483,), False, 2, ("kmnist", "KMNIST/raw", ".")),
    # 1,797 real 8x8 handwritten digits (UCI), shipped inside scikit-learn: the zero-download demo data
    "digits": DatasetSpec("digits", 1, 8, 10, (0.305,), (0.375,), False, 1, ()),
    # any ImageFolder tree at --data-dir (<root>/train/<class>/<image>, <root>/test/...): RGB, resized to
    # data.image_size, classes counted from its folders; ImageNet's channel statistics
    "imagefolder": DatasetSpec("imagefolder", 3, 0, 0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), True, 0, (".",)),
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def dataset_spec(name: str, size: int | None = None, num_classes: int | None = None) -> DatasetSpec:
    """``name``'s spec at ``size`` pixels (random-crop padding scaled alike) with ``num_classes`` classes."""
    spec = get_spec(name)
    if size and size != spec.image_size:
        pad = round(spec.crop_pad * size / spec.image_size) if spec.image_size else size // 8
        spec = dataclasses.replace(spec, image_size=size, crop_pad=max(1, pad))
    if num_classes and not spec.num_classes:
        spec = dataclasses.replace(spec, num_classes=num_classes)
    return spec


def get_spec(name: str) -> DatasetSpec:
    if name == "custom":
        raise DataError("dataset 'custom' is a run written from Python (fit_exits / make_trace with run_dir=...): "
                        "its images are in the run folder, and a config cannot train or trace it again")
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


@dataclass
class ImageSet:
    """Images of one split: ``x`` uint8 (N, C, H, W), ``y`` int64 (N,).

    ``x`` is an array in memory, or (``data.stream``) a ``streaming.FileImages`` that decodes the
    files an index asks for.
    """

    x: np.ndarray  # or streaming.FileImages, which indexes like one
    y: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.x.dtype != np.uint8:
            raise DataError(f"images must be uint8 (N, C, H, W), got {self.x.dtype} {self.x.shape}")
        if len(self.x) != len(self.y):
            raise DataError(f"{len(self.x)} images but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def decoded(self) -> ImageSet:
        """This set with its images in memory (a streamed set decodes all its files)."""
        return self if isinstance(self.x, np.ndarray) else ImageSet(self.x[:], self.y, self.classes)

    def subset(self, idx: np.ndarray) -> ImageSet:
        x = self.x.subset(idx) if hasattr(self.x, "subset") else self.x[idx]  # streamed files stay undecoded
        return ImageSet(x, self.y[idx], self.classes)


# ----------------------------------------------------------------------------------------------
# IDX (MNIST family)

_IDX_DTYPES: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array, validating header and length."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot decompress ({e}); the file is corrupt or truncated, re-copy it") from e
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, no header)")
    zero, dtype_code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or dtype_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: wrong magic number 0x{raw[:4].hex()}; this is not an IDX file")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: truncated or padded IDX data: header says shape {shape} "
                        f"({expected} bytes) but {len(raw) - header} bytes follow")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).copy()  # writable, own memory


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: missing IDX file {stem}[.gz]")


def _pixels_uint8(x: np.ndarray, where: str | Path) -> np.ndarray:
    """Pixels as uint8, refusing what a cast would silently wrap: floats and integers outside 0..255."""
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.integer):
        raise DataError(f"{where}: pixels are {x.dtype.name}; dart-ee reads 8-bit images (integers 0..255): "
                        "convert the data, e.g. (x * 255).round().astype('uint8') for floats in [0, 1]")
    if x.size and (x.min() < 0 or x.max() > 255):
        raise DataError(f"{where}: pixel values {x.min()}..{x.max()} do not fit 8 bits (0..255)")
    return x.astype(np.uint8)


def _labels(y: object, num_classes: int, where: str | Path) -> np.ndarray:
    """Integer labels in [0, num_classes), or an error naming the file."""
    try:
        arr = np.asarray(y)
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(arr.dtype)
    except (ValueError, TypeError):
        raise DataError(f"{where}: labels must be integers 0..{num_classes - 1}") from None
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise DataError(f"{where}: labels must lie in [0, {num_classes}), found {arr.min()}..{arr.max()}")
    return arr.astype(np.int64)


def read_idx_pair(images: Path, labels: Path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3:
        raise DataError(f"{images}: expected a 3-d image array (N, H, W), got shape {x.shape}")
    if y.ndim != 1:
        raise DataError(f"{labels}: expected a 1-d label array, got shape {y.shape}")
    if len(x) != len(y):
        raise DataError(f"image and label counts differ: {images} has {len(x)}, {labels} has {len(y)}")
    if len(x) == 0:
        raise DataError(f"{images}: the file holds no images")
    return np.ascontiguousarray(_pixels_uint8(x, images)[:, None]), _labels(y, num_classes, labels)


def read_idx_folder(folder: Path) -> tuple[ImageSet, ImageSet]:
    parts = []
    for prefix in ("train", "t10k"):
        x, y = read_idx_pair(_find_idx(folder, f"{prefix}-images-idx3-ubyte"),
                             _find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
        parts.append(ImageSet(x, y, tuple(str(i) for i in range(10))))
    return parts[0], parts[1]


# ----------------------------------------------------------------------------------------------
# CIFAR-10 official python format


def _unpickle_batch(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"CIFAR batch file not found: {path}")
    try:
        with open(path, "rb") as f:
            # The official format is a pickle of plain dicts/arrays; restrict what may be loaded.
            return _SafeUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as e:
        raise DataError(f"{path}: not a readable CIFAR batch ({e}); re-copy the file") from e


class _SafeUnpickler(pickle.Unpickler):
    """Only numpy array reconstruction is allowed: a CIFAR batch needs nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str) -> type:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"forbidden object {module}.{name} in pickle")


def read_cifar_python(folder: Path) -> tuple[ImageSet, ImageSet]:
    meta_path = folder / "batches.meta"
    classes = CIFAR10_CLASSES
    if meta_path.is_file():
        classes = tuple(_unpickle_batch(meta_path).get("label_names", classes))
    sets = []
    for names in ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]):
        xs, ys = [], []
        for name in names:
            d = _unpickle_batch(folder / name)
            if "data" not in d or "labels" not in d:
                raise DataError(f"{folder / name}: missing 'data' or 'labels' entry")
            data = _pixels_uint8(np.asarray(d["data"]), folder / name)
            labels = _labels(d["labels"], len(classes), folder / name)
            if data.ndim != 2 or data.shape[1] != 3072:
                raise DataError(f"{folder / name}: 'data' must be N x 3072, got {data.shape}")
            if len(data) != len(labels):
                raise DataError(f"{folder / name}: image and label counts differ ({len(data)} vs {len(labels)})")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(labels)
        sets.append(ImageSet(np.concatenate(xs), np.concatenate(ys), classes))
    return sets[0], sets[1]


# ----------------------------------------------------------------------------------------------
# ImageFolder trees, on disk or inside a .tar.gz


def _stack_folder(items: dict[str, list[tuple[str, bytes]]], where: str, size: int | None = None,
                  channels: int | None = None) -> ImageSet:
    classes = tuple(sorted(items))
    if not classes:
        raise DataError(f"{where}: no class folders found; expected {where}/<class>/<image>")
    names, xs, ys = [], [], []
    for label, cls in enumerate(classes):
        if not items[cls]:
            raise DataError(f"{where}/{cls}: empty class folder; add images or remove the folder")
        for name, data in sorted(items[cls]):
            names.append(name)
            xs.append(decode_image(data, name, size, channels))
            ys.append(label)
    if any(a.shape[0] == 3 for a in xs):  # mixed grey and colour files: promote grey to RGB
        xs = [np.repeat(a, 3, 0) if a.shape[0] == 1 else a for a in xs]
    for name, a in zip(names, xs):
        if a.shape != xs[0].shape:
            raise DataError(f"{name}: image size {a.shape[1:]} differs from {xs[0].shape[1:]} of {names[0]}; "
                            "resize the images to one size")
    return ImageSet(np.stack(xs), np.asarray(ys, dtype=np.int64), classes)


def read_image_folder(root: Path, size: int | None = None, channels: int | None = None) -> tuple[ImageSet, ImageSet]:
    """Read ``root/train/<class>/*`` and ``root/test/<class>/*`` (``decode_image``'s ``size`` and ``channels``)."""
    out = []
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir():
            raise DataError(f"ImageFolder split directory not found: {d}")
        items: dict[str, list[tuple[str, bytes]]] = {}
        for cls_dir in sorted(p for p in d.iterdir() if p.is_dir()):
            files = [p for p in sorted(cls_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
            items[cls_dir.name] = [(str(p), p.read_bytes()) for p in files]
        out.append(_stack_folder(items, str(d), size, channels))
    _check_same_classes(out[0], out[1], root)
    return out[0], out[1]


def read_image_folder_tar(path: Path, size: int | None = None, channels: int | None = None) -> tuple[ImageSet, ImageSet]:
    """Read an ImageFolder tree from a tarball in one streaming pass (``*/train/<class>/<file>``)."""
    items: dict[str, dict[str, list[tuple[str, bytes]]]] = {"train": {}, "test": {}}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                if (place := tree_place(m.name)) is None:
                    continue
                split, rest = place
                if m.isdir() and len(rest) == 1:
                    items[split].setdefault(rest[0], [])
                elif m.isfile() and len(rest) == 2 and Path(m.name).suffix.lower() in IMAGE_SUFFIXES:
                    f = tar.extractfile(m)
                    if f is not None:  # a regular file always has a reader
                        items[split].setdefault(rest[0], []).append((f"{path}:{m.name}", f.read()))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{path}: cannot read tarball ({e}); it is corrupt or truncated, re-copy it") from e
    train, test = (_stack_folder(items[s], f"{path}:{s}", size, channels) for s in ("train", "test"))
    _check_same_classes(train, test, path)
    return train, test


def _check_same_classes(train: ImageSet, test: ImageSet, where: Path) -> None:
    if train.classes != test.classes:
        raise DataError(f"{where}: train and test class folders differ: {train.classes} vs {test.classes}")


# ----------------------------------------------------------------------------------------------
# Locating a dataset under a data root, and the decode cache


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """``--data-dir`` wins, then ``DART_DATA``; a missing directory is a clear error."""
    chosen = data_dir if data_dir is not None else os.environ.get("DART_DATA")
    if not chosen:
        raise DataError("no data directory: pass --data-dir DIR or set DART_DATA=DIR")
    root = Path(chosen).expanduser()
    if not root.exists():
        raise DataError(f"data directory not found: {root}; check --data-dir or DART_DATA")
    return root


def _locate(spec: DatasetSpec, root: Path) -> tuple[str, Path]:
    """Find the dataset's files under ``root``: returns (reader kind, path)."""
    for folder in spec.folders:
        p = root / folder
        if spec.in_channels == 3:  # CIFAR-10 or an ImageFolder tree
            if (p / "data_batch_1").is_file():
                return "cifar-python", p
            if (p / "train").is_dir() and (p / "test").is_dir():
                return "imagefolder", p
            if p.is_file() and p.name.endswith((".tar.gz", ".tgz", ".tar")):
                return "imagefolder-tar", p
        else:
            for stem in ("train-images-idx3-ubyte", "train-images.idx3-ubyte"):
                if (p / stem).is_file() or (p / (stem + ".gz")).is_file():
                    return "idx", p
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
        return "imagefolder-tar", root
    looked = ", ".join(str(root / f) for f in spec.folders)
    raise DataError(f"{spec.name} not found under {root} (looked in {looked}); point --data-dir or "
                    "DART_DATA at the folder holding it")


_READERS: dict[str, Callable[..., tuple[ImageSet, ImageSet]]] = {"cifar-python": read_cifar_python, "idx": read_idx_folder,
            "imagefolder": read_image_folder, "imagefolder-tar": read_image_folder_tar}


def cache_dir() -> Path:
    return Path(os.environ.get("DART_CACHE", Path.home() / ".cache" / "dart-ee")).expanduser()


def _source_key(kind: str, path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256(os.fsencode(f"{kind}|{path.resolve()}"))  # any name the OS allows
    for f in files:
        st = f.stat()
        h.update(os.fsencode(f"{f.relative_to(path) if f != path else f.name}|{st.st_size}|{st.st_mtime_ns}"))
    return h.hexdigest()[:16]


def read_sklearn_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """The UCI 8x8 digits that scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``), read without
    importing scikit-learn, split 80/20 with a fixed seed (the data has no official split)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DataError("the digits dataset ships with scikit-learn, which is not installed: "
                        "pip install -e '.[demo]' (or pip install scikit-learn)")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    try:
        raw = np.loadtxt(path, delimiter=",")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the digits data ({e}); reinstall scikit-learn") from e
    if raw.ndim != 2 or raw.shape[1] != 65:
        raise DataError(f"{path}: expected 65 columns (8x8 pixels and a label), got shape {raw.shape}")
    x = np.round(raw[:, :64] * (255 / 16)).astype(np.uint8).reshape(-1, 1, 8, 8)
    y = raw[:, 64].astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    n_test = round(test_fraction * len(y))
    classes = tuple(str(i) for i in range(10))
    return (ImageSet(x[perm[n_test:]], y[perm[n_test:]], classes), ImageSet(x[perm[:n_test]], y[perm[:n_test]], classes))


def load_dataset(name: str, data_dir: str | Path | None = None, use_cache: bool = True, size: int | None = None,
                 stream: bool = False) -> tuple[ImageSet, ImageSet]:
    """Return the (train, test) image sets of a dataset at ``size`` pixels (default: its own size).

    In memory (the default), decoded once and cached as npz. With ``stream``, an ImageFolder
    directory is listed, not decoded: the sets hold ``streaming.FileImages``, decoded batch by batch.
    """
    spec = get_spec(name)
    if name == "digits":  # ships with an installed package: no data directory, nothing to cache
        if stream:
            raise DataError("data.stream reads ImageFolder trees; the digits dataset is tiny: set data.stream: false")
        train, test = read_sklearn_digits()
        return (train, test) if not size else (_resized(train, size), _resized(test, size))
    kind, path = _locate(spec, resolve_data_dir(data_dir))
    channels = 3 if name == "imagefolder" else None  # an arbitrary tree is read as RGB, grey files too
    if stream:
        if not kind.startswith("imagefolder"):
            raise DataError(f"{path}: data.stream reads ImageFolder trees (<root>/train/<class>/<image>, a directory or "
                            f"an uncompressed .tar), but this is {kind} data; set data.stream: false (the in-memory path)")
        ch, px = channels or spec.in_channels, size or spec.image_size
        listed = ({split: list_image_folder(path / split, IMAGE_SUFFIXES) for split in ("train", "test")}
                  if kind == "imagefolder" else list_image_tar(path, IMAGE_SUFFIXES))
        sets = [ImageSet(FileImages(path, names, ch, px, spans), labels, classes)  # type: ignore[arg-type]  # like an array
                for names, labels, classes, spans in (listed["train"], listed["test"])]
        _check_same_classes(sets[0], sets[1], path)
        return sets[0], sets[1]
    cache = cache_dir() / f"{spec.name}-{_source_key(kind, path)}{f'-{size}px' if size else ''}.npz"
    if use_cache and cache.is_file():
        try:
            with np.load(cache) as z:
                classes = tuple(str(c) for c in z["classes"])
                return ImageSet(z["x_train"], z["y_train"], classes), ImageSet(z["x_test"], z["y_test"], classes)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, DataError):
            pass  # a corrupt cache is rebuilt below
    if kind.startswith("imagefolder"):
        train, test = _READERS[kind](path, size, channels)  # the folder readers resize as they decode
    else:
        train, test = _READERS[kind](path)
        train, test = (_resized(train, size), _resized(test, size)) if size else (train, test)
    want = size or spec.image_size
    if spec.num_classes and len(train.classes) != spec.num_classes:
        raise DataError(f"{path}: {len(train.classes)} classes ({', '.join(map(str, train.classes[:12]))}), but "
                        f"{spec.name} has {spec.num_classes}; point --data-dir at a {spec.name} copy")
    for s, what in ((train, "train"), (test, "test")):
        if (want and s.x.shape[2:] != (want, want)) or (spec.in_channels and s.x.shape[1] != spec.in_channels):
            raise DataError(f"{path}: {what} images have shape {s.x.shape[1:]}, but {spec.name} expects "
                            f"{(spec.in_channels, want, want)}; set data.image_size to resize them")
    if use_cache:
        try:
            artifacts.atomic_write(cache, lambda p: np.savez(p.open("wb"), x_train=train.x, y_train=train.y,
                                                             x_test=test.x, y_test=test.y,
                                                             classes=np.array(train.classes)))
        except OSError as e:  # a cache only saves time: go on without it
            log(f"[yellow]warning: cannot write the dataset cache {cache} ({e.strerror or e}); going on without it "
                "(set DART_CACHE to a writable folder to decode the data only once)[/yellow]")
    return train, test


def _resized(s: ImageSet, size: int) -> ImageSet:
    return ImageSet(resize_images(s.x, size), s.y, s.classes)


# ----------------------------------------------------------------------------------------------
# Calibration split


def make_split(n_train: int, cal_fraction: float, seed: int) -> dict:
    """Deterministically hold out ``cal_fraction`` of the training set for calibration."""
    if not 0.0 < cal_fraction < 1.0:
        raise DataError(f"data.cal_fraction must lie strictly between 0 and 1, got {cal_fraction}")
    perm = np.random.default_rng(seed).permutation(n_train)
    n_cal = max(1, round(cal_fraction * n_train))
    return {"version": 1, "n_train_total": n_train, "seed": seed, "cal_fraction": cal_fraction,
            "cal_indices": sorted(perm[:n_cal].tolist()), "train_indices": sorted(perm[n_cal:].tolist())}


def content_fingerprint(*sets: ImageSet) -> str:
    """A hash of the pixels and labels themselves: the same data moved to another folder keeps it."""
    h = hashlib.sha256()
    for s in sets:
        if hasattr(s.x, "fingerprint"):  # streamed: the files' names, sizes and times, not their pixels
            h.update(s.x.fingerprint().encode())
        else:
            h.update(np.ascontiguousarray(s.x).data)
        h.update(np.ascontiguousarray(s.y).data)
    return h.hexdigest()[:16]


def check_split(manifest: dict, n_train: int) -> None:
    cal, tr = set(manifest["cal_indices"]), set(manifest["train_indices"])
    if manifest["n_train_total"] != n_train or cal & tr or len(cal) + len(tr) != n_train:
        raise DataError("split manifest does not match this training set (different data?); "
                        "delete split.json in the run directory to re-split")


# ----------------------------------------------------------------------------------------------
# Tensors and batched augmentation (no per-sample Python loops)


def to_float(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 in [0, 1]."""
    t = torch.as_tensor(x)
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


def augment(x: torch.Tensor, crop_pad: int, flip: bool, gen: torch.Generator, batch: int | None = None,
            share: slice = slice(None)) -> torch.Tensor:
    """Random translation by up to ``crop_pad`` pixels (reflect-padded crop) and horizontal flips.

    ``x`` may be the rows ``share`` of a batch of ``batch`` samples: the draws are made for the whole
    batch and those rows' applied, so processes that each hold a share of a batch augment it as one would.
    """
    n, _, h, w = x.shape
    total = batch or n
    if crop_pad > 0:
        xp = torch.nn.functional.pad(x, (crop_pad,) * 4, mode="reflect")
        dev = x.device  # ``gen`` must live there too
        oy = torch.randint(0, 2 * crop_pad + 1, (total, 1), generator=gen, device=dev)[share]
        ox = torch.randint(0, 2 * crop_pad + 1, (total, 1), generator=gen, device=dev)[share]
        rows = (oy + torch.arange(h, device=dev))[:, :, None]  # (n, h, 1)
        cols = (ox + torch.arange(w, device=dev))[:, None, :]  # (n, 1, w)
        x = xp[torch.arange(n, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if flip:
        mask = torch.rand(total, generator=gen, device=x.device)[share] < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x.contiguous()
