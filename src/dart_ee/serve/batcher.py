"""The server's scheduler: requests are batched, run stage by stage, and each is answered as soon as its
samples have left the network, not when its batch ends.

Usual server batching (collect N requests, run, answer N) makes every answer wait for the batch's hardest
sample and throws away what early exit buys. Here one inference thread keeps a queue per stage. New
requests wait at most ``max_wait_ms`` for a batch of at most ``max_batch`` samples at stage 0; after each
stage the samples that leave are answered at once, and the rest join the next stage's queue, where they
merge with the samples of other batches that reached it. The thread runs the *earliest* stage that has
work (least attained service first), so an easy request that arrives while hard ones are deep in the
network runs its first stages right away instead of waiting behind them. Two rules keep the hard samples
moving: a deeper stage whose queue holds a full batch goes first (hard samples run in full batches), and
a sample that has been in the server longer than ``max_hold_ms`` goes first, oldest first, whatever its
stage (under heavy load the order becomes first come, first served). The number of samples in
the server is bounded (``max_queue``): beyond it a request is refused (the app answers 503 with
Retry-After) instead of growing a queue without bound. ``close()`` stops taking requests and answers every
request already accepted before it returns.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dart_ee.core.errors import DartError, InputError
from dart_ee.serve.engine import Engine


class QueueFull(DartError):
    """The batcher holds ``max_queue`` samples already: try again shortly."""


class Closed(DartError):
    """The batcher is shutting down and takes no new requests."""


@dataclass
class Answer:
    """One sample's answer."""

    cls: int  # predicted class
    confidence: float  # max softmax at the exit taken
    exit: int  # exit index, 0-based (the last is the full network)
    macs: float  # MACs spent on this sample


@dataclass
class _Request:
    x: np.ndarray  # (k, C, H, W) uint8
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # when its samples began stage 0
    answers: list[Answer | None] = field(default_factory=list)
    left: int = 0  # samples not yet answered
    failed: bool = False  # answered with an error (its other samples still flow through, unanswered)

    def done(self) -> dict[str, Any]:
        now = time.perf_counter()
        return {"answers": self.answers, "queue_s": self.started - self.arrived, "compute_s": now - self.started,
                "total_s": now - self.arrived}


@dataclass
class _Group:
    """Samples that wait for one stage together: their owners (request, row in it) and their rows."""

    owners: list[tuple[_Request, int]]
    rows: Any


class Observer:
    """What the batcher reports as it works (the app's Prometheus metrics implement it); by default nothing."""

    def batch(self, samples: int) -> None: ...
    def queued(self, samples: int) -> None: ...
    def left(self, exit_index: int, samples: int, seconds: float) -> None: ...


class Batcher:
    """Stage-queued dynamic batching with early answers over one engine, on one inference thread (see the module
    docstring)."""

    def __init__(self, engine: Engine, max_batch: int = 32, max_wait_ms: float = 0.0, max_queue: int = 1024,
                 max_hold_ms: float = 10.0, observer: Observer | None = None) -> None:
        self.engine, self.max_batch, self.max_wait = engine, max_batch, max_wait_ms / 1000
        self.max_hold = max_hold_ms / 1000
        self.max_queue, self.observer = max_queue, observer or Observer()
        self._intake: deque[_Request] = deque()  # requests waiting for stage 0
        self._stages: list[deque[_Group]] = [deque() for _ in range(engine.num_steps)]  # [0] unused: intake
        self._waiting = 0  # samples at stage 0
        self._inside = 0  # samples accepted and not yet answered
        self._cond = threading.Condition()
        self._closing = False
        # online risk control: (request, row) of each marked sample -> None until it leaves, then its early class
        self._audit: dict[tuple[int, int], int | None] = {}
        self._thread = threading.Thread(target=self._work, name="dart-ee-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Samples accepted and not yet answered."""
        return self._inside

    async def submit(self, x: np.ndarray) -> dict[str, Any]:
        """Queue a uint8 (k, C, H, W) batch (k <= max_batch); returns its answers and its queue and compute times."""
        if not 1 <= len(x) <= self.max_batch:
            raise InputError(f"a request holds 1 to {self.max_batch} images (the server's max_batch), got {len(x)}")
        loop = asyncio.get_running_loop()
        req = _Request(x, loop, loop.create_future(), answers=[None] * len(x), left=len(x))
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down")
            if self._inside + len(x) > self.max_queue:
                raise QueueFull(f"the server holds {self._inside} samples (at most {self.max_queue})")
            self._intake.append(req)
            self._waiting += len(x)
            self._inside += len(x)
            self.observer.queued(self._inside)
            self._cond.notify()
        return await req.future

    def close(self, timeout: float | None = None) -> None:
        """Take no new requests, answer every accepted one, then stop the inference thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _next(self) -> tuple[int, list[Any]] | None:
        """The stage to run next and what it runs (requests at stage 0, groups deeper); None: closed and drained."""
        with self._cond:
            while True:
                now = time.perf_counter()
                heads = self._heads()  # stage -> arrival of the oldest sample waiting there
                overdue = {i: t for i, t in heads.items() if now - t > self.max_hold}
                deeper = [i for i in heads if i > 0]
                full = [i for i in deeper if sum(len(g.owners) for g in self._stages[i]) >= self.max_batch]
                if overdue:  # held too long: oldest first, whatever the stage
                    i = min(overdue, key=overdue.__getitem__)
                elif full:  # a full batch at a deeper stage: run it (hard samples in full batches)
                    i = full[0]
                elif self._intake and (now - self._intake[0].arrived >= self.max_wait or self._closing
                                       or self._waiting >= self.max_batch):
                    i = 0  # least attained service: new samples first
                elif deeper:  # stage 0 is empty or still filling: run deeper work meanwhile
                    i = deeper[0]
                elif self._intake:
                    self._cond.wait(self._intake[0].arrived + self.max_wait - now)
                    continue
                elif self._closing:
                    return None
                else:
                    self._cond.wait()
                    continue
                return i, self._take_requests() if i == 0 else self._take_groups(i)

    def _heads(self) -> dict[int, float]:
        heads = {i: min(r.arrived for r, _ in q[0].owners) for i, q in enumerate(self._stages) if i and q}
        if self._intake:
            heads[0] = self._intake[0].arrived
        return dict(sorted(heads.items()))

    def _take_requests(self) -> list[_Request]:
        batch, n = [], 0
        while self._intake and n + len(self._intake[0].x) <= self.max_batch:
            req = self._intake.popleft()
            batch.append(req)
            n += len(req.x)
        self._waiting -= n
        return batch

    def _take_groups(self, i: int) -> list[_Group]:
        q, batch, n = self._stages[i], [], 0
        while q and n + len(q[0].owners) <= self.max_batch:
            g = q.popleft()
            batch.append(g)
            n += len(g.owners)
        return batch

    def _work(self) -> None:
        while (job := self._next()) is not None:
            i, items = job
            owners = ([(r, j) for r in items for j in range(len(r.x))] if i == 0
                      else [o for g in items for o in g.owners])
            try:
                rows = self._begin(items) if i == 0 else self.engine.cat([g.rows for g in items])
                self._step(i, _Group(owners, rows))
            except Exception as e:  # one bad batch fails its own requests, and the thread serves the next
                self._fail(owners, e)

    def _begin(self, batch: list[_Request]) -> Any:
        started = time.perf_counter()
        for r in batch:
            r.started = started
        n = sum(len(r.x) for r in batch)
        self.observer.batch(n)
        if self.engine.audits is not None:  # online risk control: marks drawn from n alone, before any pixel is read
            marks = self.engine.audits.admit(n).tolist()
            owners = [(r, j) for r in batch for j in range(len(r.x))]
            self._audit.update({(id(r), j): None for (r, j), m in zip(owners, marks) if m})
        return self.engine.cat([self.engine.begin(r.x) for r in batch])

    def _step(self, i: int, group: _Group) -> None:
        nxt, pred, conf, leave = self.engine.step(i, group.rows)
        if i == 0 and self.engine.audits is not None:  # the shift guard reads every sample's first-exit confidence
            self.engine.audits.observe(conf)
        exit_i = self.engine.exit_at(i)
        macs = float(self.engine.leave_macs[exit_i])
        go, keep = self._route(i, group, pred, leave)
        now = time.perf_counter()
        for k in go:
            r, j = group.owners[k]
            r.answers[j] = Answer(int(pred[k]), float(conf[k]), exit_i, macs)
            r.left -= 1
            if r.left == 0 and not r.failed:
                _resolve(r, r.done())
        if go:
            self.observer.left(exit_i, len(go), now - min(group.owners[k][0].started for k in go))
        with self._cond:
            self._inside -= len(go)
            self.observer.queued(self._inside)
            if keep:
                idx = np.asarray(keep)
                self._stages[i + 1].append(_Group([group.owners[k] for k in keep], self.engine.take(nxt, idx)))

    def _route(self, i: int, group: _Group, pred: np.ndarray, leave: np.ndarray) -> tuple[list[int], list[int]]:
        """Who is answered at stage i, and who runs on: the samples that stay, and the audited ones that left early
        (answered now, run to the last stage, where the full network's class is compared with theirs)."""
        if not self._audit:
            return np.flatnonzero(leave).tolist(), np.flatnonzero(~leave).tolist()
        last = i == self.engine.num_steps - 1
        go, keep = [], []
        for k, (r, j) in enumerate(group.owners):
            key = (id(r), j)
            early = self._audit.get(key)
            if early is not None:  # answered already: this run is its audit
                if last and self.engine.audits is not None:
                    self.engine.audits.result(self._audit.pop(key) != int(pred[k]))
                elif not last:
                    keep.append(k)
            elif not leave[k]:
                keep.append(k)
            else:
                go.append(k)
                if key in self._audit:  # marked: audit it unless it left at the last exit anyway
                    if last:
                        del self._audit[key]
                    else:
                        self._audit[key] = int(pred[k])
                        keep.append(k)
        return go, keep

    def _fail(self, owners: list[tuple[_Request, int]], e: BaseException) -> None:
        """The samples ``owners`` are dropped; the requests of those not answered yet are answered with ``e``."""
        owners = [(r, j) for r, j in owners if self._audit.pop((id(r), j), None) is None]  # not an audit in flight
        with self._cond:
            self._inside -= len(owners)
            self.observer.queued(self._inside)
        for r, _ in owners:
            if not r.failed:
                r.failed = True
                _resolve(r, e)


def _resolve(r: _Request, result: dict[str, Any] | BaseException) -> None:
    """Complete a request's future on its event loop's thread (futures are not thread-safe)."""
    def complete() -> None:
        if r.future.done():  # the client went away and the request was cancelled
            return
        if isinstance(result, BaseException):
            r.future.set_exception(result)
        else:
            r.future.set_result(result)

    try:
        r.loop.call_soon_threadsafe(complete)
    except RuntimeError:  # the loop is closed: nobody waits for the answer any more
        pass

