"""Throughput and peak memory of the two data paths: decoded in memory against streamed from files.

Each path trains the same config for the same number of steps in a child process (`dart-ee train`,
with a fresh decode cache, so the in-memory path pays its decode as a first run does). Memory is the
peak, sampled every 0.5 s, of the proportional set size (PSS) summed over the child and its
DataLoader workers: pages the workers share with their parent after the fork count once, not once
per process as RSS would count them. Throughput is training images per second over the training
loop alone (the run's own ``train_wall_time_s``); setup (listing or decoding) is reported apart.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from dart_ee.core import artifacts
from dart_ee.core.errors import ConfigError
from dart_ee.core.provenance import hardware_info

MODES = ("memory", "stream")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:  # the process ended between two reads
        pass
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_mb(pid: int) -> float:
    """PSS of ``pid`` and all its descendants, in MB (Linux /proc)."""
    todo, total = [pid], 0
    while todo:
        p = todo.pop()
        total += _pss_kb(p)
        todo += _children(p)
    return total / 1024


def _train_child(config: Path, mode: str, steps: int, workers: int | None, data_dir: Path | None,
                 sets: list[str]) -> dict:
    """Train ``config`` for ``steps`` steps in ``mode`` in a child process; its metrics and peak memory."""
    with tempfile.TemporaryDirectory(prefix="dart-data-speed-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "dart_ee", "train", "-c", str(config), "--out", str(out),
               "--set", f"data.stream={'true' if mode == 'stream' else 'false'}", "--set", "train.epochs=1",
               "--set", f"train.max_steps={steps}", *(a for s in sets for a in ("--set", s))]
        if workers is not None:
            cmd += ["--set", f"data.workers={workers}"]
        if data_dir is not None:
            cmd += ["--data-dir", str(data_dir)]
        env = {**os.environ, "DART_CACHE": str(Path(tmp) / "cache")}  # a first run: the decode is paid here
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        peak = [0.0]

        def sample() -> None:
            while child.poll() is None:
                peak[0] = max(peak[0], tree_pss_mb(child.pid))
                time.sleep(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        log = child.communicate()[0].decode(errors="replace")
        sampler.join()
        total = time.perf_counter() - t0
        if child.returncode != 0:
            raise ConfigError(f"the {mode} training run failed (exit {child.returncode}):\n{log[-3000:]}")
        m = artifacts.read_json(out / "metrics.json", "metrics")
    images = m["steps_per_epoch"] * m["epochs"] * m["batch_size"]
    return {"mode": mode, "steps": m["steps_per_epoch"] * m["epochs"], "batch_size": m["batch_size"],
            "n_train": m["n_train"], "threads": m["threads"],
            "workers": m["decode_workers"], "train_s": m["train_wall_time_s"],
            "images_per_s": images / m["train_wall_time_s"], "eval_s": m["eval_wall_time_s"],
            "setup_s": total - m["train_wall_time_s"] - m["eval_wall_time_s"], "total_s": total,
            "peak_pss_mb": peak[0]}


def data_speed(config: Path, steps: int = 100, modes: tuple[str, ...] = MODES, workers: int | None = None,
               data_dir: Path | None = None, cap_mb: float | None = None, sets: list[str] | None = None,
               repeats: int = 1) -> dict:
    """Train ``config`` for ``steps`` steps in each of ``modes``, ``repeats`` rounds in alternation; per mode
    the median images/s and setup time and the highest peak memory (every round's figures are kept)."""
    bad = sorted(set(modes) - set(MODES))
    if bad or not modes:
        raise ConfigError(f"unknown data mode(s) {bad or list(modes)}: choose memory and/or stream")
    if not Path("/proc/self/smaps_rollup").is_file():
        raise ConfigError("data-speed reads memory from /proc/<pid>/smaps_rollup, which this system lacks (Linux 4.14+)")
    rounds = [[_train_child(Path(config), m, steps, workers, data_dir, sets or []) for m in modes] for _ in range(repeats)]
    rows = []
    for i in range(len(modes)):
        runs = [r[i] for r in rounds]
        peak = max(r["peak_pss_mb"] for r in runs)
        rows.append({**runs[0], "images_per_s": float(np.median([r["images_per_s"] for r in runs])),
                     "setup_s": float(np.median([r["setup_s"] for r in runs])), "peak_pss_mb": peak,
                     "under_cap": None if cap_mb is None else peak <= cap_mb, "rounds": runs})
    by = {r["mode"]: r for r in rows}
    ratio = by["stream"]["images_per_s"] / by["memory"]["images_per_s"] if len(by) == 2 else None
    return {"config": str(config), "steps": steps, "repeats": repeats, "cap_mb": cap_mb, "rows": rows,
            "stream_vs_memory": ratio, "hardware": hardware_info(torch.device("cpu"))}


def _write_images(args: tuple[Path, list[tuple[str, int]], int, int, int]) -> None:
    out, items, size, classes, seed = args
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for name, label in items:
        # a learnable class signal (a stripe orientation and a hue) under heavy noise
        angle = np.pi * label / classes
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * (xx * np.cos(angle) + yy * np.sin(angle)))
        hue = np.array([np.cos(angle), np.sin(angle), 1 - label / classes]) * 0.5 + 0.5
        img = 0.6 * stripes[..., None] * hue + 0.4 * rng.random((size, size, 3))
        Image.fromarray((img * 255).astype(np.uint8)).save(out / name, quality=90)


def make_tree(out: Path, n_train: int, n_test: int, size: int = 64, classes: int = 10, seed: int = 0,
              processes: int | None = None) -> dict:
    """Write a synthetic ImageFolder tree of JPEGs (``out/train/<class>/*.jpg``, ``out/test/...``)."""
    import multiprocessing

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new --out")
    if min(n_train, n_test) < classes:  # a class folder without images is refused by every reader
        raise ConfigError(f"{min(n_train, n_test)} images cannot fill {classes} class folders: pass --train-images and "
                          f"--test-images of at least --classes ({classes})")
    items = []
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(classes):
            (out / split / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        items += [(f"{split}/class{i % classes:02d}/{i:07d}.jpg", i % classes) for i in range(n)]
    chunks = [(out, items[s: s + 2000], size, classes, seed + s) for s in range(0, len(items), 2000)]
    with multiprocessing.get_context("fork").Pool(processes or os.cpu_count()) as pool:
        pool.map(_write_images, chunks)
    return {"out": str(out), "n_train": n_train, "n_test": n_test, "size": size, "classes": classes,
            "bytes": sum(f.stat().st_size for f in out.rglob("*.jpg"))}
