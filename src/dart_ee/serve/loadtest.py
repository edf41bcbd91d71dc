"""An open-loop load generator for a dart-ee server, on the loopback interface only.

Requests arrive as a Poisson process at a fixed rate, whatever the server does (open loop): a slow
server builds a queue and its latency grows, as a real one would. Each request's latency is counted from
its *scheduled* send time, so a generator that falls behind cannot hide the server's queue (coordinated
omission). A run is bounded in requests and in seconds. ``saturation`` measures a server's highest
throughput with a closed loop that keeps it busy; ``compare`` then loads each server at the same fractions
of the baseline's saturation, alternating servers at every rate, and finds the highest rate each sustains
under a p99 SLO.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import numpy as np

from dart_ee.core.errors import ConfigError

FRACTIONS = (0.25, 0.5, 0.75, 0.9)  # of the baseline's saturation rate
SLO_MS = 50.0
# rates tried for the SLO search, as multiples of the baseline's saturation rate
LADDER = (0.1, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6, 1.8, 2.0, 2.25, 2.5, 3.0)


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash, if its host is a loopback address; the generator loads nothing else."""
    host = urlparse(url).hostname
    if not host:
        raise ConfigError(f"{url!r} is not an http://host:port URL")
    try:
        addrs = {str(a[4][0]) for a in socket.getaddrinfo(host, None)}
    except socket.gaierror as e:
        raise ConfigError(f"{url}: cannot resolve {host!r} ({e})") from None
    if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        raise ConfigError(f"{url}: the load generator only loads servers on this machine's loopback interface "
                          f"(127.0.0.1, ::1, localhost); {host} is not")
    return url.rstrip("/")


def npy_payloads(images: np.ndarray) -> list[bytes]:
    """One ``application/x-npy`` body per uint8 image (C, H, W)."""
    out = []
    for x in images:
        b = io.BytesIO()
        np.save(b, np.ascontiguousarray(x))
        out.append(b.getvalue())
    return out


@dataclass
class Load:
    """What is sent: request bodies, one image each."""

    payloads: Sequence[bytes]


def _summary(lat: list[float], sent: int, errors: int, span: float, exits: list[int]) -> dict[str, Any]:
    ms = np.asarray(lat) * 1000 if lat else np.asarray([np.nan])
    hist = np.bincount(np.asarray(exits, dtype=np.int64)).tolist() if exits else []
    rec = {"sent": sent, "ok": len(lat), "errors": errors, "seconds": span,
           "throughput": len(lat) / span if span > 0 else 0.0,
           "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
           "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()), "exits": hist}
    return rec


async def _post(client: Any, url: str, body: bytes) -> dict | None:
    try:
        async with client.post(url, data=body, headers={"content-type": "application/x-npy"}) as r:
            return (await r.json())["predictions"][0] if r.status == 200 else None
    except Exception:  # a refused or dropped connection is an error of the run, not of the generator
        return None


def _client(connections: int) -> Any:
    # aiohttp, not httpx: on a 2-core machine the generator shares the cores with the server, and aiohttp spends
    # a fraction of httpx's CPU time per request
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=30))


async def open_loop(url: str, load: Load, rate: float, count: int, max_seconds: float, seed: int = 0,
                    connections: int = 256) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` per second, ``count`` requests or ``max_seconds``, whichever ends first."""
    rng = np.random.default_rng(seed)
    when = np.cumsum(rng.exponential(1 / rate, count))
    which = rng.integers(0, len(load.payloads), count)
    lat: list[float] = []
    exits: list[int] = []
    errors = 0

    async def one(client: Any, k: int, t_sched: float) -> None:
        nonlocal errors
        ans = await _post(client, f"{url}/predict", load.payloads[which[k]])
        if ans is None:
            errors += 1
            return
        lat.append(time.perf_counter() - t_sched)
        exits.append(ans["exit"])

    async with _client(connections) as client:
        t0, tasks = time.perf_counter(), []
        for k, t in enumerate(when):
            if t > max_seconds:
                break
            delay = t0 + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, k, t0 + t)))
        await asyncio.gather(*tasks)
        span = time.perf_counter() - t0
    # what was really offered: a finite Poisson draw sends more or fewer requests in the window than rate x seconds
    # (one seed draws the same unit gaps at every rate, so a short draw is short at all of them)
    window = float(when[len(tasks) - 1]) if len(tasks) == count else max_seconds
    return {"rate": rate, "offered": len(tasks) / window if window > 0 else 0.0,
            **_summary(lat, len(tasks), errors, span, exits)}


async def saturation(url: str, load: Load, concurrency: int, seconds: float) -> float:
    """Requests per second with ``concurrency`` requests always in flight (a closed loop that keeps the server
    busy): the highest throughput it reaches."""
    done = 0

    async def worker(client: Any, k: int, stop: float) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            if await _post(client, f"{url}/predict", load.payloads[k % len(load.payloads)]) is not None:
                done += 1
            k += concurrency

    async with _client(concurrency) as client:
        await asyncio.gather(*(worker(client, k, time.perf_counter() + seconds / 4) for k in range(concurrency)))
        done, t0 = 0, time.perf_counter()  # the first quarter warms connections and the server: not counted
        await asyncio.gather(*(worker(client, k, t0 + seconds) for k in range(concurrency)))
        return done / (time.perf_counter() - t0)


async def answers(url: str, load: Load, concurrency: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Every payload sent once: the served class and exit of each (-1 where a request failed)."""
    pred, exit_ = np.full(len(load.payloads), -1), np.full(len(load.payloads), -1)

    async def worker(client: Any, k: int) -> None:
        for j in range(k, len(load.payloads), concurrency):
            ans = await _post(client, f"{url}/predict", load.payloads[j])
            if ans is not None:
                pred[j], exit_[j] = ans["class"], ans["exit"]

    async with _client(concurrency) as client:
        await asyncio.gather(*(worker(client, k) for k in range(concurrency)))
    return pred, exit_


def sustains(rec: dict[str, Any], slo_ms: float) -> bool:
    """A rate is sustained when every request succeeded, p99 stays under the SLO and the server kept up: it answered
    at 90% or more of the rate it was really offered."""
    return rec["errors"] == 0 and rec["p99_ms"] <= slo_ms and rec["throughput"] >= 0.9 * rec["offered"]


async def compare(targets: dict[str, str], load: Load, baseline: str, count: int = 1000, max_seconds: float = 20.0,
                  concurrency: int = 64, fractions: Sequence[float] = FRACTIONS, slo_ms: float = SLO_MS,
                  seed: int = 0) -> dict[str, Any]:
    """Each server at the same rates, alternating; rates are fractions of the ``baseline`` server's saturation."""
    sat = {name: await saturation(url, load, concurrency, max_seconds / 4) for name, url in targets.items()}
    rows = [{"server": name, "fraction": f, **await open_loop(url, load, f * sat[baseline], count, max_seconds, seed)}
            for f in fractions for name, url in targets.items()]
    best, slo_rows = await _under_slo(targets, load, sat[baseline], count, max_seconds, slo_ms, seed)
    return {"saturation": sat, "baseline": baseline, "rows": rows, "slo_ms": slo_ms, "slo_rows": slo_rows,
            "max_rate_under_slo": best, "count": count, "max_seconds": max_seconds, "concurrency": concurrency}


async def _under_slo(targets: dict[str, str], load: Load, base_rate: float, count: int, max_seconds: float,
                     slo_ms: float, seed: int) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """Up the rate ladder, servers alternating; each stops at the first rate it cannot sustain."""
    best: dict[str, float | None] = dict.fromkeys(targets)
    stopped: set[str] = set()
    rows = []
    for m in LADDER:
        for name, url in targets.items():
            if name in stopped:
                continue
            rec = await open_loop(url, load, m * base_rate, count, max_seconds, seed)
            ok = sustains(rec, slo_ms)
            rows.append({"server": name, "multiple": m, "sustained": ok, **rec})
            if ok:
                best[name] = rec["rate"]
            else:
                stopped.add(name)
        if len(stopped) == len(targets):
            break
    return best, rows
