import json

import pytest
from conftest import make_idx_dataset, tiny_config
from typer.testing import CliRunner

from dart_ee.cli import app
from dart_ee.config import parse_config
from dart_ee.pipeline import run_pipeline


@pytest.mark.slow
def test_run_pipeline_end_to_end(tmp_path):
    make_idx_dataset(tmp_path / "data" / "mnist", n_train=400, n_test=300)
    raw = tiny_config(tmp_path / "data", epochs=3, batch_size=16)
    raw["data"]["cal_fraction"] = 0.5
    raw["benchmark"] = {"images": 64, "repeats": 1, "latency_images": 4, "threads": 1}
    raw["adapt"] = {"families": ["impulse"], "levels": [1, 3], "clean": 150, "shifted": 150, "batch_size": 50}
    raw["single_exit_baseline"] = True
    cfg = parse_config(raw)
    res = run_pipeline(cfg, tmp_path / "run")
    out = tmp_path / "run"
    for f in ("results.json", "report.md", "tradeoff_curves.png", "alpha_histogram.png", "exit_by_difficulty_dart.png",
              "impulse_over_time.png", "impulse_coefficients.png", "class-prior_coefficients.png", "adapt.json",
              "adapt/study.json", "policies/dart.json"):
        assert (out / f).is_file(), f
    rec = json.loads((out / "results.json").read_text())
    assert {r["policy"] for r in rec["compare"]["rows"]} >= {"static", "dart", "threshold"}
    assert rec["git_revision"] and rec["torch"] and rec["config"]["name"] == "tiny"
    report = (out / "report.md").read_text()
    assert "Accuracy vs. computational savings" in report and "Table I" in report
    # 200 calibration digits cannot certify the 0.5-point budget: the report says so, and falls back
    assert rec["compare"]["mode"] == "certified" and "What the budget promises" in report
    assert "not certifiable with this calibration split" in json.dumps(rec["compare"]) and "Certified frontier" in report
    assert rec["compare_uncertified"]["mode"] == "uncertified" and (out / "policies" / "uncertified" / "dart.json").is_file()
    assert "Baseline (No EE" in report and rec["single_exit_baseline"]["exit_test_accuracy"]
    assert "Side by side with the paper's Table I (alexnet on mnist)" in report  # the paper's MNIST AlexNet row
    assert "original README's CIFAR-10 table" not in report  # that table is CIFAR-10 only
    # `dart-ee report` redraws the figures and the report from results.json alone
    (out / "report.md").unlink()
    (out / "impulse_coefficients.png").unlink()
    cli = CliRunner().invoke(app, ["report", "--run", str(out)])
    assert cli.exit_code == 0, cli.output
    assert (out / "report.md").read_text() == report and (out / "impulse_coefficients.png").is_file()
    assert "chosen by `dart-ee adapt-tune` on development streams from the calibration split" in report
    assert "| impulse | 3 (0.06) |" in report and "Eq 13 updates" in report
    # a second run finds every step's output and resumes without retraining
    again = run_pipeline(cfg, tmp_path / "run")
    assert again["training"] == res["training"]


@pytest.mark.slow
def test_run_killed_mid_pipeline_resumes_to_the_same_results(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import yaml

    make_idx_dataset(tmp_path / "data" / "mnist", n_train=400, n_test=300)
    raw = tiny_config(tmp_path / "data", epochs=3, batch_size=16)
    raw["data"]["cal_fraction"] = 0.5
    raw["benchmark"] = {"enabled": False}
    raw["adapt"] = {"families": ["impulse"], "levels": [2], "mechanisms": False, "clean": 150, "shifted": 150,
                    "batch_size": 50}
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))

    def start(out):
        return subprocess.Popen([sys.executable, "-m", "dart_ee", "run", "-c", str(cfg_path), "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))

    ref = start(tmp_path / "ref")
    assert ref.wait(timeout=600) == 0, ref.stdout.read().decode()
    victim = start(tmp_path / "killed")
    seen = []
    for line in iter(victim.stdout.readline, b""):
        seen.append(line.decode())
        if "impulse grade 2" in seen[-1]:
            break
    # killed in the last step, the adaptation study: the traces, policies and adaptation settings are on disk
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "".join(seen)
    again = start(tmp_path / "killed")
    out = again.communicate(timeout=600)[0].decode()
    assert again.returncode == 0, out
    assert "choosing the controller's settings" not in out, out  # the finished steps are reused, not redone
    a = json.loads((tmp_path / "ref" / "results.json").read_text())
    b = json.loads((tmp_path / "killed" / "results.json").read_text())
    for key in ("exit_test_accuracy", "exit_cal_accuracy", "exit_macs"):
        assert a["training"][key] == b["training"][key], key
    for key in ("compare", "ablation", "sweep", "difficulty", "adaptation"):  # every figure but wall times
        assert a[key] == b[key], key
    study = [json.loads((tmp_path / d / "adapt" / "study.json").read_text()) for d in ("ref", "killed")]
    assert study[0]["families"] == study[1]["families"]


@pytest.mark.slow
def test_rerun_redoes_exactly_the_steps_whose_inputs_changed(tmp_path, capsys):
    import copy

    from dart_ee import trace as trace_mod
    from dart_ee.core import artifacts
    from dart_ee.runs import tracing

    make_idx_dataset(tmp_path / "data" / "mnist", n_train=400, n_test=300)
    raw = tiny_config(tmp_path / "data", epochs=2, batch_size=16)
    raw["data"]["cal_fraction"] = 0.5
    raw["benchmark"] = {"enabled": False}
    raw["adapt"] = {"enabled": False}
    out = tmp_path / "run"

    def run(**changes):
        r = copy.deepcopy(raw)
        for key, value in changes.items():
            section, field = key.split("__")
            (r if section == "root" else r.setdefault(section, {}))[field] = value
        cfg = parse_config(r)
        res = run_pipeline(cfg, out)
        model = artifacts.file_fingerprint(out / "model.pt")
        traces = artifacts.file_fingerprint(out / "trace_cal.npz")
        # results.json agrees with the model and traces on disk
        assert res["training"] == json.loads((out / "metrics.json").read_text())
        assert trace_mod.load(out / "trace_cal.npz").meta["inputs_fingerprint"] == tracing.inputs_fingerprint(cfg, out)
        return res, model, traces

    res1, model1, traces1 = run()
    # a calibration setting: nothing is retrained or retraced
    res2, model2, traces2 = run(calibration__max_drop=3.0)
    assert (model2, traces2) == (model1, traces1) and res2["compare"]["max_drop"] == 3.0
    assert not (out / "superseded").exists()
    # a training setting: the old model and everything made from it move aside, and both steps are redone
    capsys.readouterr()
    res3, model3, traces3 = run(train__epochs=3)
    assert model3 != model1 and traces3 != traces1 and res3["training"]["epochs"] == 3
    assert "other settings (train.epochs)" in capsys.readouterr().err
    kept = list((out / "superseded").glob("*/model.pt"))
    assert len(kept) == 1 and artifacts.file_fingerprint(kept[0]) == model1  # nothing is lost
    # a difficulty setting: the model stays, the traces are redone
    res4, model4, traces4 = run(train__epochs=3, root__difficulty="learned")
    assert model4 == model3 and traces4 != traces3
