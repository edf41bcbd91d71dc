"""The benchmark's choice of images."""

import numpy as np

from dart_ee.bench import timing_sample


def test_timing_sample_is_a_random_draw_of_the_split():
    labels = np.repeat(np.arange(10), 100)  # a class-sorted split, as image folders list it
    pick = timing_sample(len(labels), 256)
    assert len(set(pick.tolist())) == 256 and np.bincount(labels[pick], minlength=10).min() > 10  # every class
    assert np.array_equal(pick, timing_sample(len(labels), 256))  # seeded
    more = timing_sample(len(labels), 2500)  # larger than the split: every image, then again
    assert len(more) == 2500 and np.array_equal(np.sort(more[:1000]), np.arange(1000))
    assert np.bincount(more, minlength=1000).min() == 2
