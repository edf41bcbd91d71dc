import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dart_ee import attach_exits, create_model, list_models
from dart_ee.errors import ConfigError, InputError

EXITS = {"alexnet": 6, "resnet18": 4, "vgg16": 5}


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
    model = attach_exits(_plain_backbone(), split_points=[2, 5, 8], input_shape=(1, 28, 28), num_classes=10)
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
    with pytest.raises(ConfigError, match="split point"):
        attach_exits(_plain_backbone(), ["nope"], (1, 28, 28), 10)
    with pytest.raises(ConfigError, match="logits"):
        attach_exits(_plain_backbone()[:-1], [2], (1, 28, 28), 10)


@pytest.mark.parametrize("name", sorted(EXITS))
def test_optimize_for_inference_computes_the_same_function(name):
    from dart_ee.models import optimize_for_inference

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
