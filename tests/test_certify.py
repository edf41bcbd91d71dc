"""Certified budgets (dart_ee.calibration.certify), the refined DP, and coverage on a generator with known truth."""

import json
import math

import numpy as np
import pytest
from test_policies import probs_from

from dart_ee.calibration.calibrate import calibrate
from dart_ee.calibration.certify import (
    PRICES,
    binomial_p,
    certify,
    fixed_sequence,
    hoeffding_bentkus_p,
    losses,
    mcnemar_p,
    min_cert_samples,
    price_family,
    price_thresholds,
    scale_family,
    scale_thresholds,
    split_fit_cert,
)
from dart_ee.calibration.coverage import MAX_EXCEED, population_coverage, synthetic_trace, true_risk
from dart_ee.calibration.evaluation import evaluate, simulate
from dart_ee.core.errors import ConfigError
from dart_ee.policies import make_policy, policy_from_dict
from dart_ee.trace import Trace


# -- p-values -------------------------------------------------------------------------------------
def test_binomial_units():
    # CALIBRATION.md: n = 3,000, D = 0.5 points, delta = 0.05: 8 losses pass (0.037), 9 fail (0.069)
    assert binomial_p(8, 3000, 0.005) == pytest.approx(0.037, abs=5e-4) and binomial_p(8, 3000, 0.005) <= 0.05
    assert binomial_p(9, 3000, 0.005) == pytest.approx(0.069, abs=5e-4) and binomial_p(9, 3000, 0.005) > 0.05
    assert binomial_p(0, 598, 0.005) <= 0.05 < binomial_p(0, 597, 0.005)
    assert min_cert_samples(0.5, 0.05) == 598
    # McNemar's Clopper-Pearson bound runs at delta / 10: zero losses pass only from 1,058 samples
    assert min_cert_samples(0.5, 0.05, "drop", "mcnemar") == 1058
    assert mcnemar_p(0, 0, 1058, 0.005, 0.05) <= 0.05 < mcnemar_p(0, 0, 1057, 0.005, 0.05)
    n_hb = min_cert_samples(0.5, 0.05, "new-errors", "hb")
    assert hoeffding_bentkus_p(0.0, n_hb, 0.005) <= 0.05 < hoeffding_bentkus_p(0.0, n_hb - 1, 0.005)


def test_mcnemar_and_hoeffding_bentkus():
    delta = 0.05
    # no disagreements on plenty of data: the Clopper-Pearson bound is below D, p = gamma
    assert mcnemar_p(0, 0, 3000, 0.005, delta) == pytest.approx(delta / 10)
    # no disagreements on too little data: nothing can be concluded
    assert mcnemar_p(0, 0, 500, 0.005, delta) > delta
    # the early exit gains more often than it loses (negative drop): certifiable
    assert mcnemar_p(10, 30, 3000, 0.005, delta) <= delta
    # as often, at a 10% disagreement rate: the drop's noise (sd 0.58 points) is larger than D
    assert mcnemar_p(150, 150, 3000, 0.005, delta) > delta
    # it loses 2 points net: not certifiable at 0.5
    assert mcnemar_p(180, 120, 3000, 0.005, delta) > delta
    for k in (0, 5, 9, 20):  # Hoeffding-Bentkus is never below the exact binomial p-value
        assert hoeffding_bentkus_p(k / 3000, 3000, 0.005) >= binomial_p(k, 3000, 0.005) - 1e-12
    assert hoeffding_bentkus_p(0.0, 3000, 0.005) <= 0.05 < hoeffding_bentkus_p(0.01, 3000, 0.005)


def test_fixed_sequence_stops_at_the_first_rejection():
    evaluated = []

    def ps():
        for p in (0.01, 0.02, 0.2, 0.001):
            evaluated.append(p)
            yield p

    idx, seen = fixed_sequence(ps(), 0.05)
    assert idx == 1 and seen == [0.01, 0.02, 0.2] and evaluated == [0.01, 0.02, 0.2]
    assert fixed_sequence(iter([0.5]), 0.05)[0] == -1
    assert fixed_sequence(iter([0.0, 0.0]), 0.05)[0] == 1


def test_losses():
    t = synthetic_trace(300, "independent", seed=1)
    preds = t.preds[:, 0]
    d, ne, dis = (losses(r, t, preds) for r in ("drop", "new-errors", "disagree"))
    assert d.mean() == pytest.approx(t.correct[:, -1].mean() - t.correct[:, 0].mean())
    assert (ne >= d).all() and (dis >= ne).all()
    with pytest.raises(ConfigError, match="risk"):
        losses("typo", t, preds)


# -- the split and the candidate sequence ---------------------------------------------------------
def test_fit_and_cert_are_disjoint_and_recorded():
    cal = synthetic_trace(5000, "nested", seed=2)
    fit, cert = split_fit_cert(cal, 0.4, seed=7)
    assert fit.n == 2000 and cert.n == 3000
    assert not set(fit.index) & set(cert.index) and set(fit.index) | set(cert.index) == set(cal.index)
    again = split_fit_cert(cal, 0.4, seed=7)[0]
    np.testing.assert_array_equal(fit.index, again.index)
    pol, rec = certify("dart", cal, 0.5, 0.95, seed=7)
    g = rec["guarantee"]
    assert g["n_fit"] == 2000 and g["n_cert"] == 3000 and g["split_seed"] == 7 and g["fit_share"] == 0.4
    assert g["risk"] == "drop" and g["delta"] == pytest.approx(0.05) and g["max_drop"] == 0.5
    assert g["certified"] and g["p_value"] <= 0.05 and "at most 0.5 points" in g["statement"]
    # the policy JSON carries the guarantee, and the reloaded policy makes the same decisions
    d = json.loads(json.dumps({**pol.to_dict(), "calibration": rec}))
    assert d["calibration"]["guarantee"]["p_value"] == g["p_value"]
    np.testing.assert_array_equal(simulate(policy_from_dict(d), cal)[0], simulate(pol, cal)[0])
    # data-free sequences (global threshold) certify on the whole calibration split
    _, rec_t = certify("threshold", cal, 0.5, 0.95)
    assert rec_t["guarantee"]["n_cert"] == 5000 and rec_t["guarantee"]["n_fit"] == 0


@pytest.mark.parametrize("seed", range(20))
def test_share_scaling_is_monotone_and_switches_no_exit_off(seed):
    """Property over random score maps and thresholds: as the scale grows every threshold falls (a sample can
    only leave earlier), an exit with a share at scale 1 has one at every scale above 0, and scale 0 is static."""
    rng = np.random.default_rng(seed)
    maps = [np.sort(rng.random(int(rng.integers(50, 2000))).astype(np.float32)) for _ in range(3)]
    tau = [[float(rng.choice(m)), math.inf, float(rng.random())] for m in maps]
    prev = None
    for sc in np.round(np.arange(0, 3.01, 0.01), 2):
        rows = scale_thresholds(tau, maps, float(sc))
        if sc == 0:
            assert all(t == math.inf for row in rows for t in row)
        else:
            assert all((t < math.inf) == (t0 < math.inf) for row, row0 in zip(rows, tau) for t, t0 in zip(row, row0))
        if prev is not None:
            assert all(a <= b for row, prow in zip(rows, prev) for a, b in zip(row, prow))
        prev = rows
    # scale 1 lets the same fit samples leave as the thresholds it scales
    for m, row, row1 in zip(maps, tau, scale_thresholds(tau, maps, 1.0)):
        assert [(m >= t).sum() for t in row] == [(m >= t).sum() for t in row1]


def _certified_path(pol, fit):
    """The path certification walks from a fitted learned policy: DART's share scaling, the score's price path."""
    return scale_family(pol, fit) if pol.name == "dart" else price_family(pol, fit)


@pytest.mark.parametrize("name", ["dart", "score"])
def test_candidate_path_is_monotone_in_macs_and_keeps_every_exit(name):
    """The certified path of a fitted policy on the fit split: MACs fall with every step, and every exit
    that the fit-split winner uses (the score policy's price path: every exit) keeps leaving samples at every
    candidate but the static one."""
    fit = synthetic_trace(2000, "nested", seed=5)
    pol = make_policy(name, beta_opt=0.1).fit(fit)
    fam = _certified_path(pol, fit)
    macs = [evaluate(p, fit)["macs_per_image"] for _, p in fam]
    assert macs[0] == pytest.approx(float(fit.exit_macs[-1])) and all(a >= b - 1e-6 for a, b in zip(macs, macs[1:]))
    if name == "score":  # the price path runs from the static network to every sample leaving at the first exit
        assert macs[-1] == pytest.approx(float(fit.exit_macs[0]))
    used = [i for i, row in enumerate(pol.tau_) if row[0] < math.inf] if name == "dart" else range(fit.num_exits - 1)
    assert used
    for _, p in fam[1:]:
        assert all(p.tau_[i][0] < math.inf for i in used)


@pytest.mark.parametrize("seed", range(10))
def test_price_path_thresholds_fall_together_and_price_each_exit_by_its_saving(seed):
    """Property over random exit costs: price 0 is static; above it every exit has a finite threshold, every
    threshold falls as the price rises, and at one price an earlier exit (it saves more) admits a higher risk."""
    rng = np.random.default_rng(seed)
    macs = np.cumsum(rng.random(int(rng.integers(2, 8))) + 0.01)
    prev = None
    for lam in PRICES:
        tau = [row[0] for row in price_thresholds(macs, lam)]
        assert len(tau) == len(macs) - 1
        if lam == 0:
            assert all(t == math.inf for t in tau)
        else:
            assert all(t < math.inf for t in tau) and all(a <= b for a, b in zip(tau, tau[1:]))
        if prev is not None:
            assert all(a <= b for a, b in zip(tau, prev))
        prev = tau


def test_score_model_reads_fit_rows_only():
    """Scrambling every certification row leaves the learned score model unchanged."""
    cal = synthetic_trace(5000, "nested", seed=6)
    fit, cert = split_fit_cert(cal, 0.4, seed=3)
    pol, rec = certify("score", cal, 0.5, 0.95, seed=3)
    cert_rows = np.isin(cal.index, cert.index)
    rng = np.random.default_rng(0)
    probs = cal.probs.copy()
    probs[cert_rows] = rng.dirichlet(np.ones(cal.num_classes), (int(cert_rows.sum()), cal.num_exits)).astype(np.float32)
    alpha = np.where(cert_rows, rng.random(cal.n), cal.alpha)
    scrambled = Trace(probs, cal.labels, cal.index, cal.exit_macs, alpha, cal.meta)
    pol2, rec2 = certify("score", scrambled, 0.5, 0.95, seed=3)
    for k in ("mean_", "scale_", "coef_", "intercept_"):
        np.testing.assert_array_equal(np.asarray(getattr(pol, k)), np.asarray(getattr(pol2, k)))


def test_too_little_data_and_nothing_certifiable():
    small = synthetic_trace(800, "nested", seed=3)
    with pytest.raises(ConfigError, match="at least 598 certification samples"):
        certify("dart", small, 0.5, 0.95)
    with pytest.raises(ConfigError, match="at least 598"):
        calibrate("threshold", small.subset(np.arange(500)), max_drop=0.5, confidence=0.95)
    # every early exit is wrong where the final one is right: nothing but the static network is certifiable
    n, k = 3000, 3
    labels = np.arange(n) % k
    pred = np.stack([(labels + 1) % k, labels], 1)
    t = Trace(probs_from(np.full((n, 2), 0.9), pred, k), labels, np.arange(n), [10, 20], alpha=np.linspace(0, 1, n),
              meta={"split": "cal", "static_macs": 20})
    pol, rec = certify("dart", t, 0.5, 0.95)
    assert pol.name == "static" and not rec["guarantee"]["certified"]
    assert "not certifiable at this budget" in rec["guarantee"]["statement"]
    pol, rec = certify("threshold", t, 0.5, 0.95)  # certified, but only thresholds above every confidence seen
    assert (simulate(pol, t)[0] == 1).all()


def test_options_and_bad_targets():
    cal = synthetic_trace(3000, "independent", seed=4)
    _, hb = certify("threshold", cal, 1.0, 0.95, risk="new-errors", bound="hb")
    _, ex = certify("threshold", cal, 1.0, 0.95, risk="new-errors")
    assert "Hoeffding-Bentkus" in hb["guarantee"]["method"] and "binomial" in ex["guarantee"]["method"]
    assert evaluate(make_policy("threshold", **hb["params"]), cal)["mac_fraction"] >= \
        evaluate(make_policy("threshold", **ex["params"]), cal)["mac_fraction"] - 1e-12  # HB is the more cautious
    _, crc = certify("dart", cal, 1.0, 0.95, in_expectation=True)
    assert "conformal risk control" in crc["guarantee"]["method"] and "in expectation" in crc["guarantee"]["statement"]
    for bad in (dict(max_drop=-1), dict(max_drop=math.nan), dict(confidence=1.2), dict(risk="x"), dict(bound="y")):
        args = {"max_drop": 1.0, "confidence": 0.95, **bad}
        with pytest.raises(ConfigError):
            certify("threshold", cal, args.pop("max_drop"), args.pop("confidence"), **args)
    with pytest.raises(ConfigError, match="--max-drop"):
        calibrate("threshold", cal, max_drop=math.nan)


# -- threshold semantics --------------------------------------------------------------------------
def test_saturated_confidences_leave():
    """Exits whose softmax saturates at exactly 1.0: the DP's read-off (bins include their lower edge)
    and the decision rule (conf >= tau) agree, so the exits it chose do fire."""
    n, k = 1000, 10
    rng = np.random.default_rng(0)
    labels = rng.integers(0, k, n)
    easy = np.arange(n) < 700
    conf0 = np.where(easy, 1.0, rng.uniform(0.3, 0.6, n))
    pred0 = np.where(easy, labels, (labels + 1) % k)
    probs = np.stack([probs_from(conf0, pred0, k), probs_from(np.full(n, 1.0), labels, k)], 1)
    assert (probs[easy, 0].max(1) == 1.0).all()
    t = Trace(probs, labels, np.arange(n), [10, 100], alpha=rng.random(n), meta={"split": "cal", "static_macs": 100})
    for refine in (False, True):
        pol = make_policy("dart", beta_opt=0.1, refine=refine).fit(t)
        exits, _ = simulate(pol, t)
        assert (exits[easy] == 0).all() and (exits[~easy] == 1).all()
    pol.tau_ = [[math.inf] * pol.alpha_bins]  # +inf never leaves, not even at confidence 1.0
    assert (simulate(pol, t)[0] == 1).all()


# -- the refined DP -------------------------------------------------------------------------------
def _objective(pol, t, beta):
    r = evaluate(pol, t)
    return r["accuracy"] - beta * r["mac_fraction"]


@pytest.mark.parametrize("kind", ["two-type", "nested"])
@pytest.mark.parametrize("seed", range(4))
def test_refined_objective_at_least_the_dp(kind, seed):
    t = synthetic_trace(1500, kind, seed=seed)
    for beta in (0.0, 0.05, 0.2, 0.5):
        for bd in (0.0, 0.1):
            dp = make_policy("dart", beta_opt=beta, beta_diff=bd, refine=False).fit(t)
            ref = make_policy("dart", beta_opt=beta, beta_diff=bd).fit(t)
            assert _objective(ref, t, beta) >= _objective(dp, t, beta) - 1e-12


def test_refined_dp_meets_a_budget_the_plain_dp_misses():
    t = synthetic_trace(3000, "nested", seed=1)
    _, plain = calibrate("dart", t, max_drop=0.5, refine=False)
    _, refined = calibrate("dart", t, max_drop=0.5)
    assert not plain["budget_met"] and plain["calibration"]["drop_points"] > 0.5
    assert refined["budget_met"] and refined["calibration"]["drop_points"] <= 0.5


# -- coverage on the generator ---------------------------------------------------------------------
def test_generator_truths():
    for kind in ("nested", "independent", "two-type"):
        t = synthetic_trace(20000, kind, seed=0)
        acc = t.exit_accuracy()
        assert acc[-1] >= acc[0] and 0.6 < acc[-1] < 0.95
    nested = synthetic_trace(5000, "nested", seed=0).correct
    assert (nested[:, 1:] >= nested[:, :-1]).all()  # right once, right deeper
    indep = synthetic_trace(5000, "independent", seed=0).correct
    assert (indep[:, 1:] < indep[:, :-1]).any()


@pytest.mark.slow
@pytest.mark.parametrize("risk", ["drop", "new-errors"])
def test_population_coverage_threshold(risk):
    """200 calibration draws, truth on 100,000 fresh samples: at most 15 may exceed the budget."""
    res = population_coverage("threshold", "nested", 0.5, 0.95, risk, draws=200, n_truth=100_000)
    assert res["exceed"] <= MAX_EXCEED and res["certified"] >= 150


@pytest.mark.slow
@pytest.mark.parametrize("policy, kind", [("dart", "nested"), ("score", "nested")])
def test_population_coverage_learned_paths_short(policy, kind):
    """DART and the learned score on 30 draws (the full 200-draw checks, nested and independent, are
    `dart-ee guarantee --synthetic KIND`, recorded in BENCHMARKS 0.0 and 0.1): P(Bin(30, 0.05) >= 5) = 0.016."""
    res = population_coverage(policy, kind, 0.5, 0.95, "drop", draws=30, n_truth=50_000)
    assert res["exceed"] <= 4 and res["certified"] >= 20
    truth = synthetic_trace(50_000, "nested", seed=10**6, split="test")
    assert true_risk(make_policy("static").fit(synthetic_trace(10, "nested")), truth, "drop") == 0


# -- smaller defects, each pinned ------------------------------------------------------------------
def test_first_rejected_p_value_after_a_static_reset():
    """When the last accepted candidate cannot leave early (certify returns the static network), the record's
    first rejected p-value is the one after it, not the first candidate's."""
    from dart_ee.calibration.certify import certify_split

    n, k = 3000, 3  # every early exit wrong where the final one is right: no candidate that leaves can pass
    labels = np.arange(n) % k
    pred = np.stack([(labels + 1) % k, labels], 1)
    t = Trace(probs_from(np.full((n, 2), 0.9), pred, k), labels, np.arange(n), [10, 20], alpha=np.linspace(0, 1, n),
              meta={"split": "cal", "static_macs": 20})
    family = [({"tau": tau}, make_policy("threshold", tau=tau).fit(t)) for tau in (1.0, 0.5)]
    pol, rec = certify_split("threshold", t, t, 0.5, 0.95, family=family, data_free=True)
    g = rec["guarantee"]
    assert pol.name == "static" and g["candidate_index"] == -1 and g["p_value"] is None
    assert g["p_value_first_rejected"] == pytest.approx(1.0)  # the leaving candidate's, not the never-leaving one's 0


def test_in_expectation_needs_no_confidence():
    cal = synthetic_trace(3000, "independent", seed=4)
    pol, rec = calibrate("threshold", cal, max_drop=1.0, in_expectation=True)
    g = rec["guarantee"]
    assert g["confidence"] is None and g["delta"] is None and "in expectation" in g["statement"]


@pytest.mark.parametrize("name", ["dart", "threshold"])
def test_split_design_reference_excludes_the_cert_samples(name):
    """The 'split' design's reference risk is measured on the samples that neither fitted nor chose the policy; the
    data-free threshold certifies on fit and cert together, so neither part is in its reference either."""
    from dart_ee.calibration.coverage import resplit_coverage

    cal, test = synthetic_trace(1500, "nested", seed=1), synthetic_trace(1500, "nested", seed=2, split="test")
    res = resplit_coverage(cal, test, name, 20.0 if name == "dart" else 2.0, resplits=3, n_fit=600, n_cert=900)
    assert res["split"]["reference"] == "rest"
    for row in res["split"]["rows"]:  # the rest (1,500) is the test part, and the reference is that same part
        assert row["true_risk_points"] == pytest.approx(row["test_drop_points"])


@pytest.mark.parametrize("name", ["dart", "score", "threshold"])
def test_path_predictions_equal_simulate(name):
    """The fast replay of a certification path makes exactly the decisions ``simulate`` (the runtime's walk) makes."""
    from dart_ee.calibration.certify import knob_sequence, path_predictions

    fit, cert = synthetic_trace(1500, "independent", seed=9), synthetic_trace(2000, "independent", seed=10)
    if name == "threshold":  # its whole grid, and taus equal to confidences that occur (ties)
        fam = knob_sequence(name, fit, {}) + [({}, make_policy(name, tau=float(c)).fit(fit)) for c in cert.conf[:40, 0]]
    else:
        fam = _certified_path(make_policy(name, beta_opt=0.1).fit(fit), fit)
    predict = path_predictions(fam, cert)
    for _, pol in fam[::7]:
        np.testing.assert_array_equal(predict(pol), simulate(pol, cert)[1])


def test_an_edited_policy_is_never_reported_as_certified(tmp_path):
    """The certificate seals the fields it certified: change tau (or anything that routes) and the file certifies nothing."""
    from dart_ee.policies import EDITED, certificate

    cal = synthetic_trace(3000, "nested", seed=11)
    pol, rec = calibrate("threshold", cal, max_drop=1.0, confidence=0.95)
    path = pol.save(tmp_path / "t.json", calibration=rec)
    d = json.loads(path.read_text())
    assert certificate(d)["certified"] and certificate(d)["statement"] == rec["guarantee"]["statement"]
    d["params"]["tau"] = -1.0
    assert not certificate(d)["certified"] and certificate(d)["statement"] == EDITED
    d = json.loads(path.read_text())
    del d["calibration"]["guarantee"]["policy_digest"]  # a hand-made certificate without the seal
    assert not certificate(d)["certified"]
    dart, rec = certify("dart", cal, 1.0, 0.95)
    d = json.loads(dart.save(tmp_path / "d.json", calibration=rec).read_text())
    assert certificate(d)["certified"] == rec["guarantee"]["certified"]
    d["fitted"]["tau_"][0][0] = float("nan")
    assert not certificate(d)["certified"]


def test_an_exit_with_no_unsafe_fit_sample_still_ranks_its_samples():
    """Exit 2 is the final exit's twin, so no fit sample is unsafe there and its logistic model has nothing to learn.
    Its score must still rank the samples (it was one constant, exactly 1.0 in float32, for all of them), so that
    the share scaling opens the exit step by step; the path then certifies."""
    from scipy import stats

    from dart_ee.calibration.certify import exit_scores

    t = synthetic_trace(1500, "nested", seed=3)
    probs = t.probs.copy()
    probs[:, 1] = probs[:, -1]
    twin = Trace(probs, t.labels, t.index, t.exit_macs, t.alpha, t.meta)
    scores = exit_scores(make_policy("score").fit(twin), twin)[:, 1]
    assert len(np.unique(scores)) > twin.n // 2 and scores.max() < 1.0  # ranked, and never saturated
    assert stats.spearmanr(scores, twin.conf[:, 1]).statistic > 0.999  # by the confidence
    pol, rec = certify("score", twin, 2.0, 0.95)
    assert rec["guarantee"]["certified"] and rec["calibration"]["mac_reduction"] > 0.5
