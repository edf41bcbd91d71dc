"""The benchmark: its choice of images, its timing loops, the interval of a batch-1 speedup, and the speedup
that the stages' measured prices predict."""

import numpy as np
import pytest

from dart_ee.bench.benchmark import stage_costs, stage_time_speedup, timing_sample
from dart_ee.bench.timing import alternate, alternate_singles, median_ratio_ci
from dart_ee.models.net import create_model, optimize_for_inference
from dart_ee.policies import StaticPolicy, make_policy


def test_timing_sample_is_a_random_draw_of_the_split():
    labels = np.repeat(np.arange(10), 100)  # a class-sorted split, as image folders list it
    pick = timing_sample(len(labels), 256)
    assert len(set(pick.tolist())) == 256 and np.bincount(labels[pick], minlength=10).min() > 10  # every class
    assert np.array_equal(pick, timing_sample(len(labels), 256))  # seeded
    more = timing_sample(len(labels), 2500)  # larger than the split: every image, then again
    assert len(more) == 2500 and np.array_equal(np.sort(more[:1000]), np.arange(1000))
    assert np.bincount(more, minlength=1000).min() == 2


def test_timing_loops_alternate_the_methods():
    order = []
    seconds, joules = alternate({k: (lambda k=k: order.append(k)) for k in "abc"}, repeats=3, n_images=10, warmup=0)
    assert order == list("abcbcacab")  # each method goes first in turn: drift favours none
    assert all(len(v) == 3 for v in seconds.values()) and joules == {k: [] for k in "abc"}  # no energy counter

    class Res:
        def __init__(self, e):
            self.exit = [e]

    lat, exits = alternate_singles({"static": lambda j: Res(2), "early": lambda j: Res(j % 2)}, 4)
    assert exits == {"static": [2, 2, 2, 2], "early": [0, 1, 0, 1]} and len(lat["early"]) == 4
    assert alternate({}, 2) == ({}, {})  # an engine without methods here


def test_median_ratio_interval_covers_the_ratio_and_narrows_with_more_images():
    rng = np.random.default_rng(1)
    static = 2.0 + 0.1 * rng.standard_normal(4000)
    early = np.where(rng.random(4000) < 0.6, 1.0, 2.5) + 0.1 * rng.standard_normal(4000)  # a bimodal path
    wide, narrow = median_ratio_ci(static[:200], early[:200]), median_ratio_ci(static, early)
    point = np.median(static) / np.median(early)
    assert narrow[0] < point < narrow[1] and wide[1] - wide[0] > narrow[1] - narrow[0]
    with pytest.raises(ValueError, match="paired"):
        median_ratio_ci([1.0, 2.0], [1.0])


def test_stage_time_prediction_is_the_mac_rule_with_measured_prices():
    """Each exit costs the stages and heads passed, plus the estimator for a policy that reads alpha; the static
    network costs its own price whatever the exit."""
    costs = {"stage_ms": [1.0, 2.0, 3.0], "head_ms": [0.1, 0.1, 0.1], "static_ms": 6.1,
             "estimator_ms": {"paper": 0.5}}
    exits = np.array([0, 0, 2, 1])  # leave at 1.1, 1.1, 6.3 and 3.2 ms
    assert stage_time_speedup(costs, make_policy("threshold", tau=0.5), exits) == pytest.approx(6.1 / 2.925)
    assert stage_time_speedup(costs, StaticPolicy(), exits) == 1.0

    reads = make_policy("threshold", tau=0.5)  # a policy reading the paper's alpha pays for the estimator at every exit
    reads.uses_alpha, reads.alpha_source_ = True, "paper"  # type: ignore[misc]
    assert stage_time_speedup(costs, reads, exits) == pytest.approx(6.1 / 3.425)


def test_stage_costs_price_every_stage_and_head_on_the_batch():
    import torch

    model = optimize_for_inference(create_model("alexnet", 10, 1, 28))
    costs = stage_costs(model, torch.rand(8, 1, 28, 28), repeats=2)
    assert costs["batch_size"] == 8 and costs["estimator_ms"] == {}  # no estimator given: none priced
    assert len(costs["stage_ms"]) == len(costs["head_ms"]) == model.num_exits
    assert min(costs["stage_ms"] + costs["head_ms"]) > 0 and costs["static_ms"] > 0
