"""The worked examples run end to end (on a tiny subset)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_own_model_example_runs_with_real_early_exit():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "own_model.py"), "--tiny"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "runtime == trace evaluation: True" in out.stdout, out.stdout
