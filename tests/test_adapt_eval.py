"""Adaptation measured honestly: replay equals the runtime, settings are chosen without test data,
the matched-compute baseline spends what adaptive DART spent, and the paper's updates act."""

import numpy as np
import pytest
import torch

from dart_ee.adapt import settings as adapt_settings
from dart_ee.adapt import study as adapt_eval
from dart_ee.adapt import tuning as adapt_tuning
from dart_ee.adapt.controller import make_controller
from dart_ee.adapt.study import StreamSource, evaluate_stream, matched_compute, trace_stream
from dart_ee.calibration.calibrate import calibrate
from dart_ee.calibration.evaluation import TraceReplay, simulate
from dart_ee.config import ControllerSettings
from dart_ee.core.errors import ArtifactError
from dart_ee.data.shift import FAMILIES, make_stream
from dart_ee.runs.run import Run
from dart_ee.runtime.eager import EarlyExitRunner

TINY_GRID = {"shift_gate": [0.5, 1.0], "audit_share": [0.02, 0.2]}


@pytest.fixture(scope="module")
def setup(trained_run, tmp_path_factory):
    policy = calibrate("dart", trained_run["cal"], max_drop=3.0)[0]
    path = tmp_path_factory.mktemp("pol") / "dart.json"
    policy.save(path, calibration={"target": {"max_drop": 3.0}})
    return policy, path


def test_controller_decides_alike_on_the_runtime_and_on_a_replayed_trace(trained_run, setup):
    policy, path = setup
    run = Run(trained_run["run"])
    model, est = run.model(), run.estimators()
    stream = make_stream(trained_run["images"].numpy(), np.arange(300) % 10, "noise", 0.1, 200, 200, seed=1)
    trace = trace_stream(model, est, stream)
    settings = ControllerSettings(audit_share=0.3, update_every=1, window=150, ucb=True, shift_gate=0.25)
    live = make_controller(EarlyExitRunner(model, _copy(policy), est),
                           trained_run["cal"], settings, seed=3)
    replay = make_controller(TraceReplay(_copy(policy), trace), trained_run["cal"], settings, seed=3)
    for s in range(0, 400, 50):
        a, ma = live.process(stream.x[s: s + 50])
        b, mb = replay.process(torch.arange(s, s + 50))
        assert torch.equal(a.exit, b.exit) and torch.equal(a.pred, b.pred) and torch.equal(ma, mb)
    assert live.history == replay.history and live.shifted == replay.shifted and live.history


def test_risk_control_decides_alike_on_the_runtime_and_on_a_replayed_trace(trained_run, setup):
    from dart_ee.adapt.risk import RiskController
    from dart_ee.config import RiskSettings
    from dart_ee.data.datasets import to_float

    policy, _ = setup
    run = Run(trained_run["run"])
    model, est = run.model(), run.estimators()
    stream = make_stream(trained_run["images"].numpy(), np.arange(300) % 10, "noise", 1.0, 100, 300, seed=2)
    trace = trace_stream(model, est, stream)
    # a tight budget and a large step: theta moves within this short stream; a touchy shift guard rides along,
    # with a low floor (a high one would stop every disagreement, and theta with them)
    settings = RiskSettings(audit_rate=0.5, step=0.05, guard_threshold=8.0, guard_floor=0.05)
    live, replay = (RiskController.from_settings(_copy(policy), trained_run["cal"], 0.1, settings, seed=4)
                    for _ in range(2))
    runner = EarlyExitRunner(model, _copy(policy), est)
    thetas, alarms = [], []
    for s in range(0, 400, 50):
        a, audit = live.run(runner, to_float(stream.x[s: s + 50]))
        b = replay.process(trace.subset(np.arange(s, s + 50)))
        assert np.array_equal(a.exit.numpy(), b["exit"]) and np.array_equal(a.pred.numpy(), b["pred"])
        assert np.array_equal(audit, b["audited"]) and live.theta == replay.theta
        assert live.guard is not None and replay.guard is not None
        assert live.guard.state_dict() == pytest.approx(replay.guard.state_dict(), rel=1e-5, abs=1e-5)
        thetas.append(live.theta)
        alarms.append(live.guard.alarm)
    assert max(thetas) > 0, "theta moved"
    assert any(alarms), "the guard was raised"


def _copy(policy):
    import copy

    return copy.deepcopy(policy)


def test_streams_share_their_traced_clean_part(trained_run):
    run = Run(trained_run["run"])
    src = StreamSource(trained_run["run"], "test")
    for family in ("impulse", "jpeg"):
        joined, start = src.stream(family, FAMILIES[family].levels[2], 120, 90, seed=2, batch_size=50)
        whole = trace_stream(run.model(), run.estimators(), make_stream(src.images.x, src.images.y, family,
                                                                          FAMILIES[family].levels[2], 120, 90, seed=2))
        assert start == 120 and joined.n == whole.n == 210 and np.array_equal(joined.labels, whole.labels)
        np.testing.assert_allclose(joined.probs, whole.probs, atol=1e-5)
        np.testing.assert_allclose(joined.alpha, whole.alpha, atol=1e-6)


def test_matched_compute_spends_what_it_is_asked(trained_run, setup):
    policy, _ = setup
    test = trained_run["test"]
    for target in (0.6, 0.8):
        m = matched_compute(policy, test, target)
        assert abs(m["mac_fraction"] - target) < 0.05, m
    assert matched_compute(policy, test, 0.8)["scale"] > matched_compute(policy, test, 0.6)["scale"]


def test_tuning_reads_no_test_sample(trained_run, setup, monkeypatch, tmp_path):
    _, path = setup
    real_images, real_trace = Run.images, Run.trace

    def images(self, split, data_dir=None):
        assert split == "cal", f"tuning read the {split} split's images"
        return real_images(self, split, data_dir)

    def trace(self, split):
        assert split == "cal", f"tuning read the {split} trace"
        return real_trace(self, split)

    monkeypatch.setattr(Run, "images", images)
    monkeypatch.setattr(Run, "trace", trace)
    rec = adapt_tuning.tune(trained_run["run"], path, grid=TINY_GRID, n=60, batch_size=20)
    assert rec["chosen_on"]["split"] == "cal" and rec["candidates"] >= 3 and rec["search"] == "coordinate"
    assert {r["family"] for r in rec["chosen_streams"]} == set(adapt_tuning.CHOOSE)
    assert not set(rec["chosen_on"]["families"]) & {n for n, f in FAMILIES.items() if f.role == "report"}
    risk = rec["risk"]  # the online risk controller's settings: chosen on the same calibration-split streams
    assert {r["family"] for r in risk["streams"]} == set(adapt_tuning.CHOOSE)
    assert risk["settings"]["audit_rate"] in adapt_tuning.RISK_GRID["audit_rate"]
    assert risk["settings"]["step"] in adapt_tuning.RISK_GRID["step"]
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    import shutil

    shutil.copytree(trained_run["run"], run_dir)
    adapt_settings.save_settings(run_dir, rec)
    settings, source = adapt_settings.load_settings(run_dir)
    assert settings.model_dump() == rec["settings"] and source["chosen_on"]["split"] == "cal"
    assert adapt_settings.load_risk_settings(run_dir)[0].model_dump() == risk["settings"]
    assert adapt_settings.is_current(run_dir, path)
    (run_dir / "adapt.json").write_text('{"format": "other"}')
    with pytest.raises(ArtifactError, match="adapt-tune"):
        adapt_settings.load_settings(run_dir)


def test_class_updates_fire_under_a_label_prior_shift(trained_run, setup):
    """Eq 13/14 act when a stream turns to the classes whose early exits are most often wrong."""
    policy, path = setup
    cal = trained_run["cal"]
    classes = adapt_eval.hard_classes(policy, cal)
    exits, preds = simulate(policy, cal)
    early = exits < cal.num_exits - 1
    err = {k: float((preds[early & (cal.labels == k)] != k).mean()) for k in range(10) if (early & (cal.labels == k)).any()}
    assert min(err[k] for k in classes) >= max(v for k, v in err.items() if k not in classes) - 1e-12
    src = StreamSource(trained_run["run"], "test")
    trace, start = src.stream("class-prior", 0.9, 150, 450, seed=0, classes=classes, batch_size=30)
    s = ControllerSettings(audit_share=0.5, update_every=1, window=200, z_gate=0.5, shift_guard=False)
    rec = evaluate_stream(policy, cal, trace, start, s, 3.0, batch_size=30)
    assert rec["updates_fired"]["eq13"] > 0 and rec["updates_fired"]["eq14"] > 0
    assert set(rec["totals"]) == {"full", "frozen", "adaptive", "matched"}
    assert abs(rec["totals"]["matched"]["shifted"]["mac_fraction"]
               - rec["totals"]["adaptive"]["shifted"]["mac_fraction"]) < 0.05
