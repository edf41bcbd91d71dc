import numpy as np
import pytest
import torch
from torch import nn

from dart_ee.adapt.controller import UCB1, AdaptiveController, AlphaReference, agreement_targets
from dart_ee.calibration.calibrate import calibrate
from dart_ee.core.errors import ConfigError
from dart_ee.data.shift import FAMILIES, SCENARIOS, gaussian_blur, make_stream
from dart_ee.difficulty.estimators import load_estimators
from dart_ee.policies import make_policy
from dart_ee.runtime.eager import EarlyExitRunner
from dart_ee.training.train import load_model


class Switchable(nn.Module):
    """Wraps an exit head; when ``wrong`` is set it shifts every prediction to the next class (same confidence)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head, self.wrong = head, False

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.head(h)
        return z.roll(1, dims=1) if self.wrong else z


def _setup(trained_run, **kw):
    cal = trained_run["cal"]
    policy = calibrate("dart", cal, max_drop=3.0, beta_diff=0.0)[0]
    model = load_model(trained_run["run"] / "model.pt", optimize=True)
    runner = EarlyExitRunner(model, policy, load_estimators(trained_run["run"] / "difficulty.pt"))
    ctrl = AdaptiveController(runner, agreement_targets(policy, cal), **kw)
    twin = make_policy("dart").set_params(**policy.get_params())
    twin.__dict__.update(policy.fitted_state())  # before the runner reads which alpha the policy uses
    frozen = EarlyExitRunner(model, twin, runner.estimator)
    return ctrl, frozen, model


def _stream(images, n, seed=0):
    idx = np.random.default_rng(seed).integers(0, len(images), n)
    return images[idx].float() / 255


def test_stationary_stream_keeps_coefficients_and_savings(trained_run):
    ref = AlphaReference.from_alpha(trained_run["cal"].alpha)
    ctrl, frozen, _ = _setup(trained_run, audit_share=0.05, update_every=2, window=500, alpha_ref=ref)
    x = _stream(trained_run["images"], 4096)
    macs_frozen, macs_adapt = [], []
    for s in range(0, len(x), 64):
        b = x[s: s + 64]
        macs_frozen.append(ctrl.exit_costs[frozen(b).exit])
        macs_adapt.append(ctrl.exit_costs[ctrl.process(b)[0].exit])  # exit compute, audits excluded
    assert ctrl.history, "the controller never updated"
    for h in ctrl.history:
        assert np.all(np.abs(np.array(h["c_exit"]) - 1) <= 0.1)
        assert np.all(np.abs(np.array(h["c_class"]) - 1) <= 0.1)
        assert not h["shifted"], "the shift guard fired on an in-domain stream"
    sf, sa = (1 - float(torch.cat(m).mean()) / ctrl.static_macs for m in (macs_frozen, macs_adapt))
    assert abs(sa - sf) <= 0.02


def test_shift_guard_treats_out_of_domain_inputs_as_hard(trained_run):
    ref = AlphaReference.from_alpha(trained_run["cal"].alpha)
    ctrl, frozen, model = _setup(trained_run, audit_share=0.0, alpha_ref=ref)
    clean = _stream(trained_run["images"], 768)
    blurred = gaussian_blur(clean, 0.5)  # alpha collapses: blurred images look "easy" to the paper's score
    for s in range(0, 768, 128):
        ctrl.process(clean[s: s + 128])
        assert not ctrl.shifted and ctrl.policy.alpha_floor is None
    depth_adaptive, depth_frozen = [], []
    for s in range(0, 768, 128):
        r = ctrl.process(blurred[s: s + 128])[0]
        if s >= 256:  # the guard sees the shift within a batch or two
            assert ctrl.shifted and ctrl.shift_score() < -1 and ctrl.policy.alpha_floor == ref.hard
            depth_adaptive.append(float(r.exit.float().mean()))
            depth_frozen.append(float(frozen(blurred[s: s + 128]).exit.float().mean()))
    assert np.mean(depth_adaptive) > np.mean(depth_frozen)  # treated as hard: more confidence needed, deeper exits
    for s in range(0, 768, 128):
        ctrl.process(clean[s: s + 128])
    assert not ctrl.shifted and ctrl.policy.alpha_floor is None  # back in domain: the guard lets go


def test_early_exits_fall_when_they_become_wrong(trained_run):
    ctrl, _, model = _setup(trained_run, audit_share=0.2, update_every=1, window=400)
    for i in range(model.num_exits - 1):
        model.heads[i] = Switchable(model.heads[i])
    x = _stream(trained_run["images"], 4000)
    early_share = []
    for s in range(0, len(x), 100):
        if s == 1000:
            for h in model.heads[:-1]:
                h.wrong = True
        r, _ = ctrl.process(x[s: s + 100])
        early_share.append(float((r.exit < model.num_exits - 1).float().mean()))
    before, after = np.mean(early_share[5:10]), np.mean(early_share[-5:])
    assert before > 0.3
    assert after < 0.5 * before
    assert max(ctrl.c_exit) > 1.2


def test_ucb1_finds_the_best_arm():
    rng = np.random.default_rng(0)
    means = [0.3, 0.5, 0.7, 0.4]
    bandit = UCB1(len(means))
    for _ in range(2000):
        a = bandit.select()
        bandit.reward(a, float(rng.random() < means[a]))
    assert int(np.argmax(bandit.counts)) == 2
    assert bandit.counts[2] > 0.5 * sum(bandit.counts)


def test_state_round_trip(trained_run, tmp_path):
    ctrl, _, _ = _setup(trained_run, audit_share=0.3, update_every=1, window=300, ucb=True)
    x = _stream(trained_run["images"], 1200, seed=1)
    for s in range(0, 600, 100):
        ctrl.process(x[s: s + 100])
    ctrl.update(torch.zeros(100, dtype=torch.long))
    ctrl.save(tmp_path / "state.pt")
    twin, _, _ = _setup(trained_run, audit_share=0.3, update_every=1, window=300, ucb=True)
    twin.load(tmp_path / "state.pt")
    for s in range(600, 1200, 100):  # the restored controller goes on exactly where the first one is
        a, b = ctrl.process(x[s: s + 100])[0], twin.process(x[s: s + 100])[0]
        assert torch.equal(a.exit, b.exit)
    assert ctrl.c_exit == twin.c_exit and ctrl.bandit.counts == twin.bandit.counts


def test_controller_validation(trained_run):
    model = load_model(trained_run["run"] / "model.pt", optimize=True)
    with pytest.raises(ConfigError, match="DART"):
        AdaptiveController(EarlyExitRunner(model, make_policy("threshold").fit(trained_run["cal"])))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_shift_streams_are_deterministic(scenario, trained_run):
    imgs = trained_run["images"].numpy()
    labels = np.arange(len(imgs)) % 10
    sev = FAMILIES[scenario].levels if scenario in FAMILIES else (0.2, 0.5, 0.8)
    a = make_stream(imgs, labels, scenario, sev[1], 100, 120, seed=3)
    b = make_stream(imgs, labels, scenario, sev[1], 100, 120, seed=3)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and a.shift_start == 100 and len(a.y) == 220
    assert a.x.min() >= 0 and a.x.max() <= 1 and a.x.dtype == torch.float32
    assert torch.equal(a.x[:100], make_stream(imgs, labels, scenario, sev[2], 100, 120, seed=3).x[:100])
    if scenario != "class-prior":  # grades differ, and a corruption moves pixels away from the clean images
        assert not torch.equal(a.x[100:], make_stream(imgs, labels, scenario, sev[2], 100, 120, seed=3).x[100:])
        clean = make_stream(imgs, labels, "class-prior", 0.0, 100, 120, seed=3)
        assert not torch.equal(a.x[100:], clean.x[100:]) or scenario == "ramp"


def test_stream_longer_than_the_split_keeps_its_clean_part_clean(trained_run):
    imgs = trained_run["images"].numpy()  # 300 test images
    st = make_stream(imgs, np.arange(len(imgs)) % 10, "noise", 0.1, 500, 400, seed=0)
    assert len(st.y) == 900 and st.shift_start == 500
    on_grid = lambda x: torch.all(((x * 255) - (x * 255).round()).abs() < 1e-3)  # noqa: E731 (unshifted uint8 pixels)
    assert on_grid(st.x[:500]) and not on_grid(st.x[500:])


def test_controller_overhead_measurement(trained_run, tmp_path):
    from dart_ee.bench.benchmark import controller_overhead

    policy = calibrate("dart", trained_run["cal"], max_drop=3.0)[0]
    policy.save(tmp_path / "dart.json")
    rec = controller_overhead(trained_run["run"], tmp_path / "dart.json", batch_size=64, n_images=128, repeats=1,
                              threads=1)
    assert rec["images"] == 128 and rec["runner_ms_per_image"] > 0 and rec["controller_ms_per_image"] > 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_corrupts_more_at_each_grade(family):
    gen = torch.Generator().manual_seed(0)  # smooth random colour images, like photographs at 32 pixels
    imgs = (255 * torch.nn.functional.avg_pool2d(torch.rand(60, 3, 32, 32, generator=gen), 3, 1, 1)).byte().numpy()
    labels = np.zeros(len(imgs), dtype=np.int64)
    clean = make_stream(imgs, labels, family, FAMILIES[family].levels[0], 0, 60, seed=1).x
    ref = torch.from_numpy(imgs[np.random.default_rng(1).permutation(60)]).float() / 255
    dist = [float((make_stream(imgs, labels, family, s, 0, 60, seed=1).x - ref).abs().mean())
            for s in FAMILIES[family].levels]
    assert clean.shape == ref.shape and 0 < dist[0] < dist[1] < dist[2], dist
