"""Trace-based evaluation: apply a policy to cached exit outputs exactly as the runtime would.

``simulate`` walks the exits with the same ``policy.decide`` calls, the same per-sample state and
the same compaction of the active set as ``dart_ee.runtime.EarlyExitRunner``, so a policy's figures
here are the decisions it makes live.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from dart_ee.difficulty import oracle_depth
from dart_ee.errors import ArtifactError
from dart_ee.policies import ExitPolicy, StaticPolicy
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


def simulate(policy: ExitPolicy, trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    """Return (exit index, 0-based; prediction) for every sample of the trace."""
    trace = aligned(policy, trace)
    n, n_exits = trace.n, trace.num_exits
    probs = torch.from_numpy(trace.probs)
    alpha = torch.from_numpy(trace.alpha) if (policy.uses_alpha and trace.alpha is not None) else None
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
    return exits.numpy(), preds.numpy()


def leave_costs(policy: ExitPolicy, exit_macs: Sequence[float] | np.ndarray, static_macs: float,
                estimator_macs: Mapping[str, float]) -> np.ndarray:
    """The one cost rule (traces, benchmark, adaptation): MACs to leave at each exit under ``policy``.

    ``exit_macs`` are the network's own (stages and the heads passed). The static policy runs the plain
    network, without exit heads; a policy that reads alpha also pays for its estimator.
    """
    if isinstance(policy, StaticPolicy):
        return np.full(len(exit_macs), float(static_macs))
    source = getattr(policy, "alpha_source_", None) if policy.uses_alpha else None
    return np.asarray(exit_macs, dtype=np.float64) + (float(estimator_macs.get(source, 0)) if source else 0.0)


def exit_costs(policy: ExitPolicy, trace: Trace) -> np.ndarray:
    """``leave_costs`` from a trace (whose exit costs include the estimator it was aligned to)."""
    trace = aligned(policy, trace)
    return leave_costs(policy, trace.exit_macs.astype(np.float64) - estimator_macs(trace),
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
