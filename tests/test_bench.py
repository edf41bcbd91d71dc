"""The benchmark: its choice of images, its timing loops and the interval of a batch-1 speedup."""

import numpy as np
import pytest

from dart_ee.bench import timing_sample
from dart_ee.timing import alternate, alternate_singles, median_ratio_ci


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
