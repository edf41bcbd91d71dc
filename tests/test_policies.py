import itertools
import json
import math

import numpy as np
import pytest

from dart_ee.calibration.calibrate import calibrate, compare
from dart_ee.calibration.evaluation import evaluate, oracle, simulate
from dart_ee.calibration.frontier import sweep
from dart_ee.core.errors import ArtifactError, ConfigError
from dart_ee.policies import POLICIES, make_policy, policy_from_dict
from dart_ee.trace import Trace


def probs_from(conf: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Softmax rows with max probability ``conf`` on class ``pred`` and the rest spread evenly."""
    p = np.repeat(((1 - conf) / (k - 1))[..., None], k, -1)
    np.put_along_axis(p, pred[..., None], conf[..., None], -1)
    return p.astype(np.float32)


def realistic_trace(n=2000, exits=4, k=10, seed=0, split="cal") -> Trace:
    """Deeper exits are more accurate; confidence tracks correctness; alpha is weakly informative."""
    rng = np.random.default_rng(seed)
    hard = rng.random(n)
    labels = rng.integers(0, k, n)
    skill = np.linspace(0.5, 0.9, exits)
    correct = rng.random((n, exits)) < np.clip(skill[None] + 0.3 * (0.5 - hard[:, None]), 0, 1)
    wrong = (labels[:, None] + rng.integers(1, k, (n, exits))) % k
    pred = np.where(correct, labels[:, None], wrong)
    conf = np.clip(np.where(correct, 0.75, 0.45) + rng.normal(0, 0.15, (n, exits)), 0.11, 0.999)
    macs = np.cumsum(np.full(exits, 100))
    return Trace(probs_from(conf, pred, k), labels, np.arange(n), macs,
                 alpha=np.clip(hard + rng.normal(0, 0.3, n), 0, 1),
                 meta={"split": split, "static_macs": int(macs[-1])})


def test_dart_exits_everything_when_confident_exits_are_right():
    n, k = 500, 3
    labels = np.arange(n) % k
    conf = np.full((n, 3), 0.95)
    t = Trace(probs_from(conf, np.repeat(labels[:, None], 3, 1), k), labels, np.arange(n), [10, 20, 30],
              alpha=np.linspace(0, 1, n), meta={"split": "cal", "static_macs": 30})
    pol = make_policy("dart", beta_opt=0.1).fit(t)
    exits, _ = simulate(pol, t)
    assert (exits == 0).all()


def test_dart_exits_nothing_early_when_early_exits_are_wrong():
    n, k = 500, 3
    labels = np.arange(n) % k
    pred = np.stack([(labels + 1) % k, (labels + 1) % k, labels], 1)  # only the final exit is right
    conf = np.random.default_rng(0).uniform(0.4, 0.99, (n, 3))
    t = Trace(probs_from(conf, pred, k), labels, np.arange(n), [10, 20, 30], alpha=np.linspace(0, 1, n),
              meta={"split": "cal", "static_macs": 30})
    for beta in (0.0, 0.3, 0.6):
        exits, _ = simulate(make_policy("dart", beta_opt=beta).fit(t), t)
        assert (exits == 2).all()


def test_dp_matches_brute_force():
    """Where the Markov model is exact (deterministic transitions, exact cell accuracies), the DP's
    thresholds must reach the best objective J found by enumerating every threshold combination."""
    per, k, levels = 100, 2, np.array([0.55, 0.65, 0.8, 0.95])
    bins = np.repeat(np.arange(4), per)  # a sample keeps its confidence bin at every exit
    n = len(bins)
    slope = [0.2, 0.1, 0.02]  # early exits depend more on confidence than late ones
    correct = np.zeros((n, 3), bool)
    for i in range(3):
        for c in range(4):
            n_right = round(per * (0.97 - (3 - c) * slope[i]))
            correct[np.flatnonzero(bins == c)[:n_right], i] = True
    conf = np.repeat(levels[bins][:, None], 3, 1)
    t = Trace(probs_from(conf, np.where(correct, 0, 1), k), np.zeros(n, int), np.arange(n), [100, 250, 400],
              meta={"split": "cal", "static_macs": 400})
    for beta in (0.02, 0.1, 0.2, 0.4, 0.9):
        pol = make_policy("dart", beta_opt=beta, alpha_bins=1, conf_bins=4, prior=1e-9, refine=False).fit(t)

        def j(p, beta=beta):
            r = evaluate(p, t)
            return r["accuracy"] - beta * r["mac_fraction"]

        best = -math.inf
        for t1, t2 in itertools.product([0.0, *pol.conf_edges_[0], math.inf], [0.0, *pol.conf_edges_[1], math.inf]):
            brute = make_policy("dart", beta_opt=beta, alpha_bins=1, conf_bins=4).fit(t)
            brute.tau_ = [[t1], [t2]]
            best = max(best, j(brute))
        assert j(pol) == pytest.approx(best, abs=1e-9)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_json_round_trip(name):
    cal, test = realistic_trace(600), realistic_trace(400, seed=1, split="test")
    pol = make_policy(name).fit(cal)
    back = policy_from_dict(json.loads(json.dumps(pol.to_dict())))
    a, b = simulate(pol, test), simulate(back, test)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_policy_file_validation():
    d = make_policy("threshold").fit(realistic_trace(200)).to_dict()
    with pytest.raises(ArtifactError, match="version"):
        policy_from_dict({**d, "version": 7})
    with pytest.raises(ArtifactError, match="not a dart-ee policy"):
        policy_from_dict({"policy": "threshold"})
    with pytest.raises(ConfigError, match="unknown policy"):
        policy_from_dict({**d, "policy": "magic"})
    with pytest.raises(ArtifactError, match="policy: .*no parameter"):  # the file at fault is named
        policy_from_dict({**d, "params": {"tauu": 0.3}})
    with pytest.raises(ArtifactError, match="tau=2.0 must be a finite number in \\[0, 1\\]"):
        policy_from_dict({**d, "params": {"tau": 2.0}})


def test_calibration_never_reads_the_test_trace():
    test = realistic_trace(300, split="test")
    with pytest.raises(ArtifactError, match="calibration split only"):
        make_policy("dart").fit(test)
    with pytest.raises(ArtifactError, match="calibration split only"):
        calibrate("threshold", test, max_drop=0.5)
    with pytest.raises(ArtifactError):
        sweep(test, test)


def test_budget_certified_and_uncertified():
    cal, test = realistic_trace(3000), realistic_trace(3000, seed=5, split="test")
    pol, rec = calibrate("dart", cal, max_drop=1.0, tune_beta_diff=True)
    assert rec["budget_met"] and rec["calibration"]["drop_points"] <= 1.0 + 1e-9
    assert rec["calibration"]["mac_reduction"] > 0.2 and rec["target"]["mode"] == "uncertified budget"
    gpol, grec = calibrate("dart", cal, max_drop=1.0, confidence=0.95)
    assert grec["guarantee"]["certified"] and grec["target"]["mode"] == "certified"
    res = compare(cal, test, max_drop=1.0, policies=("static", "threshold", "patience", "dart"))
    assert [r["policy"] for r in res["rows"]] == ["static", "threshold", "patience", "dart"] and res["mode"] == "certified"
    assert all(r["certified"] for r in res["rows"])
    static = next(r for r in res["rows"] if r["policy"] == "static")
    assert static["test"]["mac_reduction"] == 0 and static["test"]["drop_points"] == 0
    assert compare(cal, test, max_drop=1.0, confidence=None, policies=("threshold",))["rows"][0]["certified"] is None


def test_sweep_chooses_on_calibration():
    cal, test = realistic_trace(1500), realistic_trace(1500, seed=5, split="test")
    res = sweep(cal, test, policies=("threshold", "dart"))
    for name, g in res["grid"].items():
        for b in (25, 50, 75):
            e = g[f"at_{b}"]
            if e["feasible"]:  # chosen by its calibration MACs; the test MACs may overshoot, and say so
                assert e["cal_mac_fraction"] <= b / 100 + 1e-12
                assert e["overshoot"] == pytest.approx(max(0.0, e["mac_fraction"] - b / 100))
                best = max(p["cal_accuracy"] for p in res["curves"][name] if p["cal_mac_fraction"] <= b / 100 + 1e-12)
                assert e["cal_accuracy"] == best
        assert 0 < g["auc"] <= 1
    # a budget nothing meets is infeasible, never 0% accuracy
    cal.exit_macs, test.exit_macs = np.array([150, 200, 300, 400]), np.array([150, 200, 300, 400])
    res = sweep(cal, test, policies=("patience",))
    assert res["grid"]["patience"]["at_25"] == {"budget": 0.25, "feasible": False}


def test_tradeoff_target_and_oracle():
    cal = realistic_trace(1500)
    lo, _ = calibrate("threshold", cal, beta_opt=0.01)
    hi, _ = calibrate("threshold", cal, beta_opt=0.8)
    assert evaluate(hi, cal)["mac_fraction"] <= evaluate(lo, cal)["mac_fraction"]
    orc = oracle(cal)
    assert orc["accuracy"] >= max(cal.exit_accuracy()) and orc["mac_fraction"] < 1


def test_patience_needs_agreement():
    n, k = 6, 3
    labels = np.zeros(n, int)
    pred = np.array([[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 2, 2], [2, 2, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]])
    t = Trace(probs_from(np.full((n, 4), 0.9), pred, k), labels, np.arange(n), [1, 2, 3, 4],
              meta={"split": "cal", "static_macs": 4})
    exits, _ = simulate(make_policy("patience", k=2).fit(t), t)
    assert exits.tolist() == [1, 2, 3, 1, 1, 3]


def test_bins_are_bucketize_for_sorted_edges():
    """The policies' binning (a comparison and a sum, which exports to few ONNX nodes) is torch.bucketize."""
    import torch

    from dart_ee.policies import _bin

    edges = torch.tensor([0.1, 0.27, 0.27, 0.45, 0.9])
    v = torch.cat([torch.rand(1000), edges, torch.tensor([0.0, 1.0, -1.0, 2.0])])
    assert torch.equal(_bin(v, edges), torch.bucketize(v, edges, right=True))
