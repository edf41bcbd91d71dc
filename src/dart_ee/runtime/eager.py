"""The early-exit runtime: real compute skipping, in batches too.

``EarlyExitRunner(model, policy, estimator)`` computes alpha once per image, then runs stage by
stage. After each stage it runs that exit's head on the samples still active, asks the policy which
of them leave, records their prediction, confidence, exit and alpha, and compacts the batch so
that only the rest run the next stage. A batch of one simply stops. There are no per-sample Python
loops and no ``.item()`` calls; results come back in input order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dart_ee.core.errors import ConfigError, check_batch
from dart_ee.data.datasets import to_float
from dart_ee.difficulty.estimators import LearnedDifficulty
from dart_ee.models.net import MultiExitNet
from dart_ee.policies import ExitPolicy, StaticPolicy


@dataclass
class ExitResult:
    """Per-sample outputs, in input order."""

    pred: torch.Tensor  # (N,) predicted class
    conf: torch.Tensor  # (N,) max softmax at the exit taken
    exit: torch.Tensor  # (N,) exit index, 0-based
    alpha: torch.Tensor | None  # (N,) difficulty, when the policy uses it


def alpha_source(model: MultiExitNet, policy: ExitPolicy, estimator: LearnedDifficulty | None) -> str | None:
    """Which difficulty score the policy reads ("paper", "learned" or None); checks that the three fit together."""
    source = getattr(policy, "alpha_source_", None) if policy.uses_alpha else None
    if source and estimator is None:
        raise ConfigError(f"policy {policy.name!r} uses the {source} difficulty score: pass the run's "
                          "fitted estimator (dart_ee.difficulty.estimators.load_estimators(RUN/difficulty.pt))")
    n_fit = getattr(policy, "num_exits_", model.num_exits)
    if n_fit != model.num_exits:
        raise ConfigError(f"policy was fitted for {n_fit} exits but the model has {model.num_exits}")
    return source


class EarlyExitRunner:
    """Run a multi-exit model under a fitted exit policy, skipping the stages that exited samples don't need.

    Pass the inference-optimised model (``load_model(path, optimize=True)``), the one traces are made with.
    """

    def __init__(self, model: MultiExitNet, policy: ExitPolicy, estimator: LearnedDifficulty | None = None) -> None:
        self.model = model.eval()
        self.policy = policy
        self.estimator = estimator.eval() if estimator is not None else None
        self.alpha_source = alpha_source(model, policy, estimator)

    # What the adaptive controller reads from a runner (``dart_ee.calibration.evaluation.TraceReplay`` offers the same).
    @property
    def num_exits(self) -> int:
        return self.model.num_exits

    def static_macs(self) -> float:
        return float(self.model.static_macs())

    def leave_macs(self) -> np.ndarray:
        """MACs to leave at each exit under this runner's policy (its estimator included)."""
        est = self.estimator.macs(self.model) if self.estimator is not None else {}
        return self.policy.leave_costs(self.model.exit_macs(), self.static_macs(), est)

    @torch.inference_mode()
    def final_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The plain network's class probabilities (an audit: what the full network says)."""
        return F.softmax(self.model.forward_static(x).float(), 1)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> ExitResult:
        model, policy = self.model, self.policy
        model.check_input(x)
        n, dev = x.shape[0], x.device
        if isinstance(policy, StaticPolicy):  # the plain network: no heads, no estimator
            p = self.final_probs(x)
            conf, pred = p.max(1)
            return ExitResult(pred, conf, torch.full((n,), model.num_exits - 1, dtype=torch.long, device=dev), None)

        est, source = self.estimator, self.alpha_source  # est is not None whenever source is (alpha_source() checks)
        alpha_all = None
        pred = torch.empty(n, dtype=torch.long, device=dev)
        conf = torch.empty(n, device=dev)
        exit_idx = torch.empty(n, dtype=torch.long, device=dev)
        active = torch.arange(n, device=dev)
        alpha = None
        state = policy.init_state(n, dev)
        h = x
        last = model.num_exits - 1
        for i in range(model.num_exits):
            h = model.stages[i](h)
            logits = model.heads[i](h)
            if i == 0 and est is not None and source:  # read first at exit 1's decision
                alpha_all = alpha = est.score(source, x, h, logits)
            probs = F.softmax(logits.float(), 1)
            c, p = probs.max(1)
            if i == last:
                pred[active], conf[active], exit_idx[active] = p, c, i
                break
            leave = policy.decide(i, probs, alpha, state)
            # One host sync per exit: the number leaving sizes the split. (Boolean-mask indexing would
            # sync once per tensor indexed, which dominates on a GPU.) When nobody leaves, nothing is copied.
            n_leave = int(leave.sum())
            if n_leave == 0:
                continue
            order = torch.argsort(leave.to(torch.uint8), descending=True, stable=True)  # leavers first
            go, keep = order[:n_leave], order[n_leave:]
            gone = active[go]
            pred[gone], conf[gone], exit_idx[gone] = p[go], c[go], i
            if n_leave == len(active):
                break
            active, h = active[keep], keep_layout(h[keep], h)
            if alpha is not None:
                alpha = alpha[keep]
            state = {k: v[keep] for k, v in state.items()}
        return ExitResult(pred, conf, exit_idx, alpha_all)

    def run(self, images: torch.Tensor, batch_size: int = 256) -> ExitResult:
        """Run over many images (uint8 or float in [0, 1]) in batches; results concatenated in order."""
        check_batch(images, batch_size)
        dev = next(self.model.parameters()).device
        parts = [self(to_float(images[s: s + batch_size]).to(dev)) for s in range(0, len(images), batch_size)]
        alphas = [r.alpha for r in parts if r.alpha is not None]
        return ExitResult(torch.cat([r.pred for r in parts]), torch.cat([r.conf for r in parts]),
                          torch.cat([r.exit for r in parts]), torch.cat(alphas) if alphas else None)


def keep_layout(sub: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Indexing may drop channels_last; restore it so later stages run the same kernels as in the trace."""
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
        return sub.contiguous(memory_format=torch.channels_last)
    return sub
