"""Stage-queued early exit, for throughput: every stage call sees a full batch.

The eager runner (``runtime.EarlyExitRunner``) takes one batch through the stages and compacts it,
so stage i runs on whatever that batch has left: on a GPU the later stages run on small batches at
almost the cost of full ones, and every exit costs a host wait. Here each stage has a queue. A stage
runs when its queue holds B samples (or, once the input ends, on what is left, padded to B on a GPU);
the samples that leave are written to the output at their input position and the rest join the
next stage's queue. Every call therefore has the same shape, so on a GPU each stage, with its head,
the softmax, the difficulty estimator (stage 1) and the policy's decision, is captured once as a CUDA
graph and replayed. The one value read back per call is the number of samples leaving.

Decisions are per sample, so they are the same as the eager runner's and the trace's, whatever
batch a sample happens to share (exactly on the CPU; on a GPU within float rounding).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dart_ee.core.errors import ConfigError, InputError
from dart_ee.data.datasets import to_float
from dart_ee.difficulty.estimators import LearnedDifficulty, check_pixels
from dart_ee.models.net import MultiExitNet
from dart_ee.policies import ExitPolicy, StaticPolicy
from dart_ee.runtime.eager import ExitResult, alpha_source, keep_layout

Batch = dict[str, torch.Tensor]  # "h" (the stage's input), "alpha", "st_<name>" (policy state); one row a sample


class _Queue:
    """Samples waiting for one stage: parts of earlier stage outputs, each with the rows of it that wait.

    The rows are selected only when a stage takes them, so a stage's batch is gathered from its parts in
    one copy per tensor (selecting the stayers at the split and concatenating the parts at the take
    would copy every activation twice, which on a CPU costs more than full batches win back).
    """

    def __init__(self) -> None:
        self.parts: list[tuple[torch.Tensor, Batch, torch.Tensor | int]] = []
        self.size = 0

    def append(self, idx: torch.Tensor, batch: Batch, rows: torch.Tensor | int = 0) -> None:
        """Queue the samples at global positions ``idx``: rows ``rows`` of ``batch`` (an index tensor, or the
        first row of a run of ``len(idx)`` consecutive ones). The batch must not change while queued."""
        if len(idx):
            self.parts.append((idx, batch, rows))
            self.size += len(idx)

    def take(self, n: int, into: Batch | None = None) -> tuple[torch.Tensor, Batch]:
        """The first ``n`` samples (in arrival order); the rest stay queued. Leading consecutive rows of one
        part come back as views, without a copy; with ``into`` (a captured graph's input buffers), every row
        is gathered straight into the first ``n`` rows of those buffers, in one copy per tensor."""
        pieces, left = [], n
        while left:
            idx, batch, rows = self.parts[0]
            cut = min(left, len(idx))
            pieces.append((idx[:cut], batch, rows if isinstance(rows, int) else rows[:cut]))
            if cut == len(idx):
                self.parts.pop(0)
            else:
                self.parts[0] = (idx[cut:], batch, rows + cut if isinstance(rows, int) else rows[cut:])
            left -= cut
        self.size -= n
        if into is None and len(pieces) == 1 and isinstance(pieces[0][2], int):
            idx, batch, start = pieces[0]
            return idx, {k: v[start: start + n] for k, v in batch.items()}
        out = {k: _empty_rows(v, n) if into is None else into[k][:n] for k, v in pieces[0][1].items()}
        at = 0
        for idx, batch, rows in pieces:
            m = len(idx)
            for k, v in batch.items():
                if isinstance(rows, int):
                    out[k][at: at + m].copy_(v[rows: rows + m])
                else:
                    torch.index_select(v, 0, rows, out=out[k][at: at + m])
            at += m
        return torch.cat([p[0] for p in pieces]), out


def _empty_rows(like: torch.Tensor, n: int) -> torch.Tensor:
    """An uninitialised tensor of ``n`` rows shaped and laid out like ``like``'s (channels_last kept)."""
    cl = like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last)
    return torch.empty((n, *like.shape[1:]), dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last if cl else torch.contiguous_format)


class _Graph:
    """One stage step captured as a CUDA graph for batch size B, with static input buffers."""

    def __init__(self, step: Callable[[Batch, torch.Tensor], Batch], example: Batch, batch_size: int) -> None:
        self.inputs = {k: keep_layout(v.new_zeros((batch_size, *v.shape[1:])), v) for k, v in example.items()}
        self.valid = torch.ones(batch_size, dtype=torch.bool, device=example["h"].device)
        self.outputs = self._capture(step)

    def _capture(self, step: Callable[[Batch, torch.Tensor], Batch]) -> Batch:
        """Capture ``step`` on the static inputs; return its static outputs (rewritten by every replay)."""
        dev = self.valid.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up off the capture: kernels chosen, lazy tensors built
            for _ in range(2):
                step(self.inputs, self.valid)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            return step(self.inputs, self.valid)

    def __call__(self, batch: Batch, m: int) -> Batch:
        for k, v in batch.items():
            if v.data_ptr() != self.inputs[k].data_ptr():  # not already gathered into the buffer (Queue.take)
                self.inputs[k][:m].copy_(v)
        self.valid[:m] = True
        self.valid[m:] = False  # padded rows: computed, never leave, never queued
        self.graph.replay()
        return self.outputs


class QueuedRunner:
    """Run a multi-exit model under a fitted policy with one queue per stage (see the module docstring).

    ``graphs``: "auto" captures CUDA graphs on a GPU and runs eagerly elsewhere; True or False forces it.
    ``profile=True`` synchronises after each stage call and times it (``stage_stats``), for reports only.

    >>> out = QueuedRunner(model, policy, estimator, batch_size=256).run(images)   # one dataset
    >>> r = runner.push(piece); ...; r = runner.finish()                           # a stream, in order
    """

    def __init__(self, model: MultiExitNet, policy: ExitPolicy, estimator: LearnedDifficulty | None = None,
                 batch_size: int = 256, graphs: bool | str = "auto", profile: bool = False) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.policy = model.eval(), policy
        self.estimator = estimator.eval() if estimator is not None else None
        self.alpha_source = alpha_source(model, policy, estimator)
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        if graphs == "auto":
            graphs = self.device.type == "cuda"
        if graphs and self.device.type != "cuda":
            raise ConfigError("CUDA graphs need the model on a GPU; pass graphs=False (or 'auto') on the CPU")
        self.graphs, self.profile = bool(graphs), profile
        self.static = isinstance(policy, StaticPolicy)  # the plain network: one stage, no heads
        self.num_stages = 1 if self.static else model.num_exits
        self._captured: dict[int, _Graph] = {}
        self.reset_stats()
        self._reset()

    def reset_stats(self) -> None:
        """Zero ``stage_stats`` (calls, samples and, with ``profile``, seconds per stage)."""
        self.stage_stats = [{"calls": 0, "samples": 0, "seconds": 0.0} for _ in range(self.num_stages)]

    # -- the per-stage step: tensors in, tensors out, no host reads (so it can be captured) -------------
    def _step(self, i: int, batch: Batch, valid: torch.Tensor) -> Batch:
        model, x = self.model, batch["h"]
        if self.static:
            h, logits = None, model.forward_static(x)
        else:
            h = model.stages[i](x)
            logits = model.heads[i](h)
        alpha, est = batch.get("alpha"), self.estimator  # est is set whenever alpha_source is
        if i == 0 and est is not None and self.alpha_source:
            alpha = est.score(self.alpha_source, x, h, logits, check=False)
        probs = F.softmax(logits.float(), 1)
        conf, pred = probs.max(1)
        state = {k[3:]: v for k, v in batch.items() if k.startswith("st_")}
        if i == self.num_stages - 1:
            leave = torch.ones_like(valid)
        else:
            leave = self.policy.decide(i, probs, alpha, state)
        leave = leave & valid
        # leavers first, then the valid stayers, then padding: one stable sort, no boolean indexing
        order = torch.argsort(leave.to(torch.uint8) * 2 + valid.to(torch.uint8), descending=True, stable=True)
        out = {"conf": conf, "pred": pred, "order": order, "n_leave": leave.sum(),
               **{f"st_{k}": v for k, v in state.items()}}
        if h is not None:
            out["h"] = h
        if alpha is not None:
            out["alpha"] = alpha
        return out

    # -- queue handling ---------------------------------------------------------------------------------
    def _reset(self) -> None:
        """An empty stream: no queued samples, empty output buffers (grown by ``_reserve``)."""
        self.queues = [_Queue() for _ in range(self.num_stages)]
        self.total = self.emitted = 0
        dev = self.device
        self._pred = torch.empty(0, dtype=torch.long, device=dev)
        self._conf = torch.empty(0, device=dev)
        self._exit = torch.empty(0, dtype=torch.long, device=dev)
        self._alpha = torch.empty(0, device=dev)
        self._done = torch.empty(0, dtype=torch.bool, device=dev)

    def _reserve(self, n: int) -> None:
        cap = len(self._pred)
        if n <= cap:
            return
        new = max(n, 2 * cap)
        for name in ("_pred", "_conf", "_exit", "_alpha", "_done"):
            old = getattr(self, name)
            buf = torch.zeros(new, dtype=old.dtype, device=old.device)
            buf[:cap] = old
            setattr(self, name, buf)

    def _run_stage(self, i: int, n: int) -> None:
        graph = self._captured.get(i)  # once captured, the stage's batch is gathered into the graph's inputs
        idx, batch = self.queues[i].take(n, into=graph.inputs if graph else None)
        t0 = time.perf_counter() if self.profile else 0.0
        if self.graphs:
            if graph is None:
                graph = self._captured[i] = _Graph(functools.partial(self._step, i), batch, self.batch_size)
            out = graph(batch, n)
        else:
            out = self._step(i, batch, torch.ones(n, dtype=torch.bool, device=self.device))
        n_leave = int(out["n_leave"])  # the one read back to the host per stage call
        exit_id = self.model.num_exits - 1 if self.static else i
        if i == 0 and "alpha" in out:
            self._alpha[idx] = out["alpha"][:n]
        if n_leave:
            go = out["order"][:n_leave]
            gone = idx[go]
            self._pred[gone], self._conf[gone], self._exit[gone] = out["pred"][go], out["conf"][go], exit_id
            self._done[gone] = True
        if n_leave < n:
            nxt = {k: v for k, v in out.items() if k in ("h", "alpha") or k.startswith("st_")}
            if self.graphs:  # a captured graph's outputs are overwritten by its next replay: copy the stayers now
                stay = out["order"][n_leave:n]
                self.queues[i + 1].append(idx[stay], {k: keep_layout(v[stay], v) for k, v in nxt.items()})
            elif n_leave == 0:  # nobody left: the stage's output is already in order
                self.queues[i + 1].append(idx, nxt)
            else:  # the stayers are selected when the next stage takes them
                stay = out["order"][n_leave:n]
                self.queues[i + 1].append(idx[stay], nxt, stay)
        stats = self.stage_stats[i]
        stats["calls"] += 1
        stats["samples"] += n
        if self.profile:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            stats["seconds"] += time.perf_counter() - t0

    def _drain(self, final: bool) -> None:
        """Run every stage that holds a full batch; with ``final``, also the remainders, in stage order."""
        b = self.batch_size
        for i in range(self.num_stages):
            while self.queues[i].size >= b:
                self._run_stage(i, b)
            if final and self.queues[i].size:
                self._run_stage(i, self.queues[i].size)

    def _push(self, x: torch.Tensor) -> None:
        x = to_float(torch.as_tensor(x).to(self.device))  # uint8 crosses to the GPU, a quarter of the bytes
        self.model.check_input(x)
        if self.alpha_source:
            check_pixels(x)
        n = len(x)
        self._reserve(self.total + n)
        self.queues[0].append(torch.arange(self.total, self.total + n, device=self.device),
                              self._initial(x))
        self.total += n
        self._drain(final=False)

    def _initial(self, x: torch.Tensor) -> Batch:
        state = {} if self.static else self.policy.init_state(len(x), self.device)
        return {"h": x, **{f"st_{k}": v for k, v in state.items()}}

    def _emit(self, upto: int) -> ExitResult:
        s = slice(self.emitted, upto)
        self.emitted = upto
        alpha = self._alpha[s].clone() if self.alpha_source else None
        return ExitResult(self._pred[s].clone(), self._conf[s].clone(), self._exit[s].clone(), alpha)

    # -- public API -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def push(self, x: torch.Tensor) -> ExitResult:
        """Queue a piece of a stream (uint8 or float pixels); return the results now complete, in input order."""
        if len(x):  # an empty piece is allowed in a stream: nothing to queue
            self._push(x)
        pending = (~self._done[self.emitted: self.total]).nonzero()
        return self._emit(self.emitted + (int(pending[0]) if len(pending) else self.total - self.emitted))

    @torch.inference_mode()
    def finish(self) -> ExitResult:
        """Run what is still queued and return the remaining results; the runner is then ready for a new stream."""
        self._drain(final=True)
        out = self._emit(self.total)
        self._reset()
        return out

    @torch.inference_mode()
    def run(self, images: torch.Tensor) -> ExitResult:
        """Run a whole dataset (uint8 or float pixels, any device); results in input order."""
        if self.total:
            raise ConfigError("run() needs an idle runner: call finish() on the stream in progress first")
        if len(images) == 0:
            raise InputError("no images to run: pass at least one")
        for s in range(0, len(images), self.batch_size):  # a batch at a time: the host copy stays bounded
            self._push(images[s: s + self.batch_size])
        return self.finish()
