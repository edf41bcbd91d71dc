"""LeViT with token exits: published sizes, training with exits, and the runtime deciding as the trace says."""

import numpy as np
import pytest
import torch

from dart_ee import create_model
from dart_ee.report.reference import PAPER_PARAMS


def test_published_sizes_at_224_pixels():
    """At ImageNet's input and 1,000 classes the backbone has the LeViT paper's parameter count (within its
    distillation head, which is left out) and its MACs."""
    for name, paper_macs in (("levit_128s", 305e6), ("levit_192", 658e6), ("levit_256", 1120e6)):
        m = create_model(name, num_classes=1000, image_size=224).eval()
        d = m.describe()
        distill_head = 1000 * (m.heads[-1][-1].in_features + 1)
        assert abs(d["params"]["backbone"] + distill_head - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.02, name
        assert abs(d["static_macs"] - paper_macs) / paper_macs < 0.02, (name, d["static_macs"])


def test_cifar_variant_exits_spread_over_the_macs():
    d = create_model("levit_128s").describe()
    frac = [e["fraction_of_full"] for e in d["exits"]]
    assert len(frac) == 6 and all(b > a for a, b in zip(frac, frac[1:])) and frac[0] < 0.25
    assert max(b - a for a, b in zip([0, *frac], frac)) < 0.35  # no exit waits for more than a third of the MACs


def test_a_tiny_levit_trains_with_exits():
    from dart_ee.config import Config
    from dart_ee.training.train import multi_exit_loss

    torch.manual_seed(0)
    m = create_model("levit_128s", width_mult=0.125)
    x, y = torch.rand(32, 3, 32, 32), torch.randint(0, 10, (32,))
    x[y % 2 == 0, 0] += 0.5  # something to learn
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    cfg = Config()
    losses = []
    for _ in range(8):
        loss = multi_exit_loss(m(x.clamp(0, 1)), y, [1.0] * m.num_exits, cfg, [1.0] * m.num_exits)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in m.heads.parameters())  # every token exit learns


@pytest.fixture(scope="module")
def tiny_levit_traces():
    """A tiny LeViT trained for a few dozen steps on learnable stripes, so that its exits disagree usefully."""
    from conftest import _class_images

    from dart_ee.config import Config
    from dart_ee.difficulty.estimators import fit_estimators
    from dart_ee.models.net import optimize_for_inference
    from dart_ee.runs.tracing import make_trace
    from dart_ee.training.train import multi_exit_loss

    torch.manual_seed(0)
    m = create_model("levit_128s", width_mult=0.125)
    xs, ys = _class_images(600, 3, 32, 10, 3)
    level = np.random.default_rng(0).uniform(0, 150, (600, 1, 1, 1))  # some images easy, some nearly hopeless
    xs = np.clip(xs + np.random.default_rng(1).normal(0, 1, xs.shape) * level, 0, 255).astype(np.uint8)
    x, y = torch.from_numpy(xs), torch.from_numpy(ys)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    m.train()
    for step in range(30):
        idx = torch.arange(step * 32, step * 32 + 32) % 240
        loss = multi_exit_loss(m(x[idx].float() / 255), y[idx], [1.0] * m.num_exits, Config(), [1.0] * m.num_exits)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = optimize_for_inference(m.eval())
    with torch.no_grad():  # labels the final exit gets right, so that an early exit pays only where it agrees
        y = model(x.float() / 255)[-1].argmax(1)
    est = fit_estimators(xs[:240])
    cal = make_trace(model, [(x[240:480], y[240:480])], "cal", est)
    test = make_trace(model, [(x[480:], y[480:])], "test", est)
    return model, est, cal, test, x[480:]


@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_runtime_on_token_tensors_equals_trace_evaluation_for_every_policy(tiny_levit_traces, batch_size):
    from dart_ee.calibration.calibrate import calibrate
    from dart_ee.calibration.evaluation import simulate
    from dart_ee.policies import POLICIES
    from dart_ee.runtime.eager import EarlyExitRunner

    model, est, cal, test, images = tiny_levit_traces
    depths = {}
    for name in sorted(POLICIES):
        policy = calibrate(name, cal, max_drop=5.0)[0]
        exits, preds = simulate(policy, test)
        out = EarlyExitRunner(model, policy, est).run(images, batch_size)
        np.testing.assert_array_equal(out.exit.numpy(), exits, err_msg=name)
        np.testing.assert_array_equal(out.pred.numpy(), preds, err_msg=name)
        depths[name] = len(np.unique(exits))
    assert depths["threshold"] > 1 and depths["dart"] > 1  # real early exits on tokens


def test_a_levit_report_shows_the_papers_table_ii_beside_this_run():
    from test_publish import _table_shapes

    from dart_ee.report.markdown import paper_tables

    res = {"config": {"data": {"dataset": "cifar10"}, "model": {"name": "levit_128s"}},
           "compare": {"rows": [{"policy": p, "test": {"accuracy": 0.8, "mac_reduction": 0.4, "macs_per_image": 2e8}}
                                for p in ("static", "dart")]},
           "benchmark": {"rows": [{"method": p, "speedup": 1.5, "time_ms": 1.0, "daes": 1.0} for p in ("static", "dart")]}}
    text = "\n\n".join(paper_tables(res))
    assert "Table II (levit_128s on CIFAR-10)" in text and "Table I (levit_128s on cifar10)" in text
    assert "| dart | 81.73% | 80.00% | 56.4 | 200.0 | 4.56 | 1.000 | 2.53x | 1.50x |" in text
    for line, rows in _table_shapes(text):
        assert len(set(rows)) == 1, (line, rows)
