"""Calibrating policies on the calibration split: trade-off, accuracy budget (certified or not), comparison.

Every tunable policy is calibrated the same ways, on the calibration trace only:

- **trade-off** (``beta_opt``): the knob that maximises J = accuracy - beta_opt * MACs / static MACs (Eq 10);
- **certified budget** (``max_drop`` with ``confidence``): Learn-then-Test on a fit / cert split
  (``dart_ee.calibration.certify``): with probability at least ``confidence``, the expected drop on unseen data
  from the same distribution is at most ``max_drop`` points. This is what the reports use;
- **uncertified budget** (``max_drop`` alone): the most MAC savings whose calibration drop is at most
  ``max_drop``. The search picks the most aggressive of hundreds of candidates on the same data it
  judges them by, so the drop on unseen data is typically larger: every output labels it uncertified.

``dart_ee.calibration.frontier`` compares policies over the whole accuracy-vs-MACs range.
"""

from __future__ import annotations

import math
from typing import Any

from dart_ee.calibration.certify import FIT_SHARE, certify, check_max_drop
from dart_ee.calibration.evaluation import evaluate, oracle
from dart_ee.calibration.inner import certify_tuned
from dart_ee.calibration.record import CalibrationRecord, Target, is_certified
from dart_ee.core.defaults import CONFIDENCE
from dart_ee.core.errors import ConfigError
from dart_ee.policies import POLICIES, ExitPolicy, check_calibration_trace, make_policy
from dart_ee.trace import Trace

BETA_DIFF_GRID = (0.0, 0.05, 0.1, 0.2, 0.3)
UNCERTIFIED = "uncertified: the calibration drop is an in-sample estimate, and the drop on unseen data is typically larger"


def candidates(name: str, params: dict[str, Any], tune_beta_diff: bool = False) -> list[dict[str, Any]]:
    """Parameter sets to try: the policy's knob grid (and, for DART, beta_diff if tuned)."""
    cls = POLICIES[name]
    if cls.knob is None:
        return [dict(params)]
    grid = [{**params, cls.knob: v} for v in cls.knob_grid]
    if name == "dart" and tune_beta_diff:
        grid = [{**g, "beta_diff": bd} for bd in BETA_DIFF_GRID for g in grid]
    return grid


def calibrate(name: str, cal: Trace, *, beta_opt: float | None = None, max_drop: float | None = None,
              confidence: float | None = None, risk: str = "drop", seed: int = 0, tune_beta_diff: bool = False,
              inner_folds: int = 0, **params: Any) -> tuple[ExitPolicy, CalibrationRecord]:
    """Fit policy ``name`` on the calibration trace for a trade-off or a budget; returns (policy, record).

    With ``confidence`` the budget is certified (``dart_ee.calibration.certify.certify``; ``risk``, ``seed`` for the
    fit / cert split, and ``fit_share``, ``bound``, ``in_expectation`` pass through). ``inner_folds`` > 0 first
    chooses the learned policy's settings and test inside its fit split (``dart_ee.calibration.inner``).
    """
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    check_calibration_trace(cal)
    if (beta_opt is None) == (max_drop is None):
        raise ConfigError("calibrate with exactly one target: --beta-opt B (trade-off) or --max-drop X (budget)")
    if max_drop is not None:
        check_max_drop(max_drop)
    if confidence is not None or params.get("in_expectation"):
        if max_drop is None:
            raise ConfigError("--confidence and --in-expectation certify an accuracy budget: give --max-drop too")
        if inner_folds:
            return certify_tuned(name, cal, max_drop, confidence if confidence is not None else CONFIDENCE, risk=risk,
                                 seed=seed, folds=inner_folds, tune_beta_diff=tune_beta_diff, **params)
        return certify(name, cal, max_drop, confidence, risk=risk, seed=seed, tune_beta_diff=tune_beta_diff, **params)
    cert_only = {k for k in ("fit_share", "bound", "in_expectation") if k in params} | ({"inner_folds"} if inner_folds else set())
    if cert_only:
        raise ConfigError(f"{', '.join(sorted(cert_only))} only apply to certified calibration: give --confidence too")
    if beta_opt is not None and name == "dart":
        params = {**params, "beta_opt": beta_opt}
        grid = ([{**params, "beta_diff": bd} for bd in BETA_DIFF_GRID] if tune_beta_diff else [params])
    else:
        grid = candidates(name, params, tune_beta_diff)
    scored = []
    for p in grid:
        pol = make_policy(name, **p).fit(cal)
        rec = evaluate(pol, cal)
        if beta_opt is not None:
            score, feasible = rec["accuracy"] - beta_opt * rec["mac_fraction"], True
        else:
            assert max_drop is not None  # exactly one target was given (checked above)
            feasible = rec["drop_points"] <= max_drop + 1e-9
            score = -rec["macs_per_image"] if feasible else -math.inf
        scored.append((score, feasible, rec["accuracy"], p, pol, rec))
    feasible_any = any(f for _, f, *_ in scored)
    if feasible_any:
        best = max(scored, key=lambda t: (t[0], t[2]))
    else:  # nothing meets the budget: fall back to the most accurate point, and say so
        best = max(scored, key=lambda t: t[2])
    _, _, _, p, pol, rec = best
    target: Target = ({"mode": "trade-off", "beta_opt": beta_opt} if beta_opt is not None else
              {"mode": "uncertified budget", "max_drop": max_drop, "note": UNCERTIFIED})
    record: CalibrationRecord = {"target": target, "params": p, "policy": name, "calibration": rec, "budget_met": feasible_any,
              "candidates_tried": len(grid),
              "trace": {k: cal.meta.get(k) for k in ("run", "config_fingerprint", "dataset", "split")}}
    return pol, record


def dart_ablation(cal: Trace, test: Trace, max_drop: float, confidence: float | None = CONFIDENCE, seed: int = 0,
                  fit_share: float = FIT_SHARE) -> list[dict]:
    """What each DART ingredient contributes, every variant calibrated the same way at the same budget."""
    variants: list[tuple[str, dict[str, Any], bool, str]] = [
        ("DART without alpha (one alpha bin, beta_diff = 0)", {"alpha_bins": 1, "beta_diff": 0.0}, False, "paper"),
        ("DART with alpha bins, beta_diff = 0", {"beta_diff": 0.0}, False, "paper"),
        ("DART with alpha bins, fixed beta_diff = 0.3", {"beta_diff": 0.3}, False, "paper"),
        ("DART with alpha bins, tuned beta_diff, plain DP (no path refinement)", {"refine": False}, True, "paper"),
        ("DART with alpha bins, tuned beta_diff (refined DP: the default)", {}, True, "paper"),
        ("DART with the learned estimator (alpha bins, tuned beta_diff)", {}, True, "learned"),
    ]
    rows = []
    for label, params, tune, source in variants:
        key = f"alpha_{source}"
        if key not in cal.extra:
            continue
        c, t = cal.with_alpha(key), test.with_alpha(key)
        cert: dict[str, Any] = {"seed": seed, "fit_share": fit_share} if confidence else {}
        pol, rec = calibrate_or_static("dart", c, max_drop, confidence, tune_beta_diff=tune, **cert, **params)
        rows.append({"variant": label, "params": rec["params"], "certified": is_certified(rec),
                     "calibration": rec["calibration"], "test": evaluate(pol, t)})
    return rows


def calibrate_or_static(name: str, cal: Trace, max_drop: float, confidence: float | None,
                        **kw: Any) -> tuple[ExitPolicy, CalibrationRecord]:
    """``calibrate`` for a report: where the calibration split is too small to certify, the static network
    stands in and the record says why (a single ``calibrate`` call raises instead)."""
    try:
        return calibrate(name, cal, max_drop=max_drop, confidence=confidence, **kw)
    except ConfigError as e:
        if not confidence:
            raise
        kw = {k: v for k, v in kw.items() if k in ("risk", "seed", "fit_share")}  # the static network tunes nothing
        pol, rec = calibrate("static", cal, max_drop=max_drop, confidence=confidence, **kw)
        g = rec["guarantee"]
        g["certified"], g["statement"] = False, f"not certifiable with this calibration split: {e}"
        rec["budget_met"] = False
        return pol, rec


def compare(cal: Trace, test: Trace, max_drop: float, confidence: float | None = CONFIDENCE, risk: str = "drop", seed: int = 0,
            policies: tuple[str, ...] = tuple(POLICIES),
            fit_share: float = FIT_SHARE, inner_folds: int = 0) -> dict:
    """Calibrate every policy at the same budget on ``cal`` (certified when ``confidence``) and measure it on ``test``.

    A policy that cannot be certified with this much calibration data keeps the static network, and
    its row says why.
    """
    rows, fitted = [], {}
    cert = {"risk": risk, "seed": seed, "fit_share": fit_share, "inner_folds": inner_folds} if confidence else {}
    for name in policies:
        pol, rec = calibrate_or_static(name, cal, max_drop, confidence, tune_beta_diff=name == "dart", **cert)
        fitted[name] = (pol, rec)
        rows.append({"policy": name, "params": rec["params"], "budget_met_on_cal": rec["budget_met"],
                     "certified": is_certified(rec), "guarantee": rec.get("guarantee"),
                     "calibration": rec["calibration"], "test": {**evaluate(pol, test), "policy": name}})
    return {"max_drop": max_drop, "confidence": confidence, "risk": risk if confidence else None,
            "mode": "certified" if confidence else "uncertified", "rows": rows, "oracle": oracle(test),
            "fitted": fitted}
