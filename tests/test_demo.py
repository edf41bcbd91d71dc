import importlib.util

import pytest
from typer.testing import CliRunner

from dart_ee.cli import app
from dart_ee.data.datasets import load_dataset

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed")


@needs_sklearn
def test_digits_ship_with_scikit_learn():
    train, test = load_dataset("digits")
    assert train.x.shape[1:] == (1, 8, 8) and len(train) + len(test) == 1797
    assert set(test.y.tolist()) == set(range(10))


@needs_sklearn
@pytest.mark.slow
def test_demo_shortened(tmp_path, monkeypatch):
    monkeypatch.delenv("DART_DATA", raising=False)  # the demo needs no data directory
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--set", "train.epochs=2",
                                   "--set", "benchmark.repeats=1", "--set", "benchmark.images=64",
                                   "--set", "benchmark.latency_images=4", "--set", "adapt.families=[impulse]",
                                   "--set", "adapt.levels=[2]", "--set", "adapt.clean=120",
                                   "--set", "adapt.shifted=120"])
    assert res.exit_code == 0, res.output
    assert "| dart |" in res.output and "| oracle |" in res.output and "Speedup" in res.output
    assert (tmp_path / "demo" / "report.md").is_file() and (tmp_path / "demo" / "tradeoff_curves.png").is_file()
