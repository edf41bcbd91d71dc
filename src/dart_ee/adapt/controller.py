"""Online adaptation of DART's threshold coefficients at deployment (METHOD.md section 5, Eqs 13-15).

``AdaptiveController`` wraps an ``EarlyExitRunner`` running a ``DartPolicy`` over a stream of batches.
It keeps a sliding window of the last ``window`` inferences and, every ``update_every`` batches,
moves the per-exit and per-class coefficients c that scale the thresholds (Eq 19).

Label-free accuracy: a random ``audit_share`` of early-exited samples also runs the full network;
agreement of the early prediction with the final one (when the final exit is confident, i.e. a
pseudo-label) estimates each exit's and each class's accuracy. True labels passed to
``update(labels)`` later replace the estimate for those samples. Audit compute is counted.

Updates, with A_target_i the agreement that exit i showed on the calibration split, and acted on only
when the window's evidence is significant (|A_target - A| > ``z_gate`` binomial standard errors), so a
stationary stream leaves the coefficients where they are:
- temporal (Eq 13): c_i <- a_decay * c_i + (1 - a_decay) * f_i, with the proposal
  f_i = c_i * (1 + gain * (A_target_i - A_i)): an integrator, so c holds still when exits meet target
  (an exit with too few audits uses the audits pooled over all early exits);
- class-aware (Eq 14): c_{i,k} += eta * (A_target_i - A_{i,k}), with A_{i,k} shrunk towards A_i
  by ``prior`` pseudo-counts because per-class audits are few;
- UCB1 (Eq 15, optional): picks a global scale (conservative / balanced / aggressive) rewarded by
  the windowed Eq 10 trade-off, estimated accuracy - beta_opt * MACs / static MACs.
- shift guard (label-free, per batch): an exponentially weighted mean of the policy's alpha, with a
  memory of ``shift_memory`` samples, is compared with alpha's mean on the calibration split
  (``alpha_ref``, in calibration standard deviations). Beyond ``shift_gate`` the inputs have left the
  domain the thresholds were calibrated on. Until alpha comes back, every input is then treated as
  hard: it gets the most demanding alpha bin's threshold at each exit and at least the calibration
  split's hardest-decile alpha (``alpha_ref.hard``) in the margin (noise raises alpha, but blur and
  lost contrast lower it, which would otherwise pass corrupted images as easy), and every exit
  coefficient is scaled by ``shift_scale``. Audits need hundreds of samples to
  see a drop of a few points; alpha sees a corrupted camera within one batch.
Every coefficient stays within ``bounds``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from dart_ee.adapt.settings import load_settings
from dart_ee.calibration.evaluation import simulate
from dart_ee.config import ControllerSettings
from dart_ee.core import artifacts
from dart_ee.core.errors import ArtifactError, ConfigError
from dart_ee.policies import DartPolicy, load_policy
from dart_ee.runs.run import Run
from dart_ee.runtime.eager import EarlyExitRunner, ExitResult
from dart_ee.trace import Trace

if TYPE_CHECKING:
    from dart_ee.calibration.evaluation import TraceReplay

STATE_FORMAT = "dart-ee-adapt-state"


class AlphaReference(NamedTuple):
    """Alpha on the calibration split: what in-domain inputs look like to the shift guard."""

    mean: float
    sd: float
    hard: float  # the hardest decile's lower edge: out-of-domain inputs count as at least this hard

    @classmethod
    def from_alpha(cls, alpha: np.ndarray, hard_quantile: float = 0.9) -> AlphaReference:
        return cls(float(np.mean(alpha)), float(np.std(alpha)), float(np.quantile(alpha, hard_quantile)))


class UCB1:
    """UCB1 bandit (Eq 15): choose argmax mean_i + sqrt(2 ln t / n_i); every arm is tried once first."""

    def __init__(self, n_arms: int) -> None:
        self.counts = [0] * n_arms
        self.values = [0.0] * n_arms

    def select(self) -> int:
        for a, n in enumerate(self.counts):
            if n == 0:
                return a
        t = sum(self.counts)
        return int(np.argmax([v + math.sqrt(2 * math.log(t) / n) for v, n in zip(self.values, self.counts)]))

    def reward(self, arm: int, r: float) -> None:
        self.counts[arm] += 1
        self.values[arm] += (r - self.values[arm]) / self.counts[arm]


def agreement_targets(policy: DartPolicy, cal_trace: Trace) -> list[float]:
    """Per exit, how often early exits agree with the final exit on the calibration split (A_target)."""
    exits, preds = simulate(policy, cal_trace)
    final = cal_trace.preds[:, -1]
    out = []
    for i in range(cal_trace.num_exits - 1):
        m = exits == i
        out.append(float((preds[m] == final[m]).mean()) if m.any() else 1.0)
    return out


_DEFAULT = ControllerSettings()  # the one source of the controller's defaults


class AdaptiveController:
    """Adapt a DART policy's coefficients online from audits (and labels when they arrive).

    ``runner`` is an ``EarlyExitRunner`` (deployment: batches of images) or a
    ``dart_ee.calibration.evaluation.TraceReplay`` (evaluation: batches of a traced stream's row indices); both
    decide alike.
    """

    FIELDS = {"exit": torch.long, "pred": torch.long, "macs": torch.float64, "audited": torch.bool,
              "agree": torch.bool, "label": torch.long}

    def __init__(self, runner: EarlyExitRunner | TraceReplay, targets: Sequence[float] | float = 0.85,
                 window: int = _DEFAULT.window, audit_share: float = _DEFAULT.audit_share,
                 update_every: int = _DEFAULT.update_every,
                 a_decay: float = 0.95, gain: float = 10.0, eta: float = 0.2, prior: float = 20.0,
                 bounds: tuple[float, float] = (0.5, 3.0), pseudo_conf: float = 0.5, min_audits: int = 5,
                 z_gate: float = _DEFAULT.z_gate, ucb: bool = _DEFAULT.ucb,
                 arm_scales: Sequence[float] = (1 + _DEFAULT.arm_spread, 1.0, 1 - _DEFAULT.arm_spread),
                 beta_opt: float | None = None, alpha_ref: AlphaReference | None = None,
                 shift_gate: float = _DEFAULT.shift_gate, shift_scale: float = _DEFAULT.shift_scale,
                 shift_memory: int = 256, seed: int = 0) -> None:
        if not isinstance(runner.policy, DartPolicy):
            raise ConfigError("AdaptiveController adapts a DART policy's coefficients; the runner's policy is "
                              f"{runner.policy.name!r}")
        if not 0 <= audit_share <= 1:
            raise ConfigError(f"audit_share must lie in [0, 1], got {audit_share}")
        if ucb and audit_share == 0:
            raise ConfigError("UCB1's reward estimates accuracy from audited samples: with audit_share 0 it would trade "
                              "accuracy it cannot see for MACs; give audit_share > 0, or ucb=False")
        self.runner, self.policy = runner, runner.policy
        n_exits = runner.num_exits
        self.targets = [float(targets)] * (n_exits - 1) if isinstance(targets, (int, float)) else list(targets)
        if len(self.targets) != n_exits - 1:
            raise ConfigError(f"targets has {len(self.targets)} entries; give one per early exit ({n_exits - 1})")
        self.window, self.audit_share, self.update_every = window, audit_share, update_every
        self.a_decay, self.gain, self.eta, self.prior = a_decay, gain, eta, prior
        self.bounds, self.pseudo_conf, self.min_audits, self.z_gate = bounds, pseudo_conf, min_audits, z_gate
        self.arm_scales = list(arm_scales)
        self.bandit = UCB1(len(self.arm_scales)) if ucb else None
        self.beta_opt = self.policy.beta_opt if beta_opt is None else beta_opt
        if alpha_ref is not None and (runner.alpha_source is None or not alpha_ref.sd > 0):
            raise ConfigError("alpha_ref needs a policy that uses alpha and a positive standard deviation; "
                              "pass alpha_ref=None to run without the shift guard")
        self.alpha_ref, self.shift_gate, self.shift_scale, self.shift_memory = alpha_ref, shift_gate, shift_scale, shift_memory
        self.alpha_ema = alpha_ref.mean if alpha_ref else 0.0
        self.shifted = False
        self.gen = torch.Generator().manual_seed(seed)
        self.static_macs = runner.static_macs()
        self.exit_costs = torch.as_tensor(runner.leave_macs(), dtype=torch.float64)
        self.c_exit = [float(c) for c in self.policy.coef_exit_]
        self.c_class = [[float(c) for c in row] for row in self.policy.coef_class_]
        self.arm = self.arm_scales.index(1.0) if 1.0 in self.arm_scales else 0
        self.buf = {k: torch.zeros(window, dtype=t) for k, t in self.FIELDS.items()}
        self.buf["label"].fill_(-1)
        self.pos, self.filled, self.batches, self.audits_total = 0, 0, 0, 0
        self.fired = {"eq13": 0, "eq14": 0}  # coefficient updates that changed a coefficient
        self.history: list[dict] = []
        self._last_slots = torch.zeros(0, dtype=torch.long)
        self._apply()

    # -- the hot path ------------------------------------------------------------------------------
    def process(self, x: torch.Tensor) -> tuple[ExitResult, torch.Tensor]:
        """Run one batch (images, or row indices for a ``TraceReplay``); returns the runner's result and each
        sample's MACs (audits included)."""
        res = self.runner(x)
        if self.alpha_ref is not None and res.alpha is not None:  # a guard needs alpha (checked in __init__)
            self._watch_shift(res.alpha)
        early = res.exit < self.runner.num_exits - 1
        audit = early & (torch.rand(len(x), generator=self.gen) < self.audit_share)
        macs = self.exit_costs[res.exit].clone()
        agree = torch.zeros(len(x), dtype=torch.bool)
        idx = audit.nonzero().flatten()
        if idx.numel():
            conf, final = self.runner.final_probs(x[idx]).max(1)
            confident = conf >= self.pseudo_conf  # only confident final predictions serve as pseudo-labels
            audit[idx[~confident]] = False
            agree[idx] = final == res.pred[idx]
            macs[idx] += self.static_macs
            self.audits_total += int(idx.numel())
        self._record(res, macs, audit, agree)
        self.batches += 1
        if self.batches % self.update_every == 0:
            self.step()
        return res, macs

    def _watch_shift(self, alpha: torch.Tensor) -> None:
        """Shift guard: update alpha's running mean and switch the guard when it crosses ``shift_gate``."""
        w = 1 - (1 - 1 / self.shift_memory) ** len(alpha)  # a batch of n counts as n samples of memory
        self.alpha_ema += w * (float(alpha.float().mean()) - self.alpha_ema)
        shifted = abs(self.shift_score()) > self.shift_gate
        if shifted != self.shifted:
            self.shifted = shifted
            self._apply()

    def shift_score(self) -> float:
        """How far recent inputs' alpha is from calibration, in calibration standard deviations (0 without a guard)."""
        return 0.0 if self.alpha_ref is None else (self.alpha_ema - self.alpha_ref.mean) / self.alpha_ref.sd

    def _record(self, res: ExitResult, macs: torch.Tensor, audit: torch.Tensor, agree: torch.Tensor) -> None:
        n = len(macs)
        slots = (self.pos + torch.arange(n)) % self.window
        for k, v in (("exit", res.exit), ("pred", res.pred), ("macs", macs), ("audited", audit), ("agree", agree),
                     ("label", torch.full((n,), -1, dtype=torch.long))):
            self.buf[k][slots] = v.to(self.buf[k].dtype)
        self._last_slots = slots[-self.window:]
        self.pos = (self.pos + n) % self.window
        self.filled = min(self.window, self.filled + n)

    def update(self, labels: torch.Tensor) -> None:
        """True labels for the most recent batch: they replace the audit estimate for those samples."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if len(labels) < len(self._last_slots):
            raise ConfigError(f"update() got {len(labels)} labels for a batch of {len(self._last_slots)}")
        self.buf["label"][self._last_slots] = labels[-len(self._last_slots):]

    # -- coefficient updates -------------------------------------------------------------------
    def _window_evidence(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        b = {k: v[: self.filled] for k, v in self.buf.items()}
        labelled = b["label"] >= 0
        known = labelled | b["audited"]
        right = torch.where(labelled, b["pred"] == b["label"], b["agree"])
        return b["exit"], b["pred"], known, right

    def _significant(self, target: float, acc: float, n: int) -> bool:
        """Act only on evidence: |A_target - A| beyond ``z_gate`` binomial standard errors."""
        se = math.sqrt(max(target * (1 - target), 0.01) / max(n, 1))
        return abs(target - acc) > self.z_gate * se

    def step(self) -> None:
        """One update of every coefficient (called every ``update_every`` batches)."""
        exits, preds, known, right = self._window_evidence()
        lo, hi = self.bounds
        eq13: list[int] = []  # exits whose coefficient this update changed
        eq14 = 0  # class coefficients it changed
        n_classes = len(self.c_class[0])
        early = known & (exits < len(self.targets))
        n_all = int(early.sum())
        if n_all >= self.min_audits:
            acc_all = float(right[early].float().mean())
            w = torch.bincount(exits[early], minlength=len(self.targets)).double()
            target_all = float((w * torch.tensor(self.targets, dtype=torch.float64)).sum() / w.sum())
        for i, target in enumerate(self.targets):
            m = known & (exits == i)
            n = int(m.sum())
            if n >= self.min_audits:  # this exit's own evidence
                acc, tgt = float(right[m].float().mean()), target
            elif n_all >= self.min_audits:  # too few audits at this exit: pool over early exits
                acc, tgt, n = acc_all, target_all, n_all
            else:
                continue
            if self._significant(tgt, acc, n):
                proposal = self.c_exit[i] * (1 + self.gain * (tgt - acc))  # Eq 13's f(performance)
                new = min(hi, max(lo, self.a_decay * self.c_exit[i] + (1 - self.a_decay) * proposal))
                if new != self.c_exit[i]:
                    eq13.append(i)
                self.c_exit[i] = new
            if not m.any():
                continue
            counts = torch.bincount(preds[m], minlength=n_classes).double()
            hits = torch.bincount(preds[m], weights=right[m].double(), minlength=n_classes)
            acc_k = (hits + self.prior * acc) / (counts + self.prior)
            for k in torch.nonzero(counts).flatten().tolist():  # Eq 14, where the class has evidence
                if self._significant(target, float(acc_k[k]), int(counts[k])):
                    new = min(hi, max(lo, self.c_class[i][k] + self.eta * (target - float(acc_k[k]))))
                    eq14 += new != self.c_class[i][k]
                    self.c_class[i][k] = new
        reward = None
        if self.bandit is not None:
            reward = self.tradeoff()
            self.bandit.reward(self.arm, reward)
            self.arm = self.bandit.select()
        self._apply()
        self.fired["eq13"] += len(eq13)
        self.fired["eq14"] += eq14
        self.history.append({"batch": self.batches, "shifted": self.shifted, "c_exit": list(self.c_exit),
                             "c_class": [list(r) for r in self.c_class], "arm": self.arm, "reward": reward,
                             "eq13_exits": eq13, "eq14_classes": eq14})

    def tradeoff(self) -> float:
        """Windowed Eq 10: estimated accuracy (relative to the final exit) - beta_opt * MACs / static MACs."""
        exits, _, known, right = self._window_evidence()
        early = exits < self.runner.num_exits - 1
        k = known & early
        agree_rate = float(right[k].float().mean()) if k.any() else 1.0
        acc = 1 - float(early.float().mean()) * (1 - agree_rate)
        return acc - self.beta_opt * float(self.buf["macs"][: self.filled].mean()) / self.static_macs

    def exit_coefficients(self) -> list[float]:
        """The per-exit coefficients in force: c_i times the bandit's arm and the shift guard's scale."""
        scale = self.arm_scales[self.arm] if self.bandit is not None else 1.0
        scale *= self.shift_scale if self.shifted else 1.0
        return [c * scale for c in self.c_exit]

    def _apply(self) -> None:
        floor = self.alpha_ref.hard if self.shifted and self.alpha_ref is not None else None
        self.policy.set_coefficients(self.exit_coefficients(), self.c_class, alpha_floor=floor)

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "version": 2, "buf": dict(self.buf), "pos": self.pos, "filled": self.filled,
                "batches": self.batches, "audits_total": self.audits_total, "fired": dict(self.fired), "c_exit": self.c_exit,
                "c_class": self.c_class, "arm": self.arm, "targets": self.targets,
                "bandit": None if self.bandit is None else {"counts": self.bandit.counts, "values": self.bandit.values},
                "rng": self.gen.get_state(), "history": self.history, "last_slots": self._last_slots,
                "alpha_ema": self.alpha_ema, "shifted": self.shifted}

    def load_state_dict(self, s: dict) -> None:
        if s.get("format") != STATE_FORMAT:
            raise ArtifactError("not a dart-ee adaptation state")
        if s.get("version") != 2:
            raise ArtifactError(f"adaptation state version {s.get('version')} is not supported (expected 2); "
                                "start the controller afresh")
        if len(s["c_exit"]) != len(self.c_exit) or s["buf"]["exit"].numel() != self.window:
            raise ArtifactError("adaptation state was saved for a different model or window size")
        self.buf = {k: v.clone() for k, v in s["buf"].items()}
        self.pos, self.filled, self.batches, self.audits_total = s["pos"], s["filled"], s["batches"], s["audits_total"]
        self.fired = dict(s.get("fired", {"eq13": 0, "eq14": 0}))
        self.c_exit, self.c_class, self.arm, self.targets = list(s["c_exit"]), [list(r) for r in s["c_class"]], s["arm"], \
            list(s["targets"])
        if self.bandit is not None and s["bandit"] is not None:
            self.bandit.counts, self.bandit.values = list(s["bandit"]["counts"]), list(s["bandit"]["values"])
        self.gen.set_state(s["rng"])
        self.history = list(s["history"])
        self._last_slots = s["last_slots"]
        self.alpha_ema, self.shifted = s["alpha_ema"], s["shifted"]
        self._apply()

    def save(self, path: str | Path) -> None:
        artifacts.save_torch(path, self.state_dict())

    def load(self, path: str | Path) -> None:
        self.load_state_dict(artifacts.load_torch(path, "adaptation state"))


def bandit_stats(ctrl: AdaptiveController) -> list[dict] | None:
    """UCB1's arms: scale on the thresholds, times chosen, mean reward (None without the bandit)."""
    if ctrl.bandit is None:
        return None
    return [{"scale": sc, "count": n, "mean_reward": v}
            for sc, n, v in zip(ctrl.arm_scales, ctrl.bandit.counts, ctrl.bandit.values)]


def make_controller(runner: EarlyExitRunner | TraceReplay, cal: Trace, settings: ControllerSettings, seed: int = 0,
                    **controller_kw: Any) -> AdaptiveController:
    """A controller for the runner's (fitted DART) policy with ``settings``: its agreement targets and the shift
    guard's alpha reference both come from the calibration trace ``cal``."""
    policy = runner.policy
    if not isinstance(policy, DartPolicy):
        raise ConfigError(f"adaptation needs a DART policy; this one is {policy.name!r}")
    if policy.alpha_source_:
        cal = cal.with_alpha(f"alpha_{policy.alpha_source_}")
    guard = settings.shift_guard and runner.alpha_source is not None and cal.alpha is not None
    s = settings.arm_spread
    kw: dict[str, Any] = {"audit_share": settings.audit_share, "window": settings.window,
                          "update_every": settings.update_every, "z_gate": settings.z_gate, "ucb": settings.ucb,
                          "arm_scales": (1 + s, 1.0, 1 - s), "shift_gate": settings.shift_gate,
                          "shift_scale": settings.shift_scale, **controller_kw}
    alpha_ref = AlphaReference.from_alpha(cal.alpha, settings.hard_quantile) if guard and cal.alpha is not None else None
    return AdaptiveController(runner, agreement_targets(policy, cal), alpha_ref=alpha_ref, seed=seed, **kw)


def controller_for_run(run_dir: str | Path, policy_path: str | Path, settings: ControllerSettings | None = None,
                       seed: int = 0, **controller_kw: Any) -> AdaptiveController:
    """A controller over the live runtime for a run's fitted DART policy (``settings``: the run's
    ``adapt.json`` when it has one, else the defaults)."""
    run = Run(run_dir)
    settings = settings if settings is not None else load_settings(run_dir)[0]
    runner = EarlyExitRunner(run.model(), load_policy(policy_path), run.estimators())
    return make_controller(runner, run.trace("cal"), settings, seed, **controller_kw)
