import numpy as np
import pytest
import torch

from dart_ee.core.errors import ArtifactError, InputError
from dart_ee.difficulty.estimators import (
    DifficultyEstimator,
    LearnedDifficulty,
    fit_weights,
    load_estimators,
    oracle_depth,
    save_estimators,
    spearman,
)


def _fitted(channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = (torch.rand(64, channels, 32, 32, generator=g) * 255).to(torch.uint8)
    return DifficultyEstimator().fit(imgs)


def _synthetic(channels=3):
    flat = torch.full((1, channels, 32, 32), 0.5)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    checker = (0.4 + 0.2 * ((yy // 8 + xx // 8) % 2).float()).expand(1, channels, 32, 32)
    noise = torch.rand(1, channels, 32, 32, generator=torch.Generator().manual_seed(3))
    return flat, checker, noise


@pytest.mark.parametrize("channels", [1, 3])
def test_flat_below_checkerboard_below_noise(channels):
    est = DifficultyEstimator()
    flat, checker, noise = _synthetic(channels)
    est.fit((torch.cat([flat, checker, noise] * 4) * 255).to(torch.uint8))
    a = est(torch.cat([flat, checker, noise]))
    assert a[0] < a[1] < a[2]
    assert ((a >= 0) & (a <= 1)).all()


def test_alpha_alone_equals_alpha_in_any_batch():
    est = _fitted()
    x = torch.rand(37, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    batch = est(x)
    alone = torch.cat([est(x[i: i + 1]) for i in range(len(x))])
    shuffled = est(x.flip(0)).flip(0)
    assert torch.equal(batch, alone) and torch.equal(batch, shuffled)


def test_state_round_trip(tmp_path):
    est = LearnedDifficulty(_fitted())
    rng = np.random.default_rng(0)
    feats, depth = rng.normal(size=(300, 12)), rng.integers(1, 8, 300)
    est.fit(feats, depth, num_exits=6)
    save_estimators(est, tmp_path / "d.pt")
    back = load_estimators(tmp_path / "d.pt")
    x = torch.rand(5, 3, 32, 32)
    assert torch.equal(back.paper(x), est.paper(x))
    f = torch.from_numpy(feats[:20]).float()
    assert torch.equal(back.predict(f), est.predict(f))
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="bad.pt"):
        load_estimators(tmp_path / "bad.pt")
    # a file from an older version (a buffer missing) is a clear error that says how to regenerate it
    ck = torch.load(tmp_path / "d.pt", weights_only=True)
    del ck["state_dict"]["scale"]
    torch.save(ck, tmp_path / "old.pt")
    with pytest.raises(ArtifactError, match="old.pt.*dart-ee trace"):
        load_estimators(tmp_path / "old.pt")


def test_bad_input():
    est = _fitted()
    for bad, match in ((torch.full((1, 3, 32, 32), float("nan")), "NaN"), (torch.full((1, 3, 32, 32), float("inf")), "NaN"),
                       (torch.rand(3, 32, 32), "shape"), (torch.rand(1, 2, 32, 32), "shape"),
                       (torch.rand(1, 3, 32, 32) * 255, r"\[0, 1\]"), (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "float"),
                       (torch.rand(0, 3, 32, 32), "empty")):
        with pytest.raises(InputError, match=match):
            est(bad)
    with pytest.raises(ArtifactError, match="not fitted"):
        DifficultyEstimator()(torch.rand(1, 3, 32, 32))


def test_cost_under_100_kflops():
    f = _fitted().flops((3, 32, 32))
    assert 20_000 < f["total"] <= 100_000


def test_spearman_and_depth():
    assert spearman(np.arange(10), np.arange(10) ** 2) == pytest.approx(1.0)
    assert spearman(np.arange(10), -np.arange(10)) == pytest.approx(-1.0)
    correct = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 0]], bool)
    assert oracle_depth(correct).tolist() == [1, 2, 4]


def test_weight_search_prefers_the_informative_term():
    rng = np.random.default_rng(0)
    depth = rng.integers(1, 7, 1000)
    terms = np.stack([rng.random(1000), np.clip(depth / 7 + rng.normal(0, 0.1, 1000), 0, 1), rng.random(1000)], 1)
    res = fit_weights(terms, depth, trials=100, folds=5)
    assert res["weights"][1] > 0.6
    assert res["cv_spearman_fitted"] >= res["cv_spearman_default"]
