"""Runs of your own model written from Python (dart_ee.models.custom): every command reads them, and the
model they rebuild decides as their traces say."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from typer.testing import CliRunner

from dart_ee import ArtifactError, ConfigError, InputError, attach_exits
from dart_ee.cli import app
from dart_ee.runs.run import Run

cli = CliRunner()


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))  # a residual connection: not an nn.Sequential


class Net(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.layer1, self.layer2, self.layer3 = Block(width), Block(width), Block(width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(torch.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


BUILDER = f"{__file__}:Net"  # a file path: commands in other processes import it too


def _data(n: int = 360) -> dict[str, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(n, 3, 16, 16, generator=g) * 255).to(torch.uint8)
    y = (x[:, 0].float().mean((1, 2)) > x[:, 1].float().mean((1, 2))).long()
    third = n // 3
    return {s: DataLoader(TensorDataset(x[a: a + third], y[a: a + third]), batch_size=32, shuffle=s == "train")
            for s, a in (("train", 0), ("cal", third), ("test", 2 * third))}


def _write_run(path, width: int = 8):
    from dart_ee.difficulty.estimators import fit_estimators
    from dart_ee.runs.tracing import make_trace
    from dart_ee.training.train import fit_exits

    torch.manual_seed(0)
    model = attach_exits(Net(width), after=["layer1", "layer2"], example_input=torch.rand(1, 3, 16, 16),
                         builder=BUILDER, builder_kwargs={"width": width})
    loaders = _data()
    fit_exits(model, loaders["train"], loaders["cal"], epochs=2, lr=0.1, bf16=False, run_dir=path)
    with torch.no_grad():  # spread the heads' softmaxes so that policies take early exits
        for head in model.heads[:-1]:
            head.body[-1].weight.mul_(40)
    # the scaled heads are the model traced: save it again (fit_exits resumes: no training)
    est = fit_estimators(loaders["train"].dataset.tensors[0].numpy())
    from dart_ee.training.train import save_model

    save_model(model, path / "model.pt")
    cal = make_trace(model, loaders["cal"], "cal", est, run_dir=path)
    test = make_trace(model, loaders["test"], "test", est, run_dir=path)
    return model, est, cal, test, loaders


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("custom") / "mine"
    model, est, cal, test, loaders = _write_run(path)
    return {"path": path, "model": model, "est": est, "cal": cal, "test": test, "loaders": loaders}


def test_the_run_folder_rebuilds_the_same_model_and_reads_back(custom_run):
    run = Run(custom_run["path"], trust_code=True)
    rebuilt = run.model()
    x = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        for a, b in zip(rebuilt(x), custom_run["model"].eval()(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert run.config().data.dataset == "custom" and run.config().model.name == "custom"
    cal, test = run.trace("cal"), run.trace("test")
    assert cal.alpha is not None and "alpha_learned" in test.extra and len(run.images("test")) == len(test.labels)
    np.testing.assert_array_equal(run.images("test").y, test.labels)
    metrics = json.loads((custom_run["path"] / "metrics.json").read_text())
    assert metrics["arch"]["builder"] == BUILDER and len(metrics["exit_val_accuracy"]) == 3


def test_runtime_on_the_reloaded_run_equals_trace_evaluation_for_every_policy(custom_run):
    from dart_ee.calibration.calibrate import calibrate
    from dart_ee.calibration.evaluation import simulate
    from dart_ee.policies import POLICIES
    from dart_ee.runtime.eager import EarlyExitRunner

    run = Run(custom_run["path"], trust_code=True)
    model, est, cal, test = run.model(), run.estimators(), run.trace("cal"), run.trace("test")
    images = torch.from_numpy(run.images("test").x)
    depths = set()
    for name in sorted(POLICIES):
        policy = calibrate(name, cal, max_drop=5.0)[0]
        exits, preds = simulate(policy, test)
        out = EarlyExitRunner(model, policy, est).run(images, 7)
        np.testing.assert_array_equal(out.exit.numpy(), exits)
        np.testing.assert_array_equal(out.pred.numpy(), preds)
        depths.add(len(np.unique(exits)))
    assert max(depths) > 1  # real early exits


def test_every_command_reads_a_custom_run(custom_run, tmp_path):
    path = custom_run["path"]
    pol = tmp_path / "dart.json"
    res = cli.invoke(app, ["calibrate", "--trace", str(path / "trace_cal.npz"), "--policy", "dart", "--max-drop", "5",
                           "--out", str(pol)])
    assert res.exit_code == 0, res.output
    res = cli.invoke(app, ["evaluate", "--policy", str(pol), "--trace", str(path / "trace_test.npz")])
    assert res.exit_code == 0, res.output
    res = cli.invoke(app, ["benchmark", "--run", str(path), "--policy", str(pol), "--images", "64", "--repeats", "1",
                           "--latency-images", "2", "--batch-size", "32", "--trust-code"])
    assert res.exit_code == 0, res.output
    res = cli.invoke(app, ["adapt", "--run", str(path), "--policy", str(pol), "--family", "impulse", "--level", "2",
                           "--no-mechanisms", "--clean", "40", "--shifted", "40", "--batch-size", "16",
                           "--out", str(tmp_path / "ad" / "study.json"), "--trust-code"])
    assert res.exit_code == 0, res.output
    onnx = pytest.importorskip("onnxruntime")
    del onnx
    res = cli.invoke(app, ["export", "--run", str(path), "--out", str(tmp_path / "onnx"), "--policy", str(pol),
                           "--trust-code"])
    assert res.exit_code == 0, res.output
    from dart_ee.calibration.evaluation import simulate
    from dart_ee.deploy.onnx_runner import OnnxRunner
    from dart_ee.policies import load_policy

    out = OnnxRunner(tmp_path / "onnx", "dart").run(Run(path).images("test").x, 16)
    exits, _ = simulate(load_policy(pol), custom_run["test"])
    assert (out.exit != exits).mean() < 0.02  # onnxruntime rounds differently: a rare tie may flip


def test_a_run_folder_never_names_code_other_than_a_module_class(tmp_path):
    from dart_ee.models.coderef import import_builder
    from dart_ee.models.custom import rebuild

    with pytest.raises(ConfigError, match="no Python source|defines no class 'system'"):
        import_builder("os:system", trusted=True)  # never called
    with pytest.raises(ConfigError, match="defines no class 'getcwd'"):
        import_builder("subprocess:getcwd", trusted=True)
    with pytest.raises(ConfigError, match="cannot find the module"):
        import_builder("no_such_package_xyz:Net", trusted=True)
    with pytest.raises(ConfigError, match="expected 'package.module:Class'"):
        import_builder("Net", trusted=True)
    with pytest.raises(ArtifactError, match="records no builder"):
        rebuild({"name": "custom", "builder": None})


def test_a_model_commands_could_not_rebuild_is_refused_before_training(tmp_path):
    from dart_ee.training.train import fit_exits

    model = attach_exits(Net(12), after=["layer1"], example_input=torch.rand(1, 3, 16, 16), builder=BUILDER)
    with pytest.raises(ConfigError, match="builder_kwargs"):  # built with width 12, recorded without it
        fit_exits(model, _data()["train"], epochs=1, bf16=False, run_dir=tmp_path / "r")
    assert not (tmp_path / "r" / "model.pt").exists()


def test_make_trace_into_a_run_checks_its_inputs(custom_run, tmp_path):
    from dart_ee.difficulty.estimators import fit_estimators
    from dart_ee.runs.tracing import make_trace

    loaders = custom_run["loaders"]
    with pytest.raises(InputError, match="needs the fitted estimator"):
        make_trace(custom_run["model"], loaders["cal"], "cal", None, run_dir=custom_run["path"])
    with pytest.raises(InputError, match="not the one saved"):
        make_trace(attach_exits(Net(), ["layer1", "layer2"], input_shape=(3, 16, 16), builder=BUILDER),
                   loaders["cal"], "cal", custom_run["est"], run_dir=custom_run["path"])
    with pytest.raises(InputError, match="holds no model"):  # no fit_exits(run_dir=...) there
        make_trace(custom_run["model"], loaders["cal"], "cal", custom_run["est"], run_dir=tmp_path / "empty")
    fresh = fit_estimators(loaders["train"].dataset.tensors[0].numpy())
    with pytest.raises(InputError, match="trace the 'cal' split first"):
        make_trace(custom_run["model"], loaders["test"], "test", fresh, run_dir=custom_run["path"])


def test_a_truncated_image_file_and_a_config_on_custom_data_give_clear_errors(custom_run, tmp_path):
    from dart_ee.core.errors import DataError
    from dart_ee.data.datasets import get_spec
    from dart_ee.models.custom import load_images

    bad = tmp_path / "images_test.npz"
    bad.write_bytes((custom_run["path"] / "images_test.npz").read_bytes()[:100])
    with pytest.raises(ArtifactError, match="truncated"):
        load_images(bad)
    with pytest.raises(DataError, match="written from Python"):
        get_spec("custom")


class Normalised(nn.Module):
    """Reads its own buffers and parameters in forward (not through a submodule)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 0.5))
        self.scale = nn.Parameter(torch.full((1, 3, 1, 1), 2.0))
        self.body, self.fc = Block(3), nn.Linear(3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body((x - self.mean) * self.scale).mean((2, 3)))


def test_a_network_reading_its_own_tensors_in_forward_splits_and_trains_them():
    net = Normalised().eval()
    model = attach_exits(net, after=["body"], input_shape=(3, 8, 8)).eval()
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[-1], net(x), rtol=0, atol=0)
    assert any(p is net.scale for p in model.parameters())  # still the same, trainable parameter


class MyHead(nn.Module):
    """A custom exit head: global average pool and one linear layer."""

    def __init__(self, feature_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(feature_shape[0], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def test_custom_heads_are_sized_by_the_probe_and_rebuilt_from_the_run(tmp_path):
    from dart_ee.models.custom import check_rebuilds, rebuild

    model = attach_exits(Net(), after=["layer1", "layer2"], input_shape=(3, 16, 16), builder=BUILDER,
                         head=f"{__file__}:MyHead")
    assert [type(h).__name__ for h in model.heads[:-1]] == ["MyHead", "MyHead"]
    check_rebuilds(model)
    copy = rebuild(model.arch, trusted=True)
    copy.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(copy.eval()(x), model.eval()(x), rtol=0, atol=0)
