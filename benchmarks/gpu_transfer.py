"""Move a run trained on a lent GPU back to the CPU machine that measures it.

The lent machine returns at most 64 MiB of files in pieces of 16 MiB, so ``pack`` stores the
weights in fp16 (ResNet-18 and VGG-16 together: 52 MB) beside the run's small files. ``unpack``
rebuilds ``model.pt`` from those fp16 weights and re-evaluates every exit on the CPU, so the
model that is traced, calibrated and timed here is exactly the one whose accuracies metrics.json
gives; the GPU's own fp32 evaluation is kept beside them for comparison.

    python benchmarks/gpu_transfer.py pack runs/cifar10_resnet18 $OUT        # on the GPU machine
    python benchmarks/gpu_transfer.py unpack FILES_AT runs/cifar10_resnet18   # here

The other way, for a GPU benchmark of runs made here (``ship`` here, ``rebuild`` there, no re-evaluation):

    python benchmarks/gpu_transfer.py ship runs/cifar10_resnet18 .gpub
    python benchmarks/gpu_transfer.py rebuild .gpub runs/cifar10_resnet18
"""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import torch

from dart_ee.core import artifacts
from dart_ee.core.runfiles import CONFIG, ESTIMATORS, METRICS, MODEL, POLICY_DIR, SINGLE_EXIT, SPLIT
from dart_ee.data import datasets as data
from dart_ee.training.train import exit_accuracies, load_model, predict_exits, save_model

PIECE = 15 * 2**20  # under the 16 MiB a returned file may hold
SMALL = (CONFIG, SPLIT, METRICS, f"{SINGLE_EXIT}/{METRICS}", f"{SINGLE_EXIT}/{CONFIG}")
# what a benchmark needs besides the weights
BENCH = (CONFIG, SPLIT, METRICS, ESTIMATORS, f"{POLICY_DIR}/dart.json", f"{POLICY_DIR}/threshold.json")


def ship(run: Path, out: Path) -> None:
    """``pack`` with the files a benchmark of the run needs (estimator and fitted policies)."""
    pack(run, out, BENCH)


def pack(run: Path, out: Path, files: tuple[str, ...] = SMALL) -> None:
    """Write ``<name>.fp16.NN`` pieces of the weights and ``<name>.small.tar`` of the run's small files."""
    out.mkdir(parents=True, exist_ok=True)
    ck = artifacts.load_torch(run / MODEL, "model file")
    ck["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in ck["state_dict"].items()}
    buf = io.BytesIO()
    torch.save(ck, buf)
    blob = buf.getvalue()
    for i in range(0, len(blob), PIECE):
        (out / f"{run.name}.fp16.{i // PIECE:02d}").write_bytes(blob[i:i + PIECE])
    with tarfile.open(out / f"{run.name}.small.tar", "w") as tar:
        for name in files:
            if (run / name).is_file():
                tar.add(run / name, arcname=name)


def rebuild(src: Path, run: Path) -> None:
    """Rebuild ``run``'s files and its fp32 ``model.pt`` from the pieces in ``src``."""
    from dart_ee.models.net import create_model

    run.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src / f"{run.name}.small.tar") as tar:
        tar.extractall(run, filter="data")
    pieces = sorted(src.glob(f"{run.name}.fp16.*"))
    if not pieces:
        sys.exit(f"no {run.name}.fp16.* pieces in {src}")
    ck = torch.load(io.BytesIO(b"".join(p.read_bytes() for p in pieces)), weights_only=True)
    arch = dict(ck["arch"])
    model = create_model(arch.pop("name"), **arch)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ck["state_dict"].items()})
    save_model(model, run / MODEL, ck["config_fingerprint"])


def unpack(src: Path, run: Path) -> None:
    """``rebuild``, then re-evaluate the fp16-rounded model on this CPU and record both evaluations."""
    from dart_ee.config import load_config
    from dart_ee.training.train import prepare_splits

    rebuild(src, run)
    cfg = load_config(run / CONFIG)
    splits = prepare_splits(cfg, run, data.resolve_data_dir(None))  # $DART_DATA: the lent machine's folder is not here
    manifest = artifacts.read_json(run / "split.json", "split manifest")
    manifest["data_dir"] = str(data.resolve_data_dir(None).resolve())
    artifacts.write_json(run / "split.json", manifest)
    model = load_model(run / MODEL)
    metrics = artifacts.read_json(run / METRICS, "metrics")
    metrics["gpu_fp32_exit_test_accuracy"] = metrics["exit_test_accuracy"]
    metrics["exit_test_accuracy"] = exit_accuracies(predict_exits(model, splits.test.x), splits.test.y)
    metrics["exit_cal_accuracy"] = exit_accuracies(predict_exits(model, splits.cal.x), splits.cal.y)
    metrics["weights"] = f"trained on {metrics['device']}, moved as fp16, evaluated here in fp32"
    artifacts.write_json(run / METRICS, metrics)
    print(run, "test accuracy per exit (CPU, fp16-rounded weights):",
          " ".join(f"{100 * a:.2f}" for a in metrics["exit_test_accuracy"]),
          "| GPU fp32:", " ".join(f"{100 * a:.2f}" for a in metrics["gpu_fp32_exit_test_accuracy"]))


if __name__ == "__main__":
    verb, a, b = sys.argv[1:4]
    {"pack": pack, "unpack": unpack, "ship": ship, "rebuild": rebuild}[verb](Path(a), Path(b))
