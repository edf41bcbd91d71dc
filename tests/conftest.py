"""Tiny generated datasets in every supported format, so tests never need real data or a network."""

from __future__ import annotations

import gzip
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _class_images(n: int, channels: int, size: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Learnable toy images: each class is a noisy stripe pattern of its own orientation and phase."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % num_classes
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(2 * np.pi * ((c % 5 + 1) * xx + (c // 5) * 2 * yy)) for c in range(num_classes)])
    x = base[y][:, None] * 0.4 + 0.5 + rng.normal(0, 0.08, (n, channels, size, size))
    return (np.clip(x, 0, 1) * 255).astype(np.uint8), y.astype(np.int64)


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_idx_dataset(root: Path, n_train: int = 200, n_test: int = 100, gz: bool = True, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x, y = _class_images(n, 1, 28, 10, seed + n)
        write_idx(root / f"{prefix}-images-idx3-ubyte{sfx}", x[:, 0], gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{sfx}", y, gz)
    return root


def make_cifar_python(root: Path, per_batch: int = 40, seed: int = 0) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        x, y = _class_images(per_batch, 3, 32, 10, seed + i)
        with open(d / name, "wb") as f:
            pickle.dump({"data": x.reshape(per_batch, -1), "labels": y.tolist()}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return root


def make_image_folder(root: Path, per_class: int = 3, classes: int = 3, size: int = 32) -> Path:
    for split in ("train", "test"):
        x, y = _class_images(per_class * classes, 3, size, classes, 7)
        for i, (img, label) in enumerate(zip(x, y)):
            d = root / split / f"class{label}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.transpose(1, 2, 0)).save(d / f"{i:04d}.png")
    return root


def make_tarball(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=src.name)
    return dest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own decode cache unless it opts into the shared one."""
    monkeypatch.setenv("DART_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.delenv("DART_DATA", raising=False)


@pytest.fixture
def mnist_like(tmp_path: Path) -> Path:
    return make_idx_dataset(tmp_path / "data" / "mnist")


def tiny_config(data_dir: Path, **train_overrides) -> dict:
    """A config dict that trains a slim AlexNet on the MNIST-like IDX data in a few seconds."""
    train = {"epochs": 1, "batch_size": 32, "lr": 0.05, "bf16": False, "channels_last": False, "num_threads": 1,
             "eval_batch_size": 64}
    train.update(train_overrides)
    return {"name": "tiny", "seed": 0, "data": {"dataset": "mnist", "data_dir": str(data_dir), "cal_fraction": 0.2},
            "model": {"name": "alexnet", "width_mult": 0.125, "head_width": 16}, "train": train}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny AlexNet trained for a few seconds on generated digits, traced with both difficulty scores."""
    import torch

    from dart_ee import trace as trace_mod
    from dart_ee.config import parse_config
    from dart_ee.runs import tracing
    from dart_ee.training.train import prepare_splits, train

    root = tmp_path_factory.mktemp("rt")
    make_idx_dataset(root / "data" / "mnist", n_train=400, n_test=300)
    raw = tiny_config(root / "data", epochs=4, batch_size=16)
    raw["data"]["cal_fraction"] = 0.5
    cfg = parse_config(raw)
    train(cfg, root / "run")
    paths = tracing.trace_run(root / "run")
    splits = prepare_splits(cfg, root / "run")
    return {"run": root / "run", "cal": trace_mod.load(paths["cal"]), "test": trace_mod.load(paths["test"]),
            "images": torch.from_numpy(splits.test.x), "cal_path": paths["cal"], "test_path": paths["test"]}


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory):
    """Every policy (on the paper's alpha, and DART on the learned one) fitted and exported with the model (once a
    session: the export, serving and scale-out tests share it)."""
    from test_runtime import CASES, _fitted

    from dart_ee.deploy.export import export_run

    root = tmp_path_factory.mktemp("export")
    policies = {}
    for name, alpha in CASES:
        pol = _fitted(name, trained_run["cal"].with_alpha(f"alpha_{alpha}"))
        policies[f"{name}_{alpha}"] = pol
        pol.save(root / "policies" / f"{name}_{alpha}.json")
    export_run(trained_run["run"], root / "onnx", policies=sorted((root / "policies").glob("*.json")))
    return {"dir": root / "onnx", "policies": policies}
