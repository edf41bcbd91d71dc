"""Serving: the batcher answers each request as its samples leave and equals the runtime's decisions; the HTTP
app refuses bad requests with a 4xx and keeps serving, refuses a full queue with 503, drains on shutdown and
exports Prometheus text; an export is served without torch; the load generator loads loopback only."""

import asyncio
import contextlib
import io
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_runtime import CASES  # noqa: E402

from dart_ee.config import ServeConfig  # noqa: E402
from dart_ee.core.errors import ConfigError  # noqa: E402
from dart_ee.serve.app import create_app  # noqa: E402
from dart_ee.serve.batcher import Batcher, QueueFull  # noqa: E402
from dart_ee.serve.engine import OnnxEngine, TorchEngine  # noqa: E402
from dart_ee.serve.loadtest import Load, check_loopback, npy_payloads, open_loop, sustains  # noqa: E402


class FakeEngine:
    """Three stages of ``delay`` seconds each; a sample's first pixel is the exit it leaves at (and its class)."""

    kind, input_shape, num_steps, audits = "fake", (1, 4, 4), 3, None
    leave_macs = np.array([1.0, 2.0, 3.0])
    info = {"engine": "fake", "policy": "fake", "certified": False}

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.delay, self.gate, self.calls = delay, gate, []

    def exit_at(self, step):
        return step

    def begin(self, x):
        return {"d": x[:, 0, 0, 0].astype(np.int64)}

    def step(self, i, rows):
        if self.gate is not None:
            self.gate.wait(30)
        time.sleep(self.delay)
        self.calls.append((i, len(rows["d"])))
        d = rows["d"]
        return rows, d.copy(), np.ones(len(d), np.float32), (d <= i) | (i == self.num_steps - 1)

    def cat(self, parts):
        return {"d": np.concatenate([p["d"] for p in parts])}

    def take(self, rows, idx):
        return {"d": rows["d"][idx]}


def _images(depths):
    x = np.zeros((len(depths), 1, 4, 4), np.uint8)
    x[:, 0, 0, 0] = depths
    return x


def _npy(x):
    b = io.BytesIO()
    np.save(b, x)
    return b.getvalue()


@contextlib.contextmanager
def served(engine, **settings):
    """The app on a real uvicorn server on a free loopback port, in a thread; its URL and the server."""
    app = create_app(lambda: engine, ServeConfig(**settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not (server.started and server.servers):
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    while httpx.get(f"{url}/readyz").status_code != 200:
        time.sleep(0.01)
    try:
        yield url, server
    finally:
        server.should_exit = True
        thread.join(30)


async def _submit_all(batcher, parts, stagger=0.0):
    async def one(k, x):
        await asyncio.sleep(k * stagger)
        out = await batcher.submit(x)
        return out, time.perf_counter()

    return await asyncio.gather(*(one(k, x) for k, x in enumerate(parts)))


# ---- the batcher --------------------------------------------------------------------------------------------------

def test_an_easy_request_is_answered_before_a_hard_one_of_the_same_batch():
    engine = FakeEngine(delay=0.05)
    batcher = Batcher(engine, max_batch=8, max_wait_ms=50)
    (hard, t_hard), (easy, t_easy) = asyncio.run(_submit_all(batcher, [_images([2]), _images([0])]))
    batcher.close()
    assert engine.calls[0] == (0, 2), "both requests ran stage 0 in one batch"
    assert [a.exit for a in easy["answers"]] == [0] and [a.exit for a in hard["answers"]] == [2]
    assert t_easy < t_hard - 0.08, "the easy request did not wait for the hard one's two later stages"
    assert easy["compute_s"] < 0.09 < hard["compute_s"]


def test_a_new_request_runs_its_first_stage_before_older_samples_go_deeper():
    engine = FakeEngine(delay=0.05)
    batcher = Batcher(engine, max_batch=8, max_hold_ms=10_000)
    # the hard request starts first; the easy one arrives while the hard one is in stage 0
    (hard, t_hard), (easy, t_easy) = asyncio.run(_submit_all(batcher, [_images([2]), _images([0])], stagger=0.02))
    batcher.close()
    assert engine.calls == [(0, 1), (0, 1), (1, 1), (2, 1)], engine.calls  # least attained service first
    assert t_easy < t_hard


def test_a_sample_held_longer_than_max_hold_goes_first():
    engine = FakeEngine(delay=0.05)
    batcher = Batcher(engine, max_batch=8, max_hold_ms=30)
    (hard, t_hard), (easy, t_easy) = asyncio.run(_submit_all(batcher, [_images([2]), _images([0])], stagger=0.02))
    batcher.close()
    assert engine.calls == [(0, 1), (1, 1), (2, 1), (0, 1)], engine.calls  # the overdue hard sample, oldest, first
    assert t_hard < t_easy


class FakeAudits:
    """Marks every sample; records each audit's verdict and the first-exit confidences the shift guard is fed."""

    def __init__(self):
        self.results, self.observed = [], 0

    def admit(self, n):
        return np.ones(n, bool)

    def result(self, disagrees):
        self.results.append(disagrees)

    def observe(self, first_conf):
        self.observed += len(first_conf)


def test_an_audited_sample_is_answered_when_it_leaves_and_runs_on_to_the_full_network():
    engine = FakeEngine(delay=0.02)
    engine.audits = FakeAudits()
    batcher = Batcher(engine, max_batch=8, max_wait_ms=20)
    outs = asyncio.run(_submit_all(batcher, [_images([0]), _images([1]), _images([2])]))
    batcher.close()
    assert [out["answers"][0].exit for out, _ in outs] == [0, 1, 2]  # answered where they left
    (easy, t_easy), (mid, t_mid), (hard, t_hard) = outs
    assert t_easy < t_mid < t_hard
    assert engine.calls == [(0, 3), (1, 3), (2, 3)], "the audited early leavers ran on to the last stage"
    assert engine.audits.results == [False, False], "one verdict per early leaver (the fake's exits all agree)"
    assert engine.audits.observed == 3, "the guard saw each sample's first exit once (audit reruns not again)"
    assert batcher.depth == 0 and not batcher._audit


def test_risk_control_in_the_server_keeps_its_state(trained_run, exported, tmp_path):
    from dart_ee.policies import load_policy

    src = exported["dir"].parent / "policies" / "dart_paper.json"
    path = tmp_path / "dart.json"
    load_policy(src).save(path, calibration={"target": {"max_drop": 1.0}})
    state = tmp_path / "risk_state.json"
    engine = TorchEngine(trained_run["run"], str(path), threads=1, adapt=True, adapt_state=state)
    x = trained_run["images"].numpy()[:64]
    with served(engine, max_batch=8) as (url, _):
        for k in range(0, 64, 4):
            r = httpx.post(f"{url}/predict", content=_npy(x[k: k + 4]), headers={"content-type": "application/x-npy"})
            assert r.status_code == 200 and len(r.json()["predictions"]) == 4
        info = httpx.get(f"{url}/info").json()
    assert info["adapt"]["method"].startswith("online risk control") and info["adapt_state"]["samples"] >= 64
    saved = json.loads(state.read_text())
    assert saved["seen"] >= 64 and saved["theta"] >= 0
    again = TorchEngine(trained_run["run"], str(path), threads=1, adapt=True, adapt_state=state)
    assert again.audits.ctrl.seen == saved["seen"], "theta and its counts come back after a restart"
    with pytest.raises(ConfigError, match="export holds fixed"):
        from dart_ee.serve.engine import make_engine

        make_engine("dart_paper", export=exported["dir"], adapt=True)


def test_samples_of_different_requests_merge_at_a_stage_and_each_request_gets_its_own_answers():
    engine = FakeEngine()
    batcher = Batcher(engine, max_batch=16, max_wait_ms=20)
    depths = [[0, 1, 2], [2, 2], [1], [0, 2, 1, 0]]
    outs = asyncio.run(_submit_all(batcher, [_images(d) for d in depths]))
    batcher.close()
    for d, (out, _) in zip(depths, outs):
        assert [a.exit for a in out["answers"]] == d and [a.cls for a in out["answers"]] == d
        assert [a.macs for a in out["answers"]] == [float(engine.leave_macs[e]) for e in d]
    assert engine.calls == [(0, 10), (1, 7), (2, 4)]
    assert batcher.depth == 0


def test_a_full_server_refuses_and_close_answers_every_accepted_request():
    gate = threading.Event()
    batcher = Batcher(FakeEngine(gate=gate), max_batch=4, max_queue=3)

    async def scenario():
        accepted = [asyncio.create_task(batcher.submit(_images([2, 1]))), asyncio.create_task(batcher.submit(_images([0])))]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await batcher.submit(_images([0]))
        closing = asyncio.get_running_loop().run_in_executor(None, batcher.close)
        await asyncio.sleep(0.05)
        gate.set()  # the engine was busy all along: close waits for it, then answers what was accepted
        await closing
        return await asyncio.gather(*accepted)

    first, second = asyncio.run(scenario())
    assert [a.exit for a in first["answers"]] == [2, 1] and [a.exit for a in second["answers"]] == [0]


@pytest.mark.parametrize("name,alpha", CASES)
def test_served_answers_equal_the_runtime_for_every_policy(trained_run, exported, name, alpha):
    from dart_ee.deploy.onnx_runner import OnnxRunner

    key = f"{name}_{alpha}"
    x = trained_run["images"].numpy()[:96]
    want = OnnxRunner(exported["dir"], policy=key).run(x)
    batcher = Batcher(OnnxEngine(exported["dir"], key), max_batch=16, max_wait_ms=5)
    sizes = [1, 3, 7, 2, 16, 5, 1, 11, 4, 9, 6, 13, 8, 10]  # 96 images in requests of different sizes
    parts = np.split(x, np.cumsum(sizes)[:-1])
    outs = asyncio.run(_submit_all(batcher, parts, stagger=0.001))
    batcher.close()
    got = [a for out, _ in outs for a in out["answers"]]
    assert [a.exit for a in got] == want.exit.tolist()
    assert [a.cls for a in got] == want.pred.tolist()
    np.testing.assert_allclose([a.confidence for a in got], want.conf, rtol=1e-6)


@pytest.mark.parametrize("name", ["threshold", "dart", "patience"])
def test_the_torch_engine_answers_as_the_eager_runner_does(trained_run, exported, name):
    from dart_ee.difficulty.estimators import load_estimators
    from dart_ee.runtime.eager import EarlyExitRunner
    from dart_ee.training.train import load_model

    policy = exported["policies"][f"{name}_paper"]
    path = exported["dir"].parent / "policies" / f"{name}_paper.json"
    run = trained_run["run"]
    want = EarlyExitRunner(load_model(run / "model.pt", optimize=True), policy, load_estimators(run / "difficulty.pt"))(
        trained_run["images"][:40].float() / 255)
    batcher = Batcher(TorchEngine(run, str(path), threads=1), max_batch=8, max_wait_ms=5)
    outs = asyncio.run(_submit_all(batcher, np.split(trained_run["images"].numpy()[:40], 10), stagger=0.001))
    batcher.close()
    got = [a for out, _ in outs for a in out["answers"]]
    assert [a.exit for a in got] == want.exit.tolist() and [a.cls for a in got] == want.pred.tolist()


# ---- the HTTP app -------------------------------------------------------------------------------------------------

def test_bad_requests_get_a_4xx_and_the_server_answers_the_next():
    with served(FakeEngine(), max_batch=4, max_body_bytes=2048) as (url, _):
        good = {"content": _npy(_images([1])), "headers": {"content-type": "application/x-npy"}}
        bad = [({"content": b"not npy", "headers": {"content-type": "application/x-npy"}}, 400),
               ({"content": b"{", "headers": {"content-type": "application/json"}}, 400),
               ({"json": {"no": 1}}, 400),
               ({"json": {"pixels": [[1, 2], [3]]}}, 422),
               ({"json": {"pixels": np.full((1, 4, 4), 300).tolist()}}, 422),
               ({"json": {"pixels": np.zeros((1, 4, 4)).tolist()}}, 422),  # floats
               ({"content": _npy(np.zeros((1, 5, 4), np.uint8)), "headers": {"content-type": "application/x-npy"}}, 422),
               ({"content": _npy(np.zeros((1, 4, 4), np.float32)), "headers": {"content-type": "application/x-npy"}}, 422),
               ({"content": _npy(_images([0] * 5)), "headers": {"content-type": "application/x-npy"}}, 413),
               ({"content": b"x" * 4096, "headers": {"content-type": "application/x-npy"}}, 413),
               ({"content": b"\x89PNG broken", "headers": {"content-type": "image/png"}}, 400),
               ({"content": b"abc", "headers": {"content-type": "text/plain"}}, 415),
               ({"content": b"", "headers": {"content-type": "application/x-npy"}}, 400)]
        for kwargs, status in bad:
            r = httpx.post(f"{url}/predict", **kwargs)
            assert r.status_code == status and r.json()["error"], (kwargs, r.status_code, r.text)
            ok = httpx.post(f"{url}/predict", **good)
            assert ok.status_code == 200 and ok.json()["predictions"][0]["exit"] == 1
        r = httpx.post(f"{url}/predict", json={"pixels": _images([2, 0]).tolist()})
        assert [p["exit"] for p in r.json()["predictions"]] == [2, 0]
        assert set(r.json()) == {"predictions", "queue_ms", "compute_ms", "latency_ms"}


def test_a_full_queue_answers_503_with_retry_after():
    gate = threading.Event()
    with served(FakeEngine(gate=gate), max_batch=2, max_queue=2, warmup=False) as (url, _):
        async def scenario():
            async with httpx.AsyncClient(timeout=30) as c:
                body = {"content": _npy(_images([0])), "headers": {"content-type": "application/x-npy"}}
                first = [asyncio.create_task(c.post(f"{url}/predict", **body)) for _ in range(2)]
                await asyncio.sleep(0.3)
                refused = await c.post(f"{url}/predict", **body)
                gate.set()
                return refused, await asyncio.gather(*first)

        refused, first = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
    assert [r.status_code for r in first] == [200, 200]


def test_graceful_shutdown_answers_every_accepted_request():
    with served(FakeEngine(delay=0.02), max_batch=4) as (url, server):
        async def scenario():
            async with httpx.AsyncClient(timeout=30) as c:
                tasks = [asyncio.create_task(c.post(f"{url}/predict", json={"pixels": _images([k % 3]).tolist()}))
                         for k in range(24)]
                await asyncio.sleep(0.1)
                server.should_exit = True  # what SIGTERM does: stop accepting, answer what is in flight
                return await asyncio.gather(*tasks, return_exceptions=True)

        answers = asyncio.run(scenario())
    ok = [r for r in answers if not isinstance(r, Exception) and r.status_code == 200]
    assert len(ok) == 24, [getattr(r, "status_code", r) for r in answers]


def test_metrics_parse_as_prometheus_text_and_info_says_what_is_served(exported):
    with served(OnnxEngine(exported["dir"], "dart_paper")) as (url, _):
        x = np.zeros((3, *httpx.get(f"{url}/info").json()["input_shape"]), np.uint8)
        assert httpx.post(f"{url}/predict", content=_npy(x), headers={"content-type": "application/x-npy"}).status_code == 200
        httpx.post(f"{url}/predict", content=b"junk", headers={"content-type": "application/x-npy"})
        text = httpx.get(f"{url}/metrics").text
        info = httpx.get(f"{url}/info").json()
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"dart_requests", "dart_request_latency_seconds", "dart_batch_samples", "dart_exits",
            "dart_queue_samples"} <= set(families)
    statuses = {s.labels["status"]: s.value for s in families["dart_requests"].samples if s.name.endswith("_total")}
    assert statuses == {"200": 1.0, "400": 1.0}
    assert sum(s.value for s in families["dart_exits"].samples if s.name.endswith("_total")) >= 3
    assert info["policy"] == "dart_paper" and info["engine"] == "onnxruntime" and info["certified"] is False
    assert len(info["leave_macs"]) == info["num_exits"]


def test_the_onnxruntime_server_never_imports_torch(trained_run, exported):
    x = trained_run["images"].numpy()[:5]
    code = f"""
import io, sys, json, numpy as np
from fastapi.testclient import TestClient
from dart_ee.cli import app as cli_app  # the `dart-ee serve` process imports the CLI too
from dart_ee.serve.app import create_app
from dart_ee.serve.engine import make_engine
app = create_app(lambda: make_engine("threshold_paper", export={str(exported['dir'])!r}))
x = np.array({x.tolist()}, dtype=np.uint8)
b = io.BytesIO(); np.save(b, x)
with TestClient(app) as c:
    while c.get("/readyz").status_code != 200:
        pass
    r = c.post("/predict", content=b.getvalue(), headers={{"content-type": "application/x-npy"}})
print(json.dumps({{"status": r.status_code, "n": len(r.json()["predictions"]), "torch": "torch" in sys.modules}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"status": 200, "n": 5, "torch": False}, out.stderr[-2000:]


def test_a_bad_export_or_policy_fails_before_serving(exported, tmp_path):
    from dart_ee.serve.engine import make_engine

    with pytest.raises(ConfigError, match="no policy 'nope'"):
        make_engine("nope", export=exported["dir"])
    with pytest.raises(ConfigError, match="exactly one of"):
        make_engine("static")


# ---- the load generator -------------------------------------------------------------------------------------------

def test_the_load_generator_loads_loopback_only():
    for url in ("http://127.0.0.1:8000", "http://localhost:8000/", "http://[::1]:8000"):
        assert check_loopback(url).startswith("http://")
    for url in ("http://10.1.2.3:8000", "http://8.8.8.8", "not a url"):
        with pytest.raises(ConfigError):
            check_loopback(url)


def test_an_open_loop_run_counts_every_request_and_its_exits():
    with served(FakeEngine(), max_batch=8) as (url, _):
        rec = asyncio.run(open_loop(url, Load(npy_payloads(_images([0, 1, 2]))), rate=200, count=60, max_seconds=10))
    assert rec["sent"] == rec["ok"] == 60 and rec["errors"] == 0
    assert sum(rec["exits"]) == 60 and len(rec["exits"]) == 3
    assert 0 < rec["p50_ms"] <= rec["p95_ms"] <= rec["p99_ms"]
    # every request was sent, so what was offered is the count over the last scheduled arrival
    assert rec["offered"] == pytest.approx(60 / np.cumsum(np.random.default_rng(0).exponential(1 / 200, 60))[-1])


def test_a_load_test_sends_a_seeded_sample_of_the_whole_test_split():
    from dart_ee.serve.bench import sample_images

    labels = np.repeat(np.arange(10), 1000)  # a test split stored by class, as CIFAR-10's folders are
    idx = sample_images(len(labels), 2000)
    assert len(idx) == len(set(idx.tolist())) == 2000 and np.all(np.diff(idx) > 0)
    assert np.array_equal(idx, sample_images(len(labels), 2000))  # the same images on every run and server
    counts = np.bincount(labels[idx], minlength=10)
    assert counts.min() > 100, counts  # every class, not the first two (binomial sd about 13 around 200)
    assert np.array_equal(sample_images(50, 2000), np.arange(50))  # asked for more than there are: all of them


def test_a_rate_is_judged_against_what_the_poisson_draw_really_offered():
    # a window-bound run whose draw sent 10% fewer requests than rate x seconds: a server that answered all of
    # them kept up; one that answered at 80% of the offered rate did not
    rec = {"rate": 10.0, "offered": 9.0, "throughput": 8.9, "errors": 0, "p99_ms": 20.0}
    assert sustains(rec, 50.0)
    assert not sustains({**rec, "throughput": 7.2}, 50.0)
    assert not sustains({**rec, "p99_ms": 60.0}, 50.0) and not sustains({**rec, "errors": 1}, 50.0)


def test_serve_refuses_a_bad_folder_or_policy_in_one_line(exported, tmp_path):
    from test_cli import invoke

    code, out = invoke("serve", "--export", tmp_path / "nothing", "--policy", "dart_paper")
    assert code == 2 and out.count("error:") == 1 and "manifest.json not found" in out, out
    code, out = invoke("serve", "--export", exported["dir"], "--policy", "nope")
    assert code == 2 and "no policy 'nope'" in out, out
    code, out = invoke("serve", "--policy", "static")
    assert code == 2 and "exactly one of --run RUN" in out, out
    code, out = invoke("loadtest", "--export", exported["dir"], "--policy", "dart_paper", "--run", tmp_path / "no_run")
    assert code == 2 and out.count("error:") == 1, out
