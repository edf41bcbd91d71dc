"""ONNX export and the onnxruntime runner: the same exits and predictions as the torch runtime."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_cli import invoke
from test_runtime import CASES

from dart_ee.calibration.evaluation import simulate
from dart_ee.core.errors import ArtifactError, InputError
from dart_ee.difficulty.estimators import load_estimators
from dart_ee.runtime.eager import EarlyExitRunner
from dart_ee.training.train import load_model

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("name,alpha", CASES)
@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_onnx_runner_matches_the_torch_runtime(trained_run, exported, name, alpha, batch_size):
    from dart_ee.deploy.onnx_runner import OnnxRunner

    key = f"{name}_{alpha}"
    policy = exported["policies"][key]
    model = load_model(trained_run["run"] / "model.pt", optimize=True)
    est = load_estimators(trained_run["run"] / "difficulty.pt")
    ref = EarlyExitRunner(model, policy, est).run(trained_run["images"], batch_size)
    images = trained_run["images"].numpy()
    out = OnnxRunner(exported["dir"], key, threads=1).run(images, batch_size)
    # exits equal except where a confidence sits within float rounding of a threshold: none on this data
    assert int((out.exit != ref.exit.numpy()).sum()) == 0
    np.testing.assert_array_equal(out.pred, ref.pred.numpy())
    np.testing.assert_allclose(out.conf, ref.conf.numpy(), atol=1e-5)
    exits, _ = simulate(policy, trained_run["test"].with_alpha(f"alpha_{alpha}"))
    np.testing.assert_array_equal(out.exit, exits)  # and the trace evaluation's
    if policy.uses_alpha:
        np.testing.assert_allclose(out.alpha, ref.alpha.numpy(), atol=1e-5)


def test_a_changed_file_is_refused(exported, tmp_path):
    from dart_ee.deploy.onnx_runner import OnnxRunner

    copy = tmp_path / "onnx"
    shutil.copytree(exported["dir"], copy)
    stage = copy / "stage_1.onnx"
    data = bytearray(stage.read_bytes())
    data[-1] ^= 1
    stage.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"stage_1.onnx: checksum does not match .*export the run again"):
        OnnxRunner(copy, "dart_paper")
    (copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="not a finished export"):
        OnnxRunner(copy, "dart_paper")


def test_bad_input_and_unknown_policy(exported):
    from dart_ee.deploy.onnx_runner import OnnxRunner

    runner = OnnxRunner(exported["dir"], "threshold_paper")
    for bad, match in ((np.zeros((2, 3, 28, 28), np.float32), "shape"), (np.zeros((0, 1, 28, 28), np.float32), "empty"),
                       (np.full((2, 1, 28, 28), np.nan, np.float32), "NaN"),
                       (np.zeros((2, 1, 28, 28), np.float64), "float32")):
        with pytest.raises(InputError, match=match):
            runner(bad)
    with pytest.raises(Exception, match="no policy 'foo'.*exported: "):
        OnnxRunner(exported["dir"], "foo")


def test_export_refuses_an_unfinished_run(trained_run, tmp_path):
    from dart_ee.deploy.export import export_run

    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    with pytest.raises(ArtifactError, match="no fitted policy: the run is unfinished"):
        export_run(run, tmp_path / "onnx")  # traced, but no policy was fitted
    (run / "difficulty.pt").unlink()
    code, out = invoke("export", "--run", run, "--out", tmp_path / "onnx")
    assert code != 0 and "difficulty.pt is missing: the run is unfinished" in out and "Traceback" not in out, out


def test_serving_needs_no_torch(trained_run, exported):
    """The runner imports numpy and onnxruntime only: a serving process never loads torch."""
    images = trained_run["images"].numpy()[:16]
    np.save(exported["dir"].parent / "x.npy", images)
    code = (f"import sys, numpy as np\nfrom dart_ee.deploy.onnx_runner import OnnxRunner\n"
            f"r = OnnxRunner({str(exported['dir'])!r}, 'dart_learned').run(np.load({str(exported['dir'].parent / 'x.npy')!r}))\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nprint(r.exit.tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 16


def test_export_cli_writes_a_manifest(trained_run, exported, tmp_path):
    pol = exported["dir"] / "policies" / "threshold_paper.json"
    code, out = invoke("export", "--run", trained_run["run"], "--out", tmp_path / "onnx", "--policy", pol)
    assert code == 0, out
    m = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert m["num_exits"] == 6 and list(m["policies"]) == ["threshold_paper", "static"] and m["input"]["shape"] == [1, 28, 28]
    assert all(len(d) == 16 for d in m["files"].values()) and "stage_0.onnx" in m["files"]


def test_what_the_fast_exporter_cannot_express_goes_through_torch_export(tmp_path):
    """An adaptive pooling whose bins do not divide its input: the TorchScript exporter refuses it."""
    import onnxruntime as ort
    import torch

    from dart_ee.deploy.export import _onnx
    from dart_ee.deploy.onnx_runner import session_options

    pool = torch.nn.AdaptiveAvgPool2d(4)
    _onnx(pool, (torch.rand(2, 3, 7, 7),), tmp_path / "pool.onnx", ["h"], ["y"], 17)
    x = torch.rand(5, 3, 7, 7)
    y = ort.InferenceSession(str(tmp_path / "pool.onnx"), session_options()).run(None, {"h": x.numpy()})[0]
    np.testing.assert_allclose(y, pool(x).numpy(), atol=1e-6)


def test_int8_export_refits_its_policies_and_routes_as_its_trace(trained_run, tmp_path):
    """int8 stages, policies fitted again on the int8 calibration trace; the runner equals that trace's evaluation."""
    from dart_ee.calibration.calibrate import calibrate
    from dart_ee.deploy.export import export_run
    from dart_ee.deploy.onnx_runner import OnnxRunner
    from dart_ee.deploy.quantize import int8_traces
    from dart_ee.policies import load_policy
    from dart_ee.runs.run import Run

    pol, rec = calibrate("threshold", trained_run["cal"], max_drop=2.0)
    pol.save(tmp_path / "threshold.json", calibration=rec)
    m = export_run(trained_run["run"], tmp_path / "int8", dtype="int8", policies=[tmp_path / "threshold.json"],
                   calibration_images=100_000)
    q = m["int8"]
    assert q["calibration_images"] == len(Run(trained_run["run"]).images("cal").x)  # what was used, not what was asked
    assert m["dtype"] == "int8" and len(q["exit_test_accuracy_int8"]) == len(q["exit_test_accuracy_fp32"]) == 6
    assert q["refit"]["threshold"]["int8"] == "threshold" and {"static", "static_fp32"} <= set(m["policies"])
    refitted = load_policy(tmp_path / "int8" / "policies" / "threshold.json")
    test8 = int8_traces(tmp_path / "int8", Run(trained_run["run"]), None)["test"]
    exits, preds = simulate(refitted, test8)
    out = OnnxRunner(tmp_path / "int8", "threshold").run(trained_run["images"].numpy(), 64)
    np.testing.assert_array_equal(out.exit, exits)
    np.testing.assert_array_equal(out.pred, preds)
    fp32 = OnnxRunner(tmp_path / "int8", "static_fp32").run(trained_run["images"].numpy()[:32])
    assert (fp32.exit == 5).all()


def test_benchmark_times_both_engines(trained_run, exported, tmp_path):
    """torch and onnxruntime on the same footing: each against its own static network, decisions compared."""
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run, ignore=shutil.ignore_patterns(".lock"))
    pol = exported["dir"] / "policies" / "dart_learned.json"
    code, out = invoke("benchmark", "--run", run, "--policy", pol, "--images", "16", "--engine", "onnxruntime",
                       "--export", tmp_path / "onnx")
    assert code != 0 and "never writes into a folder you name" in out and "dart-ee export --run" in out, out
    assert not (tmp_path / "onnx").exists()
    code, out = invoke("export", "--run", run, "--out", tmp_path / "onnx", "--policy", pol)
    assert code == 0, out
    code, out = invoke("benchmark", "--run", run, "--policy", pol, "--images", "64", "--batch-size", "16",
                       "--repeats", "2", "--latency-images", "4", "--threads", "1", "--engine", "torch",
                       "--engine", "onnxruntime", "--export", tmp_path / "onnx", "--out", tmp_path / "b.json")
    assert code == 0, out
    rec = json.loads((tmp_path / "b.json").read_text())
    assert rec["command"] and rec["git_revision"]  # a record names what made it
    rows = {(r["runner"], r["method"]): r for r in rec["rows"]}
    assert set(rows) == {(e, m) for e in ("eager", "onnxruntime") for m in ("static", "dart")}
    assert rows["onnxruntime", "dart"]["decisions_differing_from_eager"] == 0
    assert rec["onnx_export"]["timed_in_process_with_torch"] is False  # timed as served: numpy and onnxruntime only
    assert sum(rows["onnxruntime", "dart"]["latency_exit_histogram"]) == 4
    assert rows["onnxruntime", "dart"]["accuracy"] == rows["eager", "dart"]["accuracy"]
    from dart_ee.deploy.export import is_current

    # the run's own export (RUN/export) is made on the way, and made again when stale
    code, out = invoke("benchmark", "--run", run, "--policy", pol, "--images", "16", "--repeats", "1",
                       "--latency-images", "0", "--threads", "1", "--engine", "onnxruntime")
    assert code == 0, out
    assert is_current(run / "export", run, [pol])
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    manifest["code_fingerprint"] = "made-by-older-code"  # graphs traced from other code are exported again
    (run / "export" / "manifest.json").write_text(json.dumps(manifest))
    assert not is_current(run / "export", run, [pol])
    code, out = invoke("benchmark", "--run", run, "--policy", pol, "--images", "16", "--repeats", "1",
                       "--latency-images", "0", "--threads", "1", "--engine", "onnxruntime")
    assert code == 0, out
    assert is_current(run / "export", run, [pol])
    code, out = invoke("benchmark", "--run", run, "--policy", pol, "--engine", "tensorrt")
    assert code != 0 and "choose torch or onnxruntime" in out


def test_graphs_that_cannot_be_joined_run_one_after_the_other(trained_run, exported, monkeypatch):
    """A stage and an exit of different opsets (a torch.export fallback) run as two sessions: same results."""
    from onnx import compose

    from dart_ee.deploy.onnx_runner import OnnxRunner, _Chain

    images = trained_run["images"].numpy()
    joined = OnnxRunner(exported["dir"], "patience_paper").run(images, 7)

    def refuse(*args, **kwargs):
        raise ValueError("opset versions differ")

    monkeypatch.setattr(compose, "merge_models", refuse)
    runner = OnnxRunner(exported["dir"], "patience_paper")
    assert all(isinstance(s, _Chain) for s in runner.steps)
    chained = runner.run(images, 7)
    np.testing.assert_array_equal(chained.exit, joined.exit)
    np.testing.assert_array_equal(chained.pred, joined.pred)



def test_benchmark_never_overwrites_an_int8_export(trained_run, tmp_path):
    """RUN/export holding another dtype is refused, not re-exported over."""
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run, ignore=shutil.ignore_patterns(".lock"))
    (run / "export").mkdir()
    (run / "export" / "manifest.json").write_text(json.dumps({"format": 1, "dtype": "int8", "files": {}}))
    pol = run / "t.json"
    from dart_ee.calibration.calibrate import calibrate

    calibrate("threshold", trained_run["cal"], max_drop=2.0)[0].save(pol)
    code, out = invoke("benchmark", "--run", run, "--policy", pol, "--engine", "onnxruntime", "--images", "16",
                       "--repeats", "1", "--latency-images", "0")
    assert code != 0 and "holds an int8 export, which re-exporting would overwrite" in out, out
    assert json.loads((run / "export" / "manifest.json").read_text())["dtype"] == "int8"
