"""Calibrating policies on the calibration split: trade-off, accuracy budget, guarantee, and curves.

Every tunable policy is calibrated the same ways, on the calibration trace only:

- **trade-off**: choose the knob that maximises J = accuracy - beta_opt * MACs / static MACs (Eq 10);
- **accuracy budget**: the most MAC savings whose calibration drop against the final exit is at
  most ``max_drop`` points;
- **guarantee** (``confidence``): as the budget, but a point qualifies only if an upper confidence
  bound on the drop stays within ``max_drop``. The drop is a mean of paired per-sample differences
  d_j = final_right_j - policy_right_j. The bound controls the drop that a fresh test set of
  ``n_test`` samples will show: d_hat + z * s_d * sqrt(1/n_cal + 1/n_test), with z the normal
  quantile of ``confidence`` (a normal approximation to the paired difference, by the CLT;
  it accounts for the calibration estimate's error and the test sample's own noise).

``sweep`` traces each policy's accuracy-vs-MACs curve on the test trace, fitting every point on the
calibration trace, with the oracle as a reference.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np

from dart_ee.errors import ConfigError
from dart_ee.evaluation import evaluate, oracle, simulate
from dart_ee.policies import POLICIES, ExitPolicy, check_calibration_trace, make_policy
from dart_ee.trace import Trace

BETA_DIFF_GRID = (0.0, 0.05, 0.1, 0.2, 0.3)


def candidates(name: str, params: dict[str, Any], tune_beta_diff: bool = False) -> list[dict[str, Any]]:
    """Parameter sets to try: the policy's knob grid (and, for DART, beta_diff if tuned)."""
    cls = POLICIES[name]
    if cls.knob is None:
        return [dict(params)]
    grid = [{**params, cls.knob: v} for v in cls.knob_grid]
    if name == "dart" and tune_beta_diff:
        grid = [{**g, "beta_diff": bd} for bd in BETA_DIFF_GRID for g in grid]
    return grid


def drop_upper_bound(cal: Trace, policy: ExitPolicy, confidence: float, n_test: int | None = None) -> float:
    """Upper ``confidence`` bound (in points) on the drop a test set of ``n_test`` samples will show."""
    _, preds = simulate(policy, cal)
    d = cal.correct[:, -1].astype(float) - (preds == cal.labels).astype(float)
    n_test = n_test or cal.n
    z = NormalDist().inv_cdf(confidence)
    return 100 * (d.mean() + z * d.std(ddof=1) * math.sqrt(1 / cal.n + 1 / n_test))


def calibrate(name: str, cal: Trace, *, beta_opt: float | None = None, max_drop: float | None = None,
              confidence: float | None = None, n_test: int | None = None, tune_beta_diff: bool = False,
              **params: Any) -> tuple[ExitPolicy, dict]:
    """Fit policy ``name`` on the calibration trace for a trade-off or a budget; returns (policy, record)."""
    check_calibration_trace(cal)
    if (beta_opt is None) == (max_drop is None):
        raise ConfigError("calibrate with exactly one target: --beta-opt B (trade-off) or --max-drop X (budget)")
    if confidence is not None and not 0.5 <= confidence < 1:
        raise ConfigError(f"--confidence must lie in [0.5, 1), got {confidence}")
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
            score = rec["accuracy"] - beta_opt * rec["mac_fraction"]
            feasible = True
        else:
            drop = drop_upper_bound(cal, pol, confidence, n_test) if confidence else rec["drop_points"]
            rec["drop_bound_points"] = drop
            feasible = drop <= max_drop + 1e-9
            score = -rec["macs_per_image"] if feasible else -math.inf
        scored.append((score, feasible, rec["accuracy"], p, pol, rec))
    feasible_any = any(f for _, f, *_ in scored)
    if feasible_any:
        best = max(scored, key=lambda t: (t[0], t[2]))
    else:  # nothing meets the budget: fall back to the most accurate point, and say so
        best = max(scored, key=lambda t: t[2])
    _, _, _, p, pol, rec = best
    target = ({"mode": "trade-off", "beta_opt": beta_opt} if beta_opt is not None else
              {"mode": "guarantee" if confidence else "budget", "max_drop": max_drop, "confidence": confidence,
               "n_test": n_test or cal.n if confidence else None})
    record = {"target": target, "params": p, "calibration": rec, "budget_met": feasible_any,
              "candidates_tried": len(grid), "trace": {k: cal.meta.get(k) for k in ("run", "config_fingerprint",
                                                                                  "dataset", "split")}}
    return pol, record


def _best_within(points: list[tuple[float, float]], budget: float) -> float:
    ok = [a for m, a in points if m <= budget + 1e-12]
    return max(ok) if ok else float("nan")


def sweep(cal: Trace, test: Trace, policies: list[str] | None = None,
          params: dict[str, dict[str, Any]] | None = None) -> dict:
    """Accuracy-vs-MACs curves on the test trace (each point fitted on the calibration trace)."""
    check_calibration_trace(cal)
    policies = policies or ["threshold", "branchynet", "patience", "rl", "dart"]
    params = params or {}
    curves = {}
    for name in policies:
        pts = []
        for p in candidates(name, params.get(name, {})):
            rec = evaluate(make_policy(name, **p).fit(cal), test)
            pts.append({"params": p, "mac_fraction": rec["mac_fraction"], "accuracy": rec["accuracy"]})
        curves[name] = sorted(pts, key=lambda r: r["mac_fraction"])
    orc, static = oracle(test), evaluate(make_policy("static"), test)
    budgets = np.linspace(0.25, 1.0, 76)
    table = {}
    for name, pts in curves.items():
        xy = [(r["mac_fraction"], r["accuracy"]) for r in pts] + [(1.0, static["accuracy"])]
        within = [_best_within(xy, b) for b in budgets]
        table[name] = {"acc_at_25": _best_within(xy, 0.25), "acc_at_50": _best_within(xy, 0.5),
                       "acc_at_75": _best_within(xy, 0.75),
                       "auc_25_100": float(np.mean(np.nan_to_num(within, nan=0.0)))}
    return {"curves": curves, "grid": table, "oracle": orc, "static": static,
            "grid_definition": "best test accuracy among operating points using at most 25/50/75% of static MACs; "
                               "auc = mean of that best-within-budget accuracy over budgets 25..100%"}


def dart_ablation(cal: Trace, test: Trace, max_drop: float) -> list[dict]:
    """What each DART ingredient contributes, every variant calibrated at the same budget."""
    variants = [
        ("DART without alpha (one alpha bin, beta_diff = 0)", {"alpha_bins": 1, "beta_diff": 0.0}, False, "paper"),
        ("DART with alpha bins, beta_diff = 0", {"beta_diff": 0.0}, False, "paper"),
        ("DART with alpha bins, fixed beta_diff = 0.3", {"beta_diff": 0.3}, False, "paper"),
        ("DART with alpha bins, tuned beta_diff", {}, True, "paper"),
        ("DART with the learned estimator (alpha bins, tuned beta_diff)", {}, True, "learned"),
    ]
    rows = []
    for label, params, tune, source in variants:
        key = f"alpha_{source}"
        if key not in cal.extra:
            continue
        c, t = cal.with_alpha(key), test.with_alpha(key)
        pol, rec = calibrate("dart", c, max_drop=max_drop, tune_beta_diff=tune, **params)
        rows.append({"variant": label, "params": rec["params"], "calibration": rec["calibration"],
                     "test": evaluate(pol, t)})
    return rows


def compare(cal: Trace, test: Trace, max_drop: float, confidence: float | None = None,
            policies: tuple[str, ...] = ("static", "threshold", "branchynet", "patience", "rl", "dart")) -> dict:
    """Calibrate every policy at the same budget on ``cal`` and measure it on ``test``."""
    rows, fitted = [], {}
    for name in policies:
        pol, rec = calibrate(name, cal, max_drop=max_drop, confidence=confidence, n_test=test.n if confidence else None,
                             tune_beta_diff=name == "dart")
        fitted[name] = (pol, rec)
        rows.append({"policy": name, "params": rec["params"], "budget_met_on_cal": rec["budget_met"],
                     "calibration": rec["calibration"], "test": evaluate(pol, test)})
    return {"max_drop": max_drop, "confidence": confidence, "rows": rows, "oracle": oracle(test),
            "fitted": fitted}


def resplit_check(cal: Trace, test: Trace, policy: str, max_drop: float, confidence: float | None,
                  resplits: int = 20, seed: int = 0) -> dict:
    """Pool both held-out traces, re-split them at random ``resplits`` times, calibrate and test each."""
    pooled_meta = dict(cal.meta)
    probs = np.concatenate([cal.probs, test.probs])
    labels = np.concatenate([cal.labels, test.labels])
    alpha = None if cal.alpha is None else np.concatenate([cal.alpha, test.alpha])
    n_cal = cal.n
    rng = np.random.default_rng(seed)
    runs = []
    for r in range(resplits):
        perm = rng.permutation(len(labels))
        parts = {}
        for split, idx in (("cal", perm[:n_cal]), ("test", perm[n_cal:])):
            parts[split] = Trace(probs[idx], labels[idx], idx, cal.exit_macs,
                                 None if alpha is None else alpha[idx], {**pooled_meta, "split": split})
        pol, rec = calibrate(policy, parts["cal"], max_drop=max_drop, confidence=confidence,
                             n_test=parts["test"].n if confidence else None, tune_beta_diff=policy == "dart")
        ev = evaluate(pol, parts["test"])
        runs.append({"resplit": r, "params": rec["params"], "test_drop_points": ev["drop_points"],
                     "test_mac_reduction": ev["mac_reduction"], "exceeds": ev["drop_points"] > max_drop})
    drops = [x["test_drop_points"] for x in runs]
    return {"policy": policy, "max_drop": max_drop, "confidence": confidence, "resplits": resplits,
            "n_cal": n_cal, "n_test": len(labels) - n_cal, "exceed_count": sum(x["exceeds"] for x in runs),
            "mean_test_drop": float(np.mean(drops)), "max_test_drop": float(np.max(drops)),
            "mean_mac_reduction": float(np.mean([x["test_mac_reduction"] for x in runs])), "runs": runs}
