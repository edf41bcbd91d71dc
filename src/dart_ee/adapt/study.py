"""Adaptation measured on streams that shift part-way (METHOD.md section 5).

A stream (``dart_ee.data.shift``) is traced once: every exit's outputs and alpha for each image. Four
methods then run over it, each with the decisions the runtime would make on those images
(``TraceReplay``; ``tests/test_adapt_eval.py`` checks the controller decides alike on the live runner):

- **full**: the network's final exit for every image;
- **frozen**: the calibrated DART policy as fitted;
- **adaptive**: the same policy under ``AdaptiveController`` with the run's settings (``RUN/adapt.json``,
  chosen on development streams from the calibration split by ``dart_ee.adapt.tuning``);
- **matched**: frozen DART with every exit coefficient scaled by one factor, found by bisection on MACs
  alone (no labels) so that it spends on the shifted part what adaptive DART spent there, audits
  included. Adaptive DART beating frozen DART may only be the extra compute it spends; beating the
  matched baseline is what adapting buys;
- **risk**: the certified policy under online risk control (``dart_ee.adapt.risk``), whose running
  disagreement with the full network, and so its running drop, is guaranteed to come back within D.

Each method's running drop against the full network (from the stream's start) is judged after a warm-up of
``WARMUP`` images: its worst value and the share of time points above D. Besides the families, one long
stream switches between clean images and each reporting family without warning (``switching_stream``).

A scenario is within its budget when adaptive DART's accuracy on the shifted part is at most D points
below the full network's, D being the budget the policy was calibrated to (a calibration certificate
does not cover shifted data, nor changed thresholds: this is measured, not guaranteed).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dart_ee.adapt.controller import AdaptiveController, bandit_stats, make_controller
from dart_ee.adapt.risk import risk_over, running_drop
from dart_ee.adapt.settings import load_risk_settings, load_settings
from dart_ee.calibration.evaluation import TraceReplay, exit_costs, simulate
from dart_ee.calibration.record import recorded
from dart_ee.config import AdaptConfig, ControllerSettings, RiskSettings
from dart_ee.core import artifacts
from dart_ee.core.errors import ConfigError
from dart_ee.core.provenance import provenance
from dart_ee.core.runfiles import POLICY_DIR
from dart_ee.data.shift import CHOOSE, REPORT, Stream, make_stream, severity
from dart_ee.policies import DartPolicy, load_policy
from dart_ee.runs.run import Run
from dart_ee.runs.tracing import make_trace
from dart_ee.trace import Trace

_DEFAULT = AdaptConfig()
# The paper's updates are audited: how often they act depends on the audit share. The label-prior scenario
# runs each mechanism alone at each of these shares (fixed here, before any result was seen).
AUDIT_SHARES = (0.02, 0.05, 0.1, 0.2, 0.5)
# controller keywords that leave one mechanism on (the shift guard as chosen, in every one)
MECHANISMS: dict[str, dict[str, Any]] = {
    "eq13": {"eta": 0.0, "ucb": False},
    "eq14": {"gain": 0.0, "ucb": False},
    "ucb1": {"gain": 0.0, "eta": 0.0, "ucb": True},
    "all": {"ucb": True},
}
PLOTTED = ("all", 0.2)  # the mechanism run whose coefficients are drawn
WARMUP = 500  # images before a running drop is judged: over fewer it is one or two images either way
SWITCH_LEVEL = 2  # the grade of each shift in the switching stream


def budget_points(policy_path: str | Path) -> float:
    """D: the accuracy budget (points below the final exit) the policy was calibrated to."""
    rec = recorded(artifacts.read_json(policy_path, "policy file"), str(policy_path))
    d = rec["target"].get("max_drop") if rec else None
    if d is None:
        raise ConfigError(f"{policy_path} records no calibration budget; fit it with dart-ee calibrate --max-drop D")
    return float(d)


def dart_policy(policy_path: str | Path) -> DartPolicy:
    policy = load_policy(policy_path)
    if not isinstance(policy, DartPolicy):
        raise ConfigError(f"{policy_path} is a {policy.name!r} policy; adaptation needs a DART policy")
    return policy


def run_policy(run_dir: str | Path) -> Path:
    """The DART policy a run adapts: its certified one, or, where DART could not be certified at the run's budget
    (the static network stands in), the uncertified DART beside it (the report says so)."""
    pol_dir = Path(run_dir) / POLICY_DIR
    return pol_dir / "dart.json" if load_policy(pol_dir / "dart.json").name == "dart" else pol_dir / "uncertified" / "dart.json"


def trace_stream(model: Any, estimator: Any, stream: Stream, batch_size: int = 256) -> Trace:
    """Every exit's outputs and alpha for each image of the stream (one pass of the network with all heads)."""
    batches = ((stream.x[s: s + batch_size], stream.y[s: s + batch_size]) for s in range(0, len(stream.y), batch_size))
    return make_trace(model, batches, "test", estimator, stream=stream.scenario, severity=stream.severity)


def adapt_over(policy: DartPolicy, cal: Trace, trace: Trace, settings: ControllerSettings, batch_size: int,
               seed: int = 0, **controller_kw: Any) -> tuple[AdaptiveController, dict[str, torch.Tensor], list[dict]]:
    """Adaptive DART over a traced stream, batch by batch: the controller, each image's exit, prediction and
    MACs (audits included), and the coefficients in force after each batch."""
    replay = TraceReplay(copy.deepcopy(policy), trace)  # the controller moves the copy's coefficients
    ctrl = make_controller(replay, cal, settings, seed, **controller_kw)
    parts: dict[str, list[torch.Tensor]] = {"exit": [], "pred": [], "macs": []}
    coefs = []
    for s in range(0, trace.n, batch_size):
        idx = torch.arange(s, min(s + batch_size, trace.n))
        r, macs = ctrl.process(idx)
        parts["exit"].append(r.exit)
        parts["pred"].append(r.pred)
        parts["macs"].append(macs)
        coefs.append({"image": int(idx[-1]) + 1, "c_exit": ctrl.exit_coefficients(), "shift_score": ctrl.shift_score(),
                      "shifted": ctrl.shifted,
                      "c_class_mean": [float(np.mean([row[k] for row in ctrl.c_class])) for k in range(len(ctrl.c_class[0]))]})
    return ctrl, {k: torch.cat(v) for k, v in parts.items()}, coefs


def scaled(policy: DartPolicy, scale: float) -> DartPolicy:
    """A copy of ``policy`` with every exit coefficient times ``scale`` (class coefficients as they are)."""
    p = copy.deepcopy(policy)
    p.set_coefficients([c * scale for c in policy.coef_exit_], policy.coef_class_)
    return p


def matched_compute(policy: DartPolicy, trace: Trace, mac_fraction: float, lo: float = 0.25, hi: float = 4.0,
                    steps: int = 30) -> dict:
    """Frozen DART scaled to spend ``mac_fraction`` of the static network's MACs on ``trace`` (bisection on the
    scale; MACs rise with it). Labels are read only to score the result."""
    static = float(trace.meta.get("static_macs", trace.exit_macs[-1]))
    costs = exit_costs(policy, trace)

    def spend(s: float) -> tuple[float, np.ndarray, np.ndarray]:
        exits, preds = simulate(scaled(policy, s), trace)
        return float(costs[exits].mean()) / static, exits, preds

    for _ in range(steps):
        mid = (lo + hi) / 2
        if spend(mid)[0] < mac_fraction:
            lo = mid
        else:
            hi = mid
    frac, _, preds = spend(hi)
    return {"scale": hi, "accuracy": float((preds == trace.labels).mean()), "mac_fraction": frac}


def _part(correct: np.ndarray, macs: np.ndarray, static: float) -> dict:
    return {"accuracy": float(correct.mean()), "mac_fraction": float(macs.mean()) / static}


def drop_stats(run: np.ndarray, budget: float, warmup: int = WARMUP) -> dict:
    """A method's running drop against the full network (``run``: points, from the stream's start, as
    ``100 * running_drop`` gives it): its final value, its worst after ``warmup`` images and the share of time
    points after the warm-up where it exceeds ``budget``."""
    after = run[warmup:] if len(run) > warmup else run[-1:]
    return {"final_running_drop_points": float(run[-1]), "worst_running_drop_points": float(after.max()),
            "share_over_budget": float((after > budget).mean())}


def _risk_run(policy: DartPolicy, cal: Trace, trace: Trace, budget: float, batch_size: int, risk: RiskSettings,
              seed: int) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """The online risk controller over the stream: (correct, MACs) per image, and what it did."""
    ctrl, out = risk_over(policy, cal, trace, budget, risk, seed)
    info = {"settings": risk.model_dump(), "audit_share": float(out["audited"].mean()), "theta_final": ctrl.theta,
            "guard_alarm_share": None if ctrl.guard is None else ctrl.guard.alarms / trace.n,
            "theta_max": float(out["theta"].max()), "guaranteed_bound_points": 100 * ctrl.bound(risk.update_every),
            "theta": out["theta"][::batch_size].tolist()}
    return (out["pred"] == trace.labels, out["macs"]), info


def evaluate_stream(policy: DartPolicy, cal: Trace, trace: Trace, shift_start: int, settings: ControllerSettings,
                    budget: float, batch_size: int = _DEFAULT.batch_size, seed: int = 0, report_window: int = 500,
                    matched: bool = True, risk: RiskSettings | None = None, **controller_kw: Any) -> dict:
    """Full, frozen, adaptive (matched-compute, and with ``risk`` risk-controlled) DART on one traced stream; totals
    per part, windows and running drops."""
    static = float(trace.meta.get("static_macs", trace.exit_macs[-1]))
    y = trace.labels
    costs = exit_costs(policy, trace)
    f_exit, f_pred = simulate(policy, trace)
    ctrl, a, coefs = adapt_over(policy, cal, trace, settings, batch_size, seed, **controller_kw)
    runs = {"full": (trace.preds[:, -1] == y, np.full(trace.n, static)),
            "frozen": (f_pred == y, costs[f_exit]),
            "adaptive": (a["pred"].numpy() == y, a["macs"].numpy())}
    risk_info = None
    if risk is not None:
        runs["risk"], risk_info = _risk_run(policy, cal, trace, budget, batch_size, risk, seed)
    parts = {"clean": slice(0, shift_start), "shifted": slice(shift_start, trace.n)}
    totals = {k: {p: _part(c[sl], m[sl], static) for p, sl in parts.items()} for k, (c, m) in runs.items()}
    if matched:
        totals["matched"] = {"shifted": matched_compute(policy, trace.subset(np.arange(shift_start, trace.n)),
                                                        totals["adaptive"]["shifted"]["mac_fraction"])}
    windows = [(s, min(s + report_window, shift_start)) for s in range(0, shift_start, report_window)] + \
        [(s, min(s + report_window, trace.n)) for s in range(shift_start, trace.n, report_window)]
    full_c = runs["full"][0]
    drops = {k: 100 * running_drop(full_c, c) for k, (c, _) in runs.items()}
    series = {k: {"window_start": [s for s, _ in windows], "window_end": [e for _, e in windows],
                  "accuracy": [float(c[s:e].mean()) for s, e in windows],
                  "mac_fraction": [float(m[s:e].mean()) / static for s, e in windows],
                  "running_drop_points": [float(drops[k][e - 1]) for _, e in windows]}
              for k, (c, m) in runs.items()}
    sh = {k: v["shifted"] for k, v in totals.items()}
    lost = sh["full"]["accuracy"] - sh["frozen"]["accuracy"]
    summary = {"accuracy_lost_by_frozen": lost,
               "accuracy_recovered": sh["adaptive"]["accuracy"] - sh["frozen"]["accuracy"],
               "recovered_share": (sh["adaptive"]["accuracy"] - sh["frozen"]["accuracy"]) / lost if lost > 0 else None,
               "clean_mac_cost_points": 100 * (totals["adaptive"]["clean"]["mac_fraction"]
                                               - totals["frozen"]["clean"]["mac_fraction"]),
               "within_budget": 100 * (sh["full"]["accuracy"] - sh["adaptive"]["accuracy"]) <= budget,
               "fewer_macs_than_full": sh["adaptive"]["mac_fraction"] < 1.0}
    if matched:
        summary["above_matched_points"] = 100 * (sh["adaptive"]["accuracy"] - sh["matched"]["accuracy"])
    if risk_info is not None:
        summary["risk_clean_mac_cost_points"] = 100 * (totals["risk"]["clean"]["mac_fraction"]
                                                       - totals["frozen"]["clean"]["mac_fraction"])
    running = {k: drop_stats(drops[k], budget) for k in runs if k != "full"}
    guard = None if ctrl.alpha_ref is None else {**ctrl.alpha_ref._asdict(), "gate": ctrl.shift_gate,
                                                 "scale": ctrl.shift_scale,
                                                 "batches_guarded": sum(c["shifted"] for c in coefs)}
    return {"n_clean": shift_start, "n_shift": trace.n - shift_start, "shift_start": shift_start,
            "batch_size": batch_size, "report_window": report_window, "budget_points": budget,
            "audit_share": ctrl.audit_share, "audited_samples": ctrl.audits_total, "targets": ctrl.targets,
            "updates_fired": dict(ctrl.fired), "ucb1": bandit_stats(ctrl), "shift_guard": guard, "totals": totals,
            "summary": summary, "series": series, "coefficients": coefs, "final_c_class": ctrl.c_class,
            "running": running, "risk": risk_info, "warmup": WARMUP}


class StreamSource:
    """A run's model, estimators and one split's images: builds and traces streams from that split only.

    Streams with the same seed share their clean part (``make_stream`` draws it before the shift), so it is
    traced once and reused while its pixels are the same."""

    def __init__(self, run_dir: str | Path, split: str, data_dir: str | Path | None = None) -> None:
        run = Run(run_dir)
        self.model, self.estimator, self.images = run.model(), run.estimators(), run.images(split, data_dir)
        self.split = split
        self._clean: tuple[torch.Tensor, Trace] | None = None

    def stream(self, scenario: str, sev: float, n_clean: int, n_shift: int, seed: int = 0,
               classes: Sequence[int] | None = None, batch_size: int = 256) -> tuple[Trace, int]:
        st = make_stream(self.images.x, self.images.y, scenario, sev, n_clean, n_shift, seed, classes)
        if n_clean == 0:
            return trace_stream(self.model, self.estimator, st, batch_size), 0
        x_clean, y_clean = st.x[:n_clean], st.y[:n_clean]
        if self._clean is None or not torch.equal(self._clean[0], x_clean):
            self._clean = x_clean, trace_stream(self.model, self.estimator, Stream(x_clean, y_clean, 0, "clean", 0.0),
                                                batch_size)
        shifted = trace_stream(self.model, self.estimator, Stream(st.x[n_clean:], st.y[n_clean:], 0, scenario, sev),
                               batch_size)
        return _joined(self._clean[1], shifted), st.shift_start


def _joined(a: Trace, b: Trace) -> Trace:
    """Trace ``a`` followed by trace ``b`` (same model and estimator); ``b``'s metadata."""
    return Trace(np.concatenate([a.probs, b.probs]), np.concatenate([a.labels, b.labels]), np.arange(a.n + b.n),
                 b.exit_macs, None if b.alpha is None or a.alpha is None else np.concatenate([a.alpha, b.alpha]),
                 dict(b.meta, n=a.n + b.n), {k: np.concatenate([a.extra[k], v]) for k, v in b.extra.items()})


def hard_classes(policy: DartPolicy, cal: Trace, k: int = 3) -> list[int]:
    """The ``k`` classes whose early exits are most often wrong on the calibration split (by true class)."""
    exits, preds = simulate(policy, cal)
    early = exits < cal.num_exits - 1
    n_cls = cal.num_classes
    wrong = np.bincount(cal.labels[early & (preds != cal.labels)], minlength=n_cls)
    n = np.bincount(cal.labels[early], minlength=n_cls)
    rate = wrong / np.maximum(n, 1)
    return sorted(int(c) for c in np.argsort(-rate, kind="stable")[:k])


def study(run_dir: str | Path, policy_path: str | Path, families: Sequence[str] = tuple(_DEFAULT.families),
          levels: Sequence[int] = tuple(_DEFAULT.levels), n_clean: int = _DEFAULT.clean, n_shift: int = _DEFAULT.shifted,
          batch_size: int = _DEFAULT.batch_size, seed: int = 0, data_dir: str | Path | None = None,
          mechanisms: bool = True, settings: ControllerSettings | None = None, progress: Any = None) -> dict:
    """Every reported figure of adaptation on a run: the reporting families at each grade on the test split,
    and the label-prior scenario with each mechanism alone at each audit share."""
    dev = [f for f in families if f in CHOOSE]
    if dev:  # the settings were chosen on these: a report on them would flatter the controller
        raise ConfigError(f"{', '.join(dev)}: development family (the controller's settings are chosen on it), never "
                          f"reported on; choose reporting families: {', '.join(REPORT)}")
    say = progress or (lambda msg: None)
    if settings is None:
        settings, source = load_settings(run_dir)
    else:
        source = {"source": "given by the caller"}
    risk, risk_source = load_risk_settings(run_dir)
    policy, budget = dart_policy(policy_path), budget_points(policy_path)
    cal = Run(run_dir).trace("cal")
    src = StreamSource(run_dir, "test", data_dir)
    rows = []
    for fam in families:
        for level in levels:
            sev = severity(fam, level)
            say(f"{fam} grade {level} (severity {sev})")
            trace, start = src.stream(fam, sev, n_clean, n_shift, seed, batch_size=batch_size)
            rows.append({"scenario": fam, "level": level, "severity": sev,
                         **evaluate_stream(policy, cal, trace, start, settings, budget, batch_size, seed, risk=risk)})
    say(f"switching stream: clean and {', '.join(families)} at grade {SWITCH_LEVEL}, in turn, without warning")
    trace, segments = switching_stream(src, families, n_shift // 2, seed, batch_size)
    switching = {"segments": segments, **evaluate_stream(policy, cal, trace, segments[1]["start"], settings, budget,
                                                         batch_size, seed, risk=risk)}
    mech = None
    if mechanisms:
        classes = hard_classes(policy, cal)
        say(f"label-prior shift to classes {classes} (hardest for early exits on the calibration split)")
        trace, start = src.stream("class-prior", 0.9, n_clean, n_shift, seed, classes, batch_size)
        runs = []
        for share in AUDIT_SHARES:
            for name, kw in MECHANISMS.items():
                s = settings.model_copy(update={"audit_share": share, "ucb": kw["ucb"]})
                rec = evaluate_stream(policy, cal, trace, start, s, budget, batch_size, seed,
                                      risk=risk if (name, share) == PLOTTED else None,
                                      **{k: v for k, v in kw.items() if k != "ucb"})
                if (name, share) != PLOTTED:
                    rec.pop("coefficients"), rec.pop("series")
                runs.append({"mechanism": name, "audit_share": share, **rec})
        mech = {"scenario": "class-prior", "severity": 0.9, "classes": classes, "runs": runs}
    return {"provenance": provenance(), "settings": settings.model_dump(), "settings_source": source, "budget_points": budget,
            "risk_settings": risk.model_dump(), "risk_settings_source": risk_source,
            "policy_file": _relative(policy_path, run_dir), "seed": seed, "families": rows, "mechanisms": mech,
            "switching": switching}


def switching_stream(src: StreamSource, families: Sequence[str], segment: int, seed: int = 0,
                     batch_size: int = 256) -> tuple[Trace, list[dict]]:
    """Clean images, then each family in turn at grade ``SWITCH_LEVEL``, a clean segment before each: one stream,
    no warning where a segment starts. Returns the traced stream and its segments (scenario, start, end)."""
    trace, segments = None, []
    for k, fam in enumerate(families):
        part, start = src.stream(fam, severity(fam, SWITCH_LEVEL), segment, segment, seed + k, batch_size=batch_size)
        at = 0 if trace is None else trace.n
        segments += [{"scenario": "clean", "start": at, "end": at + start},
                     {"scenario": fam, "start": at + start, "end": at + part.n}]
        trace = part if trace is None else _joined(trace, part)
    if trace is None:
        raise ConfigError("the switching stream needs at least one reporting family")
    return trace, segments


def _relative(path: str | Path, run_dir: str | Path) -> str:
    """``path`` as the run names it (``policies/dart.json``) when it lies in the run folder."""
    p, r = Path(path).resolve(), Path(run_dir).resolve()
    return str(p.relative_to(r)) if p.is_relative_to(r) else str(path)
