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
    first_conf: torch.Tensor | None = None  # (N,) max softmax at the first exit, which every sample ran


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

    # One batch, stage by stage: ``begin`` gives the rows that enter stage 0, ``step(i, rows)`` runs stage i and its
    # exit on them. Rows are per-sample tensors (the stage's input ``h``, ``alpha``, the policy's state as
    # ``st_<name>``), so a caller may split and join them between steps: ``__call__`` compacts one batch, a
    # server's scheduler (``dart_ee.serve.batcher``) merges the samples of several requests at the same stage.
    @property
    def num_steps(self) -> int:
        """Stages a sample can run (1 for the static network, run whole)."""
        return 1 if isinstance(self.policy, StaticPolicy) else self.model.num_exits

    def exit_at(self, step: int) -> int:
        """The exit index (0-based) of the samples that leave at ``step``: the last exit for the static network."""
        return self.model.num_exits - 1 if isinstance(self.policy, StaticPolicy) else step

    def begin(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The rows of a checked float batch, entering stage 0 (``x``: the input the difficulty score reads)."""
        self.model.check_input(x)
        state = self.policy.init_state(x.shape[0], x.device)
        return {"x": x, "h": x, **{f"st_{k}": v for k, v in state.items()}}

    @torch.inference_mode()
    def step(self, i: int, rows: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Stage i and its exit on ``rows``: (the rows entering stage i + 1, the exit's softmax, who leaves here);
        at the last step everyone leaves."""
        model, est, source = self.model, self.estimator, self.alpha_source
        if isinstance(self.policy, StaticPolicy):  # the plain network: no heads, no estimator
            probs = self.final_probs(rows["x"])
            return {}, probs, torch.ones(len(probs), dtype=torch.bool, device=probs.device)
        h = model.stages[i](rows["h"])
        logits = model.heads[i](h)
        alpha = rows.get("alpha")
        if i == 0 and est is not None and source:  # read first at exit 1's decision
            alpha = est.score(source, rows["x"], h, logits)
        probs = F.softmax(logits.float(), 1)
        if i == model.num_exits - 1:
            return {}, probs, torch.ones(len(probs), dtype=torch.bool, device=probs.device)
        state = {k[3:]: v for k, v in rows.items() if k.startswith("st_")}
        leave = self.policy.decide(i, probs, alpha, state)
        nxt = {"h": h, **{f"st_{k}": v for k, v in state.items()}}
        if alpha is not None:
            nxt["alpha"] = alpha
        return nxt, probs, leave

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> ExitResult:
        rows = self.begin(x)
        n, dev = x.shape[0], x.device
        pred = torch.empty(n, dtype=torch.long, device=dev)
        conf = torch.empty(n, device=dev)
        exit_idx = torch.empty(n, dtype=torch.long, device=dev)
        active, alpha_all, first = torch.arange(n, device=dev), None, None
        for i in range(self.num_steps):
            rows, probs, leave = self.step(i, rows)
            c, p = probs.max(1)
            if i == 0:
                alpha_all, first = rows.get("alpha"), c
            if i == self.num_steps - 1:
                pred[active], conf[active], exit_idx[active] = p, c, self.exit_at(i)
                break
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
            active, rows = active[keep], take_rows(rows, keep)
        return ExitResult(pred, conf, exit_idx, alpha_all, first)

    def run(self, images: torch.Tensor, batch_size: int = 256) -> ExitResult:
        """Run over many images (uint8 or float in [0, 1]) in batches; results concatenated in order."""
        check_batch(images, batch_size)
        dev = next(self.model.parameters()).device
        parts = [self(to_float(images[s: s + batch_size]).to(dev)) for s in range(0, len(images), batch_size)]
        alphas = [r.alpha for r in parts if r.alpha is not None]
        return ExitResult(torch.cat([r.pred for r in parts]), torch.cat([r.conf for r in parts]),
                          torch.cat([r.exit for r in parts]), torch.cat(alphas) if alphas else None,
                          torch.cat([r.first_conf for r in parts if r.first_conf is not None]))


def take_rows(rows: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows ``idx`` of every per-sample tensor, activations kept in their memory layout."""
    return {k: keep_layout(v[idx], v) for k, v in rows.items()}


def keep_layout(sub: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Indexing may drop channels_last; restore it so later stages run the same kernels as in the trace."""
    if like.dim() == 4 and like.is_contiguous(memory_format=torch.channels_last):
        return sub.contiguous(memory_format=torch.channels_last)
    return sub
