import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SHARED_DATA, make_cifar_python, tiny_config

from dart_ee import trace as trace_mod
from dart_ee.config import parse_config
from dart_ee.core.errors import ArtifactError, ConfigError
from dart_ee.runs import tracing
from dart_ee.training.train import load_model, train


@pytest.mark.parametrize("name", ["alexnet", "resnet18", "vgg16", "levit_128s"])
def test_one_epoch_smoke_each_model(tmp_path, name):
    root = make_cifar_python(tmp_path / "data", per_batch=20)
    raw = tiny_config(root)
    raw["data"]["dataset"] = "cifar10"
    raw["model"] = {"name": name, "width_mult": 0.125, "head_width": 8}
    if name.startswith("levit"):  # a transformer's usual optimiser
        raw["train"].update(optimizer="adamw", lr=1e-3, weight_decay=0.05)
    m = train(parse_config(raw), tmp_path / "run")
    assert len(m["exit_test_accuracy"]) == {"alexnet": 6, "resnet18": 4, "vgg16": 5, "levit_128s": 6}[name]
    assert (tmp_path / "run" / "model.pt").is_file() and (tmp_path / "run" / "split.json").is_file()
    assert load_model(tmp_path / "run" / "model.pt").num_exits == len(m["exit_macs"])


def test_train_then_trace(tmp_path, mnist_like):
    run = tmp_path / "run"
    metrics = train(parse_config(tiny_config(mnist_like.parent, epochs=5, batch_size=16)), run)
    assert metrics["exit_test_accuracy"][-1] > 0.3  # the toy classes are learnable
    paths = tracing.trace_run(run)
    cal = trace_mod.load(paths["cal"], expect_split="cal")
    test = trace_mod.load(paths["test"])
    assert cal.n == 40 and test.n == 100 and cal.num_exits == 6
    split = json.loads((run / "split.json").read_text())
    assert sorted(cal.index.tolist()) == split["cal_indices"]
    assert test.exit_accuracy() == pytest.approx(metrics["exit_test_accuracy"], abs=1e-6)
    with pytest.raises(ArtifactError, match="never calibrate on the test split"):
        trace_mod.load(paths["test"], expect_split="cal")


def test_trace_validation(tmp_path, mnist_like):
    run = tmp_path / "run"
    train(parse_config(tiny_config(mnist_like.parent)), run)
    path = tracing.trace_run(run)["test"]
    meta = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(ArtifactError, match="version"):
        trace_mod.load(path)
    path.with_suffix(".json").write_text(json.dumps({**meta, "n": 5}))
    with pytest.raises(ArtifactError, match="disagree"):
        trace_mod.load(path)
    path.write_bytes(path.read_bytes()[:100])
    path.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="unreadable"):
        trace_mod.load(path)


def test_existing_run_needs_resume(tmp_path, mnist_like):
    cfg = parse_config(tiny_config(mnist_like.parent))
    train(cfg, tmp_path / "run")
    (tmp_path / "run" / "model.pt").unlink()
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg, tmp_path / "run")


def test_training_device_choice(monkeypatch):
    from dart_ee.config import config_fingerprint
    from dart_ee.training.train import training_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="train.device"):
        training_device("cuda")
    # where a run trains is not part of its recipe: a CPU run can resume on a GPU and back
    cfg = parse_config({"train": {"device": "cpu"}})
    assert config_fingerprint(cfg) == config_fingerprint(parse_config({"train": {"device": "cuda"}}))
    assert config_fingerprint(cfg) != config_fingerprint(parse_config({"train": {"device": "cpu", "epochs": 3}}))


def _cli_train(cfg_path: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "dart_ee", "train", "-c", str(cfg_path), "--out", str(out),
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_kill9_then_resume_matches_uninterrupted(tmp_path):
    from conftest import make_idx_dataset

    make_idx_dataset(tmp_path / "data" / "mnist", n_train=1200, n_test=100)
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(tmp_path / "data", epochs=4, batch_size=16)))

    ref = _cli_train(cfg_path, tmp_path / "ref")
    assert ref.wait(timeout=300) == 0, ref.stdout.read().decode()

    victim = _cli_train(cfg_path, tmp_path / "killed")
    for line in victim.stdout:  # no sleeps: the run says when epoch 1's checkpoint is written
        if line.startswith(b"epoch 1/4:"):
            break
    assert (tmp_path / "killed" / "checkpoint.pt").exists() and victim.poll() is None
    victim.send_signal(signal.SIGKILL)  # somewhere in epoch 2
    victim.wait()
    assert not (tmp_path / "killed" / "metrics.json").exists()

    resumed = _cli_train(cfg_path, tmp_path / "killed", "--resume")
    out = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, out
    assert "resuming" in out
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert a["exit_test_accuracy"] == b["exit_test_accuracy"] and a["exit_cal_accuracy"] == b["exit_cal_accuracy"]
    sa = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.realdata
@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_real_data_smoke(tmp_path, monkeypatch, dataset):
    monkeypatch.setenv("DART_CACHE", str(Path.home() / ".cache" / "dart-ee"))  # decode the JPEGs once per machine
    raw = tiny_config(SHARED_DATA, batch_size=64)
    raw["data"].update(dataset=dataset, train_subset=1000, test_subset=500, cal_fraction=0.1)
    m = train(parse_config(raw), tmp_path / "run")
    assert m["n_train"] == 900 and m["n_cal"] == 100 and m["n_test"] == 500
    assert len(m["exit_test_accuracy"]) == 6 and all(0 <= a <= 1 for a in m["exit_test_accuracy"])


def test_diverging_training_stops_and_writes_no_model(tmp_path, mnist_like):
    raw = tiny_config(mnist_like, epochs=2, batch_size=16)
    raw["train"]["lr"] = 1e12  # finite, accepted by the config, and certain to blow up
    with pytest.raises(ConfigError, match=r"non-finite loss at epoch 1, step \d+ of \d+; lower train.lr"):
        train(parse_config(raw), tmp_path / "run")
    assert not (tmp_path / "run" / "model.pt").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_refused_resume_keeps_the_runs_config(tmp_path, mnist_like):
    raw = tiny_config(mnist_like, epochs=1, batch_size=16)
    train(parse_config(raw), tmp_path / "run")
    (tmp_path / "run" / "model.pt").unlink()  # as if killed after the last checkpoint
    before = (tmp_path / "run" / "config.yaml").read_text()
    raw["train"]["epochs"] = 5
    with pytest.raises(ConfigError, match="different config"):
        train(parse_config(raw), tmp_path / "run", resume=True)
    assert (tmp_path / "run" / "config.yaml").read_text() == before  # the error's advice still works


@pytest.mark.parametrize("batch_size", [16, 12, 48])
def test_few_optimiser_steps(tmp_path, mnist_like, batch_size):
    """48 training images in 3, 4 (the one-cycle schedule's corner case) or 1 optimiser step(s) all train."""
    raw = tiny_config(mnist_like, epochs=1, batch_size=batch_size)
    raw["data"]["train_subset"], raw["data"]["cal_fraction"] = 64, 0.25
    assert train(parse_config(raw), tmp_path / "run")["epochs"] == 1


def test_a_run_of_exactly_four_optimiser_steps_trains(tmp_path, mnist_like):
    """OneCycleLR divides by its warm-up steps minus one: 4 steps once gave a ZeroDivisionError."""
    cfg = parse_config(tiny_config(mnist_like.parent, epochs=4, batch_size=160))  # 160 training images: 1 step an epoch
    metrics = train(cfg, tmp_path / "run")
    assert metrics["n_train"] == 160 and (tmp_path / "run" / "model.pt").is_file()


def test_bf16_falls_back_to_fp32_without_native_support(monkeypatch, capsys):
    """Emulated bf16 autocast was 18x slower than fp32 on an AVX2-only CPU: there training runs in fp32, and says so."""
    import torch

    from dart_ee.training.train import use_bf16

    cpu = torch.device("cpu")
    for amx, avx512_bf16, want in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        capsys.readouterr()
        assert use_bf16(True, cpu) is want
        said = capsys.readouterr()
        assert ("bf16 ignored" in said.out + said.err) is not want
    assert use_bf16(False, cpu) is False
