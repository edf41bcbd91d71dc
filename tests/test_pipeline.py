import json

import pytest
from conftest import make_idx_dataset, tiny_config

from dart_ee.config import parse_config
from dart_ee.pipeline import run_pipeline


@pytest.mark.slow
def test_run_pipeline_end_to_end(tmp_path):
    make_idx_dataset(tmp_path / "data" / "mnist", n_train=400, n_test=300)
    raw = tiny_config(tmp_path / "data", epochs=3, batch_size=16)
    raw["data"]["cal_fraction"] = 0.5
    raw["benchmark"] = {"images": 64, "repeats": 1, "latency_images": 4, "threads": 1}
    raw["adapt"] = {"scenarios": ["noise", "class-prior"], "severities": [0.2, 0.9], "clean": 150, "shifted": 150,
                    "batch_size": 50}
    cfg = parse_config(raw)
    res = run_pipeline(cfg, tmp_path / "run")
    out = tmp_path / "run"
    for f in ("results.json", "report.md", "tradeoff_curves.png", "alpha_histogram.png", "exit_by_difficulty_dart.png",
              "noise_over_time.png", "noise_coefficients.png", "policies/dart.json"):
        assert (out / f).is_file(), f
    rec = json.loads((out / "results.json").read_text())
    assert {r["policy"] for r in rec["compare"]["rows"]} >= {"static", "dart", "threshold"}
    assert rec["git_revision"] and rec["torch"] and rec["config"]["name"] == "tiny"
    report = (out / "report.md").read_text()
    assert "Accuracy vs. computational savings" in report and "Table I" in report
    # a second run finds every step's output and resumes without retraining
    again = run_pipeline(cfg, tmp_path / "run")
    assert again["training"] == res["training"]
