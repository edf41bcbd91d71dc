"""The stage-queued runner: streams in pieces, batch filling, errors and CUDA graphs (its equality with the
trace evaluation is tested beside the eager runner's, in test_runtime.py)."""

import numpy as np
import pytest
import torch
from test_runtime import _fitted

from dart_ee.core.errors import ConfigError, InputError
from dart_ee.difficulty.estimators import load_estimators
from dart_ee.policies import make_policy
from dart_ee.runtime.eager import EarlyExitRunner
from dart_ee.runtime.queued import QueuedRunner
from dart_ee.training.train import load_model


def _runner(run, policy, batch_size, **kw):
    return QueuedRunner(load_model(run["run"] / "model.pt", optimize=True), policy,
                        load_estimators(run["run"] / "difficulty.pt"), batch_size=batch_size, **kw)


def test_queue_takes_rows_in_arrival_order_across_parts():
    """Parts queue rows lazily (an index, or a run of consecutive rows); a take gathers them in order, and a
    run at the front of one part comes back as a view, uncopied."""
    from dart_ee.runtime.queued import _Queue

    h = torch.arange(6 * 2 * 3 * 3, dtype=torch.float32).reshape(6, 2, 3, 3).contiguous(memory_format=torch.channels_last)
    a = torch.arange(6, dtype=torch.float32)
    q = _Queue()
    q.append(torch.tensor([10, 11, 12]), {"h": h, "alpha": a}, torch.tensor([4, 0, 2]))
    q.append(torch.tensor([20, 21, 22, 23]), {"h": h, "alpha": a}, 1)  # rows 1-4
    idx, batch = q.take(5)
    assert idx.tolist() == [10, 11, 12, 20, 21] and q.size == 2
    assert torch.equal(batch["h"], h[[4, 0, 2, 1, 2]]) and batch["alpha"].tolist() == [4, 0, 2, 1, 2]
    assert batch["h"].is_contiguous(memory_format=torch.channels_last)
    idx, batch = q.take(2)
    assert idx.tolist() == [22, 23] and batch["alpha"].tolist() == [3, 4] and q.size == 0
    assert batch["h"].data_ptr() == h[3].data_ptr()  # a view: no copy
    # into a captured graph's input buffers: gathered there, a run of one part too (a view would not be seen)
    buf = {"h": torch.zeros(4, 2, 3, 3).contiguous(memory_format=torch.channels_last), "alpha": torch.zeros(4)}
    q.append(torch.tensor([30, 31]), {"h": h, "alpha": a}, 2)
    idx, batch = q.take(2, into=buf)
    assert idx.tolist() == [30, 31] and batch["h"].data_ptr() == buf["h"].data_ptr()
    assert torch.equal(buf["h"][:2], h[2:4]) and buf["alpha"].tolist() == [2, 3, 0, 0]


@pytest.mark.parametrize("name", ["dart", "patience", "threshold"])
def test_stream_in_pieces_equals_one_piece(trained_run, name):
    policy = _fitted(name, trained_run["cal"])
    images = trained_run["images"]
    whole = _runner(trained_run, policy, 16).run(images)
    runner = _runner(trained_run, policy, 16)
    parts, start = [], 0
    for size in (5, 1, 40, 17, 100):  # pieces smaller and larger than the batch
        parts.append(runner.push(images[start: start + size]))
        start += size
    parts.append(runner.push(images[start:]))
    parts.append(runner.finish())
    assert sum(len(p.pred) for p in parts) == len(images)
    for field in ("exit", "pred", "conf"):
        np.testing.assert_array_equal(torch.cat([getattr(p, field) for p in parts]).numpy(),
                                      getattr(whole, field).numpy())
    # the runner is reusable after finish(), and results come in input order as soon as they are complete
    again = runner.push(images[:50])
    assert len(again.pred) <= 50
    np.testing.assert_array_equal(torch.cat([again.exit, runner.finish().exit]).numpy(), whole.exit[:50].numpy())


def test_queued_matches_eager_runner_and_fills_batches(trained_run):
    policy = _fitted("dart", trained_run["cal"])
    images = trained_run["images"]
    eager = EarlyExitRunner(load_model(trained_run["run"] / "model.pt", optimize=True), policy,
                            load_estimators(trained_run["run"] / "difficulty.pt")).run(images, 32)
    runner = _runner(trained_run, policy, 32)
    out = runner.run(images)
    np.testing.assert_array_equal(out.exit.numpy(), eager.exit.numpy())
    np.testing.assert_allclose(out.conf.numpy(), eager.conf.numpy(), rtol=1e-6)
    # every stage call but the last of each stage saw a full batch
    for s in runner.stage_stats:
        assert s["calls"] == 0 or s["samples"] > (s["calls"] - 1) * 32


def test_queued_bad_input(trained_run):
    model = load_model(trained_run["run"] / "model.pt", optimize=True)
    policy = make_policy("threshold", tau=0.5).fit(trained_run["cal"])
    runner = QueuedRunner(model, policy, batch_size=8)
    for bad, match in ((torch.rand(2, 3, 28, 28), "shape"), (torch.full((2, 1, 28, 28), float("nan")), "NaN")):
        with pytest.raises(InputError, match=match):
            runner.run(bad)
    with pytest.raises(ConfigError, match="batch_size"):
        QueuedRunner(model, policy, batch_size=0)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="GPU"):
            QueuedRunner(model, policy, graphs=True)
    dart = _fitted("dart", trained_run["cal"])
    if dart.uses_alpha:
        with pytest.raises(ConfigError, match="estimator"):
            QueuedRunner(model, dart)


class _ReplayOnCpu:
    """A stand-in for a captured graph on the CPU, with a CUDA graph's memory rules: static input buffers, and
    outputs that every replay rewrites in place. So the runner's work around its graphs (padding the last batch,
    the valid mask, copying the stayers out before the next replay) is tested here, not only on a lent GPU."""

    def __init__(self, step, outputs):
        self.step, self.outputs, self.inputs, self.valid = step, outputs, None, None

    def replay(self):
        for k, v in self.step(self.inputs, self.valid).items():
            self.outputs[k].copy_(v)


def _graphs_on_cpu(monkeypatch):
    from dart_ee.runtime import queued

    class CpuGraph(queued._Graph):
        def _capture(self, step):
            outputs = {k: v.clone() for k, v in step(self.inputs, self.valid).items()}
            self.graph = _ReplayOnCpu(step, outputs)
            self.graph.inputs, self.graph.valid = self.inputs, self.valid
            return outputs

    monkeypatch.setattr(queued, "_Graph", CpuGraph)


@pytest.mark.parametrize("name", ["dart", "patience", "rl", "score", "static"])
@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_graph_path_matches_eager_on_cpu(trained_run, monkeypatch, name, batch_size):
    _graphs_on_cpu(monkeypatch)
    policy = _fitted(name, trained_run["cal"])
    images = trained_run["images"]
    eager = EarlyExitRunner(load_model(trained_run["run"] / "model.pt", optimize=True), policy,
                            load_estimators(trained_run["run"] / "difficulty.pt")).run(images, batch_size)
    runner = _runner(trained_run, policy, batch_size)
    runner.graphs = True  # the graph path, with the stand-in above in place of CUDA graphs
    out = runner.run(images)
    assert len(runner._captured) > 0
    assert torch.equal(out.exit, eager.exit) and torch.equal(out.pred, eager.pred)
    again = runner.run(images)  # replayed "graphs", fresh stream: the same results
    assert torch.equal(again.exit, out.exit) and torch.equal(again.pred, out.pred)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on a lent machine)")
@pytest.mark.parametrize("name", ["dart", "patience", "rl", "score", "static"])
@pytest.mark.parametrize("batch_size", [1, 7, 256])
def test_cuda_graph_runner_matches_eager(trained_run, name, batch_size):
    policy = _fitted(name, trained_run["cal"])
    model = load_model(trained_run["run"] / "model.pt", optimize=True).cuda()
    est = load_estimators(trained_run["run"] / "difficulty.pt").cuda()
    images = trained_run["images"]
    eager = EarlyExitRunner(model, policy, est).run(images, batch_size)
    runner = QueuedRunner(model, policy, est, batch_size=batch_size, graphs=True)
    out = runner.run(images)
    assert len(runner._captured) > 0
    # decisions equal except where a confidence sits within float rounding of a threshold
    differ = int(((out.exit != eager.exit) | (out.pred != eager.pred)).sum())
    assert differ <= 3, f"{differ} of {len(images)} decisions differ"
    again = runner.run(images)  # replayed graphs, fresh stream: the same results
    assert torch.equal(again.exit, out.exit)
