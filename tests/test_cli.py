import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from dart_ee import create_model
from dart_ee.cli import app
from dart_ee.core.malloc import malloc_setting

cli = CliRunner()


def invoke(*args):
    res = cli.invoke(app, [str(a) for a in args])
    return res.exit_code, res.output


def test_info_json():
    code, out = invoke("info", "--model", "alexnet", "--dataset", "cifar10", "--json")
    assert code == 0, out
    rec = json.loads(out)
    macs = [e["cumulative_macs"] for e in rec["exits"]]
    assert len(macs) == 6 and all(b > a for a, b in zip(macs, macs[1:]))
    m = create_model("alexnet").eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(torch.zeros(1, 3, 32, 32))
    assert macs[-1] == fc.get_total_flops() // 2 == rec["full_forward_macs"]
    assert 0 < rec["difficulty_estimator"]["total"] <= 100_000


def test_config_errors_are_clean(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epocs: 3\n")
    code, out = invoke("train", "--config", cfg, "--out", tmp_path / "r")
    assert code == 2 and "train.epocs: unknown key" in out and "Traceback" not in out
    code, out = invoke("train", "--set", "model.head_width=-1", "--out", tmp_path / "r")
    assert code == 2 and "model.head_width" in out


def test_policy_commands(trained_run, tmp_path):
    cal, test = trained_run["cal_path"], trained_run["test_path"]
    code, out = invoke("calibrate", "--trace", cal, "--policy", "dart", "--max-drop", "1", "--out", tmp_path / "d.json")
    assert code == 0 and "UNCERTIFIED" in out, out
    code, out = invoke("calibrate", "--trace", cal, "--policy", "dart", "--max-drop", "1", "--confidence", "0.95",
                       "--out", tmp_path / "c.json")
    assert code == 2 and "needs at least 299 certification samples" in out and "Traceback" not in out, out
    code, out = invoke("calibrate", "--trace", cal, "--policy", "threshold", "--max-drop", "20", "--confidence", "0.95",
                       "--risk", "new-errors", "--out", tmp_path / "c.json")
    assert code == 0 and ("CERTIFIED" in out) and "not guaranteed" in out, out
    assert json.loads((tmp_path / "c.json").read_text())["calibration"]["guarantee"]["risk"] == "new-errors"
    code, out = invoke("calibrate", "--trace", test, "--policy", "dart", "--max-drop", "1", "--out", tmp_path / "x.json")
    assert code == 2 and "never calibrate on the test split" in out
    code, out = invoke("evaluate", "--trace", test, "--policy", tmp_path / "d.json", "--json")
    assert code == 0, out
    rows = json.loads(out)
    assert rows[0]["policy"] == "dart" and rows[-1]["policy"] == "oracle" and rows[0]["budget"].startswith("UNCERTIFIED")
    code, out = invoke("evaluate", "--trace", test, "--policy", tmp_path / "c.json")
    assert code == 0 and "c.json: certified: with probability at least 0.95" in out, out
    code, out = invoke("sweep", "--cal", cal, "--test", test, "--out", tmp_path / "sw")
    assert code == 0 and (tmp_path / "sw" / "tradeoff_curves.png").stat().st_size > 10_000, out
    assert "@25% MACs" in out
    code, out = invoke("sweep", "--cal", cal, "--test", test, "--out", tmp_path / "sw", "--resplits", "2")
    assert code == 0 and "AUC difference DART - threshold over 2 re-splits" in out, out
    assert "D = 0.5 points" in out and "D = 1 point |" in out, out
    code, out = invoke("compare", "--cal", cal, "--test", test, "--max-drop", "1", "--out", tmp_path / "cmp")
    assert code == 0 and "DART ablation" in out and "static network instead" in out, out  # 200 samples: too few
    code, out = invoke("guarantee", "--cal", cal, "--test", test, "--max-drop", "20", "--resplits", "2", "--json")
    assert code == 0, out
    rec = json.loads(out)
    assert [r["policy"] for r in rec] == ["dart", "threshold"] and rec[0]["split"]["draws"] == 2
    code, out = invoke("guarantee", "--synthetic", "nested", "--policy", "threshold", "--resplits", "3")
    assert code == 0 and "threshold (generator 'nested'):" in out, out
    for bad in (["--synthetic", "nestd"], ["--synthetic", "nested", "--policy", "dartt"], ["--resplits", "0"]):
        code, out = invoke("guarantee", "--cal", cal, "--test", test, *bad)
        assert code == 2 and "Traceback" not in out and ("must be" in out or "unknown policy" in out
                                                         or "Invalid value" in out), out


def test_difficulty_commands(trained_run, tmp_path):
    code, out = invoke("difficulty", "fit-weights", "--trace", trained_run["cal_path"], "--test",
                       trained_run["test_path"], "--trials", "20")
    assert code == 0 and "fitted  weights" in out and "alpha_learned" in out, out
    code, out = invoke("difficulty", "report", "--trace", trained_run["test_path"], "--out", tmp_path / "rep")
    assert code == 0 and "exit 1-2" in out, out
    assert (tmp_path / "rep" / "exit_by_difficulty.png").is_file() and (tmp_path / "rep" / "alpha_histogram.png").is_file()
    code, out = invoke("difficulty", "cost", "--repeats", "2", "--threads", "1")
    assert code == 0 and "share" in out


@pytest.mark.slow
def test_benchmark_command(trained_run, tmp_path):
    code, out = invoke("calibrate", "--trace", trained_run["cal_path"], "--policy", "threshold", "--max-drop", "1",
                       "--out", tmp_path / "t.json")
    assert code == 0, out
    code, out = invoke("benchmark", "--run", trained_run["run"], "--policy", tmp_path / "t.json", "--images", "64",
                       "--repeats", "2", "--latency-images", "4", "--threads", "1", "--out", tmp_path / "b.json")
    assert code == 0, out
    from dart_ee.bench.energy import energy_meter

    if not energy_meter().available:
        assert "unavailable" in out  # no energy counter readable: never a made-up number
    rec = json.loads((tmp_path / "b.json").read_text())
    assert [r["method"] for r in rec["rows"]] == ["static", "threshold"]
    assert rec["rows"][0]["speedup"] == pytest.approx(1.0)
    # the stages' own prices, measured in the same process: the static network's prediction is itself
    costs = rec["stage_costs"]
    assert costs["batch_size"] == 256 and len(costs["stage_ms"]) == len(costs["head_ms"]) == len(rec["rows"][1]["exit_histogram"])
    assert rec["rows"][0]["stage_time_speedup"] == 1.0 and rec["rows"][1]["stage_time_speedup"] > 0
    assert "Stage-time-predicted speedup" in out
    # both runners, timed in alternation; the queued one decides exactly as the eager one on the CPU. Peak memory
    # per method in a child process of its own: its figure is the child's, however large this process is
    ballast = torch.ones(2**28)  # 1 GiB held here
    code, out = invoke("benchmark", "--run", trained_run["run"], "--policy", tmp_path / "t.json", "--images", "64",
                       "--batch-size", "16", "--repeats", "2", "--latency-images", "4", "--threads", "1",
                       "--runner", "eager", "--runner", "queued", "--memory", "--out", tmp_path / "q.json")
    assert code == 0, out
    rec = json.loads((tmp_path / "q.json").read_text())
    memory = [r["memory"] for r in rec["rows"] if "memory" in r]
    assert len(memory) == 2 and "memory threshold: peak RSS" in out  # measured under the first runner, eager
    assert all(0 < m["peak_rss_mb"] < ballast.numel() * 4 / 2**20 for m in memory)
    assert rec["hardware"]["malloc"] == memory[0]["malloc"] == malloc_setting() != "glibc default"  # the CLI kept it
    assert [(r["runner"], r["method"]) for r in rec["rows"]] == [
        ("eager", "static"), ("eager", "threshold"), ("queued", "static"), ("queued", "threshold")]
    queued = rec["rows"][3]
    assert queued["decisions_differing_from_eager"] == 0 and "capture skipped" in rec["method"]
    assert len(queued["stages"]) == len(queued["exit_histogram"]) and "stage 1" in out
    code, out = invoke("benchmark", "--run", trained_run["run"], "--policy", tmp_path / "t.json", "--runner", "lazy")
    assert code != 0 and "eager, queued and/or onnxruntime" in out


def test_info_timing():
    code, out = invoke("info", "--model", "alexnet", "--dataset", "mnist", "--timing")
    assert code == 0, out
    assert "batch 256" in out and "batch 1 " in out and "% of MACs" in out
