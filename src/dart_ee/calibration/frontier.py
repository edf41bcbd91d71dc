"""Comparing policies fairly over the accuracy-vs-MACs range (``shared/docs/CALIBRATION.md``, "Comparing policies fairly").

- An operating point is **chosen on calibration** and only **measured on test**: for a MAC budget b,
  the candidate with the highest calibration accuracy whose calibration MACs are at most b; its test
  accuracy, test MACs and MAC overshoot are reported. A budget no candidate meets is infeasible,
  never "0% accuracy".
- ``resplit_frontier`` repeats that over R random calibration / test re-splits of the pooled traces,
  paired across policies, and gives the AUC difference DART minus threshold a corrected resampled-t
  interval (Nadeau-Bengio: the re-splits overlap, so the plain 1/R term is too optimistic), plus the
  certified frontier: every policy certified the same way at D = 0.25 / 0.5 / 1 / 2 points.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats

from dart_ee.calibration.calibrate import candidates
from dart_ee.calibration.certify import FIT_SHARE, SCALED, certify_split, fit_cert_for, fit_search, knob_sequence
from dart_ee.calibration.coverage import pool_traces
from dart_ee.calibration.evaluation import evaluate, oracle
from dart_ee.calibration.inner import certify_tuned
from dart_ee.calibration.record import CalibrationRecord
from dart_ee.core.defaults import CONFIDENCE
from dart_ee.core.errors import ConfigError
from dart_ee.policies import POLICIES, ExitPolicy, check_calibration_trace, make_policy
from dart_ee.trace import Trace

COMPARED = tuple(n for n in POLICIES if n != "static")  # every registered policy against the static network
BUDGETS = tuple(np.round(np.linspace(0.25, 1.0, 76), 2).tolist())  # fractions of the static network's MACs
GRID = (0.25, 0.5, 0.75)
CERT_BUDGETS = (0.25, 0.5, 1.0, 2.0)  # points
GRID_DEFINITION = ("each operating point is chosen on the calibration split (highest calibration accuracy among "
                   "candidates whose calibration MACs are at most the budget) and measured on the test split; "
                   "a budget no candidate meets on calibration is infeasible. AUC: mean test accuracy over the "
                   "feasible budgets from 25 to 100% of the static network's MACs (in steps of 1%)")


def operating_points(name: str, cal: Trace, test: Trace, params: dict[str, Any] | None = None) -> list[dict]:
    """Every candidate of the policy's knob grid, fitted on ``cal``, measured on ``cal`` and ``test``."""
    pts = []
    for p in candidates(name, params or {}):
        pol = make_policy(name, **p).fit(cal)
        c, t = evaluate(pol, cal), evaluate(pol, test)
        pts.append({"params": p, "cal_accuracy": c["accuracy"], "cal_mac_fraction": c["mac_fraction"],
                    "accuracy": t["accuracy"], "mac_fraction": t["mac_fraction"], "drop_points": t["drop_points"]})
    return sorted(pts, key=lambda r: r["cal_mac_fraction"])


def choose(points: list[dict], budget: float) -> dict | None:
    """The point with the highest calibration accuracy within ``budget`` calibration MACs (None: infeasible)."""
    ok = [p for p in points if p["cal_mac_fraction"] <= budget + 1e-12]
    return max(ok, key=lambda p: (p["cal_accuracy"], -p["cal_mac_fraction"])) if ok else None


def _with_static(points: list[dict], cal: Trace, test: Trace) -> list[dict]:
    """Every policy may fall back to the static network, which meets the 100% budget."""
    s_cal, s_test = evaluate(make_policy("static"), cal), evaluate(make_policy("static"), test)
    return points + [{"params": {"static": True}, "cal_accuracy": s_cal["accuracy"], "cal_mac_fraction": 1.0,
                      "accuracy": s_test["accuracy"], "mac_fraction": 1.0, "drop_points": 0.0}]


def curve_on_budgets(points: list[dict]) -> list[dict | None]:
    return [choose(points, b) for b in BUDGETS]


def auc(chosen: list[dict | None], mask: np.ndarray | None = None) -> float:
    """Mean test accuracy over the feasible budgets (restricted to ``mask`` when given)."""
    ok = np.array([c is not None for c in chosen]) & (True if mask is None else mask)
    return float(np.mean([c["accuracy"] for c, m in zip(chosen, ok) if m and c is not None])) if ok.any() else math.nan


def _grid_entry(point: dict | None, budget: float) -> dict:
    if point is None:
        return {"budget": budget, "feasible": False}
    return {"budget": budget, "feasible": True, "accuracy": point["accuracy"], "mac_fraction": point["mac_fraction"],
            "cal_accuracy": point["cal_accuracy"], "cal_mac_fraction": point["cal_mac_fraction"],
            "overshoot": max(0.0, point["mac_fraction"] - budget), "params": point["params"]}


def sweep(cal: Trace, test: Trace, policies: tuple[str, ...] = COMPARED,
          params: dict[str, dict[str, Any]] | None = None) -> dict:
    """Accuracy-vs-MACs curves and the 25 / 50 / 75% grid, every point chosen on ``cal`` and measured on ``test``."""
    check_calibration_trace(cal)
    params = params or {}
    curves, grid = {}, {}
    for name in policies:
        pts = operating_points(name, cal, test, params.get(name))
        curves[name] = pts
        full = _with_static(pts, cal, test)
        chosen = curve_on_budgets(full)
        feasible = [b for b, c in zip(BUDGETS, chosen) if c is not None]
        grid[name] = {**{f"at_{round(100 * b)}": _grid_entry(choose(full, b), b) for b in GRID},
                      "auc": auc(chosen), "auc_from": feasible[0] if feasible else None}
    return {"curves": curves, "grid": grid, "oracle": oracle(test), "static": evaluate(make_policy("static"), test),
            "grid_definition": GRID_DEFINITION}


def nadeau_bengio(diffs: np.ndarray, n_cal: int, n_test: int, level: float = 0.95) -> dict:
    """Corrected resampled-t interval for the mean of paired differences over overlapping re-splits."""
    r = len(diffs)
    mean, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1)) if r > 1 else math.nan
    half = float(stats.t.ppf(0.5 + level / 2, r - 1)) * sd * math.sqrt(1 / r + n_test / n_cal) if r > 1 else math.nan
    return {"mean": mean, "sd": sd, "low": mean - half, "high": mean + half, "level": level, "resplits": r}


def resplit_frontier(cal: Trace, test: Trace, resplits: int = 50, seed: int = 0, policies: tuple[str, ...] = COMPARED,
                     cert_budgets: tuple[float, ...] = CERT_BUDGETS, confidence: float = CONFIDENCE, risk: str = "drop",
                     fit_share: float = FIT_SHARE, inner_folds: int = 0) -> dict:
    """Paired AUC comparison and certified frontier over ``resplits`` random calibration / test re-splits
    (``inner_folds``: see ``certified_points``)."""
    if resplits < 2:
        raise ConfigError(f"--resplits must be at least 2 for an interval, got {resplits}")
    pool = pool_traces(cal, test)
    n_cal = cal.n
    rng = np.random.default_rng(seed)
    aucs: dict[str, list[float]] = {p: [] for p in policies}
    diffs, frontier_rows = [], []
    for r in range(resplits):
        perm = rng.permutation(pool.n)
        c = pool.subset(np.sort(perm[:n_cal]))
        t = pool.subset(np.sort(perm[n_cal:]))
        t.meta["split"] = "test"
        chosen = {name: curve_on_budgets(_with_static(operating_points(name, c, t), c, t)) for name in policies}
        for name in policies:
            aucs[name].append(auc(chosen[name]))
        if "dart" in chosen and "threshold" in chosen:
            both = np.array([a is not None and b is not None for a, b in zip(chosen["dart"], chosen["threshold"])])
            diffs.append(auc(chosen["dart"], both) - auc(chosen["threshold"], both))
        rows = certified_points(c, t, policies, cert_budgets, confidence, risk, fit_share, seed=seed + r,
                                inner_folds=inner_folds)
        oracle_red = oracle(t)["mac_reduction"]
        frontier_rows += [{**row, "resplit": r, "oracle_mac_reduction": oracle_red} for row in rows]
    out: dict[str, Any] = {"resplits": resplits, "n_cal": n_cal, "n_test": pool.n - n_cal, "seed": seed,
                           **({"inner_folds": inner_folds} if inner_folds else {}),
                           "auc": {k: {"mean": float(np.nanmean(v)), "sd": float(np.nanstd(v, ddof=1))} for k, v in aucs.items()},
                           "grid_definition": GRID_DEFINITION}
    if diffs:
        out["auc_difference_dart_minus_threshold"] = {
            **nadeau_bengio(np.array(diffs), n_cal, pool.n - n_cal),
            "definition": "per re-split, mean test accuracy over the MAC budgets where both are feasible"}
    out["certified_frontier"] = summarize_frontier(frontier_rows, confidence, risk, (n_cal, pool.n - n_cal))
    return out


def certified_points(cal: Trace, test: Trace, policies: tuple[str, ...], budgets: tuple[float, ...], confidence: float,
                     risk: str, fit_share: float = FIT_SHARE, seed: int = 0, inner_folds: int = 0) -> list[dict]:
    """Every policy certified at every budget on ``cal`` (the same fit / cert split for all), measured on ``test``.
    ``inner_folds`` > 0 adds a row "NAME (inner)" for DART and the score policy: their settings and test chosen on
    the fit split (``dart_ee.calibration.inner``)."""
    rows = []
    for name in policies:
        f, ce, data_free = fit_cert_for(name, cal, fit_share, seed)
        reuse = ({"search": fit_search(name, f, {})} if name in SCALED else {"family": knob_sequence(name, f, {})})
        rows += [_certified_row(name, d, test, certify_split, name, f, ce, d, confidence, risk=risk,
                                data_free=data_free, **reuse) for d in budgets]
    for name in (n for n in policies if n in SCALED and inner_folds):
        searches: dict = {}  # the inner candidates, fitted once for every budget
        rows += [_certified_row(f"{name} (inner)", d, test, certify_tuned, name, cal, d, confidence, risk=risk,
                                seed=seed, folds=inner_folds, fit_share=fit_share, searches=searches) for d in budgets]
    return rows


def _certified_row(label: str, d: float, test: Trace, certify_fn: Callable[..., tuple[ExitPolicy, CalibrationRecord]], *args: Any,
                   **kw: Any) -> dict:
    """What ``certify_fn(*args, **kw)`` certified at budget ``d``, measured on ``test`` (one frontier row)."""
    try:
        pol, rec = certify_fn(*args, **kw)
    except ConfigError as e:  # too few certification samples for this budget
        return {"policy": label, "max_drop": d, "certified": False, "error": str(e)}
    ev = evaluate(pol, test)
    return {"policy": label, "max_drop": d, "certified": rec["guarantee"]["certified"], "mac_reduction": ev["mac_reduction"],
            "test_drop_points": ev["drop_points"], "params": rec["params"],
            **({"bound": rec["inner_choice"]["bound"]} if "inner_choice" in rec else {})}


def summarize_frontier(rows: list[dict], confidence: float, risk: str, sizes: tuple[int, int] | None = None) -> dict:
    """Mean certified MAC reduction and test drop per (policy, budget), over however many splits ``rows`` hold.

    With re-split rows (``resplit`` and ``sizes`` = (n_cal, n_test)): each policy's paired difference in MAC
    reduction to the global threshold with a corrected resampled-t 95% interval, and the oracle's mean savings
    at no loss. A split where a policy could not be certified counts as no saving (the static network)."""
    table: dict[str, dict[str, dict]] = {}
    for (name, d) in dict.fromkeys((r["policy"], r["max_drop"]) for r in rows):
        sel = [r for r in rows if r["policy"] == name and r["max_drop"] == d]
        ok = [r for r in sel if "mac_reduction" in r]
        red = np.array([r["mac_reduction"] for r in ok]) if ok else np.array([math.nan])
        drop = np.array([r["test_drop_points"] for r in ok]) if ok else np.array([math.nan])
        cell = {"splits": len(sel), "certified": sum(r["certified"] for r in sel),
                "mean_mac_reduction": float(red.mean()), "sd_mac_reduction": float(red.std(ddof=1)) if len(red) > 1 else 0.0,
                "mean_test_drop_points": float(drop.mean()), "exceed": int((drop > d + 1e-9).sum()),
                "errors": sorted({r["error"] for r in sel if "error" in r})}
        if sizes is not None and name != "threshold" and all("resplit" in r for r in rows):
            saved = {(r["policy"], r["resplit"]): r.get("mac_reduction", 0.0) for r in rows if r["max_drop"] == d}
            pairs = [saved[name, k] - saved["threshold", k] for (q, k) in saved if q == name and ("threshold", k) in saved]
            if len(pairs) > 1:
                cell["vs_threshold"] = nadeau_bengio(np.array(pairs), *sizes)
        table.setdefault(name, {})[f"{d:g}"] = cell
    out: dict[str, Any] = {"confidence": confidence, "risk": risk, "table": table}
    oracle_red = [r["oracle_mac_reduction"] for r in {r["resplit"]: r for r in rows if "oracle_mac_reduction" in r}.values()]
    if oracle_red:
        out["oracle_mean_mac_reduction"] = float(np.mean(oracle_red))
    return out
