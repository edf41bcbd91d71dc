"""Exit policies: plain objects fitted on a calibration trace, then deciding per sample.

Every policy has the same small interface, modelled on scikit-learn estimators:

- parameters in ``__init__``; ``knob`` names the one parameter that calibration searches;
- ``fit(cal_trace)`` learns what the policy needs from the calibration split (never the test split);
- ``decide(i, probs, alpha, state)`` takes exit i's softmax for the samples still active, their
  alpha and their per-sample ``state`` (from ``init_state``), and returns a bool mask of the samples
  that leave at exit i. It is called only for i < N-1; at the last exit everything leaves.

``decide`` is pure vectorised torch, so the live runtime (``dart_ee.runtime.eager``) and the trace
evaluator (``dart_ee.calibration.evaluation``) run the very same code on live or cached outputs.
``to_dict``/``policy_from_dict`` round-trip a fitted policy through JSON.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from dart_ee.core import artifacts
from dart_ee.core.errors import ArtifactError, ConfigError
from dart_ee.core.seal import EDITED as EDITED  # re-exported: the certificate API stays importable from here
from dart_ee.core.seal import certificate as certificate
from dart_ee.core.seal import policy_digest
from dart_ee.trace import Trace

FORMAT = "dart-ee-policy"
VERSION = 2  # 2: DART leaves at conf >= tau (the read-off's bins), path-refined DP, -inf thresholds
State = dict[str, torch.Tensor]


POLICIES: dict[str, type[ExitPolicy]] = {}  # the registry: every policy class by name, in definition order


class ExitPolicy:
    """Base class. Subclasses set ``name``, ``knob`` (or None) and implement ``decide``; a named subclass
    registers itself in ``POLICIES`` (a second class of the same name is refused)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in POLICIES:
                raise ConfigError(f"a policy named {cls.name!r} is registered already ({POLICIES[cls.name].__qualname__})")
            POLICIES[cls.name] = cls

    name: ClassVar[str] = ""
    knob: ClassVar[str | None] = None  # the parameter calibration searches
    knob_grid: ClassVar[tuple[float, ...]] = ()
    uses_alpha: ClassVar[bool] = False
    # certification walks the knob from the most conservative value: is that the highest one?
    knob_conservative_high: ClassVar[bool] = False
    # the knob's candidates need no data (certify on the whole calibration split, no fit split)
    data_free_knob: ClassVar[bool] = False

    def get_params(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.endswith("_") and not k.startswith("_")}

    # (low, high) of a parameter where its type alone allows values that mean nothing
    param_bounds: ClassVar[dict[str, tuple[float, float]]] = {}

    def set_params(self, **params: Any) -> ExitPolicy:
        """Set parameters, each checked against the type of its default (a bool, an integer, a finite number)
        and its bounds, so that a policy file or ``--set`` with a string, null, list or NaN fails here, named."""
        current = self.get_params()
        for k, v in params.items():
            if k not in current:
                raise ConfigError(f"policy {self.name!r} has no parameter {k!r}; it has {sorted(current)}")
            setattr(self, k, _checked_param(self.name, k, v, current[k], self.param_bounds.get(k)))
        return self

    def fit(self, trace: Trace) -> ExitPolicy:
        self.set_params(**self.get_params())  # parameters set in __init__ or as attributes are checked too
        check_calibration_trace(trace)
        self.num_exits_ = trace.num_exits
        self.alpha_source_ = trace.meta.get("difficulty", "paper") if self.uses_alpha else None
        return self

    def init_state(self, n: int, device: torch.device | str = "cpu") -> State:
        return {}

    def _tensor(self, values: Any, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A fitted list as a tensor on ``device``, built once: ``decide`` runs on the hot path.

        Keyed by the list's identity, so reassigning a fitted attribute (or new coefficients) rebuilds it.
        """
        cache = self.__dict__.setdefault("_tensors", {})
        key = (id(values), device, dtype)
        if key not in cache:
            cache[key] = (values, torch.tensor(values, dtype=dtype, device=device))  # keep values alive
        return cache[key][1]

    def decide(self, i: int, probs: torch.Tensor, alpha: torch.Tensor | None, state: State) -> torch.Tensor:
        raise NotImplementedError

    def never_leaves_early(self) -> bool:
        """True when no input can leave before the last exit (so the policy's risk is 0 by construction)."""
        return False

    def leave_costs(self, exit_macs: Sequence[float] | np.ndarray, static_macs: float,
                    estimator_macs: Mapping[str, float]) -> np.ndarray:
        """The one cost rule (traces, runtime, benchmark, export, adaptation): MACs to leave at each exit.

        ``exit_macs`` are the network's own (stages and the heads passed); a policy that reads alpha also pays
        for its estimator. (The static policy runs the plain network, without exit heads: see its override.)
        """
        source = getattr(self, "alpha_source_", None) if self.uses_alpha else None
        return np.asarray(exit_macs, dtype=np.float64) + (float(estimator_macs.get(source, 0)) if source else 0.0)

    def fitted_shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        """The shape of each fitted array for ``n`` exits (-1: any length), checked when a policy file is loaded."""
        return {}

    # -- persistence ---------------------------------------------------------------------------
    def fitted_state(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}

    def to_dict(self) -> dict[str, Any]:
        fitted = {k: _jsonable(v) for k, v in self.fitted_state().items()}
        return {"format": FORMAT, "version": VERSION, "policy": self.name, "params": self.get_params(), "fitted": fitted}

    def save(self, path: str | Path, **extra: Any) -> Path:
        """Write the policy as JSON; a certificate in ``calibration`` is sealed with the digest of what it certified."""
        d = self.to_dict()
        cal = extra.get("calibration")
        if isinstance(cal, dict) and isinstance(cal.get("guarantee"), dict):
            extra = {**extra, "calibration": {**cal, "guarantee": {**cal["guarantee"], "policy_digest": policy_digest(d)}}}
        return artifacts.write_json(path, {**d, **extra})


def _checked_param(policy: str, k: str, v: Any, default: Any, bounds: tuple[float, float] | None) -> Any:
    """``v`` if it has the default's type (an int where a float is expected is taken as a float) and lies in bounds."""
    kind = type(default)
    if kind is bool:
        ok, want = isinstance(v, bool), "true or false"
    elif kind is int:
        ok, want = isinstance(v, int) and not isinstance(v, bool), "an integer"
    elif kind is float:
        ok, want = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number"
        v = float(v) if ok else v
    else:
        ok, want = isinstance(v, kind), kind.__name__
    if ok and bounds is not None and not bounds[0] <= v <= bounds[1]:
        ok, want = False, f"{want} in [{bounds[0]:g}, {bounds[1]:g}]"
    if not ok:
        raise ConfigError(f"policy {policy!r}: parameter {k}={v!r} must be {want}")
    return v


def check_calibration_trace(trace: Trace) -> None:
    """Calibration must never read the test split: the trace's split tag enforces it."""
    if not hasattr(trace, "split"):
        raise ArtifactError(f"expected a calibration Trace (dart_ee.trace.load('RUN/trace_cal.npz')), got "
                            f"{type(trace).__name__}")
    if trace.split != "cal":
        raise ArtifactError(f"policies are fitted on the calibration split only, but this trace is tagged "
                            f"{trace.split!r}; pass RUN/trace_cal.npz")


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.cpu().numpy()
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, float) and math.isinf(v):
        return None if v > 0 else "-inf"  # JSON has no infinities: None is "never leave", "-inf" "always leave"
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def _conf(probs: torch.Tensor) -> torch.Tensor:
    return probs.max(1).values


def _bin(v: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Each value's bin, the number of edges at or below it: ``torch.bucketize(v, edges, right=True)`` for
    sorted edges and finite values. As a comparison and a sum it exports to three small ONNX nodes, where
    bucketize exports to a dozen, and at batch 1 each node costs about as much as the arithmetic."""
    return (v[:, None] >= edges).sum(1)


# ----------------------------------------------------------------------------------------------
# Baselines


class StaticPolicy(ExitPolicy):
    """No early exit: every sample runs the whole network (the runtime uses the plain forward)."""

    name = "static"
    data_free_knob = True  # nothing to fit: its risk is 0 by definition

    def decide(self, i: int, probs: torch.Tensor, alpha: torch.Tensor | None, state: State) -> torch.Tensor:
        return torch.zeros(len(probs), dtype=torch.bool, device=probs.device)

    def never_leaves_early(self) -> bool:
        return True

    def leave_costs(self, exit_macs: Sequence[float] | np.ndarray, static_macs: float,
                    estimator_macs: Mapping[str, float]) -> np.ndarray:
        return np.full(len(exit_macs), float(static_macs))  # the plain network: no exit heads, no estimator


class ThresholdPolicy(ExitPolicy):
    """One global max-softmax threshold for every exit."""

    name = "threshold"
    knob = "tau"
    knob_conservative_high = data_free_knob = True
    param_bounds = {"tau": (0.0, 1.0)}
    knob_grid = tuple(np.round(np.concatenate([np.linspace(0.3, 0.9, 61), 1 - np.geomspace(0.1, 1e-4, 60)[1:]]), 6).tolist())

    def __init__(self, tau: float = 0.9) -> None:
        self.tau = float(tau)

    def decide(self, i: int, probs: torch.Tensor, alpha: torch.Tensor | None, state: State) -> torch.Tensor:
        return _conf(probs) > self.tau

    def never_leaves_early(self) -> bool:
        return self.tau >= 1


class BranchyNetPolicy(ExitPolicy):
    """Normalised-entropy thresholds per exit: leave when H(p)/log K <= T_i.

    The per-exit T_i are the ``q``-quantile of each exit's entropy on the calibration split, so one
    knob sets every exit's threshold without fitting N-1 free parameters.
    """

    name = "branchynet"
    knob = "q"
    param_bounds = {"q": (0.0, 1.0)}
    knob_grid = tuple(np.round(np.linspace(0.0, 0.95, 39), 4).tolist())

    def __init__(self, q: float = 0.5) -> None:
        self.q = float(q)

    @staticmethod
    def entropy(probs: torch.Tensor) -> torch.Tensor:
        """Entropy normalised by log K: 0 for a one-hot softmax, 1 for the uniform one."""
        return -(probs * probs.clamp_min(1e-12).log()).sum(1) / math.log(probs.shape[1])

    def fit(self, trace: Trace) -> BranchyNetPolicy:
        super().fit(trace)
        h = self.entropy(torch.from_numpy(trace.probs).flatten(0, 1)).view(trace.n, trace.num_exits)
        self.thresholds_ = [float(torch.quantile(h[:, i], self.q)) if self.q > 0 else -1.0
                            for i in range(trace.num_exits - 1)]
        return self

    def decide(self, i: int, probs: torch.Tensor, alpha: torch.Tensor | None, state: State) -> torch.Tensor:
        return self.entropy(probs) <= self.thresholds_[i]

    def fitted_shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        return {"thresholds_": (n - 1,)}

    def never_leaves_early(self) -> bool:
        return all(t < 0 for t in self.thresholds_)  # normalised entropy is never negative


class PatiencePolicy(ExitPolicy):
    """PABEE: leave once ``k`` consecutive exits agree on the prediction."""

    name = "patience"
    knob = "k"
    knob_conservative_high = data_free_knob = True
    param_bounds = {"k": (1, math.inf)}
    knob_grid = (1, 2, 3, 4, 5, 6, 7, 8)

    def __init__(self, k: int = 2) -> None:
        self.k = int(k)

    def init_state(self, n: int, device: torch.device | str = "cpu") -> State:
        return {"prev": torch.full((n,), -1, dtype=torch.long, device=device),
                "streak": torch.zeros(n, dtype=torch.long, device=device)}

    def decide(self, i: int, probs: torch.Tensor, alpha: torch.Tensor | None, state: State) -> torch.Tensor:
        pred = probs.argmax(1)
        state["streak"] = torch.where(pred == state["prev"], state["streak"] + 1, torch.ones_like(state["streak"]))
        state["prev"] = pred
        return state["streak"] >= int(self.k)

    def never_leaves_early(self) -> bool:
        return self.k >= self.num_exits_  # the streak at exit i (0-based) is at most i + 1 <= N - 1


class RLPolicy(ExitPolicy):
    """Tabular Q-learning over (exit, confidence decile) with actions exit/continue (DDECS 2025).

    Reward on exit: +1 if right, -1 if wrong, minus ``cost_weight`` * C_i / C_N. Hyperparameters
    from METHOD.md: epsilon 0.1, learning rate 0.1, gamma 0.9. Trained on calibration samples.
    """

    name = "rl"
    knob = "cost_weight"
    knob_grid = tuple(np.round(np.concatenate([[0.0], np.geomspace(0.01, 3.0, 30)]), 5).tolist())

    param_bounds = {"cost_weight": (0.0, math.inf), "epsilon": (0.0, 1.0), "lr": (0.0, 1.0), "gamma": (0.0, 1.0),
                    "episodes": (1, math.inf)}

    def __init__(self, cost_weight: float = 0.1, epsilon: float = 0.1, lr: float = 0.1, gamma: float = 0.9,
                 episodes: int = 20000, seed: int = 0) -> None:
        self.cost_weight, self.epsilon, self.lr, self.gamma = float(cost_weight), float(epsilon), float(lr), float(gamma)
        self.episodes, self.seed = int(episodes), int(seed)

    def fit(self, trace: Trace) -> RLPolicy:
        super().fit(trace)
        n_exits = trace.num_exits
        conf, correct = trace.conf, trace.correct
        self.edges_ = [np.quantile(conf[:, i], np.linspace(0.1, 0.9, 9)).tolist() for i in range(n_exits)]
        bins = np.stack([np.searchsorted(self.edges_[i], conf[:, i], side="right") for i in range(n_exits)], 1)
        cost = trace.exit_macs / trace.exit_macs[-1]
        # The episodes are sequential (each update reads the last), so this stays a Python loop; on Python floats
        # and lists it runs several times faster than on numpy scalars, with the same IEEE doubles and draws.
        q = [[[0.0, 0.0] for _ in range(10)] for _ in range(n_exits)]  # action 0 = continue, 1 = exit
        bins_l, correct_l, cost_l = bins.tolist(), correct.tolist(), [float(c) for c in cost]
        lr, gamma, eps, w, last = self.lr, self.gamma, self.epsilon, self.cost_weight, n_exits - 1
        rng = np.random.default_rng(self.seed)
        for j in rng.integers(0, trace.n, self.episodes).tolist():
            row = bins_l[j]
            for i in range(n_exits):
                qs = q[i][row[i]]
                # greedy: exit only when its value is strictly higher (numpy's argmax keeps the first of a tie)
                leave = i == last or (int(rng.integers(2)) == 1 if rng.random() < eps else qs[1] > qs[0])
                if leave:
                    r = (1.0 if correct_l[j][i] else -1.0) - w * cost_l[i]
                    qs[1] += lr * (r - qs[1])
                    break
                nxt = q[i + 1][row[i + 1]]
                qs[0] += lr * (gamma * max(nxt[0], nxt[1]) - qs[0])
        self.q_table_ = q
        return self

    def decide(self, i: int, probs: torch.Tensor, alpha: torch.Tensor | None, state: State) -> torch.Tensor:
        s = _bin(_conf(probs), self._tensor(self.edges_[i], probs.device, probs.dtype))
        q = self._tensor(self.q_table_[i], probs.device, torch.float64)[s]
        return q[:, 1] > q[:, 0]

    def fitted_shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        return {"edges_": (n, 9), "q_table_": (n, 10, 2)}


# ----------------------------------------------------------------------------------------------
# DART


class DartPolicy(ExitPolicy):
    """DART: joint thresholds by backward induction over (exit, alpha bin, confidence bin), Eqs 10-12 and 19,
    then refined on the calibration samples' real paths.

    ``fit`` estimates, on the calibration trace, each state's exit accuracy and its transition to the
    next exit's confidence bin (alpha bin fixed), smoothing sparse cells towards pooled estimates with
    ``prior`` pseudo-counts. Backward induction gives V(s) = max(R(s, exit), E[V(s')]); the
    threshold tau_i(a) is the lowest confidence edge from which "exit" is optimal for every higher
    bin (monotone by construction; see the comment in ``fit``).

    The DP's state forgets how a sample got there: the samples that continue are the harder ones, so
    it over-rates continuing and exits too early. ``refine=True`` (the default) fixes that on the same
    fit data: coordinate sweeps over (exit, alpha bin) that score each candidate threshold on the
    samples that really reach it, with their real payoff downstream (``_refine``). The plain DP stays
    available (``refine=False``) for the ablation.

    At inference (Eq 19): leave at exit i if conf >= clamp(c_i * c_{i,class} * tau_i(a) + beta_diff * alpha, 0, 1);
    tau = +inf never leaves and tau = -inf always does. ``>=`` is the read-off's own semantics: the
    confidence bin whose lower edge is tau includes the edge, so saturated confidences (exactly 1.0)
    leave where the DP said they should. ``alpha_bins=1`` gives alpha-free thresholds, ``beta_diff=0``
    removes the margin.
    """

    name = "dart"
    knob = "beta_opt"
    _alpha_floor: float | None = None  # run-time state, not a parameter: see set_coefficients
    knob_grid = tuple(np.round(np.concatenate([np.linspace(0.0, 0.1, 11)[1:], np.linspace(0.12, 1.0, 45)]), 4).tolist())
    param_bounds = {"beta_opt": (0.0, math.inf), "beta_diff": (0.0, math.inf), "alpha_bins": (1, math.inf),
                    "conf_bins": (2, math.inf), "prior": (0.0, math.inf)}

    def __init__(self, beta_opt: float = 0.1, beta_diff: float = 0.0, alpha_bins: int = 3, conf_bins: int = 10,
                 prior: float = 10.0, refine: bool = True) -> None:
        self.beta_opt, self.beta_diff = float(beta_opt), float(beta_diff)
        self.alpha_bins, self.conf_bins, self.prior = int(alpha_bins), int(conf_bins), float(prior)
        self.refine = bool(refine)

    @property
    def uses_alpha(self) -> bool:  # type: ignore[override]
        return self.alpha_bins > 1 or self.beta_diff != 0

    def fit(self, trace: Trace) -> DartPolicy:
        super().fit(trace)
        n, n_exits, b = trace.n, trace.num_exits, self.conf_bins
        if self.alpha_bins > 1 and trace.alpha is None:
            raise ArtifactError("DART with alpha bins needs alpha in the trace; regenerate it with `dart-ee trace`"
                                " or set alpha_bins=1")
        alpha = trace.alpha if trace.alpha is not None else np.zeros(n, np.float32)
        self.alpha_edges_ = (np.quantile(alpha, np.linspace(0, 1, self.alpha_bins + 1)[1:-1]).tolist()
                             if self.alpha_bins > 1 else [])
        abin = self.alpha_bin(alpha)
        conf, correct = trace.conf, trace.correct.astype(np.float64)
        # Eq 12: candidate edges from quantiles of each exit's confidence (b bins; b=10 gives q = 0.1..0.9)
        self.conf_edges_ = [np.quantile(conf[:, i], np.linspace(0, 1, b + 1)[1:-1]).tolist() for i in range(n_exits)]
        cbin = np.stack([np.searchsorted(self.conf_edges_[i], conf[:, i], side="right") for i in range(n_exits)], 1)
        cost = trace.exit_macs / trace.exit_macs[-1]
        A, m = self.alpha_bins, self.prior
        # "exit from the lowest bin" is the lowest confidence seen on calibration (at least 1/K): the same
        # decisions as tau = -inf there, but a threshold that the adaptive coefficients can still scale
        floor = np.maximum(1.0 / trace.num_classes, conf.min(0)).tolist()

        value = np.zeros((A, b))
        self.tau_ = [[math.inf] * A for _ in range(n_exits - 1)]
        for i in range(n_exits - 1, -1, -1):
            # smoothed accuracy of exit i per (alpha bin, conf bin): pooled over alpha bins as the prior
            cnt = np.zeros((A, b))
            hit = np.zeros((A, b))
            np.add.at(cnt, (abin, cbin[:, i]), 1)
            np.add.at(hit, (abin, cbin[:, i]), correct[:, i])
            pooled = (hit.sum(0) + m * correct[:, i].mean()) / (cnt.sum(0) + m)
            acc = (hit + m * pooled[None]) / (cnt + m)
            r_exit = acc - self.beta_opt * cost[i]
            if i == n_exits - 1:
                value = r_exit
                continue
            # transitions (a, c) -> c' at exit i+1, smoothed towards the alpha bin's marginal over c'
            trans = np.zeros((A, b, b))
            np.add.at(trans, (abin, cbin[:, i], cbin[:, i + 1]), 1)
            marg = (trans.sum(1) + 1.0) / (trans.sum(1) + 1.0).sum(1, keepdims=True)  # (A, b')
            p = (trans + m * marg[:, None, :]) / (trans.sum(2, keepdims=True) + m)
            q_cont = np.einsum("acd,ad->ac", p, value)
            # monotone in confidence: one threshold per (exit, alpha bin). Choose the first exiting bin f
            # that maximises the count-weighted value of "exit in bins >= f, continue below"; when the
            # unconstrained optimum is already monotone this is exactly it.
            gain = (cnt + 1e-9) * (r_exit - q_cont)  # (A, b)
            tail = np.concatenate([np.cumsum(gain[:, ::-1], 1)[:, ::-1], np.zeros((A, 1))], 1)  # sum over c >= f
            first = tail.shape[1] - 1 - np.argmax(tail[:, ::-1], 1)  # ties: the most conservative threshold
            for a in range(A):
                if first[a] < b:
                    self.tau_[i][a] = floor[i] if first[a] == 0 else float(self.conf_edges_[i][first[a] - 1])
            # the value that earlier exits see follows the monotone policy actually used
            value = np.where(np.arange(b)[None, :] >= first[:, None], r_exit, q_cont)
        self.set_coefficients([1.0] * (n_exits - 1), [[1.0] * trace.num_classes for _ in range(n_exits - 1)])
        if self.refine:
            self._refine(trace, abin, correct - self.beta_opt * cost[None], floor)
        return self

    def alpha_bin(self, alpha: np.ndarray) -> np.ndarray:
        """Each sample's alpha bin, computed in float32 exactly as ``thresholds`` does at run time."""
        edges = torch.tensor(self.alpha_edges_, dtype=torch.float32)
        return _bin(torch.from_numpy(np.asarray(alpha, np.float32)), edges).numpy()

    def _refine(self, trace: Trace, abin: np.ndarray, payoff: np.ndarray, floor: list[float], max_sweeps: int = 50) -> None:
        """Coordinate ascent of the empirical objective mean(correct - beta_opt * cost) on real sample paths.

        Sweep exits from the last-but-one down; for each alpha bin, score every candidate threshold
        ({lowest seen, the Eq 12 edges, +inf, the current one}) on the samples that reach that exit
        under the current table: leaving pays their payoff here, staying their real payoff under the
        current later thresholds. Keep the best (the larger threshold on ties). The current value is a
        candidate, so the objective never decreases; stop when a sweep changes nothing. Decisions are
        computed by the same formula as ``decide``, in float32, so the fit and the runtime agree exactly.
        """
        n, n_exits = trace.n, trace.num_exits
        conf = torch.from_numpy(trace.conf.copy())  # the trace keeps its own read-only
        alpha = torch.from_numpy(trace.alpha) if (trace.alpha is not None and self.uses_alpha) else None
        abin_t = torch.from_numpy(abin)

        def leaves(i: int, idx: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
            """(len(taus), len(idx)) bool: would each sample leave exit i under each threshold."""
            a = None if alpha is None else alpha[idx][None]
            return conf[idx, i][None] >= self._effective(taus[:, None], 1.0, a)

        def leaves_now(i: int) -> np.ndarray:
            tau = torch.tensor(self.tau_[i], dtype=torch.float32)[abin_t]
            return (conf[:, i] >= self._effective(tau, 1.0, alpha)).numpy()

        leave = [leaves_now(k) for k in range(n_exits - 1)]  # kept current as thresholds change
        for _ in range(max_sweeps):
            changed = False
            for i in range(n_exits - 2, -1, -1):
                reach = ~np.any(leave[:i], axis=0) if i else np.ones(n, bool)  # under the current earlier thresholds
                stay = payoff[:, -1].copy()  # real payoff from exit i+1 on, under the current later thresholds
                for k in range(n_exits - 2, i, -1):
                    stay = np.where(leave[k], payoff[:, k], stay)
                for a in range(self.alpha_bins):
                    idx = np.flatnonzero(reach & (abin == a))
                    if len(idx) == 0:
                        continue
                    cands = sorted({floor[i], *self.conf_edges_[i], math.inf, self.tau_[i][a]})
                    L = leaves(i, torch.from_numpy(idx), torch.tensor(cands, dtype=torch.float32)).numpy()
                    obj = np.where(L, payoff[idx, i][None], stay[idx][None]).sum(1)
                    best = cands[int(np.flatnonzero(obj >= obj.max() - 1e-9)[-1])]
                    if best != self.tau_[i][a]:
                        self.tau_[i][a], changed = best, True
                        leave[i] = leaves_now(i)
            if not changed:
                break
        self._tensors: dict = {}

    @property
    def alpha_floor(self) -> float | None:
        return self._alpha_floor

    def set_coefficients(self, coef_exit: list[float], coef_class: list[list[float]],
                         alpha_floor: float | None = None) -> None:
        """Replace the adaptive coefficients c (per exit, and per exit and predicted class).

        ``alpha_floor`` (run-time only, not saved): out-of-domain mode, set by the adaptive controller's
        shift guard. Every sample then gets the most demanding alpha bin's threshold, and its alpha
        counts as at least ``alpha_floor`` in the beta_diff margin.
        """
        self.coef_exit_, self.coef_class_ = list(coef_exit), [list(r) for r in coef_class]
        self._alpha_floor = alpha_floor
        self._tensors = {}

    def _effective(self, tau: torch.Tensor, coef: torch.Tensor | float, alpha: torch.Tensor | None) -> torch.Tensor:
        """Eq 19's threshold from the table value: clamp(coef * tau + beta_diff * alpha, 0, 1); +inf stays +inf."""
        margin = self.beta_diff * alpha.float() if (alpha is not None and self.beta_diff) else 0.0
        thr = (coef * tau + margin).clamp(0, 1)
        # a clamp to 1 would let saturated confidences leave; (== inf, not isposinf: it exports to ONNX)
        return torch.where(tau == math.inf, tau, thr)

    def thresholds(self, i: int, probs: torch.Tensor, alpha: torch.Tensor | None) -> torch.Tensor:
        """tau'_i for each sample (Eq 19), including the adaptive coefficients."""
        dev = probs.device
        tau_row, edges = self._tensor(self.tau_[i], dev), self._tensor(self.alpha_edges_, dev)
        coef_class = self.coef_exit_[i] * self._tensor(self.coef_class_[i], dev)
        if alpha is not None and self._alpha_floor is not None:
            # out of domain: the most demanding alpha bin's threshold for everyone (the DP does not
            # promise that the hardest bin is the most demanding one), and at least the floor's margin
            alpha = alpha.clamp(min=self._alpha_floor)
            tau = tau_row.max().expand(len(probs))
        elif self.alpha_bins > 1 and alpha is not None:
            tau = tau_row[_bin(alpha.float(), edges)]
        else:
            tau = tau_row[0].expand(len(probs))
        return self._effective(tau, coef_class[probs.argmax(1)], alpha)

    def decide(self, i: int, probs: torch.Tensor, alpha: torch.Tensor | None, state: State) -> torch.Tensor:
        return _conf(probs) >= self.thresholds(i, probs, alpha)

    def fitted_shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        return {"alpha_edges_": (self.alpha_bins - 1,), "conf_edges_": (n, self.conf_bins - 1),
                "tau_": (n - 1, self.alpha_bins), "coef_exit_": (n - 1,), "coef_class_": (n - 1, -1)}

    def never_leaves_early(self) -> bool:
        return all(t == math.inf for row in self.tau_ for t in row)


# ----------------------------------------------------------------------------------------------
# DART on a learned exit score


class ScorePolicy(ExitPolicy):
    """DART's per-exit thresholds acting on a learned exit score instead of the max-softmax confidence.

    Max-softmax confidence ranks samples badly for one decision that matters here: whether leaving at
    exit i loses a sample that the final exit gets right. Per exit, a logistic regression fitted on the
    fit split predicts P(safe) = P(not (final exit right and exit i wrong)) from what the runtime
    already has at that exit (``FEATURES``): the top-1 confidence and its log-odds, the top-1 / top-2
    margin, the normalised entropy, whether exit i agrees with the exit before it, for how many exits
    in a row the prediction has held, the previous exit's confidence, and the difficulty score alpha
    (the learned estimator's when the trace holds it). Leave at exit i when P(safe) >= tau_i.

    The thresholds maximise mean(safe - beta_opt * C_i / C_N), DART's refinement objective with "safe" (not a
    new error, the loss that certification counts) in place of "correct", by coordinate ascent on the fit
    samples' real paths (each exit scores candidate thresholds on the samples that really reach it, with
    their real payoff downstream). Certification replaces them with the price path of the same score model
    (``dart_ee.calibration.certify.price_family``): leave at exit i once 1 - P(safe) is at most lambda times the
    share of MACs that leaving there saves.
    """

    name = "score"
    knob = "beta_opt"
    knob_grid = DartPolicy.knob_grid
    FEATURES: ClassVar[tuple[str, ...]] = ("conf", "log_odds", "margin", "entropy", "agree_prev", "streak",
                                          "prev_conf", "alpha")

    param_bounds = {"beta_opt": (0.0, math.inf), "l2": (0.0, math.inf), "threshold_grid": (2, math.inf),
                    "max_sweeps": (0, math.inf)}

    def __init__(self, beta_opt: float = 0.1, l2: float = 1.0, alpha_feature: bool = True, threshold_grid: int = 64,
                 max_sweeps: int = 20) -> None:
        self.beta_opt, self.l2, self.alpha_feature = float(beta_opt), float(l2), bool(alpha_feature)
        self.threshold_grid, self.max_sweeps = int(threshold_grid), int(max_sweeps)

    @property
    def uses_alpha(self) -> bool:  # type: ignore[override]
        return self.alpha_feature

    def init_state(self, n: int, device: torch.device | str = "cpu") -> State:
        return {"prev": torch.full((n,), -1, dtype=torch.long, device=device),
                "streak": torch.zeros(n, dtype=torch.long, device=device),
                "prev_conf": torch.zeros(n, dtype=torch.float32, device=device)}

    def features(self, i: int, probs: torch.Tensor, alpha: torch.Tensor | None, state: State) -> torch.Tensor:
        """(n, len(FEATURES)) float32 features at exit ``i``; advances ``state`` (what later exits read)."""
        top = probs.float().topk(2, 1).values
        conf, pred = top[:, 0], probs.argmax(1)
        entropy = BranchyNetPolicy.entropy(probs)
        agree = (pred == state["prev"]).float()
        streak = torch.where(pred == state["prev"], state["streak"] + 1, torch.ones_like(state["streak"]))
        a = alpha.float() if (alpha is not None and self.alpha_feature) else torch.zeros_like(conf)
        eps = 1e-6
        f = torch.stack([conf, torch.log(conf + eps) - torch.log1p(eps - conf), top[:, 0] - top[:, 1], entropy, agree,
                         streak.float() / (i + 1), state["prev_conf"], a], 1)
        state["prev"], state["streak"], state["prev_conf"] = pred, streak, conf
        return f

    def score(self, i: int, feats: torch.Tensor) -> torch.Tensor:
        """P(safe to leave at exit ``i``) from its features."""
        mean, scale = self._tensor(self.mean_[i], feats.device), self._tensor(self.scale_[i], feats.device)
        w = self._tensor(self.coef_[i], feats.device)
        return torch.sigmoid(((feats - mean) / scale) @ w + self.intercept_[i])

    def decide(self, i: int, probs: torch.Tensor, alpha: torch.Tensor | None, state: State) -> torch.Tensor:
        return self.score(i, self.features(i, probs, alpha, state)) >= self._tensor(self.tau_[i], probs.device)[0]

    def _walk_features(self, trace: Trace) -> list[torch.Tensor]:
        """Every exit's features for every sample, as ``decide`` computes them (no sample leaves)."""
        probs = torch.from_numpy(trace.probs)
        alpha = torch.from_numpy(trace.alpha) if (self.alpha_feature and trace.alpha is not None) else None
        state = self.init_state(trace.n)
        return [self.features(i, probs[:, i], alpha, state) for i in range(trace.num_exits - 1)]

    def fit(self, trace: Trace) -> ScorePolicy:
        if self.alpha_feature and "alpha_learned" in trace.extra:
            trace = trace.with_alpha("alpha_learned")  # the learned estimator ranks difficulty; the paper's barely does
        if self.alpha_feature and trace.alpha is None:
            raise ArtifactError("the score policy reads alpha, which this trace lacks; regenerate it with `dart-ee trace` "
                                "or set alpha_feature=False")
        super().fit(trace)
        # the score model does not depend on beta_opt: a search over it (calibration, sweeps) fits it once per trace
        key = (_content_key(trace), self.l2, self.alpha_feature)
        if key not in _SCORE_MODELS:
            feats = self._walk_features(trace)
            unsafe = trace.correct[:, -1:] & ~trace.correct[:, :-1]  # (n, E-1): leaving here loses a right answer
            fitted = [_logistic(f.double().numpy(), ~unsafe[:, i], self.l2) for i, f in enumerate(feats)]
            self._set_model(fitted)
            scores = np.stack([self.score(i, f).numpy() for i, f in enumerate(feats)], 1)
            while len(_SCORE_MODELS) >= 8:
                _SCORE_MODELS.pop(next(iter(_SCORE_MODELS)))
            _SCORE_MODELS[key] = (fitted, scores)
        fitted, scores = _SCORE_MODELS[key]
        self._set_model(fitted)
        return self._fit_thresholds(trace, scores)

    def _set_model(self, fitted: list[tuple[list[float], list[float], list[float], float]]) -> None:
        """Per-exit (mean, scale, weights, intercept) as fitted fields: fresh lists, so that editing this policy's
        fields leaves a cached model as it was fitted."""
        self.mean_ = [list(r[0]) for r in fitted]
        self.scale_ = [list(r[1]) for r in fitted]
        self.coef_ = [list(r[2]) for r in fitted]
        self.intercept_ = [r[3] for r in fitted]
        self._tensors: dict = {}

    def _fit_thresholds(self, trace: Trace, scores: np.ndarray) -> ScorePolicy:
        """Thresholds for ``beta_opt`` on the fit split's ``scores`` (n, E-1), by coordinate ascent on real paths."""
        cost = trace.exit_macs / trace.exit_macs[-1]
        # the payoff counts what certification bounds: a new error (the final exit right, this one wrong) costs 1
        safe = ~(trace.correct[:, -1:] & ~trace.correct)
        payoff = safe - self.beta_opt * cost[None]
        self.tau_ = refine_thresholds(scores, payoff, self.threshold_grid, self.max_sweeps)
        self._tensors = {}
        return self

    def fitted_shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        f = len(self.FEATURES)
        return {"mean_": (n - 1, f), "scale_": (n - 1, f), "coef_": (n - 1, f), "intercept_": (n - 1,), "tau_": (n - 1, 1)}

    def never_leaves_early(self) -> bool:
        return all(t == math.inf for row in self.tau_ for t in row)


_SCORE_MODELS: dict[tuple, tuple] = {}  # the last few fitted score models, by trace content and settings
# the log-odds weight of an exit whose fit samples are all safe (or all unsafe): the standardised feature spans a few
# units, so the score moves by a few tenths of a logit around the rate, enough to rank in float32, too little to
# outweigh the rate
TIED_RANK_WEIGHT = 0.1


def _content_key(trace: Trace) -> str:
    """A digest of what a score model reads: probabilities, labels, alpha and exit costs."""
    h = hashlib.sha1(np.ascontiguousarray(trace.probs).tobytes())
    for a in (trace.labels, trace.exit_macs, trace.alpha):
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _logistic(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[list[float], list[float], list[float], float]:
    """L2-regularised logistic regression on standardised features: (mean, scale, weights, intercept)."""
    from scipy.optimize import minimize

    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    z, t = (x - mean) / scale, y.astype(np.float64)
    if t.min() == t.max():
        # Every fit sample safe (or none): nothing says which ones are. The score is then the Jeffreys estimate of
        # the rate, (k + 1/2) / (n + 1), ranked by the confidence's log-odds with a small weight. A constant score
        # (it was sigmoid(+-30), exactly 1.0 in float32) tied every sample, so the share scaling could not open the
        # exit gradually: at its first step every sample reaching it left, the unsafe ones of other data too.
        rate = (t.sum() + 0.5) / (len(t) + 1)
        w = np.zeros(x.shape[1])
        w[ScorePolicy.FEATURES.index("log_odds")] = TIED_RANK_WEIGHT
        return mean.tolist(), scale.tolist(), w.tolist(), float(np.log(rate / (1 - rate)))

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:-1], theta[-1]
        u = z @ w + b
        nll = np.logaddexp(0, u) - t * u  # -log sigmoid(u) for t = 1, -log(1 - sigmoid(u)) for t = 0
        g = 1 / (1 + np.exp(-u)) - t
        grad = np.concatenate([z.T @ g / len(t) + l2 * w / len(t), [g.mean()]])
        return float(nll.mean() + 0.5 * l2 * (w @ w) / len(t)), grad

    theta = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B").x
    return mean.tolist(), scale.tolist(), theta[:-1].tolist(), float(theta[-1])


def refine_thresholds(scores: np.ndarray, payoff: np.ndarray, grid: int = 64, max_sweeps: int = 20) -> list[list[float]]:
    """Per-exit thresholds on ``scores`` (n, E-1; leave when score >= tau) that maximise mean payoff (n, E).

    Coordinate ascent from "never leave" on real sample paths: each exit, last-but-one first, scores
    ``grid`` quantiles of its reaching samples' scores (and +inf) by the payoff of leaving there against
    the real payoff downstream under the current later thresholds; keeps the best (the larger on ties).
    The current threshold is a candidate, so the objective never falls; stops when a sweep changes nothing.
    """
    n, m = scores.shape
    tau = [math.inf] * m
    leave = np.zeros((n, m), bool)
    for _ in range(max_sweeps):
        changed = False
        for i in range(m - 1, -1, -1):
            reach = ~leave[:, :i].any(1)
            stay = payoff[:, -1].copy()
            for k in range(m - 1, i, -1):
                stay = np.where(leave[:, k], payoff[:, k], stay)
            s = scores[reach, i]
            if len(s) == 0:
                continue
            cands = np.unique(np.concatenate([np.quantile(s, np.linspace(0, 1, grid + 1)).astype(np.float32),
                                              [np.float32(tau[i]), np.float32(np.inf)]]))
            obj = np.where(s[None] >= cands[:, None], payoff[reach, i][None], stay[reach][None]).sum(1)
            best = float(cands[int(np.flatnonzero(obj >= obj.max() - 1e-9)[-1])])
            if best != tau[i]:
                tau[i], changed = best, True
                leave[:, i] = scores[:, i] >= best
        if not changed:
            break
    return [[t] for t in tau]


def make_policy(name: str, **params: Any) -> ExitPolicy:
    if name not in POLICIES:
        raise ConfigError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}")
    return POLICIES[name]().set_params(**params)


def policy_from_dict(d: dict[str, Any], source: str = "policy") -> ExitPolicy:
    """Rebuild a fitted policy from ``to_dict`` output, validating format, version and fields."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ArtifactError(f"{source} is not a dart-ee policy (format={d.get('format') if isinstance(d, dict) else d!r})")
    if d.get("version") != VERSION:
        raise ArtifactError(f"{source}: policy version {d.get('version')} is not supported (expected {VERSION}); "
                            "recalibrate it with `dart-ee calibrate`")
    if "policy" not in d:
        raise ArtifactError(f"{source}: missing field 'policy'")
    pol = make_policy(d["policy"])
    try:
        pol.set_params(**d.get("params", {}))
    except (ConfigError, TypeError) as e:  # a parameter of the wrong type or out of bounds; params not a dict
        raise ArtifactError(f"{source}: {e}") from None
    fitted = d.get("fitted", {})
    if not fitted and pol.name != "static":
        raise ArtifactError(f"{source}: policy {pol.name!r} is not fitted")
    for k, v in fitted.items():
        if not k.endswith("_"):
            raise ArtifactError(f"{source}: unexpected fitted field {k!r}")
        setattr(pol, k, _restore_inf(v) if k == "tau_" else v)
    if fitted:
        _check_fitted(pol, source)
    return pol


def _check_fitted(pol: ExitPolicy, source: str) -> None:
    """Every fitted array present, numeric and of the shape the exit count gives: a hand-edited or truncated
    policy file fails here, with its field named, not deep in ``decide``."""
    n = getattr(pol, "num_exits_", None)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ArtifactError(f"{source}: fitted field 'num_exits_' must be a positive integer, got {n!r}")
    if pol.uses_alpha and getattr(pol, "alpha_source_", None) not in ("paper", "learned"):
        raise ArtifactError(f"{source}: fitted field 'alpha_source_' must be 'paper' or 'learned'")
    if not pol.uses_alpha and getattr(pol, "alpha_source_", None) is not None:
        raise ArtifactError(f"{source}: fitted field 'alpha_source_' must be null: this {pol.name!r} policy reads no alpha")
    for field, shape in pol.fitted_shapes(n).items():
        if not hasattr(pol, field):
            raise ArtifactError(f"{source}: fitted field {field!r} is missing; recalibrate the policy")
        try:
            arr = np.asarray(getattr(pol, field), dtype=np.float64)
        except (ValueError, TypeError):
            raise ArtifactError(f"{source}: fitted field {field!r} must be numbers in a regular array") from None
        if arr.ndim != len(shape) or any(want not in (-1, got) for want, got in zip(shape, arr.shape)):
            want = " x ".join("any" if d < 0 else str(d) for d in shape)
            raise ArtifactError(f"{source}: fitted field {field!r} has shape {arr.shape}, but {n} exits need {want}")
        # thresholds may be infinite (never / always leave); nothing may be NaN (null in a list reads as NaN)
        if np.isnan(arr).any() or (field != "tau_" and np.isinf(arr).any()):
            raise ArtifactError(f"{source}: fitted field {field!r} must hold finite numbers"
                                + (" (or null for +inf)" if field == "tau_" else "") + "; recalibrate the policy")


def _restore_inf(v: Any) -> Any:
    if v is None:
        return math.inf
    if v == "-inf":
        return -math.inf
    if isinstance(v, list):
        return [_restore_inf(x) for x in v]
    return v


def load_policy(path: str | Path) -> ExitPolicy:
    return policy_from_dict(artifacts.read_json(path, "policy file"), str(path))
