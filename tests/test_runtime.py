import numpy as np
import pytest
import torch

from dart_ee.calibration.calibrate import calibrate
from dart_ee.calibration.evaluation import aligned, simulate
from dart_ee.core.errors import ConfigError, InputError
from dart_ee.difficulty.estimators import load_estimators
from dart_ee.policies import POLICIES, make_policy
from dart_ee.runtime.eager import EarlyExitRunner
from dart_ee.runtime.queued import QueuedRunner
from dart_ee.training.train import load_model

_FITTED: dict = {}  # calibration is deterministic: each (policy, trace) is fitted once per session


def _fitted(name, cal):
    """``name`` calibrated on ``cal`` at a 2-point budget (once per policy, alpha source and trace)."""
    key = (name, cal.meta.get("difficulty"), cal.meta.get("inputs_fingerprint"), cal.n, cal.exit_macs.tobytes(),
           None if cal.alpha is None else cal.alpha.tobytes())
    if key not in _FITTED:
        _FITTED[key] = (make_policy(name).fit(cal) if name == "static" else
                        calibrate(name, cal, max_drop=2.0, tune_beta_diff=name == "dart")[0])
    return _FITTED[key]


CASES = [(name, "paper") for name in sorted(POLICIES)] + [("dart", "learned")]


@pytest.mark.parametrize("kind", ["eager", "queued"])
@pytest.mark.parametrize("name,alpha", CASES)
@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_runners_match_trace_evaluation(trained_run, kind, name, alpha, batch_size):
    """Both runners give the trace's exits and predictions; 300 images: every stage's last batch is partial."""
    cal = trained_run["cal"].with_alpha(f"alpha_{alpha}")
    test = trained_run["test"].with_alpha(f"alpha_{alpha}")
    policy = _fitted(name, cal)
    exits, preds = simulate(policy, test)
    model = load_model(trained_run["run"] / "model.pt", optimize=True)
    est = load_estimators(trained_run["run"] / "difficulty.pt")
    if kind == "eager":
        out = EarlyExitRunner(model, policy, est).run(trained_run["images"], batch_size)
    else:
        out = QueuedRunner(model, policy, est, batch_size=batch_size).run(trained_run["images"])
    np.testing.assert_array_equal(out.exit.numpy(), exits)
    np.testing.assert_array_equal(out.pred.numpy(), preds)
    if policy.uses_alpha:
        # the score it was fitted on (the learned score policy reads the learned estimator's when the trace holds it)
        np.testing.assert_allclose(out.alpha.numpy(), aligned(policy, test).alpha, atol=1e-6)
    if name != "static":
        assert len(np.unique(exits)) > 1 or name in ("patience",)  # the test exercises real early exits


def test_runtime_bad_input(trained_run):
    model = load_model(trained_run["run"] / "model.pt", optimize=True)
    runner = EarlyExitRunner(model, make_policy("threshold", tau=0.5).fit(trained_run["cal"]))
    for bad, match in ((torch.rand(2, 3, 28, 28), "shape"), (torch.rand(0, 1, 28, 28), "empty"),
                       (torch.full((2, 1, 28, 28), float("nan")), "NaN"), (torch.rand(1, 28, 28), "shape")):
        with pytest.raises(InputError, match=match):
            runner(bad)
    dart = calibrate("dart", trained_run["cal"], max_drop=1.0, beta_diff=0.3)[0]
    with pytest.raises(ConfigError, match="estimator"):
        EarlyExitRunner(model, dart)
