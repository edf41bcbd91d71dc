"""Online risk control: a label-free bound on the disagreement with the full network that holds under any shift.

A sample *disagrees* when it left early and its class differs from the full network's: d_t = 1[exit_t < last
and pred_t != final_t]. Whatever the labels are, the accuracy lost against the full network over any stretch
of samples is at most the share that disagrees over it, so keeping the running disagreement at D keeps the
running drop within D, on any stream.

``RiskController`` (``run`` on a live ``EarlyExitRunner``, ``process`` on a traced stream) keeps one
conservativeness parameter theta >= 0 that moves the certified policy along its
exit-share scaling path (``dart_ee.calibration.certify.scale_family``, fitted on the calibration split):
scale 1 - theta, where theta = 0 is the certified policy itself (so clean data keeps its certificate: the
controller is never less conservative) and theta >= 1 the full network. A random share q of the samples is
marked for audit: those of them that left early also run the full network (its cost is counted). The marks
come from the controller's own generator and are drawn for a batch's *size* before any of its samples is
looked at, so they are independent of the inputs. With A_t the mark, the inverse-propensity weighted
disagreement e_t = A_t d_t / q has E[e_t | past] = d_t, and after each batch of b samples

    theta <- max(0, theta + eta * sum_t (e_t - D))          (online risk control, after Gibbs and Candes, 2021)

**Guarantee** for ANY sequence of inputs (shifted or adversarial), as long as the audits are random. theta
starts at 0, rises by at most eta * b / q per batch and falls whenever it is >= 1 (then nothing leaves early
and e_t = 0), so theta <= 1 + eta b / q; the clamp at 0 only raises theta, so eta * sum_t (e_t - D) <= theta_T.
Over the first T samples:

    (1/T) sum_t e_t <= D + (1 + eta b / q) / (eta T)                                     (always)
    (1/T) sum_t d_t <= D + (1 + eta b / q) / (eta T) + sqrt(2 ln(1/delta) / (q T)) + 2 ln(1/delta) / (3 T)

the second with probability >= 1 - delta (Freedman's inequality on the martingale sum_t (d_t - e_t), whose
increments are at most 1 and whose conditional variances sum to at most T / q). The same holds for any
stretch that starts where theta = 0, e.g. after a clean period (``slack`` computes it). The slack shrinks as
1/T; the accuracy drop against the full network is at most the disagreement, so the running drop is within
D plus the slack. Not guaranteed: the MACs (under a shift they can rise up to the full network's).

Audits react only after the first audited disagreement, hundreds of samples into a shift at a 5% audit rate. A
label-free **shift guard** (``dart_ee.adapt.guard``: a CUSUM on the first exit's confidence, which every sample
computes) can hold theta at a floor while it is raised. It only makes the policy more conservative, and theta's
own update is unchanged, so the bound above holds as it is (with theta >= 1 nothing leaves early, guard or not).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dart_ee.adapt.guard import ShiftGuard
from dart_ee.calibration.certify import SCALED, scale_family
from dart_ee.calibration.evaluation import exit_costs, simulate
from dart_ee.config import RiskSettings
from dart_ee.core.artifacts import read_json, write_json
from dart_ee.core.errors import ConfigError
from dart_ee.policies import ExitPolicy
from dart_ee.runtime.eager import EarlyExitRunner, ExitResult
from dart_ee.trace import Trace

# the path's resolution: theta is rounded to the nearest multiple of 1 / GRID (every point of the path is at least as
# conservative as the certified policy, and the guarantee reads only the disagreement that was realised)
GRID = 100


def slack(t: int, step: float, audit_rate: float, batch_size: int, delta: float | None = None) -> float:
    """How far above D the running disagreement over t samples can be (fraction, not points): the deterministic
    term for the weighted disagreement, plus, with ``delta``, Freedman's term for the true one (module docstring)."""
    s = (1 + step * batch_size / audit_rate) / (step * t)
    if delta is not None:
        s += math.sqrt(2 * math.log(1 / delta) / (audit_rate * t)) + 2 * math.log(1 / delta) / (3 * t)
    return s


class RiskController:
    """Online risk control of a certified DART or score policy (see the module docstring).

    ``max_drop``: D in points; ``audit_rate``: q, the share of samples marked for audit; ``step``: eta; ``guard``:
    an optional label-free shift guard that holds theta at its floor while raised. Feed it a stream batch by batch
    with ``process`` (a traced stream: what ``TraceReplay`` replays) or ``run`` (a live runner).
    ``from_settings`` builds one from a run's ``RiskSettings``.
    """

    def __init__(self, policy: ExitPolicy, cal: Trace, max_drop: float, audit_rate: float = RiskSettings().audit_rate,
                 step: float = RiskSettings().step, seed: int = 0, grid: int = GRID,
                 guard: ShiftGuard | None = None) -> None:
        if policy.name not in SCALED:
            raise ConfigError(f"online risk control moves a policy along its exit-share scaling path: a {SCALED} "
                              f"policy, not {policy.name!r}")
        if not 0 < audit_rate <= 1 or step <= 0 or not 0 < max_drop < 100:
            raise ConfigError(f"audit_rate must lie in (0, 1], step be > 0 and max_drop in (0, 100) points; got "
                              f"{audit_rate}, {step}, {max_drop}")
        self.target, self.audit_rate, self.step, self.grid = max_drop / 100, audit_rate, step, grid
        self.path = [policy] + [p for _, p in scale_family(policy, cal, [1 - k / grid for k in range(1, grid + 1)])]
        self.theta = 0.0
        self.rng = np.random.default_rng(seed)
        self.seen = self.audited = 0
        self.weighted = 0.0  # sum of e_t so far
        self.guard = guard

    @classmethod
    def from_settings(cls, policy: ExitPolicy, cal: Trace, max_drop: float, settings: RiskSettings,
                      seed: int = 0) -> RiskController:
        """The controller ``settings`` describe, its shift guard fitted on the calibration trace's first exit."""
        guard = None
        if settings.guard_threshold is not None:
            guard = ShiftGuard(cal.conf[:, 0], settings.guard_drift, settings.guard_threshold, settings.guard_floor)
        return cls(policy, cal, max_drop, settings.audit_rate, settings.step, seed, guard=guard)

    @property
    def conservativeness(self) -> float:
        """theta, or the guard's floor when the guard is raised and that is more."""
        g = self.guard
        return max(self.theta, g.floor) if g is not None and g.alarm else self.theta

    @property
    def policy(self) -> ExitPolicy:
        """The policy in force: the certified one at theta = 0, the full network from theta = 1 on."""
        return self.path[min(self.grid, round(self.conservativeness * self.grid))]

    def marks(self, n: int) -> np.ndarray:
        """The audit marks of the next ``n`` samples: drawn from n alone, before any sample is looked at."""
        return self.rng.random(n) < self.audit_rate

    def process(self, batch: Trace) -> dict[str, Any]:
        """Decide for one batch of a traced stream under the policy in force, audit, update theta.

        Returns each sample's exit, class and MACs (audits included), its audit mark and whether it was audited
        (marked and left early)."""
        marks = self.marks(batch.n)
        policy, theta = self.policy, self.conservativeness
        exits, preds = simulate(policy, batch)
        last = batch.num_exits - 1
        audit = marks & (exits < last)
        disagree = audit & (preds != batch.preds[:, -1])  # the final class is read only where audited
        self.update(int(disagree.sum()), batch.n)
        self.audited += int(audit.sum())
        if self.guard is not None:  # every sample ran exit 1: its confidence there is known whatever it did next
            self.guard.observe(batch.conf[:, 0])
        static = float(batch.meta.get("static_macs", batch.exit_macs[-1]))
        macs = exit_costs(policy, batch)[exits] + np.where(audit, static, 0.0)  # an audit runs the whole network
        return {"exit": exits, "pred": preds, "macs": macs, "marked": marks, "audited": audit, "theta": theta}

    def run(self, runner: EarlyExitRunner, x: torch.Tensor) -> tuple[ExitResult, np.ndarray]:
        """Live: one batch through the runner under the policy in force (real early exit), the marked samples that
        left early through the full network too; theta moves. Returns the runner's result and the audit mask."""
        marks = self.marks(len(x))
        runner.policy = self.policy  # every point of the path is the same policy class: its alpha source holds
        res = runner(x)
        audit = marks & (res.exit.cpu().numpy() < runner.num_exits - 1)
        disagreements = 0
        if audit.any():
            idx = torch.from_numpy(np.flatnonzero(audit)).to(x.device)
            disagreements = int((runner.final_probs(x[idx]).argmax(1) != res.pred[idx]).sum())
        self.update(disagreements, len(x))
        self.audited += int(audit.sum())
        if self.guard is not None:
            if res.first_conf is None:
                raise ConfigError("the shift guard reads every sample's first-exit confidence: run an EarlyExitRunner")
            self.guard.observe(res.first_conf.cpu().numpy())
        return res, audit

    def update(self, disagreements: int, n: int) -> None:
        """theta after a batch of ``n`` samples with ``disagreements`` audited disagreements."""
        e = disagreements / self.audit_rate
        self.weighted += e
        self.seen += n
        self.theta = max(0.0, self.theta + self.step * (e - n * self.target))

    def bound(self, batch_size: int, delta: float | None = 0.05) -> float:
        """The guarantee so far: D plus the slack over the samples seen (fraction)."""
        return self.target + slack(max(self.seen, 1), self.step, self.audit_rate, batch_size, delta)

    def state_dict(self) -> dict[str, Any]:
        return {"theta": self.theta, "seen": self.seen, "audited": self.audited, "weighted": self.weighted,
                "rng": self.rng.bit_generator.state, "guard": None if self.guard is None else self.guard.state_dict()}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.theta, self.seen, self.audited, self.weighted = s["theta"], s["seen"], s["audited"], s["weighted"]
        self.rng.bit_generator.state = s["rng"]
        if self.guard is not None and s.get("guard") is not None:
            self.guard.load_state_dict(s["guard"])


class ServedRisk:
    """Online risk control inside a server (``dart-ee serve --run RUN --adapt``), where an audit's answer comes back
    stages after the sample was answered: ``admit(n)`` draws the marks of n new samples, puts the policy in force on
    the runner and charges their -D; ``result(disagrees)`` adds an audit's e_t when the full network has spoken.
    theta moves by the same sum as in ``RiskController.update``, only later, so the guarantee holds with the
    audits in flight (at most a batch's) added to the slack. ``save``/``load`` keep theta across restarts."""

    def __init__(self, ctrl: RiskController, runner: EarlyExitRunner, state: Path | None = None) -> None:
        self.ctrl, self.runner, self.state = ctrl, runner, state
        if state is not None and state.is_file():
            ctrl.load_state_dict(read_json(state, "risk control state"))
        runner.policy = ctrl.policy

    def admit(self, n: int) -> np.ndarray:
        marks = self.ctrl.marks(n)
        self.runner.policy = self.ctrl.policy
        self.ctrl.update(0, n)
        return marks

    def result(self, disagrees: bool) -> None:
        self.ctrl.audited += 1
        self.ctrl.update(int(disagrees), 0)

    def observe(self, first_conf: np.ndarray) -> None:
        """The first exit's confidences of the samples that just ran it (the shift guard's input)."""
        if self.ctrl.guard is not None:
            self.ctrl.guard.observe(first_conf)

    def info(self, update_every: int) -> dict[str, Any]:
        c = self.ctrl
        return {"theta": c.theta, "guard_alarm": c.guard is not None and c.guard.alarm, "samples": c.seen,
                "audited": c.audited, "audit_rate": c.audit_rate, "step": c.step,
                "max_drop_points": 100 * c.target, "bound_points": 100 * c.bound(update_every),
                "state_file": str(self.state) if self.state else None}

    def save(self) -> None:
        if self.state is not None:
            write_json(self.state, self.ctrl.state_dict())


def risk_over(policy: ExitPolicy, cal: Trace, trace: Trace, max_drop: float, settings: RiskSettings,
              seed: int = 0) -> tuple[RiskController, dict[str, np.ndarray]]:
    """The risk controller ``settings`` describe over a traced stream, in updates of ``settings.update_every``
    samples: each image's exit, class, MACs, audit and the conservativeness it was decided under."""
    ctrl = RiskController.from_settings(policy, cal, max_drop, settings, seed)
    b = settings.update_every
    parts: dict[str, list[np.ndarray]] = {"exit": [], "pred": [], "macs": [], "marked": [], "audited": [], "theta": []}
    for s in range(0, trace.n, b):
        r = ctrl.process(trace.subset(np.arange(s, min(s + b, trace.n))))
        for k in parts:
            parts[k].append(np.broadcast_to(r[k], r["exit"].shape) if k == "theta" else r[k])
    return ctrl, {k: np.concatenate(v) for k, v in parts.items()}


def running_drop(full_correct: np.ndarray, correct: np.ndarray, start: int = 0) -> np.ndarray:
    """The accuracy drop against the full network (fraction) over samples start..t, for every t >= start."""
    gap = full_correct[start:].astype(np.float64) - correct[start:]
    return np.cumsum(gap) / np.arange(1, len(gap) + 1)
