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
                 "--latency-images", "0", "--out", str(tmp_path / "bench.json")]):
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
