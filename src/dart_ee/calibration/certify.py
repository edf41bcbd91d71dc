"""Certified accuracy budgets: Learn-then-Test with fixed-sequence testing (``shared/docs/CALIBRATION.md``).

A budget ``--max-drop D --confidence 1-delta`` is a promise about data the calibration never saw:

    with probability at least 1 - delta over the draw of the certification samples, the expected
    accuracy drop against the final exit (or the expected rate of new errors, or of disagreements)
    on data from the same distribution is at most D.

How it is kept:

1. the calibration split is cut, with a recorded seed, into **fit** (40%) and **cert** (60%);
   everything learned (edges, the beta / beta_diff search, the DP and its refinement, the score model, the share
   maps) sees fit only;
2. fit yields one **sequence of candidates fixed in advance**, from the most conservative (the
   static network) to more and more aggressive: for the learned-score policy, its score model's price
   path (``price_family``: leave at exit i once the predicted risk of a new error there is at most
   lambda times the share of MACs that leaving there saves, lambda rising from 0); for DART, the
   fit-split winner's thresholds moved so that each exit's share of leaving fit samples is scaled by a
   common factor s = 0.00, 0.01, ..., 3.00 (``scale_family``). On both, no exit is switched off on the
   way and MACs fall monotonically. The other policies walk their knob in order; those whose sequence
   needs no data (the global threshold, patience) certify on the whole calibration split;
3. cert tests H_s: risk > D for each candidate in order and stops at the first p-value above
   delta (``fixed_sequence``); no multiplicity correction is needed. The last accepted candidate is
   the certified policy; if none is, the answer is the static network, "not certifiable at this budget".

Not guaranteed: the savings, per-class drops, behaviour under shift or adaptation, and the drop on
one finite test set (which scatters around the expectation: a policy whose true drop is exactly D
exceeds D on about half of all test sets).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np
from scipy import stats

from dart_ee.calibration.evaluation import aligned, evaluate, simulate
from dart_ee.calibration.record import CalibrationRecord, Guarantee
from dart_ee.core.defaults import CONFIDENCE, FIT_SHARE
from dart_ee.core.errors import ConfigError
from dart_ee.policies import (
    POLICIES,
    DartPolicy,
    ExitPolicy,
    ScorePolicy,
    ThresholdPolicy,
    check_calibration_trace,
    make_policy,
)
from dart_ee.trace import Trace

RISKS = ("drop", "new-errors", "disagree")
# "exact": the exact binomial on the per-sample loss; for the drop, on new errors (final exit right, chosen exit
# wrong), whose rate bounds the drop from above. Chosen a priori for every policy: where few samples are right only
# at the early exit (the usual case), it certifies where the conditional McNemar test ("mcnemar") cannot: at
# n = 3,000 and D = 0.5 points it accepts up to 8 new errors, McNemar at most 4-5, and McNemar needs n >= 1,058
# before even zero losses pass. "hb": Hoeffding-Bentkus on the loss itself.
BOUNDS = ("exact", "mcnemar", "hb")
SCALES = tuple(np.round(np.arange(0, 301) / 100, 2).tolist())  # 0.00 (static) up to 3.00
# The score policy's prices, fixed a priori: 0 (static), then 400 geometric steps (3.5% apart) from 1e-4, where only
# samples the model calls all but certainly safe leave, to 100, where every sample leaves at the first exit. A finer
# grid costs nothing in validity (the fixed-sequence test needs no correction) and little time (it stops at the
# first rejection).
PRICES = (0.0, *np.geomspace(1e-4, 1e2, 400).tolist())
# policies whose candidate path is learned on the fit split from a fitted policy's exit scores: DART's exit-share
# scaling of its fit-split winner, the score policy's price path
SCALED = ("dart", "score")
# The fit-split search only has to seed DART's scaled path, which sets the aggressiveness on cert: a
# third of the budget search's beta grid and three margins keep certification fast (fixed a priori).
CERT_BETA_DIFFS = (0.0, 0.1, 0.3)

GUARANTEED = ("with probability at least {conf} over the draw of the {n} certification samples, the expected {what} "
              "on data from the same distribution is at most {d} points")
NOT_GUARANTEED = ("not guaranteed: the MAC savings, per-class drops, behaviour under distribution shift or online "
                  "adaptation, or the drop on any one finite test set (it scatters around the expectation)")
RISK_WORDS = {"drop": "accuracy drop against the final exit", "new-errors": "rate of new errors (final exit right, "
              "chosen exit wrong)", "disagree": "rate of disagreement with the final exit"}


# -- p-values ----------------------------------------------------------------------------------
def min_cert_samples(max_drop: float, delta: float, risk: str = "drop", bound: str = "exact") -> int:
    """Smallest n at which zero losses can pass the test. ``max_drop`` in points.

    Exact binomial: (1 - D)^n <= delta. McNemar on the drop: its Clopper-Pearson bound on the disagreement rate,
    at level delta / 10, must fall below D with no disagreement: (1 - D)^n <= delta / 10. Hoeffding-Bentkus:
    the smallest n whose p-value at zero loss is <= delta (found by doubling, then bisection)."""
    d = max_drop / 100
    if bound == "hb":
        lo, hi = 1, 1
        while p_value(np.zeros(hi, np.int8), max_drop, delta, risk, bound) > delta:
            lo, hi = hi, hi * 2
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if p_value(np.zeros(mid, np.int8), max_drop, delta, risk, bound) <= delta else (mid + 1, hi)
        return hi
    level = delta / 10 if (bound == "mcnemar" and risk == "drop") else delta
    return int(math.ceil(math.log(level) / math.log1p(-d) - 1e-9))


def binomial_p(k: int, n: int, d: float) -> float:
    """Exact binomial p-value for H: rate > d, having seen k losses in n: P(Bin(n, d) <= k)."""
    return float(stats.binom.cdf(k, n, d))


def mcnemar_p(n_plus: int, n_minus: int, n: int, d: float, delta: float) -> float:
    """Conditional McNemar p-value for H: E[drop] > d with a Berger-Boos bound on the disagreement rate.

    n_plus samples where only the final exit is right, n_minus where only the chosen exit is. On the
    event that the disagreement rate is at most its Clopper-Pearson upper bound U (level gamma =
    delta / 10), the null forces the share of n_plus among the m disagreements to be at least
    (1 + d / U) / 2; the p-value adds gamma for the event's complement.
    """
    m, gamma = n_plus + n_minus, delta / 10
    upper = 1.0 if m >= n else float(stats.beta.ppf(1 - gamma, m + 1, n - m))
    if upper < d:
        return gamma
    return min(1.0, gamma + float(stats.binom.cdf(n_plus, m, (1 + d / upper) / 2)))


def hoeffding_bentkus_p(risk: float, n: int, d: float) -> float:
    """Hoeffding-Bentkus p-value for H: E[loss] > d, any loss in [0, 1] with empirical mean ``risk``."""

    def h(a: float, b: float) -> float:
        first = a * math.log(a / b) if a > 0 else 0.0
        return first + (1 - a) * math.log((1 - a) / (1 - b)) if a < 1 else first

    hoeffding = math.exp(-n * h(min(risk, d), d))
    bentkus = math.e * float(stats.binom.cdf(math.ceil(n * risk - 1e-9), n, d))
    return min(1.0, hoeffding, bentkus)


def losses(risk: str, trace: Trace, preds: np.ndarray) -> np.ndarray:
    """Per-sample loss of choosing ``preds`` instead of the final exit's prediction."""
    final_pred = trace.preds[:, -1]
    final_right, right = final_pred == trace.labels, preds == trace.labels
    if risk == "drop":
        return final_right.astype(np.int8) - right.astype(np.int8)
    if risk == "new-errors":
        return (final_right & ~right).astype(np.int8)
    if risk == "disagree":
        return (preds != final_pred).astype(np.int8)
    raise ConfigError(f"--risk must be one of {', '.join(RISKS)}, got {risk!r}")


def p_value(loss: np.ndarray, max_drop: float, delta: float, risk: str = "drop", bound: str = "exact") -> float:
    """p-value for H: E[loss] > D (D = ``max_drop`` points) from per-sample losses (drop: -1/0/1, else 0/1).

    Any bound is valid for the drop; "exact" tests the rate of its positive part (new errors), which is larger."""
    n, d = len(loss), max_drop / 100
    if bound == "hb":  # a drop in [-1, 1] maps affinely to [0, 1]
        return (hoeffding_bentkus_p((loss.mean() + 1) / 2, n, (d + 1) / 2) if risk == "drop"
                else hoeffding_bentkus_p(float(loss.mean()), n, d))
    if risk == "drop" and bound == "mcnemar":
        return mcnemar_p(int((loss > 0).sum()), int((loss < 0).sum()), n, d, delta)
    return binomial_p(int((loss > 0).sum()), n, d)  # for the drop: new errors, an upper bound of it


def fixed_sequence(pvalues: Iterable[float], delta: float) -> tuple[int, list[float]]:
    """Test hypotheses in order, accepting while p <= delta; returns (last accepted index or -1, p-values seen).

    The iterable is consumed lazily, so candidates after the first rejection are never evaluated.
    """
    seen: list[float] = []
    for p in pvalues:
        seen.append(float(p))
        if p > delta:
            return len(seen) - 2, seen
    return len(seen) - 1, seen


# -- the fit / cert split and the candidate sequence ------------------------------------------
def split_fit_cert(cal: Trace, fit_share: float = FIT_SHARE, seed: int = 0) -> tuple[Trace, Trace]:
    """Disjoint fit and cert parts of the calibration split, drawn with ``seed`` (both keep split "cal")."""
    if not 0 < fit_share < 1:
        raise ConfigError(f"fit_share must lie in (0, 1), got {fit_share}")
    perm = np.random.default_rng(seed).permutation(cal.n)
    k = int(round(fit_share * cal.n))
    return cal.subset(np.sort(perm[:k])), cal.subset(np.sort(perm[k:]))


def scale_thresholds(tau: list[list[float]], sorted_scores: list[np.ndarray], scale: float) -> list[list[float]]:
    """Thresholds whose share of leaving fit samples is ``scale`` times the share under ``tau`` (at most all).

    Per exit i (and alpha bin), s_i = the share of fit samples whose exit-i score is >= tau_i; the new
    threshold lets the top min(1, scale * s_i) of them leave: +inf at scale 0, ``tau`` itself at scale 1
    (up to ties), the lowest score seen once every fit sample leaves. Every threshold falls as ``scale``
    grows, so a sample can only leave earlier and MACs fall monotonically; an exit that ``tau`` uses is
    used at every scale above 0, so no exit is switched off on the way (a quantile shift removes every
    exit whose share is below the shift).
    """
    out = []
    for row, srt in zip(tau, sorted_scores):
        n = len(srt)
        new = []
        for t in row:
            share = (n - np.searchsorted(srt, t, side="left")) / n if t != math.inf else 0.0
            k = int(math.ceil(min(1.0, scale * share) * n - 1e-9))  # fit samples that leave
            new.append(math.inf if k == 0 else float(srt[n - k]))
        out.append(new)
    return out


def scale_family(policy: ExitPolicy, fit: Trace, scales: Iterable[float] = SCALES) -> list[tuple[dict, ExitPolicy]]:
    """The monotone exit-share scaling path of a fitted DART or score policy: one (label, policy) per scale."""
    scores = exit_scores(policy, fit)
    maps = [np.sort(scores[:, i]) for i in range(scores.shape[1])]
    tau = cast(list, policy.tau_)  # type: ignore[attr-defined]
    return [({"scale": sc}, _with_thresholds(policy, scale_thresholds(tau, maps, sc))) for sc in scales]


def price_thresholds(exit_macs: np.ndarray, price: float) -> list[list[float]]:
    """The score policy's thresholds at ``price`` lambda: leave at exit i once P(unsafe_i) <= lambda * saved_i, i.e.
    P(safe_i) >= 1 - lambda * saved_i, where saved_i = 1 - C_i / C_N is the share of MACs that leaving there saves.

    Why this path: a new error costs the same wherever it happens, while an exit's saving grows the earlier it is, so
    the cheapest way to spend a risk budget admits, at every exit, the samples whose risk per MAC saved is lowest, at
    one price for all exits. The price is the only knob, so nothing is fitted to the few new errors that the fit
    split holds at a tight budget (the fit-split winner of a per-exit search is; its thresholds scatter from split to
    split). Every threshold falls as the price rises, so MACs fall monotonically; price 0 is the static network, and
    every exit is used at every price above 0."""
    saved = 1 - np.asarray(exit_macs, np.float64)[:-1] / float(exit_macs[-1])
    return [[math.inf if price == 0 else float(1 - price * s)] for s in saved]


def price_family(policy: ScorePolicy, fit: Trace, prices: Iterable[float] = PRICES) -> list[tuple[dict, ExitPolicy]]:
    """The score policy's price path (``price_thresholds``) on its fitted score model: one (label, policy) per price."""
    return [({"lambda": lam}, _with_thresholds(policy, price_thresholds(fit.exit_macs, lam))) for lam in prices]


def _with_thresholds(policy: ExitPolicy, tau: list[list[float]]) -> ExitPolicy:
    """A copy of the fitted ``policy`` (DART or score) with thresholds ``tau``."""
    p = make_policy(policy.name, **policy.get_params())
    for k, v in policy.fitted_state().items():
        setattr(p, k, v)
    p.tau_ = tau  # type: ignore[attr-defined]
    if isinstance(p, DartPolicy):
        p.set_coefficients(p.coef_exit_, p.coef_class_)
    return p


def exit_scores(policy: ExitPolicy, trace: Trace) -> np.ndarray:
    """(n, E-1): what the policy's thresholds are compared with at each exit (DART: confidence)."""
    if isinstance(policy, ScorePolicy):
        feats = policy._walk_features(aligned(policy, trace))
        return np.stack([policy.score(i, f).numpy() for i, f in enumerate(feats)], 1)
    return trace.conf[:, :-1]


def path_predictions(family: list[tuple[dict, ExitPolicy]], trace: Trace) -> Callable[[ExitPolicy], np.ndarray]:
    """Each candidate's predictions on ``trace``, as ``simulate`` gives them, computed fast for a scaled path.

    A learned-score path shares one score model: its scores are computed once and each candidate only compares
    them with its thresholds (a certification tests up to 301 candidates); the global threshold's path compares
    the confidences. Every decision there depends only on a sample's own outputs, so no compaction is needed;
    ``test_path_predictions_equal_simulate`` holds both to ``simulate`` exactly. Other paths go through
    ``simulate``.
    """
    kinds = {type(p) for _, p in family}
    if kinds == {ThresholdPolicy}:  # the global threshold's path: compare each exit's confidence with tau
        conf = trace.conf[:, :-1]
        return lambda pol: _first_leave(trace, conf > np.float32(pol.tau))  # type: ignore[attr-defined]
    if kinds != {ScorePolicy}:
        return lambda pol: simulate(pol, trace)[1]
    scores = exit_scores(family[0][1], trace)
    return lambda pol: _first_leave(trace, scores >= np.array([row[0] for row in pol.tau_], np.float32)[None])  # type: ignore[attr-defined]


def _first_leave(trace: Trace, leave_early: np.ndarray) -> np.ndarray:
    """Predictions where each sample leaves at its first True of ``leave_early`` (N, E-1), else at the last exit.
    (float32 comparisons, as the runtime's float32 tensors make them.)"""
    leave = np.concatenate([leave_early, np.ones((trace.n, 1), bool)], 1)
    return trace.preds[np.arange(trace.n), leave.argmax(1)]


def uses_fit_split(name: str) -> bool:
    """Whether the policy's candidate sequence is learned (needs a fit split) or data-free."""
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    return not POLICIES[name].data_free_knob


def fit_cert_for(name: str, cal: Trace, fit_share: float = FIT_SHARE, seed: int = 0) -> tuple[Trace, Trace, bool]:
    """(fit, cert, data_free): a learned sequence splits ``cal``; a data-free one certifies on all of it."""
    if not uses_fit_split(name):
        return cal, cal, True
    fit, cert = split_fit_cert(cal, fit_share, seed)
    return fit, cert, False


def knob_sequence(name: str, fit: Trace, params: dict[str, Any]) -> list[tuple[dict, ExitPolicy]]:
    """Candidates in the policy's knob order, most conservative first, each fitted on ``fit``."""
    cls = POLICIES[name]
    grid = sorted(cls.knob_grid, reverse=cls.knob_conservative_high)
    knob = cast(str, cls.knob)  # every policy certify walks has a knob
    return [({knob: v}, make_policy(name, **{**params, knob: v}).fit(fit)) for v in grid]


def fit_search(name: str, fit: Trace, params: dict[str, Any], tune_beta_diff: bool = True) -> list[tuple[dict, ExitPolicy, dict]]:
    """What a learned path starts from, fitted and evaluated on the fit split (reused across budgets): DART's
    trade-off candidates over (beta_opt, beta_diff); the score policy's one score model (its price path needs no
    trade-off search)."""
    if name == "score":
        grid = [params]
    else:
        diffs = CERT_BETA_DIFFS if tune_beta_diff else (params.get("beta_diff", 0.0),)
        grid = [{**params, "beta_opt": b, "beta_diff": bd} for bd in diffs for b in DartPolicy.knob_grid[::3]]
    out: list[tuple[dict, ExitPolicy, dict]] = []
    for p in grid:
        pol = make_policy(name, **p).fit(fit)
        out.append((p, pol, evaluate(pol, fit)))
    return out


def tested_risk(risk: str, bound: str) -> str:
    """The per-sample loss that the test counts: the exact test bounds the drop by its new errors."""
    return "new-errors" if (risk == "drop" and bound == "exact") else risk


def winner_target(max_drop: float, delta: float, risk: str, bound: str, n_cert: int) -> float:
    """The fit-split risk (points) to aim the winner at: the highest loss rate that the test can still accept on
    ``n_cert`` samples (exact binomial: the largest k with P(Bin(n, D) <= k) <= delta, as a rate k / n), so that the
    scaled path certifies near the winner's own exit shares; D itself for the other tests. Depends on the sizes
    and the budget only, never on cert data."""
    if bound != "exact":
        return max_drop
    k = int(stats.binom.ppf(delta, n_cert, max_drop / 100))
    while k >= 0 and binomial_p(k, n_cert, max_drop / 100) > delta:
        k -= 1
    return 100 * max(k, 0) / n_cert


def fit_winner(search: list[tuple[dict, ExitPolicy, dict]], fit: Trace, target: float, risk: str = "drop",
               bound: str = "exact") -> tuple[dict, ExitPolicy]:
    """The in-sample budget winner on the fit split: fewest MACs with a fit risk, the one the test counts
    (``tested_risk``), of at most ``target`` points; else the most accurate."""
    loss = tested_risk(risk, bound)
    ok = [s for s in search if 100 * losses(loss, fit, simulate(s[1], fit)[1]).mean() <= target + 1e-9]
    best = (min(ok, key=lambda s: (s[2]["macs_per_image"], -s[2]["accuracy"])) if ok
            else max(search, key=lambda s: s[2]["accuracy"]))
    return best[0], best[1]


# -- certification -----------------------------------------------------------------------------
def certify_sequence(family: list[tuple[dict, ExitPolicy]], cert: Trace, max_drop: float, delta: float, risk: str = "drop",
                     bound: str = "exact", in_expectation: bool = False) -> dict:
    """Fixed-sequence test (or, ``in_expectation``, conformal risk control) over ``family`` on ``cert``.

    Returns {"index": the accepted candidate or -1, and "pvalues" (or "crc_risks"): what was computed, in order}.
    """
    preds_of = path_predictions(family, cert)

    def loss_of(pol: ExitPolicy) -> np.ndarray:
        return losses(risk, cert, preds_of(pol))

    def p_of(pol: ExitPolicy) -> float:  # a policy that can never leave early has risk 0 by construction
        return 0.0 if pol.never_leaves_early() else p_value(loss_of(pol), max_drop, delta, risk, bound)

    if in_expectation:
        # Conformal risk control: the loss made monotone along the sequence (running max from the
        # conservative end), bound B = 1; accept while (n/(n+1)) R_n + 1/(n+1) <= D
        n, d, run, idx, seen = cert.n, max_drop / 100, np.zeros(cert.n), -1, []
        for k, (_, pol) in enumerate(family):
            run = np.maximum(run, loss_of(pol))
            adj = n / (n + 1) * run.mean() + 1 / (n + 1)
            seen.append(float(adj))
            if adj > d:
                break
            idx = k
        return {"index": idx, "crc_risks": seen}
    idx, ps = fixed_sequence((p_of(pol) for _, pol in family), delta)
    return {"index": idx, "pvalues": ps}


def certify(name: str, cal: Trace, max_drop: float, confidence: float | None = CONFIDENCE, *, risk: str = "drop",
            fit_share: float = FIT_SHARE, seed: int = 0, bound: str = "exact", in_expectation: bool = False,
            tune_beta_diff: bool = True, **params: Any) -> tuple[ExitPolicy, CalibrationRecord]:
    """Calibrate ``name`` so that its budget holds on unseen data; returns (policy, record).

    Learned candidate sequences (DART, BranchyNet, RL) fit on ``fit_share`` of ``cal`` and certify on
    the rest, split with ``seed``; data-free ones (threshold, patience) certify on all of ``cal``.
    Raises ConfigError when the certification part is too small to ever pass.
    """
    check_calibration_trace(cal)
    fit, cert, data_free = fit_cert_for(name, cal, fit_share, seed)
    pol, rec = certify_split(name, fit, cert, max_drop, confidence, risk=risk, bound=bound, in_expectation=in_expectation,
                             tune_beta_diff=tune_beta_diff, data_free=data_free, **params)
    g = rec["guarantee"]
    g["fit_share"], g["split_seed"], g["cal_fingerprint"] = 0.0 if data_free else fit_share, seed, _fingerprint(cal)
    if not data_free:  # certify_split measured it on cert; a data-free policy's cert is all of cal already
        rec["calibration"] = evaluate(pol, cal)
    return pol, rec


def certify_split(name: str, fit: Trace, cert: Trace, max_drop: float, confidence: float | None = CONFIDENCE, *,
                  risk: str = "drop", bound: str = "exact", in_expectation: bool = False, tune_beta_diff: bool = True,
                  search: list | None = None, family: list | None = None, data_free: bool = False,
                  **params: Any) -> tuple[ExitPolicy, CalibrationRecord]:
    """``certify`` on a given fit / cert pair (``data_free``: the sequence ignores ``fit``, which may be ``cert``).

    ``confidence`` may be None with ``in_expectation`` (conformal risk control has no confidence level).
    Reused across budgets on the same fit split: ``search`` (DART, score: a precomputed ``fit_search``)
    or ``family`` (the other policies: a precomputed ``knob_sequence``).
    """
    check_calibration_trace(cert)
    _check_target(max_drop, confidence, risk, bound, in_expectation)
    uses_fit_split(name)  # a clear error for an unknown policy
    delta, winner = (1 - confidence if confidence is not None else 1.0), None
    if name == "static":  # its risk is 0 by definition: nothing to test
        res: dict = {"index": -1, "pvalues": []}
        family = []
    else:
        n_min = min_cert_samples(max_drop, delta, risk, bound)
        if cert.n < n_min and not in_expectation:
            raise ConfigError(
                f"certifying --max-drop {max_drop} at --confidence {confidence} needs at least {n_min} certification "
                f"samples (the smallest n at which zero losses pass the {bound} test); {name} gets {cert.n}"
                + ("" if data_free else f" (the calibration split less the {fit.n} that fit the policy)")
                + ". Hold out more calibration data (data.cal_fraction), raise --max-drop or lower --confidence.")
        if family is None or name in SCALED:
            target = winner_target(max_drop, delta, risk, bound, cert.n) if not in_expectation else max_drop
            family, winner = family_for(name, fit, max_drop, params, tune_beta_diff, search, risk, bound, target)
        res = certify_sequence(family, cert, max_drop, delta, risk, bound, in_expectation)
        res["last_accepted"] = res["index"]  # where the test stopped, for the record's p-values
        if res["index"] >= 0 and family[res["index"]][1].never_leaves_early():
            res["index"] = -1  # nothing that exits early was certified: the plain network is cheaper than its twin
    label, pol = family[res["index"]] if res["index"] >= 0 else ({}, make_policy("static").fit(cert))
    certified = name == "static" or res["index"] >= 0
    return pol, _record(name, cert, max_drop, confidence, risk, bound, in_expectation, pol, label, certified, winner, res,
                        0 if data_free else fit.n)


def check_max_drop(max_drop: float) -> None:
    """An accuracy budget is a finite number of points in (0, 100)."""
    if not (isinstance(max_drop, (int, float)) and math.isfinite(max_drop) and 0 < max_drop < 100):
        raise ConfigError(f"--max-drop must be a number of points in (0, 100), got {max_drop}")


def _check_target(max_drop: float, confidence: float | None, risk: str, bound: str, in_expectation: bool = False) -> None:
    check_max_drop(max_drop)
    if not (in_expectation and confidence is None) and not (isinstance(confidence, (int, float)) and 0.5 <= confidence < 1):
        raise ConfigError(f"--confidence must lie in [0.5, 1), got {confidence}")
    if risk not in RISKS:
        raise ConfigError(f"--risk must be one of {', '.join(RISKS)}, got {risk!r}")
    if bound not in BOUNDS:
        raise ConfigError(f"--bound must be one of {', '.join(BOUNDS)}, got {bound!r}")


def _fingerprint(trace: Trace) -> str:
    return hashlib.sha256(np.sort(trace.index).tobytes()).hexdigest()[:16]


def _record(name: str, cert: Trace, max_drop: float, confidence: float | None, risk: str, bound: str, in_expectation: bool,
            pol: ExitPolicy, label: dict, certified: bool, winner: dict | None, res: dict,
            n_fit: int) -> CalibrationRecord:
    idx = res["index"]
    stat: Guarantee
    if in_expectation:
        stat = {"method": "conformal risk control (in expectation over calibration and test draws; no per-draw "
                          "guarantee)", "adjusted_risk": res["crc_risks"][idx] if idx >= 0 else None}
    else:
        ps, last = res["pvalues"], res.get("last_accepted", idx)
        stat = {"method": "fixed-sequence Learn-then-Test, " + ("Hoeffding-Bentkus" if bound == "hb" else
                          "conditional McNemar (Berger-Boos)" if (risk == "drop" and bound == "mcnemar") else
                          "exact binomial on new errors (an upper bound of the drop)" if risk == "drop" else
                          "exact binomial"),
                "p_value": ps[idx] if idx >= 0 else None,
                "p_value_first_rejected": ps[last + 1] if last + 1 < len(ps) else None,
                "candidates_tested": len(ps)}
    what = RISK_WORDS[risk]
    statement = (GUARANTEED.format(conf=confidence, n=f"{cert.n:,}", what=what, d=max_drop) if not in_expectation else
                 f"in expectation over the calibration and test draws, the {what} is at most {max_drop} points "
                 "(conformal risk control; says nothing about any single draw)")
    if not certified:
        statement = "not certifiable at this budget: the static network is returned instead (its risk is 0)"
    guarantee: Guarantee = {"certified": certified, "max_drop": max_drop, "confidence": confidence,
                 "delta": None if confidence is None else 1 - confidence,
                 "risk": risk, "in_expectation": in_expectation, "n_cert": cert.n, "n_fit": n_fit,
                 "cert_fingerprint": _fingerprint(cert), "candidate": label, "candidate_index": idx, **stat,
                 "cert_risk_points": 100 * float(losses(risk, cert, simulate(pol, cert)[1]).mean()),
                 "statement": statement, "not_guaranteed": NOT_GUARANTEED}
    rec: CalibrationRecord = {"target": {"mode": "certified", "max_drop": max_drop, "confidence": confidence, "risk": risk},
           "params": {**pol.get_params(), **label} if pol.name != "static" else {}, "policy": pol.name,
           "calibration": evaluate(pol, cert), "budget_met": certified, "guarantee": guarantee,
           "trace": {k: cert.meta.get(k) for k in ("run", "config_fingerprint", "dataset", "split")}}
    if winner is not None:
        rec["fit_split_winner"] = winner
    return rec


def family_for(name: str, fit: Trace, max_drop: float, params: dict[str, Any], tune_beta_diff: bool = True,
               search: list | None = None, risk: str = "drop", bound: str = "exact",
               target: float | None = None) -> tuple[list[tuple[dict, ExitPolicy]], dict | None]:
    """The candidate sequence that ``certify`` tests, most conservative first, and (DART's scaled path) the fit-split
    winner, aimed at ``target`` points of the tested risk (``winner_target``).

    Not certifying any of them leaves the static network, whose risk is 0 by definition.
    """
    if name not in SCALED:
        return knob_sequence(name, fit, params), None
    found = search if search is not None else fit_search(name, fit, params, tune_beta_diff)
    if name == "score":
        return price_family(cast(ScorePolicy, found[0][1]), fit), None
    wparams, wpol = fit_winner(found, fit, max_drop if target is None else target, risk, bound)
    return [({**wparams, **lab}, p) for lab, p in scale_family(wpol, fit)], {"params": wparams, "fit": evaluate(wpol, fit)}
