"""The benchmark's timing loops, and the onnxruntime engine timed in a process of its own.

Both loops alternate the methods (each goes first in turn), so that drift in the machine's speed does
not favour one. They import neither torch nor ``dart_ee.bench.benchmark``: ``time_exported`` runs them in a child
process that imports numpy and onnxruntime only, as a serving process would. Timed in the benchmark's own
process, after torch had run the same images, onnxruntime's batch-1 calls were slower, the many small
calls of an early-exit runner more than the one call of the static network (CIFAR-10 AlexNet: DART's
latency speedup about 1.4x there against about 1.55x in a process without torch; ad-hoc, not recorded).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

import numpy as np

from dart_ee.deploy.onnx_runner import OnnxRunner

K = TypeVar("K", bound=Hashable)


def rotated(keys: list, r: int) -> list:
    """``keys`` starting at position ``r``: each method goes first in turn, so drift does not favour one."""
    r = r % len(keys) if keys else 0
    return keys[r:] + keys[:r]


def _no_sync() -> None:
    pass


def alternate(fns: Mapping[K, Callable[[], Any]], repeats: int, n_images: int = 1, sync: Callable[[], None] = _no_sync,
              energy: Callable[[], float | None] | None = None,
              warmup: int = 1) -> tuple[dict[K, list[float]], dict[K, list[float]]]:
    """Seconds per image of each ``fns[k]()`` (one call handles ``n_images``), ``repeats`` times in rotation; and
    joules per image where ``energy`` (a cumulative counter) reads. Each function runs ``warmup`` times first."""
    for _ in range(warmup):  # warm-up (and CUDA graph capture)
        for fn in fns.values():
            fn()
    seconds: dict[K, list[float]] = {k: [] for k in fns}
    joules: dict[K, list[float]] = {k: [] for k in fns}
    for rep in range(repeats):
        for k in rotated(list(fns), rep):
            sync()
            e0, t0 = energy() if energy else None, time.perf_counter()
            fns[k]()
            sync()
            t1, e1 = time.perf_counter(), energy() if energy else None
            seconds[k].append((t1 - t0) / n_images)
            if e0 is not None and e1 is not None:
                joules[k].append((e1 - e0) / n_images)
    return seconds, joules


def alternate_singles(fns: Mapping[K, Callable[[int], Any]], n: int,
                      sync: Callable[[], None] = _no_sync) -> tuple[dict[K, list[float]], dict[K, list[int]]]:
    """Latency (seconds) of ``fns[k](j)`` for images j < n, one by one, the methods alternating per image; and the
    exit each image took (``.exit[0]`` of the result)."""
    seconds: dict[K, list[float]] = {k: [] for k in fns}
    exits: dict[K, list[int]] = {k: [] for k in fns}
    for k in fns if n else []:
        fns[k](0)
    for j in range(n):
        for k in rotated(list(fns), j):
            sync()
            t0 = time.perf_counter()
            res = fns[k](j)
            sync()
            seconds[k].append(time.perf_counter() - t0)
            exits[k].append(int(res.exit[0]))
    return seconds, exits


def median_ratio_ci(base: list[float], other: list[float], level: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of median(base) / median(other) over paired samples (entry j of both timed
    the same image): how far a batch-1 speedup could move with another draw of images and timings alike."""
    a, b = np.asarray(base), np.asarray(other)
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"paired samples of one length needed, got {len(a)} and {len(b)}")
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    ratios = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _exported_child(folder: str, names: dict[str, str], images_path: str, batch_size: int, repeats: int,
                    latency_images: int, threads: int) -> dict:
    """In a fresh process: time each exported method (``names``: method -> policy in the export)."""
    x = np.load(images_path)
    runners = {m: OnnxRunner(folder, name, threads=threads, shared_pool=True) for m, name in names.items()}
    batches = [x[s: s + batch_size] for s in range(0, len(x), batch_size)]

    def whole(r: OnnxRunner) -> Callable[[], Any]:
        return lambda: [r(b) for b in batches]

    def single(r: OnnxRunner) -> Callable[[int], Any]:
        return lambda j: r(x[j: j + 1])

    seconds, _ = alternate({m: whole(r) for m, r in runners.items()}, repeats, len(x))
    latency, exits = alternate_singles({m: single(r) for m, r in runners.items()}, min(latency_images, len(x)))
    return {"seconds": seconds, "latency": latency, "latency_exits": exits, "torch_imported": "torch" in sys.modules}


def time_exported(folder: str, names: dict[str, str], images: np.ndarray, batch_size: int, repeats: int,
                  latency_images: int, threads: int) -> dict:
    """Throughput and batch-1 latency of each exported method, measured in a child process that imports
    numpy and onnxruntime only (spawned, so nothing of this process's state goes with it)."""
    import multiprocessing as mp
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "images.npy")
        np.save(path, np.ascontiguousarray(images, dtype=np.float32))
        with mp.get_context("spawn").Pool(1) as pool:
            return pool.apply(_exported_child, (folder, names, path, batch_size, repeats, latency_images, threads))
