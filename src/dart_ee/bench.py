"""Wall-clock measurements. Every figure is a median of repeated, alternating runs in one process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from dart_ee.data import get_spec
from dart_ee.difficulty import DifficultyEstimator
from dart_ee.models import create_model
from dart_ee.training import set_threads


def time_alternating(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, list[float]]:
    """Run each function ``warmup`` times, then ``repeats`` rounds in alternation; seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


@torch.inference_mode()
def difficulty_cost(model_name: str = "alexnet", dataset: str = "cifar10", repeats: int = 20,
                    threads: int | None = None) -> dict:
    """FLOPs of the paper's estimator, and its wall-clock share of a full forward pass at batch 1 and 256."""
    n_threads = set_threads(threads)
    spec = get_spec(dataset)
    shape = (spec.in_channels, spec.image_size, spec.image_size)
    model = create_model(model_name, spec.num_classes, *shape[:1], spec.image_size).eval()
    gen = torch.Generator().manual_seed(0)
    est = DifficultyEstimator().fit((torch.rand(512, *shape, generator=gen) * 255).to(torch.uint8))
    timing = []
    for bs in (1, 256):
        x = torch.rand(bs, *shape, generator=gen)
        t = time_alternating({"estimator": lambda x=x: est(x), "model": lambda x=x: model.forward_static(x)},
                             repeats if bs > 1 else 5 * repeats)
        e, m = statistics.median(t["estimator"]), statistics.median(t["model"])
        timing.append({"batch_size": bs, "estimator_ms": 1e3 * e, "model_ms": 1e3 * m, "share": e / m})
    return {"model": model_name, "dataset": dataset, "threads": n_threads, "torch": torch.__version__,
            "flops": est.flops(shape), "timing": timing,
            "note": "median of alternating runs after warm-up; model = static forward (no exit heads), fp32"}
