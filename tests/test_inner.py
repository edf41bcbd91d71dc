"""The inner choice of a certified policy's settings reads the fit split only, and certifies what it chose."""

import numpy as np
import pytest

from dart_ee.calibration.calibrate import calibrate
from dart_ee.calibration.certify import split_fit_cert
from dart_ee.calibration.coverage import synthetic_trace
from dart_ee.calibration.inner import certify_tuned, choose, settings
from dart_ee.core.errors import ConfigError
from dart_ee.trace import Trace


def _scrambled(cal: Trace, rows: np.ndarray, seed: int = 0) -> Trace:
    """``cal`` with the given rows' outputs and alpha replaced by noise (labels kept)."""
    rng = np.random.default_rng(seed)
    probs = cal.probs.copy()
    probs[rows] = rng.dirichlet(np.ones(cal.num_classes), (int(rows.sum()), cal.num_exits)).astype(np.float32)
    alpha = np.where(rows, rng.random(cal.n), cal.alpha)
    return Trace(probs, cal.labels, cal.index, cal.exit_macs, alpha, cal.meta)


def test_settings_keep_what_the_user_gave():
    assert ({}, "exact") in settings("dart", "drop", {}) and ({"alpha_bins": 1}, "mcnemar") in settings("dart", "drop", {})
    assert all(b == "exact" for _, b in settings("score", "new-errors", {}))  # 0/1 losses: the binomial
    assert all(p["alpha_bins"] == 2 for p, _ in settings("dart", "drop", {"alpha_bins": 2}))  # not searched


@pytest.mark.parametrize("name", ["dart", "score"])
def test_inner_choice_reads_no_cert_or_test_row(name):
    """Scrambling every cert row leaves the choice and its evidence unchanged (a test trace is never given to it).
    The chosen setting is the one certified, and the record shows why it won."""
    cal = synthetic_trace(1500, "nested", seed=4)
    _, cert = split_fit_cert(cal, 0.4, seed=2)
    pol, rec = certify_tuned(name, cal, 2.0, 0.95, seed=2, folds=1)
    _, rec2 = certify_tuned(name, _scrambled(cal, np.isin(cal.index, cert.index)), 2.0, 0.95, seed=2, folds=1)
    chosen = rec["inner_choice"]
    assert rec2["inner_choice"] == chosen
    assert {s["bound"] for s in chosen["settings"]} == {"exact", "mcnemar"} and chosen["folds"] == 1
    assert all(pol.get_params()[k] == v for k, v in chosen["params"].items())
    won = [s for s in chosen["settings"] if (s["params"], s["bound"]) == (chosen["params"], chosen["bound"])]
    assert won[0]["inner_macs_per_image"] == min(s["inner_macs_per_image"] for s in chosen["settings"])
    assert ("McNemar" in rec["guarantee"]["method"]) == (chosen["bound"] == "mcnemar")


def test_calibrate_passes_inner_folds_and_refuses_a_fixed_test():
    cal = synthetic_trace(1500, "nested", seed=5)
    pol, rec = calibrate("score", cal, max_drop=2.0, confidence=0.95, inner_folds=1)
    assert rec["inner_choice"]["folds"] == 1
    _, plain = calibrate("threshold", cal, max_drop=2.0, confidence=0.95, inner_folds=1)  # data-free: nothing to tune
    assert "inner_choice" not in plain
    with pytest.raises(ConfigError, match="picks the test itself"):
        calibrate("dart", cal, max_drop=2.0, confidence=0.95, inner_folds=1, bound="mcnemar")
    with pytest.raises(ConfigError, match="positive number"):
        choose("dart", cal, 1.0, folds=0)


def test_frontier_rows_for_the_inner_choice():
    """`sweep --resplits --inner-folds` adds "NAME (inner)" rows beside the defaults', with the test it chose."""
    from dart_ee.calibration.frontier import certified_points, summarize_frontier

    cal, test = synthetic_trace(1500, "nested", seed=7), synthetic_trace(1000, "nested", seed=8, split="test")
    rows = certified_points(cal, test, ("threshold", "score"), (2.0,), 0.95, "drop", inner_folds=1)
    assert [r["policy"] for r in rows] == ["threshold", "score", "score (inner)"]
    assert rows[-1]["bound"] in ("exact", "mcnemar") and "bound" not in rows[1]
    assert set(summarize_frontier(rows, 0.95, "drop")["table"]) == {"threshold", "score", "score (inner)"}


def test_a_malformed_calibration_record_is_refused():
    from dart_ee.calibration.record import is_certified, recorded
    from dart_ee.core.errors import ArtifactError

    assert recorded({"policy": "dart"}) is None
    with pytest.raises(ArtifactError, match="p.json: 'calibration' is not the record"):
        recorded({"calibration": {"target": "0.5"}}, "p.json")
    _, rec = calibrate("threshold", synthetic_trace(1500, "nested", seed=1), max_drop=2.0, confidence=0.95)
    assert recorded({"calibration": rec}) is rec and is_certified(rec) is rec["guarantee"]["certified"]
    _, loose = calibrate("threshold", synthetic_trace(500, "nested", seed=1), max_drop=2.0)
    assert is_certified(loose) is None  # an uncertified search certifies nothing
