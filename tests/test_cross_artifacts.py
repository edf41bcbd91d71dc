"""Artifacts that do not belong together are refused with one line naming both sides, never combined."""

import dataclasses
import errno
import os

import numpy as np
import pytest
from test_cli import invoke

from dart_ee.calibration.calibrate import calibrate
from dart_ee.calibration.evaluation import evaluate, simulate
from dart_ee.core.errors import ArtifactError
from dart_ee.trace import check_pair, save


def _fewer_exits(t, k):
    """A consistent trace of a network with k exits (its whole network ends at exit k)."""
    return dataclasses.replace(t, probs=t.probs[:, :k].copy(), exit_macs=t.exit_macs[:k].copy(),
                               meta=dict(t.meta, static_macs=int(t.exit_macs[k - 1])))


def test_policy_and_trace_with_different_exits_are_refused(trained_run, tmp_path):
    pol = calibrate("threshold", trained_run["cal"], max_drop=1.0)[0]
    short = _fewer_exits(trained_run["test"], 4)
    with pytest.raises(ArtifactError, match="fitted for 6 exits but the trace .* has 4"):
        evaluate(pol, short)
    pol.save(tmp_path / "t.json")
    save(dataclasses.replace(short, meta=dict(short.meta, split="test")), tmp_path / "short.npz")
    code, out = invoke("evaluate", "--trace", tmp_path / "short.npz", "--policy", tmp_path / "t.json")
    assert code == 2 and "fitted for 6 exits" in out and "Traceback" not in out


def test_traces_of_two_runs_are_not_combined(trained_run, tmp_path):
    cal, test = trained_run["cal"], trained_run["test"]
    other = dataclasses.replace(test, meta=dict(test.meta, config_fingerprint="0123456789abcdef", run="elsewhere"))
    with pytest.raises(ArtifactError, match="different runs .*config differs"):
        check_pair(cal, other)
    with pytest.raises(ArtifactError, match="exits"):
        check_pair(cal, _fewer_exits(test, 5))
    save(other, tmp_path / "other.npz")
    code, out = invoke("compare", "--cal", trained_run["cal_path"], "--test", tmp_path / "other.npz", "--max-drop", "1")
    assert code == 2 and "different runs" in out


def test_policy_reads_its_own_difficulty_score(trained_run):
    learned_cal = trained_run["cal"].with_alpha("alpha_learned")
    pol = calibrate("dart", learned_cal, max_drop=2.0, beta_diff=0.3)[0]
    assert pol.alpha_source_ == "learned"
    on_learned = simulate(pol, trained_run["test"].with_alpha("alpha_learned"))
    on_paper = simulate(pol, trained_run["test"].with_alpha("alpha_paper"))  # aligned to the policy's score
    np.testing.assert_array_equal(on_learned[0], on_paper[0])
    assert evaluate(pol, trained_run["test"].with_alpha("alpha_paper")) == \
        evaluate(pol, trained_run["test"].with_alpha("alpha_learned"))


@pytest.mark.parametrize("args,needle", [
    (["benchmark", "--batch-size", "0"], "--batch-size"), (["benchmark", "--images", "0"], "--images"),
    (["benchmark", "--repeats", "0"], "--repeats"), (["adapt", "--batch-size", "0"], "--batch-size"),
    (["adapt", "--clean", "0"], "--clean"), (["guarantee", "--resplits", "0"], "--resplits"),
    (["difficulty", "fit-weights", "--folds", "0"], "--folds"),
])
def test_numeric_options_have_minimums(args, needle):
    code, out = invoke(*args)
    assert code == 2 and needle in out and "Traceback" not in out


def test_benchmark_on_a_missing_gpu_is_a_clear_error(trained_run, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    pol = calibrate("threshold", trained_run["cal"], max_drop=1.0)[0]
    pol.save(tmp_path / "t.json")
    code, out = invoke("benchmark", "--run", trained_run["run"], "--policy", tmp_path / "t.json", "--device", "cuda")
    assert code == 2 and "torch sees no GPU" in out


def test_api_misuse_gets_clear_errors(trained_run, tmp_path):
    import torch

    from dart_ee.core.errors import ConfigError, InputError
    from dart_ee.models.net import create_model
    from dart_ee.policies import make_policy
    from dart_ee.runtime.eager import EarlyExitRunner
    from dart_ee.training.train import load_model

    with pytest.raises(ConfigError, match="unknown policy 'foo'"):
        calibrate("foo", None)
    with pytest.raises(ArtifactError, match="expected a calibration Trace"):
        calibrate("threshold", None, max_drop=1.0)
    with pytest.raises(ConfigError, match="width_mult"):
        create_model("alexnet", width_mult=float("nan"))
    runner = EarlyExitRunner(load_model(trained_run["run"] / "model.pt"), make_policy("threshold", tau=0.5))
    with pytest.raises(InputError, match="float32"):
        runner(torch.rand(2, 1, 28, 28, dtype=torch.float64))
    code, out = invoke("info", "--model", "alexnet", "--width-mult", "nan")
    assert code == 2 and "width_mult" in out
    (tmp_path / "afile").write_text("")
    code, out = invoke("calibrate", "--trace", trained_run["cal_path"], "--policy", "threshold", "--max-drop", "1",
                       "--out", tmp_path / "afile" / "x.json")
    assert code == 2 and "afile" in out and "Traceback" not in out
    code, out = invoke("train-speed", "--model", "foo")
    assert code == 2 and "unknown model 'foo'" in out


def test_artifacts_honour_the_umask(tmp_path):
    import os
    import stat

    from dart_ee.core import artifacts

    path = artifacts.write_json(tmp_path / "a.json", {"x": 1})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~artifacts._UMASK


def test_unwritable_cache_is_a_warning(tmp_path, monkeypatch, capsys):
    from conftest import make_idx_dataset

    from dart_ee.data.datasets import load_dataset

    make_idx_dataset(tmp_path / "data" / "mnist", n_train=20, n_test=10)
    (tmp_path / "cache").write_text("")  # a file where the cache folder should be: nothing can be written there
    monkeypatch.setenv("DART_CACHE", str(tmp_path / "cache"))
    train, test = load_dataset("mnist", tmp_path / "data")
    assert len(train) == 20 and len(test) == 10
    assert "cannot write the dataset cache" in capsys.readouterr().err


BAD_FITTED = [
    ("dart", lambda f: f.update(tau_=f["tau_"][:-1]), "'tau_' has shape"),
    ("dart", lambda f: f.update(tau_=[row[:-1] for row in f["tau_"]]), "'tau_' has shape"),
    ("dart", lambda f: f.update(coef_exit_="high"), "'coef_exit_'"),
    ("dart", lambda f: f.pop("conf_edges_"), "'conf_edges_' is missing"),
    ("dart", lambda f: f.update(num_exits_="6"), "'num_exits_' must be a positive integer"),
    ("branchynet", lambda f: f.update(thresholds_=f["thresholds_"][:2]), "'thresholds_' has shape"),
    ("rl", lambda f: f.update(q_table_=[[0.0, 1.0]]), "'q_table_' has shape"),
]


@pytest.mark.parametrize("name,corrupt,match", BAD_FITTED)
def test_policy_files_with_bad_fitted_fields(trained_run, tmp_path, name, corrupt, match):
    import json

    from dart_ee.policies import load_policy, make_policy

    pol = make_policy(name).set_params(**({"cost_weight": 0.1} if name == "rl" else {})).fit(trained_run["cal"])
    path = pol.save(tmp_path / "p.json")
    d = json.loads(path.read_text())
    corrupt(d["fitted"])
    path.write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match=match):
        load_policy(path)
    code, out = invoke("evaluate", "--trace", trained_run["test_path"], "--policy", path)
    assert code == 2 and "p.json" in out and "Traceback" not in out


@pytest.mark.parametrize("name,alpha", [("static", "paper"), ("threshold", "paper"), ("dart", "paper"),
                                        ("dart", "learned")])
def test_one_cost_rule_for_traces_and_the_runtime(trained_run, name, alpha):
    """The MACs a trace-based evaluation charges equal what the model and estimator (benchmark, adaptation) say."""
    from dart_ee.calibration.evaluation import exit_costs
    from dart_ee.difficulty.estimators import load_estimators
    from dart_ee.training.train import load_model

    cal, test = trained_run["cal"].with_alpha(f"alpha_{alpha}"), trained_run["test"]
    pol = calibrate(name, cal, max_drop=2.0)[0]
    model = load_model(trained_run["run"] / "model.pt", optimize=True)
    est = load_estimators(trained_run["run"] / "difficulty.pt")
    np.testing.assert_allclose(exit_costs(pol, test),
                               pol.leave_costs(model.exit_macs(), model.static_macs(), est.macs(model)))


def test_out_of_range_dart_parameters_and_empty_runs(trained_run):
    import torch

    from dart_ee.core.errors import ConfigError, InputError
    from dart_ee.policies import make_policy
    from dart_ee.runtime.eager import EarlyExitRunner
    from dart_ee.runtime.queued import QueuedRunner
    from dart_ee.training.train import load_model

    code, out = invoke("calibrate", "--trace", trained_run["cal_path"], "--policy", "dart", "--max-drop", "1",
                       "--set", "alpha_bins=0", "--out", "unused.json")
    assert code == 2 and "alpha_bins=0" in out
    with pytest.raises(ConfigError, match="conf_bins"):
        make_policy("dart", conf_bins=1).fit(trained_run["cal"])
    model, pol = load_model(trained_run["run"] / "model.pt"), make_policy("threshold", tau=0.5)
    empty = torch.zeros(0, 1, 28, 28, dtype=torch.uint8)
    for runner in (EarlyExitRunner(model, pol), QueuedRunner(model, pol)):
        with pytest.raises(InputError, match="no images"):
            runner.run(empty)
    stream = QueuedRunner(model, pol, batch_size=4)
    assert len(stream.push(empty).pred) == 0 and len(stream.finish().pred) == 0  # an empty piece is a no-op


def test_other_data_of_the_same_shape_is_refused(tmp_path):
    from conftest import make_idx_dataset, tiny_config

    from dart_ee.config import parse_config
    from dart_ee.core.errors import DataError
    from dart_ee.runs.tracing import trace_run
    from dart_ee.training.train import train

    make_idx_dataset(tmp_path / "a" / "mnist", n_train=80, n_test=20, seed=0)
    make_idx_dataset(tmp_path / "b" / "mnist", n_train=80, n_test=20, seed=5)  # same sizes, other digits
    train(parse_config(tiny_config(tmp_path / "a", epochs=1, batch_size=16)), tmp_path / "run")
    with pytest.raises(DataError, match="made from other data"):
        trace_run(tmp_path / "run", tmp_path / "b")
    assert not (tmp_path / "run" / "trace_cal.npz").exists()  # nothing was overwritten
    trace_run(tmp_path / "run", tmp_path / "a")  # the same data in its own folder is fine


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.ENOSPC])  # read-only folder or file system, full disk
def test_filesystem_errors_are_one_line_naming_the_path(trained_run, tmp_path, monkeypatch, code):
    def refuse(src, dst):
        raise OSError(code, os.strerror(code), str(dst))

    monkeypatch.setattr(os, "replace", refuse)  # the last step of every atomic artifact write
    out_file = tmp_path / "policy.json"
    rc, out = invoke("calibrate", "--trace", trained_run["cal_path"], "--policy", "threshold", "--max-drop", "1",
                     "--out", out_file)
    assert rc != 0 and "Traceback" not in out, out
    assert f"error: {out_file}: {os.strerror(code)}" in out, out
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind, nothing half-written


def test_out_naming_a_file_is_one_line(trained_run, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    rc, out = invoke("sweep", "--cal", trained_run["cal_path"], "--test", trained_run["test_path"], "--out", a_file)
    assert rc != 0 and "Traceback" not in out and str(a_file) in out, out
    assert a_file.read_text() == "not a folder"
