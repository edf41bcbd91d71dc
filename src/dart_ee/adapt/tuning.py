"""Choosing the adaptive controller's settings without test data (``dart-ee adapt-tune``).

The settings (shift guard trigger, scale and alpha floor; audit share; window; update period; UCB1
and its arms) are chosen on **development streams**: images of the run's *calibration* split, clean
and then shifted by the ``CHOOSE`` corruption families (``dart_ee.data.shift``) at grades 1 and 3. The
test split and the ``REPORT`` families are never read here; they only report
(``dart_ee.adapt.study``). Every candidate runs over every development stream (replayed from one
trace per stream, so a candidate costs milliseconds to seconds); a coordinate search over ``GRID``,
from the defaults, keeps the candidate that comes first in this order:

1. adapting costs at most ``MAX_CLEAN_COST`` points of MACs on the clean part of every stream;
2. the most streams on which adaptive DART's accuracy on the shifted part is within the budget D of the
   full network's;
3. the fewest MACs on the shifted parts; then the highest accuracy there.

The online risk controller's settings (audit rate q and step eta, ``RISK_GRID``; its shift guard keeps the
defaults of ``RiskSettings``) are chosen on the same streams, every combination tried (``choose_risk``),
keeping the one that comes first in this order: the most streams whose running drop stays within D after the
warm-up; an audit share of at most ``MAX_AUDIT_SHARE``; at most ``MAX_CLEAN_EXTRA`` points of MACs on the
clean parts beyond frozen DART's and the audits' (what a false alarm of the guard costs); the fewest MACs,
audits included.

The choice, what it was chosen on and how it scored are written to ``RUN/adapt.json``; every
adaptation figure records where its settings came from.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dart_ee.adapt.risk import risk_over, running_drop
from dart_ee.adapt.settings import FORMAT, given, is_current, policy_fingerprint, save_settings
from dart_ee.adapt.study import StreamSource, budget_points, dart_policy, drop_stats, evaluate_stream
from dart_ee.calibration.evaluation import exit_costs, simulate
from dart_ee.config import AdaptConfig, ControllerSettings, RiskSettings
from dart_ee.core.provenance import provenance
from dart_ee.data.shift import CHOOSE, severity
from dart_ee.policies import ExitPolicy
from dart_ee.runs.run import Run
from dart_ee.trace import Trace

MAX_CLEAN_COST = 2.0  # points of the static network's MACs that adapting may add on clean data
DEV_LEVELS = (1, 3)
GRID: dict[str, list[Any]] = {  # the values tried for each setting (the defaults are tried too)
    "shift_gate": [0.25, 0.5, 1.0],
    "shift_scale": [1.0, 1.2, 1.4],
    "hard_quantile": [0.75, 0.9],
    "audit_share": [0.0, 0.01, 0.02, 0.05, 0.1],
    "window": [500, 1000, 2000],
    "update_every": [1, 2, 4],
    "ucb": [False, True],
    "arm_spread": [0.05, 0.15],
}
PASSES = 3
# the online risk controller's candidates. The shift guard (dart_ee.adapt.guard) is not among them: it is there for
# the shifts development streams do not show, where they would always drop it as pure cost; its threshold is set by
# its in-distribution false-alarm rate (RiskSettings), and a false alarm on a clean part counts against a candidate
RISK_GRID: dict[str, list[Any]] = {"audit_rate": [0.02, 0.05], "step": [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05]}
MAX_AUDIT_SHARE = 0.05
MAX_CLEAN_EXTRA = 0.5  # points of the static MACs a candidate may spend on clean data beyond frozen DART and audits


def choose_risk(policy: ExitPolicy, cal: Trace, streams: Sequence[tuple[str, int, Trace, int]], budget: float,
                seed: int = 0, grid: Mapping[str, Sequence[Any]] = RISK_GRID) -> dict:
    """The online risk controller's settings, every combination of ``grid`` tried on the development ``streams``
    (family, grade, traced calibration-split stream, shift start); the record ``adapt.json`` keeps as "risk"."""
    # per stream, what no setting changes: each exit's cost and frozen DART's mean cost on the clean part
    frozen = []
    for _, _, trace, start in streams:
        cost = exit_costs(policy, trace)
        frozen.append((cost, cost[simulate(policy, trace.subset(np.arange(start)))[0]].mean()))
    tried = []
    for values in itertools.product(*grid.values()):
        settings = RiskSettings(**dict(zip(grid, values)))
        rows = []
        for (fam, level, trace, start), (cost, frozen_clean) in zip(streams, frozen):
            _, out = risk_over(policy, cal, trace, budget, settings, seed)
            static = float(trace.meta.get("static_macs", trace.exit_macs[-1]))
            st = drop_stats(100 * running_drop(trace.preds[:, -1] == trace.labels, out["pred"] == trace.labels),
                            budget)
            # the clean part's MACs beyond frozen DART's, audits left out (a raised guard or theta spends them)
            extra = cost[out["exit"][:start]].mean() - frozen_clean
            rows.append({"family": fam, "level": level, **st, "audit_share": float(out["audited"].mean()),
                         "mac_fraction": float(out["macs"].mean()) / static,
                         "clean_cost_beyond_audits_points": 100 * float(extra) / static})
        within = sum(r["worst_running_drop_points"] <= budget for r in rows)
        audits = max(r["audit_share"] for r in rows)
        extra = max(r["clean_cost_beyond_audits_points"] for r in rows)
        score = (-within, audits > MAX_AUDIT_SHARE, extra > MAX_CLEAN_EXTRA,
                 float(np.mean([r["mac_fraction"] for r in rows])))
        tried.append((score, settings, rows))
    tried.sort(key=lambda t: t[0])
    score, best, rows = tried[0]
    return {"settings": best.model_dump(), "source": "RUN/adapt.json: chosen on development streams of the calibration "
            "split", "criterion": f"most streams with the running drop within D after the warm-up; audit share <= "
            f"{MAX_AUDIT_SHARE}; clean-part MACs beyond frozen DART's and the audits' <= {MAX_CLEAN_EXTRA} points "
            "(a false alarm of the shift guard costs there); fewest MACs (audits included)",
            "grid": {k: list(v) for k, v in grid.items()}, "streams_within": -score[0], "streams": rows}


def coordinate_search(grid: Mapping[str, Sequence[Any]], base: ControllerSettings,
                      score: Callable[[ControllerSettings], tuple]) -> list[tuple[tuple, ControllerSettings]]:
    """Change one setting at a time to the value that scores best, the others held, until a whole pass changes
    nothing (at most ``PASSES``; incoherent combinations, ``ControllerSettings.problem``, are skipped): every
    candidate tried, best first. A full grid would cost the product of the
    value counts; this costs about their sum per pass."""
    seen: dict[str, tuple[tuple, ControllerSettings]] = {}

    def tried(c: ControllerSettings) -> tuple:
        key = c.model_dump_json()
        if key not in seen:
            seen[key] = (score(c), c)
        return seen[key][0]

    best = base
    for _ in range(PASSES):
        changed = False
        for k, values in grid.items():
            for v in values:
                c = best.model_copy(update={k: v})
                if c.problem() is None and tried(c) < tried(best):
                    best, changed = c, True
        if not changed:
            break
    return sorted(seen.values(), key=lambda s: s[0])


def _score(rows: list[dict]) -> tuple:
    """The order of choice (smaller is better): see the module docstring."""
    worst_cost = max(r["clean_mac_cost_points"] for r in rows)
    return (worst_cost > MAX_CLEAN_COST, -sum(r["within_budget"] for r in rows),
            round(float(np.mean([r["shifted_mac_fraction"] for r in rows])), 4),
            -float(np.mean([r["shifted_accuracy"] for r in rows])), worst_cost)


def tune(run_dir: str | Path, policy_path: str | Path, grid: Mapping[str, Sequence[Any]] = GRID,
         families: Sequence[str] = CHOOSE, levels: Sequence[int] = DEV_LEVELS, n: int | None = None,
         batch_size: int = AdaptConfig().batch_size, seed: int = 0, data_dir: str | Path | None = None,
         base: ControllerSettings | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Choose controller settings on development streams from the calibration split; return the record
    ``save_settings`` writes. ``n``: clean and shifted images per stream (default: half the split each)."""
    say = progress or (lambda msg: None)
    t0 = time.perf_counter()
    policy, budget = dart_policy(policy_path), budget_points(policy_path)
    cal = Run(run_dir).trace("cal")
    src = StreamSource(run_dir, "cal", data_dir)
    n = n or len(src.images.y) // 2
    streams = []
    for fam in families:
        for level in levels:
            say(f"development stream: {fam} grade {level}, {n} + {n} calibration images")
            trace, start = src.stream(fam, severity(fam, level), n, n, seed, batch_size=batch_size)
            streams.append((fam, level, trace, start))
    say(f"coordinate search over {', '.join(grid)} on {len(streams)} streams")
    rows_of: dict[str, list[dict]] = {}

    def score(c: ControllerSettings) -> tuple:
        rows = []
        for fam, level, trace, start in streams:
            r = evaluate_stream(policy, cal, trace, start, c, budget, batch_size, seed, matched=False)
            t, sm = r["totals"], r["summary"]
            rows.append({"family": fam, "level": level, "within_budget": sm["within_budget"],
                         "clean_mac_cost_points": sm["clean_mac_cost_points"],
                         "shifted_accuracy": t["adaptive"]["shifted"]["accuracy"],
                         "shifted_mac_fraction": t["adaptive"]["shifted"]["mac_fraction"],
                         "full_shifted_accuracy": t["full"]["shifted"]["accuracy"],
                         "frozen_shifted_accuracy": t["frozen"]["shifted"]["accuracy"]})
        rows_of[c.model_dump_json()] = rows
        return _score(rows)

    scored = coordinate_search(grid, base or ControllerSettings(), score)
    say(f"online risk control: {math.prod(len(v) for v in RISK_GRID.values())} settings on {len(streams)} streams")
    risk = choose_risk(policy, cal, streams, budget, seed)
    best = scored[0][1]
    best_rows = rows_of[best.model_dump_json()]
    summary = lambda s: {"settings": s[1].model_dump(), "score": list(s[0])}  # noqa: E731
    return {"format": FORMAT, "version": 1, "tuned": True, "provenance": provenance(), "settings": best.model_dump(),
            "chosen_on": {"split": "cal", "families": list(families), "levels": list(levels), "n_clean": n,
                          "n_shift": n, "seed": seed, "batch_size": batch_size},
            "policy_file": str(policy_path), "policy_fingerprint": policy_fingerprint(policy_path),
            "budget_points": budget, "max_clean_cost_points": MAX_CLEAN_COST,
            "criterion": "clean-part MAC cost <= max_clean_cost_points on every stream; most streams within the "
                         "budget on the shifted part; fewest shifted-part MACs; highest shifted-part accuracy",
            "grid": {k: list(v) for k, v in grid.items()}, "search": "coordinate", "candidates": len(scored),
            "chosen_streams": best_rows, "next_best": [summary(s) for s in scored[1:6]], "risk": risk,
            "seconds": time.perf_counter() - t0}


def ensure_settings(run_dir: str | Path, policy_path: str | Path, adapt: AdaptConfig, seed: int = 0,
                    data_dir: str | Path | None = None, batch_size: int | None = None,
                    progress: Callable[[str], None] | None = None) -> None:
    """Give the run settings for this policy: the config's as given (``adapt.tune`` false), or, unless current
    ones are there, settings chosen on the calibration split."""
    if not adapt.tune:
        save_settings(run_dir, given(policy_path, adapt.controller, "the config's adapt section (adapt.tune: false)",
                                     adapt.risk))
    elif not is_current(run_dir, policy_path):
        if progress:
            progress("choosing the controller's settings on the calibration split first (dart-ee adapt-tune)")
        save_settings(run_dir, tune(run_dir, policy_path, batch_size=batch_size or adapt.batch_size, seed=seed,
                                    data_dir=data_dir, base=adapt.controller, progress=progress))
