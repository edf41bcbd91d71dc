"""The worked examples run end to end (on a tiny subset), and their run folders are read by the CLI."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _example(name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--tiny", *args], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_own_model_example_runs_with_real_early_exit_and_writes_a_run_the_cli_reads(tmp_path):
    run = tmp_path / "own"
    assert "runtime == trace evaluation: True" in _example("own_model.py", "--out", str(run))
    # another process rebuilds the model from the run folder (the class is imported from the example's file)
    pol = tmp_path / "dart.json"
    for cmd in (["calibrate", "--trace", str(run / "trace_cal.npz"), "--policy", "dart", "--max-drop", "5",
                 "--out", str(pol)],
                ["benchmark", "--run", str(run), "--policy", str(pol), "--images", "64", "--repeats", "1",
                 "--latency-images", "0", "--out", str(tmp_path / "bench.json"), "--trust-code"]):
        out = subprocess.run([sys.executable, "-m", "dart_ee", *cmd], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = {r["method"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert set(rows) == {"static", "dart"}


def test_heads_on_resnet18_example_rebuilds_the_registry_network_and_compares(tmp_path):
    """The weight mapping from the registry ResNet-18 to a plain one is exact (the example asserts it)."""
    rec = tmp_path / "rec.json"
    out = _example("heads_on_resnet18.py", "--out", str(tmp_path / "heads"), "--record", str(rec))
    assert "heads: exits' test accuracy" in out
    assert set(json.loads(rec.read_text())["networks"]) == {"heads"}


def test_gpu_benchmark_script_rehearses_on_the_cpu(trained_run, tmp_path):
    """benchmarks/gpu_bench.py, the one command a lent GPU runs, works end to end here on a tiny run (on the CPU,
    small batches): its records have both runners at every batch size and batch-1 latency at the first."""
    import importlib.util
    import shutil

    from typer.testing import CliRunner

    from dart_ee.cli import app

    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    for name in ("dart", "threshold"):
        res = CliRunner().invoke(app, ["calibrate", "--trace", str(trained_run["cal_path"]), "--policy", name,
                                       "--max-drop", "5", "--out", str(run / "policies" / f"{name}.json")])
        assert res.exit_code == 0, res.output
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(tmp_path / "out", [run], device="cpu", batches=(8, 16), images=32, repeats=1, latency_images=3)
    for b in (8, 16):
        rec = json.loads((tmp_path / "out" / f"run_b{b}.json").read_text())
        assert {(r["runner"], r["method"]) for r in rec["rows"]} == {
            (k, m) for k in ("eager", "queued") for m in ("static", "dart", "threshold")}
        assert ("latency_p50_ms" in rec["rows"][0]) == (b == 8) and rec["stage_costs"]["batch_size"] == b
