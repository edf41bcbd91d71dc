"""Checking that certified budgets hold: a generator with known truth, and re-splits of real pools.

One trained network's held-out pool is one draw: re-splitting it checks the implementation, and only
a generator whose truth is known checks coverage itself (``shared/docs/CALIBRATION.md``, "Verifying
coverage"). Pass criterion for both: at most 15 of 200 draws exceed the budget
(P(Bin(200, 0.05) >= 16) = 0.044, power 0.999 against a 15% failure rate).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dart_ee.calibration.certify import FIT_SHARE, certify, certify_split, losses, uses_fit_split
from dart_ee.calibration.evaluation import evaluate, simulate
from dart_ee.core.defaults import CONFIDENCE
from dart_ee.core.errors import ConfigError
from dart_ee.policies import ExitPolicy
from dart_ee.trace import Trace

KINDS = ("nested", "independent", "two-type")
MAX_EXCEED = 15  # of 200 draws, see the module docstring


def synthetic_trace(n: int, kind: str = "nested", exits: int = 6, k: int = 10, seed: int = 0, split: str = "cal") -> Trace:
    """A trace with known truth: a latent difficulty u drives correctness, confidence and alpha.

    - ``nested``: exit i is right iff u < a_i (a_i rising with depth), so an exit that is right stays
      right deeper: the samples that go on are the harder ones, which the DP's state cannot see;
    - ``independent``: exit i is right iff u + e_i < a_i with independent noise e_i: not nested;
    - ``two-type``: easy and hard samples look alike at exit 1; the easy ones become confidently right
      deeper, the hard ones confidently wrong, so a DP state averages two different futures.
    Confidence tracks correctness with noise; alpha is a noisy view of u.
    """
    if kind not in KINDS:
        raise ConfigError(f"--synthetic must be one of {', '.join(KINDS)}, got {kind!r}")
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    labels = rng.integers(0, k, n)
    acc = np.linspace(0.55, 0.9, exits)
    if kind == "nested":
        correct = u[:, None] < acc[None]
        margin = acc[None] - u[:, None]
    elif kind == "independent":
        z = u[:, None] + rng.normal(0, 0.2, (n, exits))  # each exit sees the difficulty through its own noise
        correct = z < acc[None]
        margin = acc[None] - z
    else:
        hard = u > 0.6
        first = rng.random(n) < 0.7
        deep = np.where(hard, rng.random(n) < 0.35, rng.random(n) < 0.97)
        correct = np.concatenate([first[:, None], np.repeat(deep[:, None], exits - 1, 1)], 1)
        margin = np.where(correct, 0.2, -0.2)
        margin[:, 0] = rng.normal(0, 0.1, n)  # exit 1's confidence says nothing about the type
    conf = 1 / (1 + np.exp(-(4 * margin + rng.normal(0, 0.8, (n, exits)))))
    conf = 1 / k + (1 - 1 / k) * np.clip(conf, 0, 1)
    wrong = (labels[:, None] + rng.integers(1, k, (n, exits))) % k
    pred = np.where(correct, labels[:, None], wrong)
    probs = np.repeat(((1 - conf) / (k - 1))[..., None], k, -1)
    np.put_along_axis(probs, pred[..., None], conf[..., None], -1)
    macs = np.round(np.linspace(1, 10, exits) ** 1.5 * 1e6).astype(np.int64)
    alpha = np.clip(u + rng.normal(0, 0.25, n), 0, 1)
    return Trace(probs.astype(np.float32), labels, np.arange(n), macs, alpha,
                 meta={"split": split, "static_macs": int(macs[-1]), "dataset": f"synthetic-{kind}"})


def true_risk(policy: ExitPolicy, truth: Trace, risk: str) -> float:
    """The policy's risk in points on a large fresh sample (the truth)."""
    return 100 * float(losses(risk, truth, simulate(policy, truth)[1]).mean())


def population_coverage(policy: str, kind: str, max_drop: float, confidence: float = CONFIDENCE, risk: str = "drop",
                        draws: int = 200, n_cal: int = 5000, n_truth: int = 100_000, seed: int = 0,
                        **kw: Any) -> dict:
    """Certify on ``draws`` fresh calibration draws; count how often the true risk exceeds the budget."""
    truth = synthetic_trace(n_truth, kind, seed=10**6 + seed, split="test")
    rows = []
    for d in range(draws):
        cal = synthetic_trace(n_cal, kind, seed=seed + d)
        pol, rec = certify(policy, cal, max_drop, confidence, risk=risk, seed=seed + d, **kw)
        rows.append({"true_risk_points": true_risk(pol, truth, risk), "certified": rec["guarantee"]["certified"],
                     "mac_reduction": evaluate(pol, truth)["mac_reduction"]})
    return _summary(rows, {"check": "population", "policy": policy, "kind": kind, "max_drop": max_drop,
                           "confidence": confidence, "risk": risk, "draws": draws, "n_cal": n_cal, "n_truth": n_truth})


def pool_traces(a: Trace, b: Trace) -> Trace:
    """The pooled held-out samples, tagged "cal" so that re-splits can fit on them."""
    extra = {k: np.concatenate([a.extra[k], b.extra[k]]) for k in a.extra if k in b.extra}
    alpha = None if a.alpha is None or b.alpha is None else np.concatenate([a.alpha, b.alpha])
    return Trace(np.concatenate([a.probs, b.probs]), np.concatenate([a.labels, b.labels]),
                 np.arange(a.n + b.n), a.exit_macs, alpha, dict(a.meta, split="cal", n=a.n + b.n), extra)


def resplit_coverage(cal: Trace, test: Trace, policy: str, max_drop: float, confidence: float = CONFIDENCE,
                     risk: str = "drop", resplits: int = 200, seed: int = 0, n_fit: int | None = None,
                     n_cert: int | None = None, **kw: Any) -> dict:
    """Both designs of CALIBRATION.md on the pooled calibration and test traces.

    - ``replacement``: fit and cert drawn with replacement from the pool; the reference risk is the
      whole pool's, which carries no test noise;
    - ``split``: n_fit / n_cert / rest without replacement; the reference is the risk on the rest, which
      neither fitted nor chose the policy (for a data-free policy too, which certifies on fit and cert together),
      and whose realised drop is reported too.
    A data-free policy (threshold, patience) certifies on fit and cert together. By default fit and
    cert split the shipped calibration split's size as certification does (5,000: 2,000 / 3,000).
    """
    n_fit = round(FIT_SHARE * cal.n) if n_fit is None else n_fit
    n_cert = cal.n - n_fit if n_cert is None else n_cert
    pool = pool_traces(cal, test)
    rng = np.random.default_rng(seed)
    out = {}
    for design in ("replacement", "split"):
        rows = []
        for _ in range(resplits):
            if design == "replacement":
                fit_idx, cert_idx = rng.integers(0, pool.n, n_fit), rng.integers(0, pool.n, n_cert)
                test_idx = ref_idx = np.arange(pool.n)
            else:
                perm = rng.permutation(pool.n)
                fit_idx, cert_idx, test_idx = perm[:n_fit], perm[n_fit:n_fit + n_cert], perm[n_fit + n_cert:]
                ref_idx = test_idx  # not the fit or cert samples: they chose the policy (a data-free one: both did)
            learned = uses_fit_split(policy)
            fit, cert = pool.subset(fit_idx), pool.subset(cert_idx if learned else np.concatenate([fit_idx, cert_idx]))
            pol, rec = certify_split(policy, fit, cert, max_drop, confidence, risk=risk, data_free=not learned, **kw)
            t = evaluate(pol, pool.subset(test_idx))
            rows.append({"true_risk_points": true_risk(pol, pool.subset(ref_idx), risk), "certified":
                         rec["guarantee"]["certified"], "test_drop_points": t["drop_points"],
                         "mac_reduction": t["mac_reduction"]})
        out[design] = _summary(rows, {"design": design, "max_drop": max_drop,
                                      "reference": "pool" if design == "replacement" else "rest"})
    return {"check": "resplit", "policy": policy, "max_drop": max_drop, "confidence": confidence, "risk": risk,
            "resplits": resplits, "pool": pool.n, "n_fit": n_fit, "n_cert": n_cert, **out}


def _summary(rows: list[dict], head: dict) -> dict:
    risk = np.array([r["true_risk_points"] for r in rows])
    macs = np.array([r["mac_reduction"] for r in rows])
    exceed = int((risk > head.get("max_drop", np.inf) + 1e-9).sum()) if "max_drop" in head else None
    out = {**head, "draws": len(rows), "certified": int(sum(r["certified"] for r in rows)),
           "mean_reference_risk_points": float(risk.mean()), "max_reference_risk_points": float(risk.max()),
           "mean_mac_reduction": float(macs.mean()), "sd_mac_reduction": float(macs.std(ddof=1)) if len(rows) > 1 else 0.0,
           "rows": rows}
    if exceed is not None:
        out.update(exceed=exceed, passed=exceed <= MAX_EXCEED * len(rows) / 200)
    if "test_drop_points" in rows[0]:
        drops = np.array([r["test_drop_points"] for r in rows])
        out.update(mean_test_drop_points=float(drops.mean()), p95_test_drop_points=float(np.percentile(drops, 95)))
    return out

