"""Trace-based evaluation: apply a policy to cached exit outputs exactly as the runtime would.

``simulate`` walks the exits with the same ``policy.decide`` calls, the same per-sample state and
the same compaction of the active set as ``dart_ee.runtime.eager.EarlyExitRunner``, so a policy's figures
here are the decisions it makes live.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from dart_ee.core.errors import ArtifactError
from dart_ee.difficulty.estimators import oracle_depth
from dart_ee.policies import ExitPolicy
from dart_ee.runtime.eager import ExitResult
from dart_ee.trace import Trace


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: trace evaluation is thousands of tiny ops, where intra-op threads cost more
    than they give (several-fold when another process holds the other core)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@one_thread()
def aligned(policy: ExitPolicy, trace: Trace) -> Trace:
    """The trace as the policy reads it: the same exits, and alpha (and its cost) from the score it was fitted on."""
    n_fit = getattr(policy, "num_exits_", trace.num_exits)
    if n_fit != trace.num_exits:
        raise ArtifactError(f"policy {policy.name!r} was fitted for {n_fit} exits but the trace "
                            f"({trace.meta.get('run', 'no run recorded')}) has {trace.num_exits}: use one run's policy and trace")
    source = getattr(policy, "alpha_source_", None) if policy.uses_alpha else None
    if source and trace.meta.get("difficulty", "paper") != source:  # the default fit() assumes too
        if f"alpha_{source}" not in trace.extra:
            raise ArtifactError(f"policy {policy.name!r} reads the {source} difficulty score, which this trace does not "
                                f"hold (it holds {sorted(trace.extra)}); use the trace of the run it was fitted on")
        trace = trace.with_alpha(f"alpha_{source}")
    return trace


def walk(policy: ExitPolicy, probs: torch.Tensor, alpha: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exit index (0-based) and prediction for each row of ``probs`` (N, exits, classes): the runtime's
    ``policy.decide`` calls, per-sample state and compaction of the active set, on cached outputs."""
    n, n_exits = probs.shape[:2]
    exits = torch.full((n,), n_exits - 1, dtype=torch.long)
    preds = probs[:, -1].argmax(1)
    active = torch.arange(n)
    state = policy.init_state(n)
    for i in range(n_exits - 1):
        if len(active) == 0:
            break
        p = probs[active, i]
        leave = policy.decide(i, p, None if alpha is None else alpha[active], state)
        exits[active[leave]] = i
        preds[active[leave]] = p[leave].argmax(1)
        active = active[~leave]
        state = {k: v[~leave] for k, v in state.items()}
    return exits, preds


def simulate(policy: ExitPolicy, trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Return (exit index, 0-based; prediction) for every sample of the trace."""
    trace = aligned(policy, trace)
    alpha = torch.from_numpy(trace.alpha) if (policy.uses_alpha and trace.alpha is not None) else None
    exits, preds = walk(policy, torch.from_numpy(trace.probs), alpha)
    return exits.numpy(), preds.numpy()


class TraceReplay:
    """A runner that replays a trace: ``replay(idx)`` decides for the trace's rows ``idx`` as
    ``EarlyExitRunner`` decides on those images (the trace holds the same model's outputs), without
    running the network. It offers what the adaptive controller reads from a runner, so a controller
    can be run over a traced stream many times (``dart_ee.adapt.tuning`` searches settings that way).
    """

    def __init__(self, policy: ExitPolicy, trace: Trace) -> None:
        self.policy, self.trace = policy, aligned(policy, trace)
        self.alpha_source = getattr(policy, "alpha_source_", None) if policy.uses_alpha else None
        self._probs = torch.from_numpy(self.trace.probs)
        self._alpha = torch.from_numpy(self.trace.alpha) if self.trace.alpha is not None else None
        self._costs = exit_costs(policy, trace)

    @property
    def num_exits(self) -> int:
        return self.trace.num_exits

    def static_macs(self) -> float:
        return float(self.trace.meta.get("static_macs", self.trace.exit_macs[-1]))

    def leave_macs(self) -> np.ndarray:
        return self._costs

    def final_probs(self, idx: torch.Tensor) -> torch.Tensor:
        return self._probs[idx, -1]

    @one_thread()
    def __call__(self, idx: torch.Tensor) -> ExitResult:
        probs = self._probs[idx]
        alpha = None if self._alpha is None else self._alpha[idx]
        exits, preds = walk(self.policy, probs, alpha if self.alpha_source else None)
        conf = probs[torch.arange(len(idx)), exits].max(1).values
        return ExitResult(preds, conf, exits, alpha if self.alpha_source else None, probs[:, 0].max(1).values)


def exit_costs(policy: ExitPolicy, trace: Trace) -> np.ndarray:
    """``ExitPolicy.leave_costs`` from a trace (whose exit costs include the estimator it was aligned to)."""
    trace = aligned(policy, trace)
    return policy.leave_costs(trace.exit_macs.astype(np.float64) - estimator_macs(trace),
                       float(trace.meta.get("static_macs", trace.exit_macs[-1])), trace.meta.get("estimator_macs", {}))


def estimator_macs(trace: Trace) -> float:
    """MACs of the difficulty estimator included in the trace's exit costs."""
    return float(trace.meta.get("estimator_macs", {}).get(trace.meta.get("difficulty", ""), 0))


def summarize(trace: Trace, exits: np.ndarray, preds: np.ndarray, costs: np.ndarray) -> dict:
    static = float(trace.meta.get("static_macs", trace.exit_macs[-1]))
    acc = float((preds == trace.labels).mean())
    final = float(trace.correct[:, -1].mean())
    macs = float(costs[exits].mean())
    return {"accuracy": acc, "final_exit_accuracy": final, "drop_points": 100 * (final - acc),
            "macs_per_image": macs, "static_macs": static, "mac_fraction": macs / static,
            "mac_reduction": 1 - macs / static,
            "exit_histogram": np.bincount(exits, minlength=trace.num_exits).tolist(), "n": trace.n}


def evaluate(policy: ExitPolicy, trace: Trace) -> dict:
    """Accuracy, drop against the final exit, expected MACs per image and reduction, exit histogram."""
    trace = aligned(policy, trace)
    exits, preds = simulate(policy, trace)
    return {"policy": policy.name, **summarize(trace, exits, preds, exit_costs(policy, trace))}


def oracle(trace: Trace) -> dict:
    """Upper bound: each sample leaves at the earliest exit that is right (the last one if none is)."""
    exits = np.minimum(oracle_depth(trace.correct), trace.num_exits) - 1
    preds = trace.preds[np.arange(trace.n), exits]
    costs = trace.exit_macs.astype(np.float64) - estimator_macs(trace)
    return {"policy": "oracle", **summarize(trace, exits, preds, costs)}
