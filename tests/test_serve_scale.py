"""Serving on more than one process: 2 uvicorn workers (`dart-ee serve --workers 2`) and Ray Serve with 2
replicas each serve 1,000 requests, every answer equal to the onnxruntime runner's, from both processes."""

import asyncio
import io
import signal
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")


from dart_ee.serve.bench import free_port, wait_ready  # noqa: E402

pytestmark = pytest.mark.slow
REQUESTS = 1000
POLICY = "dart_paper"


def _expected(trained_run, exported):
    from dart_ee.deploy.onnx_runner import OnnxRunner

    x = trained_run["images"].numpy()
    return x, OnnxRunner(exported["dir"], policy=POLICY).run(x)


async def _load(url, x, concurrency=32):
    """REQUESTS requests of one image each, ``concurrency`` at a time: (class, exit, process) per request.

    Each request on a fresh connection: uvicorn's workers share one listening socket and spread *connections*,
    and one worker's accept loop can take all 32 keep-alive connections opened at once (it did, once in CI), so
    the load would not reach both processes."""
    import aiohttp

    bodies = []
    for img in x:
        b = io.BytesIO()
        np.save(b, img)
        bodies.append(b.getvalue())
    out = [None] * REQUESTS

    async def worker(session, k):
        for j in range(k, REQUESTS, concurrency):
            async with session.post(f"{url}/predict", data=bodies[j % len(x)],
                                    headers={"content-type": "application/x-npy"}) as r:
                assert r.status == 200, await r.text()
                p = (await r.json())["predictions"][0]
                out[j] = (p["class"], p["exit"], r.headers["x-dart-ee-process"])

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency, force_close=True)) as session:
        await asyncio.gather(*(worker(session, k) for k in range(concurrency)))
    return out


def _both_ready(url, processes=2, timeout=180):
    """Until a fresh connection has reached each process: a process accepts connections only once loaded."""
    import time

    import httpx

    seen, t0 = set(), time.monotonic()
    while len(seen) < processes and time.monotonic() - t0 < timeout:
        with httpx.Client() as c:  # a new connection each time
            r = c.get(f"{url}/info")
            if r.status_code == 200:
                seen.add(r.json()["process"])
        time.sleep(0.05)
    assert len(seen) == processes, f"only {len(seen)} of {processes} processes answered within {timeout} s"


def _check(out, x, want):
    idx = np.arange(REQUESTS) % len(x)
    assert [o[0] for o in out] == want.pred[idx].tolist()
    assert [o[1] for o in out] == want.exit[idx].tolist()
    assert len({o[2] for o in out}) == 2, "both processes answered"


def test_two_uvicorn_workers_serve_a_thousand_requests(trained_run, exported):
    x, want = _expected(trained_run, exported)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dart_ee", "serve", "--export", str(exported["dir"]), "--policy",
                             POLICY, "--workers", "2", "--port", str(port), "--threads", "1"],
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        _both_ready(url)
        out = asyncio.run(_load(url, x))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    _check(out, x, want)


def test_ray_serve_with_two_replicas_serves_a_thousand_requests(trained_run, exported):
    ray = pytest.importorskip("ray")
    from ray import serve

    from dart_ee.config import ServeConfig
    from dart_ee.serve.ray_serve import deployment

    x, want = _expected(trained_run, exported)
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment({"policy": POLICY, "export": str(exported["dir"])}, ServeConfig(threads=1), replicas=2,
                             cpus_per_replica=0.5), route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_ready(url)
        _both_ready(url)
        out = asyncio.run(_load(url, x))
    finally:
        serve.shutdown()
        ray.shutdown()
    _check(out, x, want)
