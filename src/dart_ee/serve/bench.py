"""``dart-ee loadtest``: servers started on loopback ports, loaded alternately by the open-loop generator, and one
record that says what each served, how fast and how right.

Every server is the same ``dart-ee serve`` process with the same batching settings; only the policy differs
(``static``, the plain network with no heads, is the baseline). The images are a seeded sample of the run's test
split (``sample_images``), and the served answers are checked against the trace evaluation of the same policy on
the same images.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from dart_ee.calibration.evaluation import simulate
from dart_ee.config import ServeConfig
from dart_ee.core.errors import DartError
from dart_ee.core.provenance import provenance
from dart_ee.deploy.onnx_runner import load_manifest
from dart_ee.policies import load_policy
from dart_ee.runs.run import Run
from dart_ee.serve.engine import STATIC
from dart_ee.serve.loadtest import Load, answers, compare, npy_payloads
from dart_ee.trace import Trace

READY_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def started(args: list[str], cfg: ServeConfig) -> Iterator[str]:
    """A ``dart-ee serve`` process on a free loopback port, ready; its URL. Stopped (SIGTERM) on exit."""
    port = free_port()
    cmd = [sys.executable, "-m", "dart_ee", "serve", *args, "--port", str(port), "--max-batch", str(cfg.max_batch),
           "--max-wait-ms", str(cfg.max_wait_ms), "--max-hold-ms", str(cfg.max_hold_ms), "--max-queue", str(cfg.max_queue),
           *(["--threads", str(cfg.threads)] if cfg.threads else [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = READY_TIMEOUT_S) -> None:
    """Poll ``/readyz`` until the server is ready; a server that exits or fails to load is an error."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise DartError(f"the server at {url} exited ({proc.returncode}): {err.strip()[-800:]}")
        try:
            r = httpx.get(f"{url}/readyz", timeout=5)
            if r.status_code == 200:
                return
            if r.json().get("status") == "failed":
                raise DartError(f"the server at {url} could not load its model: {r.json().get('error')}")
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise DartError(f"the server at {url} was not ready within {timeout:.0f} s")


SAMPLE_SEED = 0  # which test images every load test sends, so that records compare like with like


def sample_images(n_test: int, images: int, seed: int = SAMPLE_SEED) -> np.ndarray:
    """Which test images a load test sends: a seeded uniform sample, in order. Not the first ones: a test split
    stored by class (CIFAR-10's JPEG folders) starts with two classes, whose exits are not the split's."""
    return np.sort(np.random.default_rng(seed).choice(n_test, min(images, n_test), replace=False))


def trace_agreement(test: Trace, policy_file: Path | None, served: tuple[np.ndarray, np.ndarray],
                    idx: np.ndarray) -> dict[str, Any]:
    """The served answers on the test images ``idx`` beside the trace evaluation of the same policy on them."""
    pred, exit_ = served
    trace = test.subset(idx)
    t_exit, t_pred = ((np.full(trace.n, trace.num_exits - 1), trace.preds[:, -1]) if policy_file is None
                      else simulate(load_policy(policy_file), trace))
    return {"images": len(pred), "failed": int((pred < 0).sum()),
            "served_accuracy": float(np.mean(pred == trace.labels)), "trace_accuracy": float(np.mean(t_pred == trace.labels)),
            "classes_differing": int((pred != t_pred).sum()), "exits_differing": int((exit_ != t_exit).sum()),
            "served_exits": np.bincount(exit_[exit_ >= 0], minlength=trace.num_exits).tolist(),
            "trace_exits": np.bincount(t_exit, minlength=trace.num_exits).tolist()}


def loadtest(export: Path, policies: list[str], cfg: ServeConfig, images: int = 2000, count: int = 1000,
             max_seconds: float = 20.0, concurrency: int = 64, slo_ms: float = 50.0, run: Path | None = None,
             data_dir: Path | None = None) -> dict[str, Any]:
    """Serve the export under ``static`` and each policy, load them alternately, and record the comparison."""
    manifest = load_manifest(export, verify=False)
    run = run or Path(manifest["run"])
    test = Run(run).test_images(data_dir)
    idx = sample_images(len(test.x), images)
    load = Load(npy_payloads(test.x[idx]))
    names = [STATIC, *(p for p in policies if p != STATIC)]
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(started(["--export", str(export), "--policy", name], cfg)) for name in names}
        rec = asyncio.run(compare(urls, load, STATIC, count, max_seconds, concurrency, slo_ms=slo_ms))
        served = {name: asyncio.run(answers(url, load)) for name, url in urls.items()}
    trace = Run(run).trace("test")
    rec["answers"] = {name: trace_agreement(trace, _policy_file(export, manifest, name), served[name], idx)
                      for name in names}
    return {"what": "dart-ee serve under open-loop load, onnxruntime, one image per request",
            "export": str(export), "run": str(run), "images": len(load.payloads),
            "image_sample": f"seeded uniform sample of the test split (seed {SAMPLE_SEED})", "batching": cfg.model_dump(),
            "cpu_count": os.cpu_count(), **rec, "provenance": provenance()}


def _policy_file(export: Path, manifest: dict, name: str) -> Path | None:
    info = manifest["policies"][name]
    return None if info["static"] else export / info["file"]
