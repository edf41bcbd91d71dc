import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dart_ee import MultiExitNet, attach_exits, create_model, list_models
from dart_ee.core.errors import ConfigError, InputError

EXITS = {"alexnet": 6, "resnet18": 4, "vgg16": 5, "levit_128s": 6, "levit_192": 6, "levit_256": 6}


@pytest.mark.parametrize("name", sorted(EXITS))
@pytest.mark.parametrize("shape", [(3, 32), (1, 28)])
def test_models_forward_and_costs(name, shape):
    c, s = shape
    m = create_model(name, num_classes=10, in_channels=c, image_size=s, width_mult=0.25).eval()
    outs = m(torch.rand(2, c, s, s))
    assert len(outs) == EXITS[name] == m.num_exits
    assert all(o.shape == (2, 10) for o in outs)
    macs = m.exit_macs()
    assert all(b > a for a, b in zip(macs, macs[1:]))
    with FlopCounterMode(display=False) as fc:
        m(torch.zeros(1, c, s, s))
    assert macs[-1] == fc.get_total_flops() // 2  # every stage and every head, in MACs
    assert torch.allclose(m.forward_static(torch.ones(1, c, s, s)), m(torch.ones(1, c, s, s))[-1])


def test_registry():
    assert set(EXITS) <= set(list_models())
    with pytest.raises(ConfigError, match="unknown model"):
        create_model("alexnet2")


@pytest.mark.parametrize("name", sorted(EXITS))
def test_heads_are_cheap(name):
    d = create_model(name).describe()
    # every intermediate head costs under 5% of the stage it follows, and all heads < 3% of the network
    assert max(e["head_to_stage"] for e in d["exits"][:-1]) < 0.05
    assert sum(e["head_macs"] for e in d["exits"][:-1]) < 0.03 * d["static_macs"]


def test_bad_input_errors():
    m = create_model("alexnet", width_mult=0.125)
    for bad, match in ((torch.rand(2, 1, 32, 32), "shape"), (torch.zeros(0, 3, 32, 32), "empty"),
                       (torch.full((1, 3, 32, 32), float("nan")), "NaN"),
                       (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "float")):
        with pytest.raises(InputError, match=match):
            m.check_input(bad)


def _plain_backbone():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 10))


def test_attach_exits_trains():
    torch.manual_seed(0)
    model = attach_exits(_plain_backbone(), after=[2, 5, 8], input_shape=(1, 28, 28), num_classes=10)
    assert model.num_exits == 4
    x = torch.rand(64, 1, 28, 28)
    y = (x.mean((1, 2, 3)) > x.mean()).long()  # a learnable rule
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = sum(nn.functional.cross_entropy(z, y) for z in model(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    macs = model.exit_macs()
    assert all(b > a for a, b in zip(macs, macs[1:]))


def test_attach_exits_errors():
    with pytest.raises(ConfigError, match="no module named 'nope'"):
        attach_exits(_plain_backbone(), ["nope"], input_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(ConfigError, match="logits"):
        attach_exits(_plain_backbone()[:-1], [2], input_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(ConfigError, match="example_input"):
        attach_exits(_plain_backbone(), [2])


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv2(torch.relu(self.conv1(x)))))  # a residual connection


class _ResNet(nn.Module):
    """Not an nn.Sequential: its forward wires the layers itself."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1, self.layer2, self.layer3 = _Block(8), _Block(8), _Block(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(torch.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class _TokenNet(nn.Module):
    """A small token model: patches -> tokens -> attention blocks -> mean token -> classes."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
                                     for _ in range(3)])
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        t = self.embed(x.flatten(2).transpose(1, 2).reshape(x.shape[0], -1, 12))
        for b in self.blocks:
            t = b(t)
        return self.head(t.mean(1))


@pytest.mark.parametrize("make,after,shape", [(_ResNet, ["layer1", "layer2"], (3, 16, 16)),
                                              (_TokenNet, ["blocks.0", "blocks.1"], (3, 8, 8))])
def test_attach_exits_by_module_name_computes_the_original_function(make, after, shape):
    torch.manual_seed(0)
    net = make().eval()
    x = torch.rand(5, *shape)
    model = attach_exits(net, after=after, example_input=x).eval()
    assert model.num_exits == 3 and model.arch["num_classes"] == 10
    with torch.no_grad():
        assert torch.equal(model(x)[-1], net(x))  # exactly the original network
        assert torch.equal(model.forward_static(x), net(x))
        assert [tuple(z.shape) for z in model(x)] == [(5, 10)] * 3


def test_attach_exits_refuses_a_cut_inside_a_residual_block_and_untraceable_code():
    with pytest.raises(ConfigError, match="after 'layer1.conv1' more than one value flows on"):
        attach_exits(_ResNet(), after=["layer1.conv1"], input_shape=(3, 16, 16))

    class Branchy(_ResNet):
        def forward(self, x):
            x = self.layer1(torch.relu(self.stem(x)))
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot follow it
                x = self.layer2(x)
            return self.fc(x.mean((2, 3)))

    with pytest.raises(ConfigError, match=r"torch.fx cannot trace Branchy .*MultiExitNet.from_stages"):
        attach_exits(Branchy(), after=["layer1"], input_shape=(3, 16, 16))
    by_hand = MultiExitNet.from_stages([nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
                                        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))],
                                       input_shape=(3, 16, 16))
    assert by_hand.num_exits == 2 and by_hand(torch.rand(2, 3, 16, 16))[0].shape == (2, 10)


@pytest.mark.parametrize("name", sorted(EXITS))
def test_optimize_for_inference_computes_the_same_function(name):
    from dart_ee.models.net import optimize_for_inference

    torch.manual_seed(0)
    m = create_model(name, width_mult=0.25)
    m.train()
    for _ in range(3):  # give BatchNorm non-trivial running statistics
        m(torch.rand(16, 3, 32, 32))
    m.eval()
    fast = optimize_for_inference(m)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in fast.modules())
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(m(x), fast(x)):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert fast.exit_macs() == m.exit_macs()


def test_own_model_traced_from_a_data_loader_runs_as_its_trace_says():
    """attach_exits by name on a residual network, traces from DataLoaders, every policy: runtime == trace evaluation."""
    from torch.utils.data import DataLoader, TensorDataset

    from dart_ee.calibration.calibrate import calibrate
    from dart_ee.calibration.evaluation import simulate
    from dart_ee.difficulty.estimators import fit_estimators
    from dart_ee.policies import POLICIES
    from dart_ee.runs.tracing import make_trace
    from dart_ee.runtime.eager import EarlyExitRunner

    torch.manual_seed(0)
    model = attach_exits(_ResNet(), after=["layer1", "layer2"], example_input=torch.rand(2, 3, 16, 16))
    with torch.no_grad():  # untrained heads make near-uniform softmaxes; spread them so exits differ
        for head in model.heads[:-1]:
            head.body[-1].weight.mul_(40)
    model.eval()
    x = (torch.rand(360, 3, 16, 16) * 255).to(torch.uint8)
    y = torch.randint(0, 10, (360,))
    est = fit_estimators(x[:120].numpy())
    loader = {s: DataLoader(TensorDataset(x[a:b], y[a:b]), batch_size=32) for s, a, b in (("cal", 120, 240),
                                                                                          ("test", 240, 360))}
    cal, test = (make_trace(model, loader[s], s, est, dataset="noise") for s in ("cal", "test"))
    assert cal.num_exits == 3 and cal.alpha is not None and cal.meta["dataset"] == "noise"
    depths = {}
    for name in sorted(POLICIES):
        policy = calibrate(name, cal, max_drop=5.0)[0]
        exits, preds = simulate(policy, test)
        out = EarlyExitRunner(model, policy, est).run(x[240:], 7)
        np.testing.assert_array_equal(out.exit.numpy(), exits)
        np.testing.assert_array_equal(out.pred.numpy(), preds)
        depths[name] = len(np.unique(exits))
    assert depths["threshold"] > 1 and depths["dart"] > 1  # real early exits, not the whole network every time


def _loaders():
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x = torch.rand(256, 3, 16, 16)
    y = (x[:, 0].mean((1, 2)) > x[:, 1].mean((1, 2))).long()  # a learnable rule
    return (DataLoader(TensorDataset(x[:192], y[:192]), batch_size=32, shuffle=True),
            DataLoader(TensorDataset(x[192:], y[192:]), batch_size=64))


def test_fit_exits_with_a_frozen_backbone_changes_no_backbone_weight(tmp_path):
    from dart_ee.training.train import fit_exits

    torch.manual_seed(0)
    model = attach_exits(_ResNet(), after=["layer1", "layer2"], example_input=torch.rand(2, 3, 16, 16))
    before = {k: v.clone() for k, v in model.stages.state_dict().items()}  # weights and BatchNorm statistics
    train, val = _loaders()
    hist = fit_exits(model, train, val, freeze_backbone=True, epochs=3, lr=0.1, bf16=False,
                     checkpoint=tmp_path / "ck.pt")
    assert all(torch.equal(v, model.stages.state_dict()[k]) for k, v in before.items())
    assert hist[-1]["exit_loss"][0] < hist[0]["exit_loss"][0] and len(hist[-1]["val_exit_accuracy"]) == 3
    # a later call resumes after the last finished epoch instead of starting again
    assert len(fit_exits(model, train, val, epochs=3, lr=0.1, bf16=False, checkpoint=tmp_path / "ck.pt")) == 3
    with pytest.raises(ConfigError, match="another network or other settings"):  # never resumed with other settings
        fit_exits(model, train, val, epochs=3, lr=0.5, bf16=False, checkpoint=tmp_path / "ck.pt")


def test_joint_fit_exits_lowers_every_exit_loss():
    from dart_ee.training.train import fit_exits

    torch.manual_seed(0)
    model = attach_exits(_ResNet(), after=["layer1", "layer2"], example_input=torch.rand(2, 3, 16, 16))
    hist = fit_exits(model, _loaders()[0], freeze_backbone=False, epochs=4, lr=0.05, bf16=False)
    assert all(b < a for a, b in zip(hist[0]["exit_loss"], hist[-1]["exit_loss"])), hist
