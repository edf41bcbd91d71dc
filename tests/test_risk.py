"""Online risk control (dart_ee.adapt.risk): after a change point that makes the early exits wrong, the running
disagreement with the full network comes back under D within the bound the guarantee states; on a clean stream
the certified policy stays in force (no MACs beyond the audits); the audit marks never read a sample."""

import numpy as np
import pytest

from dart_ee.adapt.guard import ShiftGuard, false_alarm_every
from dart_ee.adapt.risk import RiskController, risk_over, running_drop, slack
from dart_ee.calibration.certify import certify
from dart_ee.calibration.coverage import synthetic_trace
from dart_ee.calibration.evaluation import exit_costs, simulate
from dart_ee.config import RiskSettings
from dart_ee.core.errors import ConfigError
from dart_ee.trace import Trace

D_CERT, D = 1.0, 2.0  # the policy is certified at 1 point; the controller holds the disagreement at 2 points
Q, STEP, BATCH = 0.2, 0.002, 16
AUDITS = RiskSettings(audit_rate=Q, step=STEP, update_every=BATCH, guard_threshold=None)  # audits alone
GUARDED = AUDITS.model_copy(update={"guard_threshold": RiskSettings().guard_threshold})


@pytest.fixture(scope="module")
def certified():
    cal = synthetic_trace(5000, "nested", seed=0)
    pol, rec = certify("score", cal, D_CERT, 0.95)
    assert rec["guarantee"]["certified"]
    return pol, cal


def _joined(a: Trace, b: Trace) -> Trace:
    return Trace(np.concatenate([a.probs, b.probs]), np.concatenate([a.labels, b.labels]), np.arange(a.n + b.n),
                 a.exit_macs, np.concatenate([a.alpha, b.alpha]), dict(a.meta))


def _early_exits_wrong(t: Trace) -> Trace:
    """The same confidences, but every early exit names another class (the classes rolled by one)."""
    probs = t.probs.copy()
    probs[:, :-1] = np.roll(probs[:, :-1], 1, axis=2)
    return Trace(probs, t.labels, t.index, t.exit_macs, t.alpha, dict(t.meta))


def _disagree(trace: Trace, exits: np.ndarray, preds: np.ndarray) -> np.ndarray:
    return (exits < trace.num_exits - 1) & (preds != trace.preds[:, -1])


def test_after_a_change_point_the_running_disagreement_comes_back_under_d_within_the_bound(certified):
    pol, cal = certified
    t0 = 4000
    stream = _joined(synthetic_trace(t0, "nested", seed=1, split="test"),
                     _early_exits_wrong(synthetic_trace(16000, "nested", seed=2, split="test")))
    ctrl, out = risk_over(pol, cal, stream, D, AUDITS, seed=3)
    d = _disagree(stream, out["exit"], out["pred"]).astype(float)
    e = (out["audited"] & (out["pred"] != stream.preds[:, -1])) / Q  # the weighted disagreement the controller saw
    target = D / 100
    for end in range(t0 + BATCH, stream.n + 1, BATCH):  # every batch boundary after the change
        n = end - t0
        assert e[t0:end].mean() <= target + slack(n, STEP, Q, BATCH) + 1e-12, n  # deterministic: always holds
    n = stream.n - t0
    bound = target + slack(n, STEP, Q, BATCH, delta=0.01)
    assert d[t0:].mean() <= bound
    assert d[-4000:].mean() <= 1.5 * target  # and it settles at D, not merely under the loose bound
    f_exit, f_pred = simulate(pol, stream)
    frozen = _disagree(stream, f_exit, f_pred)[t0:].mean()
    assert frozen > 5 * bound, "the frozen policy breaks the budget: the test can fail"
    # the drop against the full network is at most the disagreement, whatever the labels
    correct, full = out["pred"] == stream.labels, stream.preds[:, -1] == stream.labels
    assert running_drop(full, correct, t0)[-1] <= d[t0:].mean() + 1e-12
    assert ctrl.theta > 0.3, "it moved towards the full network"


def test_on_a_clean_stream_the_certified_policy_stays_in_force(certified):
    pol, cal = certified
    stream = synthetic_trace(20000, "nested", seed=4, split="test")
    ctrl, out = risk_over(pol, cal, stream, D, AUDITS, seed=5)
    f_exit, f_pred = simulate(pol, stream)
    assert _disagree(stream, f_exit, f_pred).mean() < D / 100  # clean data is within the budget
    static = float(stream.meta["static_macs"])
    beyond_audits = out["macs"] - np.where(out["audited"], static, 0.0)
    frozen = exit_costs(pol, stream)[f_exit]
    # an audited disagreement lifts theta by step / q, which then drains at step * D per sample: theta is above 0
    # about d / D of the time, but only by a little (on average d / D * step / (2 q)), so the policy in force
    # stays the certified one or its nearest neighbour on the path
    assert out["theta"].mean() <= 0.01
    assert (beyond_audits.mean() - frozen.mean()) / static <= 0.005, "no MACs beyond the audits, to half a point"
    assert out["audited"].mean() <= Q


def test_audit_marks_are_drawn_without_reading_the_samples(certified):
    pol, cal = certified
    a = synthetic_trace(640, "nested", seed=6, split="test")
    b = _early_exits_wrong(synthetic_trace(640, "nested", seed=7, split="test"))
    _, out_a = risk_over(pol, cal, a, D, AUDITS, seed=8)
    _, out_b = risk_over(pol, cal, b, D, AUDITS, seed=8)
    assert np.array_equal(out_a["marked"], out_b["marked"]), "the marks depend on the samples"
    assert not np.array_equal(out_a["exit"], out_b["exit"]) or not np.array_equal(out_a["pred"], out_b["pred"])
    assert abs(out_a["marked"].mean() - Q) < 0.05


def test_theta_zero_is_the_certified_policy_and_one_the_full_network(certified):
    pol, cal = certified
    ctrl = RiskController(pol, cal, D)
    assert ctrl.policy is pol
    ctrl.theta = 1.0
    exits, _ = simulate(ctrl.policy, cal)
    assert (exits == cal.num_exits - 1).all()
    ctrl.theta = 0.5  # thresholds only rise along the path: more conservative than the certified policy
    assert simulate(ctrl.policy, cal)[0].mean() >= simulate(pol, cal)[0].mean()
    state = ctrl.state_dict()
    ctrl.update(3, 16)
    ctrl.load_state_dict(state)
    assert ctrl.theta == 0.5 and ctrl.seen == 0


def test_only_a_scaled_policy_with_sane_settings_is_controlled(certified):
    pol, cal = certified
    thr, _ = certify("threshold", cal, D_CERT, 0.95)
    with pytest.raises(ConfigError, match="scaling path"):
        RiskController(thr, cal, D)
    for kw in ({"audit_rate": 0.0}, {"step": -1.0}, {"max_drop": 0.0}):
        with pytest.raises(ConfigError):
            RiskController(pol, cal, **{"max_drop": D, **kw})


def _first_exit_unsure(t: Trace, temperature: float = 3.0) -> Trace:
    """Early exits wrong (classes rolled) and the first exit's softmax flattened: a shift the first exit shows."""
    probs = _early_exits_wrong(t).probs.copy()
    flat = probs[:, 0] ** (1 / temperature)
    probs[:, 0] = flat / flat.sum(1, keepdims=True)
    return Trace(probs, t.labels, t.index, t.exit_macs, t.alpha, dict(t.meta))


def test_the_shift_guard_stops_early_exits_soon_after_a_shift_the_first_exit_shows(certified):
    pol, cal = certified
    t0, n = 4000, 4000
    stream = _joined(synthetic_trace(t0, "nested", seed=1, split="test"),
                     _first_exit_unsure(synthetic_trace(n, "nested", seed=2, split="test")))
    ctrl, out = risk_over(pol, cal, stream, D, GUARDED, seed=3)
    _, unguarded = risk_over(pol, cal, stream, D, AUDITS, seed=3)
    guard = ctrl.guard
    assert guard is not None
    delta = -guard.scores(stream.conf[t0:, 0]).mean()  # how far the shift moved the first exit's normal scores
    delay = (guard.threshold + 1.166) / (delta - guard.drift)  # Siegmund: samples until the alarm, on average
    assert delta > 2 * guard.drift and delay < 100, "the shift is one the guard is built to flag"
    early = (out["exit"] < stream.num_exits - 1)[t0:]
    assert early[int(3 * delay) + BATCH:].sum() == 0, "after the alarm (decided per update) nobody leaves early"
    d = _disagree(stream, out["exit"], out["pred"])[t0:].mean()
    d_audits = _disagree(stream, unguarded["exit"], unguarded["pred"])[t0:].mean()
    print(f"delta {delta:.2f}, delay {delay:.0f}, disagreement {d:.4f} guarded, {d_audits:.4f} audits alone")
    assert d < d_audits / 5, "the guard cuts the disagreements that audits alone let through"
    assert out["theta"][t0 + int(3 * delay) + BATCH:].min() >= guard.floor


def test_the_shift_guard_stays_quiet_in_distribution(certified):
    pol, cal = certified
    stream = synthetic_trace(20000, "nested", seed=4, split="test")
    ctrl, out = risk_over(pol, cal, stream, D, GUARDED, seed=5)
    assert ctrl.guard is not None and ctrl.guard.alarms == 0  # one false alarm per ~1.6e5 samples at the defaults
    assert false_alarm_every(0.25, 20.0) > 1e5
    _, audits_only = risk_over(pol, cal, stream, D, AUDITS, seed=5)
    assert np.array_equal(out["exit"], audits_only["exit"]), "with no alarm, the guard changes nothing"


def test_the_shift_guard_only_makes_the_policy_more_conservative(certified):
    pol, cal = certified
    guard = ShiftGuard(cal.conf[:, 0], drift=0.25, threshold=5.0, floor=0.5)
    ctrl = RiskController(pol, cal, D, guard=guard)
    guard.observe(np.full(200, cal.conf[:, 0].min()))  # far below the calibration confidences: the alarm
    assert guard.alarm and ctrl.conservativeness == 0.5 and ctrl.theta == 0.0
    ctrl.theta = 0.8
    assert ctrl.conservativeness == 0.8, "a raised guard never lowers theta"
    state = ctrl.state_dict()
    guard.observe(np.full(400, np.median(cal.conf[:, 0])))  # back in distribution: the alarm drops
    assert not guard.alarm
    ctrl.load_state_dict(state)
    assert guard.alarm
    for bad in ({"drift": 0.0}, {"threshold": -1.0}, {"floor": 1.5}):
        with pytest.raises(ConfigError):
            ShiftGuard(cal.conf[:, 0], **{"drift": 0.25, "threshold": 5.0, "floor": 1.0, **bad})
