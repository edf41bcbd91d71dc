"""Exits on a ResNet-18 you already have, or retrain with exits? The trained single-exit ResNet-18 (the
"Baseline (No EE)" network, configs/cifar10_resnet18_single_exit.yaml) rebuilt as a plain ResNet-18
whose forward wires its own residual blocks (torchvision's layout, not an nn.Sequential), exits
attached by module name after layer1..layer3, heads trained on the frozen backbone, then calibrated,
certified and benchmarked next to the jointly trained 4-exit ResNet-18 of the registry, at the same
budget, on the same machine, in one process.

    dart-ee train --config configs/cifar10_resnet18_single_exit.yaml --out runs/cifar10_resnet18_single_exit
    dart-ee run --config configs/cifar10_resnet18.yaml       # the jointly trained network (already there?)
    python examples/heads_on_resnet18.py --record benchmarks/cpu/resnet18_heads.json
    python examples/heads_on_resnet18.py --tiny              # seconds, untrained and random: CI's smoke test

Writes the run folder ``--out`` (every dart-ee command reads it) and, with ``--record``, the JSON
record BENCHMARKS.md's "Exits on a network you have" section is generated from.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dart_ee import attach_exits, create_model, trust_code
from dart_ee.bench.benchmark import benchmark
from dart_ee.calibration.calibrate import compare
from dart_ee.core import artifacts
from dart_ee.core.provenance import provenance
from dart_ee.core.runfiles import POLICY_DIR
from dart_ee.data.datasets import CIFAR10_CLASSES, DATASETS, ImageSet, augment, to_float
from dart_ee.difficulty.estimators import fit_estimators
from dart_ee.runs.run import Run
from dart_ee.runs.tracing import make_trace
from dart_ee.training.train import fit_exits, load_model, prepare_splits

CIFAR = DATASETS["cifar10"]


class BasicBlock(nn.Module):
    """torchvision's ResNet block: two 3x3 convolutions and a shortcut, added in forward."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """A plain CIFAR ResNet-18 (3x3 stem, no max-pool), as a user would have it: normalisation inside."""

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512), num_classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(CIFAR.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(CIFAR.std).view(1, 3, 1, 1))
        self.conv1, self.bn1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, w in enumerate(widths):
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)))
            cin = w
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1((x - self.mean) / self.std)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


# dart-ee's registry ResNet-18 (stages of nn.Sequential) -> the plain layout above
_RENAMES = [(r"^stages\.0\.0\.(mean|std)$", r"\1"), (r"^stages\.0\.1\.0\.", "conv1."), (r"^stages\.0\.1\.1\.", "bn1."),
            (r"\.body\.0\.0\.", ".conv1."), (r"\.body\.0\.1\.", ".bn1."), (r"\.body\.1\.", ".conv2."),
            (r"\.body\.2\.", ".bn2."), (r"\.short\.", ".downsample."), (r"^heads\.3\.2\.", "fc.")]


def plain_state_dict(registry: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The registry model's backbone and final classifier, renamed for ``ResNet18`` (exit heads dropped)."""
    out = {}
    for key, value in registry.items():
        if key.startswith("heads.") and not key.startswith("heads.3."):
            continue  # the single-exit network's untrained early heads
        m = re.match(r"^stages\.(\d)\.(\d)\.(.*)$", key)
        if m and not (m[1] == "0" and m[2] in "01"):  # a residual block: stage s, block b (stage 0 has 2 in front)
            s, b = int(m[1]), int(m[2]) - (2 if m[1] == "0" else 0)
            key = f"layer{s + 1}.{b}.{m[3]}"
        for pattern, repl in _RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


class Batches:
    """Your training loader: shuffled, random-crop and flip augmented batches of uint8 CIFAR images."""

    def __init__(self, images: ImageSet, batch_size: int, seed: int = 0) -> None:
        self.x, self.y, self.batch_size, self.epoch, self.seed = torch.from_numpy(images.x), images.y, batch_size, 0, seed

    def __len__(self) -> int:
        return len(self.y) // self.batch_size

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.epoch += 1
        perm = torch.randperm(len(self.y), generator=gen)
        for b in range(len(self)):
            idx = perm[b * self.batch_size: (b + 1) * self.batch_size]
            yield augment(to_float(self.x[idx]), CIFAR.crop_pad, CIFAR.flip, gen), torch.from_numpy(self.y[idx.numpy()])


def in_order(images: ImageSet, batch_size: int = 500):
    return [(images.x[s: s + batch_size], images.y[s: s + batch_size]) for s in range(0, len(images), batch_size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="runs/cifar10_resnet18_single_exit", help="the trained single-exit run")
    ap.add_argument("--joint", default="runs/cifar10_resnet18", help="the jointly trained 4-exit run to compare with")
    ap.add_argument("--out", default="runs/cifar10_resnet18_heads", help="the run folder to write")
    ap.add_argument("--epochs", type=int, default=6, help="epochs of head training on the frozen backbone")
    ap.add_argument("--max-drop", type=float, default=0.5, help="accuracy budget (points), as `dart-ee run`'s")
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--record", type=Path, help="write the JSON record BENCHMARKS.md is generated from")
    ap.add_argument("--tiny", action="store_true", help="an untrained small network on random images: a smoke test")
    args = ap.parse_args()

    if args.tiny:  # what CI can run: the same steps on an untrained network of 1/8 the width
        registry = create_model("resnet18", width_mult=0.125, mean=CIFAR.mean, std=CIFAR.std).eval()
        rng = np.random.default_rng(0)
        split = {s: ImageSet(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n),
                             CIFAR10_CLASSES) for s, n in (("train", 256), ("cal", 256), ("test", 128))}
        widths, args.epochs = (8, 16, 32, 64), 1
    else:
        registry = load_model(Path(args.backbone) / "model.pt")
        splits = prepare_splits(Run(args.backbone).config(), Path(args.backbone))  # its own held-out cal split
        split = {"train": splits.train, "cal": splits.cal, "test": splits.test}
        widths = (64, 128, 256, 512)

    # 1. the network you have: a plain ResNet-18 with the trained weights; it computes what the registry model did
    net = ResNet18(widths)
    net.load_state_dict(plain_state_dict(registry.state_dict()))
    x = to_float(torch.from_numpy(split["test"].x[:64]))
    with torch.no_grad():
        gap = float((net.eval()(x) - registry.forward_static(x)).abs().max())
    assert gap < 1e-4, f"the rebuilt ResNet-18 differs from the trained one by {gap}"

    # 2. exits by module name, heads trained on the frozen backbone, traced into a run folder
    model = attach_exits(net, after=["layer1", "layer2", "layer3"], example_input=x[:1],
                         builder_kwargs={"widths": list(widths)})  # how commands rebuild it from the run folder
    t0 = time.perf_counter()
    history = fit_exits(model, Batches(split["train"], 256), in_order(split["cal"]), freeze_backbone=True,
                        epochs=args.epochs, lr=0.05, distill=0.5, run_dir=args.out)
    head_train_s = time.perf_counter() - t0
    est = fit_estimators(split["train"].x)
    heads = {"cal": make_trace(model, in_order(split["cal"]), "cal", est, run_dir=args.out),
             "test": make_trace(model, in_order(split["test"]), "test", est, run_dir=args.out)}

    # 3. both networks calibrated at the same certified budget, measured on the same test images
    runs = {"heads": (Path(args.out), heads)}
    if not args.tiny:
        joint = Run(args.joint)
        runs["joint"] = (joint.path, {"cal": joint.trace("cal"), "test": joint.trace("test")})
    record: dict = {"max_drop": args.max_drop, "confidence": args.confidence, "head_epochs": args.epochs,
                    "head_train_s": round(head_train_s, 1), "history": history, "networks": {}}
    for name, (path, traces) in runs.items():
        res = compare(traces["cal"], traces["test"], args.max_drop, args.confidence)
        pol_dir = path / POLICY_DIR if name == "heads" else Path(args.out) / "joint_policies"
        for pname, (pol, rec) in res.pop("fitted").items():
            pol.save(pol_dir / f"{pname}.json", calibration=rec)
        with trust_code():  # the heads run names this script's ResNet18 class: our own code
            bench = benchmark(path, [pol_dir / "threshold.json", pol_dir / "dart.json"],
                              n_images=256 if args.tiny else 2560, repeats=1 if args.tiny else 5,
                              latency_images=4 if args.tiny else 100)
        record["networks"][name] = {"run": str(path), "exit_test_accuracy": traces["test"].exit_accuracy(),
                                    "exit_macs": traces["test"].exit_macs.tolist(), "compare": res, "benchmark": bench}
        dart = next(r for r in res["rows"] if r["policy"] == "dart")["test"]
        speed = next(r for r in bench["rows"] if r["method"] == "dart")
        print(f"{name}: exits' test accuracy {' / '.join(f'{100 * a:.2f}%' for a in traces['test'].exit_accuracy())}; "
              f"DART at {args.max_drop} points (certified at {args.confidence}): test drop "
              f"{dart['drop_points']:+.2f} points, MACs -{100 * dart['mac_reduction']:.1f}%, "
              f"{speed['speedup']:.2f}x measured at batch {bench['batch_size']}, {speed['latency_speedup']:.2f}x at batch 1")
    if args.record:
        artifacts.write_json(args.record, {**record, "provenance": provenance()})
        print(f"wrote {args.record}")


if __name__ == "__main__":
    sys.exit(main())
