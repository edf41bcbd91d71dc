"""Hyperparameters of a certified policy chosen inside its fit split, by simulating the whole certify step.

``certify`` fits a learned policy's candidates on the fit part of the calibration split and tests them on the
cert part. The settings that shape those candidates (DART's alpha bins, the score model's L2 strength and
whether it reads alpha, and which valid test certifies them) must be chosen without the cert samples: a cert
sample that helped choose the sequence would help test it too, and the promise would no longer hold as stated.
So each setting is scored by K inner repetitions on the fit split alone:

    fit --(seeded split, the outer fit share)--> inner fit + inner cert
    certify on (inner fit, inner cert) with the setting, at the user's budget and confidence
    score = MACs per image of what that certified, on inner cert (the static network's where nothing passed)

and the setting with the fewest mean MACs wins (ties: the earlier, so the defaults win a tie). The outer
certification then runs once with it. The fit share itself is not chosen here: it decides which samples
certify, so choosing it on calibration data would let the cert samples shape their own test; 0.4 is fixed a
priori (``dart_ee.core.defaults.FIT_SHARE``). The inner cert part is smaller than the outer one (a share of the
fit split), so the inner test is stricter than the real one; a setting is judged at the smaller n.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dart_ee.calibration.certify import SCALED, certify, certify_split, fit_cert_for, fit_search, knob_sequence
from dart_ee.calibration.evaluation import evaluate
from dart_ee.calibration.record import CalibrationRecord
from dart_ee.core.defaults import CONFIDENCE, FIT_SHARE
from dart_ee.core.errors import ConfigError
from dart_ee.policies import POLICIES, ExitPolicy
from dart_ee.trace import Trace

# The settings each policy's inner choice walks, the defaults first (so they win ties). Fixed in advance.
GRIDS: dict[str, tuple[dict[str, Any], ...]] = {
    "dart": ({}, {"alpha_bins": 1}, {"alpha_bins": 5}),
    "score": ({}, {"l2": 0.1}, {"l2": 10.0}, {"alpha_feature": False}),
}
# Both tests are valid for the drop; which certifies more depends on how many samples only the early exit gets
# right, so it is chosen too. The other risks are 0/1 losses, for which the exact binomial is the sharpest.
DROP_BOUNDS = ("exact", "mcnemar")
FOLDS = 3


@dataclass(frozen=True)
class InnerChoice:
    """What the inner repetitions chose, and the evidence: each setting's mean inner MACs per image."""

    params: dict[str, Any]
    bound: str
    folds: int
    scores: list[dict[str, Any]] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        return {"params": self.params, "bound": self.bound, "folds": self.folds, "settings": self.scores}


def settings(name: str, risk: str, params: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """(params, bound) pairs the inner choice compares; a parameter the user gave is kept, not searched."""
    grid = [g for g in GRIDS.get(name, ({},)) if not set(g) & set(params)] or [{}]
    bounds = DROP_BOUNDS if risk == "drop" else ("exact",)
    return [({**params, **g}, b) for g in grid for b in bounds]


def choose(name: str, fit: Trace, max_drop: float, confidence: float = CONFIDENCE, *, risk: str = "drop",
           folds: int = FOLDS, seed: int = 0, fit_share: float = FIT_SHARE, tune_beta_diff: bool = True,
           searches: dict | None = None, **params: Any) -> InnerChoice:
    """The setting (params, bound) whose certified policy costs least on inner cert, over ``folds`` splits of
    ``fit`` (each cut as the outer split is, at ``fit_share``). Reads ``fit`` only. ``searches``: a dict the
    caller keeps to reuse the fitted candidates across budgets on the same ``fit``."""
    if folds < 1:
        raise ConfigError(f"inner_folds must be a positive number of repetitions, got {folds}")
    cands = settings(name, risk, params)
    macs = np.zeros((folds, len(cands)))
    for r in range(folds):
        ifit, icert, _ = fit_cert_for(name, fit, fit_share, seed=10_000 * (seed + 1) + r)
        static = float(icert.exit_macs[-1])
        reuse = {} if searches is None else searches  # one fitted search per fold and parameter set
        for k, (p, bound) in enumerate(cands):
            key = (r, tuple(sorted(p.items())))
            if key not in reuse:
                reuse[key] = ({"search": fit_search(name, ifit, p, tune_beta_diff)} if name in SCALED
                              else {"family": knob_sequence(name, ifit, p)})
            try:
                pol, _ = certify_split(name, ifit, icert, max_drop, confidence, risk=risk, bound=bound,
                                       tune_beta_diff=tune_beta_diff, **reuse[key], **p)
                macs[r, k] = evaluate(pol, icert)["macs_per_image"]
            except ConfigError:  # inner cert too small to ever pass: this repetition certifies nothing
                macs[r, k] = static
    mean = macs.mean(0)
    best = int(np.argmin(mean))  # the first of equals
    scores = [{"params": p, "bound": b, "inner_macs_per_image": float(m)} for (p, b), m in zip(cands, mean)]
    return InnerChoice(params=cands[best][0], bound=cands[best][1], folds=folds, scores=scores)


def certify_tuned(name: str, cal: Trace, max_drop: float, confidence: float = CONFIDENCE, *, risk: str = "drop",
                  seed: int = 0, folds: int = FOLDS, tune_beta_diff: bool = True, searches: dict | None = None,
                  **params: Any) -> tuple[ExitPolicy, CalibrationRecord]:
    """``certify`` with its settings chosen by ``choose`` on the fit split it will use; the record gains
    ``inner_choice``. A data-free policy (no fit split) certifies as it would untuned."""
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    if "bound" in params or params.get("in_expectation"):
        raise ConfigError("the inner choice picks the test itself: drop --bound / --in-expectation, or inner_folds=0")
    fit_share = params.pop("fit_share", FIT_SHARE)
    fit, _, data_free = fit_cert_for(name, cal, fit_share, seed)
    if data_free:
        return certify(name, cal, max_drop, confidence, risk=risk, seed=seed, tune_beta_diff=tune_beta_diff, **params)
    choice = choose(name, fit, max_drop, confidence, risk=risk, folds=folds, seed=seed, fit_share=fit_share,
                    tune_beta_diff=tune_beta_diff, searches=searches, **params)
    pol, rec = certify(name, cal, max_drop, confidence, risk=risk, seed=seed, fit_share=fit_share, bound=choice.bound,
                       tune_beta_diff=tune_beta_diff, **choice.params)
    rec["inner_choice"] = choice.record()
    return pol, rec

