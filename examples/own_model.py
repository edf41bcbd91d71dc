"""DART on your own model and data, from Python: a residual network that is not an nn.Sequential, data
through a plain torch Dataset, exits after two of its blocks, heads trained on the frozen backbone,
then calibrated and run with real early exit.

    python examples/own_model.py            # about a minute on 2 CPU cores
    python examples/own_model.py --tiny     # a few seconds (CI runs this)

It also writes a run folder (``--out``, default runs/own_model) that every command reads, e.g.
``dart-ee compare --cal runs/own_model/trace_cal.npz --test runs/own_model/trace_test.npz --max-drop 1``.
"""

import argparse
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dart_ee import attach_exits
from dart_ee.calibration.calibrate import calibrate
from dart_ee.calibration.evaluation import evaluate, simulate
from dart_ee.difficulty.estimators import fit_estimators
from dart_ee.runs.tracing import make_trace
from dart_ee.runtime.eager import EarlyExitRunner
from dart_ee.training.train import fit_exits


class Patterns(Dataset):
    """Your data: 10 classes of oriented stripes under noise of random strength, 3x32x32 uint8 images (any
    Dataset of (image, label) works)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 10, (n,), generator=g)
        yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        angle = self.y[:, None, None] * (torch.pi / 10)
        stripes = torch.sin((xx * torch.cos(angle) + yy * torch.sin(angle)) * 0.8)
        level = torch.rand(n, 1, 1, 1, generator=g) * 12  # some images are easy, some nearly hopeless
        noise = torch.randn(n, 3, 32, 32, generator=g) * level
        self.x = ((stripes[:, None] + noise) * 20 + 128).clamp(0, 255).to(torch.uint8)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride > 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.skip(x) + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """Your model: its forward wires the blocks itself (residual connections), so it is not an nn.Sequential."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1, self.block2 = Block(width, width, 1), Block(width, 2 * width, 2)
        self.block3 = Block(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem((x - 0.5) / 0.25))))
        return self.fc(x.mean((2, 3)))


def loader(ds: Dataset, shuffle: bool = False) -> DataLoader:
    # dart-ee reads uint8 pixels (or float in [0, 1]) and converts them itself
    return DataLoader(ds, batch_size=64, shuffle=shuffle)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a few hundred images, one epoch each: a smoke test")
    ap.add_argument("--out", default="runs/own_model", help="the run folder to write")
    args = ap.parse_args()
    n, epochs = (600, 1) if args.tiny else (6000, 4)
    torch.manual_seed(0)
    train, cal, test = Patterns(n, 0), Patterns(n // 2, 1), Patterns(n // 2, 2)

    # 1. the model you already have, trained the ordinary way (here, briefly)
    net = SmallResNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(epochs):
        for x, y in loader(train, shuffle=True):
            loss = nn.functional.cross_entropy(net(x.float() / 255), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    # 2. the ten lines: exits by module name, heads on the frozen backbone, traces, calibration, early exit
    model = attach_exits(net.eval(), after=["block1", "block2"], example_input=torch.rand(1, 3, 32, 32))
    fit_exits(model, loader(train, shuffle=True), loader(cal), freeze_backbone=True, epochs=epochs + 1, bf16=False,
              run_dir=args.out)                          # a run folder that every dart-ee command reads
    estimator = fit_estimators(train.x.numpy())              # the paper's difficulty score, fitted on training images
    cal_trace = make_trace(model, loader(cal), "cal", estimator, run_dir=args.out)
    test_trace = make_trace(model, loader(test), "test", estimator, run_dir=args.out)
    policy, record = calibrate("dart", cal_trace, max_drop=1.0, tune_beta_diff=True)
    runner = EarlyExitRunner(model, policy, estimator)
    result = runner.run(test.x, batch_size=64)                # real early exit: later stages skip who left

    # 3. what it did
    m = evaluate(policy, test_trace)
    exits, preds = simulate(policy, test_trace)
    same = bool((result.exit.numpy() == exits).all() and (result.pred.numpy() == preds).all())
    t0 = time.perf_counter()
    runner.run(test.x, batch_size=64)
    t_dart = time.perf_counter() - t0
    with torch.inference_mode():
        t0 = time.perf_counter()
        for s in range(0, len(test), 64):
            model.forward_static(test.x[s: s + 64].float() / 255)
        t_static = time.perf_counter() - t0
    print(f"exits' test accuracy: {' / '.join(f'{100 * a:.1f}%' for a in test_trace.exit_accuracy())}")
    print(f"DART ({record['calibration']['n']} calibration images, budget 1 point, uncertified): test accuracy "
          f"{100 * m['accuracy']:.2f}% against {100 * m['final_exit_accuracy']:.2f}% for the whole network, "
          f"{100 * m['mac_reduction']:.1f}% of the MACs saved, exits {np.bincount(result.exit.numpy(), minlength=3).tolist()}")
    print(f"measured here: {t_static / t_dart:.2f}x the throughput of the whole network (one run, not a benchmark)")
    print(f"runtime == trace evaluation: {same}")
    print(f"run folder: {args.out}; try `dart-ee compare --cal {args.out}/trace_cal.npz --test {args.out}/trace_test.npz "
          "--max-drop 1 --out OUT`, then `dart-ee benchmark --run RUN --policy OUT/dart.json --trust-code` (the run "
          "names this file's class)")


if __name__ == "__main__":
    main()
