"""Figures (matplotlib, Agg backend): every axis labelled with its unit, every series in a legend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dart_ee.core import artifacts  # noqa: E402

plt.rcParams.update({"figure.dpi": 110, "font.size": 10, "axes.grid": True, "grid.alpha": 0.3})


def _save(fig: plt.Figure, path: str | Path) -> Path:
    fig.tight_layout()
    artifacts.atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return Path(path)


def alpha_histogram(scores: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Histogram of one or more difficulty scores over a split."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, a in scores.items():
        ax.hist(a, bins=40, range=(0, 1), alpha=0.55, label=f"{name} (mean {a.mean():.2f})")
    for x in (0.3, 0.7):
        ax.axvline(x, color="grey", ls="--", lw=1)
    ax.set_xlabel("difficulty alpha (0 = easy, 1 = hard)")
    ax.set_ylabel("number of images")
    ax.set_title(title or "Distribution of alpha (dashed: easy/medium/hard bounds)")
    ax.legend()
    return _save(fig, path)


def exit_distribution_plot(dists: list[dict], path: str | Path, title: str = "") -> Path:
    """Stacked bars: for each difficulty bin, the share leaving in each exit group (one panel per binning)."""
    fig, axes = plt.subplots(1, len(dists), figsize=(5.2 * len(dists), 3.8), squeeze=False)
    colors = plt.cm.viridis(np.linspace(0.15, 0.85, len(dists[0]["groups"])))
    for ax, dist in zip(axes[0], dists):
        names = [r["difficulty"].replace(" (", "\n(") for r in dist["rows"]]
        bottom = np.zeros(len(names))
        for g, (label, c) in enumerate(zip(dist["groups"], colors)):
            vals = np.array([100 * np.nan_to_num(r["shares"][g]) for r in dist["rows"]])
            ax.bar(names, vals, bottom=bottom, color=c, label=label)
            bottom += vals
        ax.set_ylabel("share of images in the bin (%)")
        ax.set_xlabel(f"difficulty bin ({dist['kind']})")
        ax.set_ylim(0, 100)
        ax.legend(title="left at", fontsize=8)
    fig.suptitle(title or "Exit distribution by difficulty")
    return _save(fig, path)


def tradeoff_curves(sweep: dict, path: str | Path, title: str = "") -> Path:
    """Accuracy vs MACs (% of static) for every policy, with the oracle and static network as references."""
    fig, ax = plt.subplots(figsize=(6.8, 4.4))
    markers = "os^vDPX*"
    for (name, pts), mk in zip(sweep["curves"].items(), markers):
        pts = sorted(pts, key=lambda p: p["mac_fraction"])
        x = [100 * p["mac_fraction"] for p in pts]
        y = [100 * p["accuracy"] for p in pts]
        ax.plot(x, y, marker=mk, ms=3.5, lw=1.3, label=name)
    o, s = sweep["oracle"], sweep["static"]
    ax.scatter([100 * o["mac_fraction"]], [100 * o["accuracy"]], marker="*", s=160, color="gold", edgecolor="k",
               zorder=5, label=f"oracle ({100 * o['mac_reduction']:.0f}% fewer MACs)")
    ax.scatter([100 * s["mac_fraction"]], [100 * s["accuracy"]], marker="s", s=60, color="k", zorder=5,
               label="static network")
    for b in (25, 50, 75):
        ax.axvline(b, color="grey", ls=":", lw=0.8, label="25 / 50 / 75% grid (report table)" if b == 25 else None)
    lo = min(100 * s["accuracy"] - 10, min(100 * p["accuracy"] for pts in sweep["curves"].values() for p in pts))
    ax.set_ylim(max(lo, 100 * s["accuracy"] - 15), 100 * max(o["accuracy"], s["accuracy"]) + 1)
    ax.set_xlim(0, 105)
    ax.set_xlabel("expected MACs per image (% of the static network)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "Accuracy vs compute on the test split (each candidate fitted on the calibration split)")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


# the methods of an adaptation study (dart_ee.adapt.study): colour, line style, legend
METHOD_STYLES = {"full": ("k", "-", "full network"), "frozen": ("tab:red", "--", "frozen DART"),
                 "adaptive": ("tab:blue", "-", "adaptive DART"), "risk": ("tab:green", "-.", "DART under risk control")}


def adaptation_over_time(res: dict, path: str | Path) -> Path:
    """Accuracy and MACs per window for the full network, frozen, adaptive and risk-controlled DART, shift marked."""
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 5.6), sharex=True)
    for name, s in res["series"].items():
        c, ls, label = METHOD_STYLES[name]
        x = [(a + b) / 2 for a, b in zip(s["window_start"], s["window_end"])]
        a1.plot(x, [100 * v for v in s["accuracy"]], color=c, ls=ls, marker="o", ms=3, label=label)
        a2.plot(x, [100 * v for v in s["mac_fraction"]], color=c, ls=ls, marker="o", ms=3, label=label)
    for ax in (a1, a2):
        ax.axvline(res["shift_start"], color="grey", lw=1.5, ls=":")
        ax.legend(fontsize=8, loc="best")
    a1.text(res["shift_start"], a1.get_ylim()[1], f" shift: {res['scenario']} (severity {res['severity']})",
            va="top", fontsize=8)
    a1.set_ylabel(f"accuracy per {res['report_window']} images (%)")
    a2.set_ylabel("MACs per image (% of static)")
    a2.set_xlabel("position in the stream (images)")
    a1.set_title(f"Adaptation under a {res['scenario']} shift ({res['audited_samples']} samples audited)")
    return _save(fig, path)


def coefficient_evolution(res: dict, path: str | Path) -> Path:
    """The paper's Fig. 2: per-exit and per-class threshold coefficients over the stream (and the shift guard's score)."""
    coefs = res["coefficients"]
    guard = res.get("shift_guard")
    fig, axes = plt.subplots(1, 3 if guard else 2, figsize=(15 if guard else 10, 3.8))
    xs = [c["image"] for c in coefs]
    a1, a2 = axes[0], axes[1]
    # equal coefficients draw on top of each other: dashes and widths keep every line visible
    styles = ["-", "--", "-.", ":"]
    for i in range(len(coefs[0]["c_exit"])):
        a1.plot(xs, [c["c_exit"][i] for c in coefs], ls=styles[i % 4], lw=3 - 0.4 * (i % 5), label=f"exit {i + 1}")
    cmap = plt.cm.tab10
    for k in range(len(coefs[0]["c_class_mean"])):
        a2.plot(xs, [c["c_class_mean"][k] for c in coefs], color=cmap(k % 10), ls=styles[k % 4], lw=3 - 0.2 * k,
                label=f"class {k}")
    titles = [(a1, "per-exit coefficient in force", "coefficient (1 = as calibrated)"),
              (a2, "per-class coefficient (mean over exits)", "coefficient (1 = as calibrated)")]
    if guard:
        a3 = axes[2]
        a3.plot(xs, [c["shift_score"] for c in coefs], color="tab:purple", label="alpha shift score")
        for g in (guard["gate"], -guard["gate"]):
            a3.axhline(g, color="tab:red", ls="--", lw=1, label="guard trigger" if g > 0 else None)
        titles.append((a3, f"shift guard: beyond the trigger, alpha >= {guard['hard']:.2f}, coefficients x{guard['scale']}",
                       "alpha vs calibration (standard deviations)"))
    for ax, t, ylabel in titles:
        ax.axvline(res["shift_start"], color="grey", ls=":", lw=1.5, label="shift starts")
        ax.set_xlabel("position in the stream (images)")
        ax.set_ylabel(ylabel)
        ax.set_title(t, fontsize=10)
        ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def adaptation_figures(res: dict, out: str | Path) -> None:
    """Both adaptation figures of one scenario: ``SCENARIO_over_time.png`` and ``SCENARIO_coefficients.png``."""
    adaptation_over_time(res, Path(out) / f"{res['scenario']}_over_time.png")
    coefficient_evolution(res, Path(out) / f"{res['scenario']}_coefficients.png")


def study_figures(study: dict, out: str | Path) -> None:
    """An adaptation study's figures (``dart_ee.adapt.study.study``): each family at its most severe grade, and the
    label-prior scenario's drawn mechanism run (``study_scenarios`` names them)."""
    mech = study.get("mechanisms") or {}
    for sc in study_scenarios(study):
        if sc == mech.get("scenario"):
            run = next(r for r in mech["runs"] if "coefficients" in r)
            adaptation_figures({**run, "scenario": sc, "severity": mech["severity"]}, out)
        else:
            adaptation_figures(max((r for r in study["families"] if r["scenario"] == sc), key=lambda r: r["level"]), out)
    if study.get("switching"):
        running_drop_plot(study["switching"], study["budget_points"], Path(out) / "switching_running_drop.png",
                          "switching stream: running drop against the full network")


def running_drop_plot(res: dict, budget: float, path: str | Path, title: str = "") -> Path:
    """Each method's running drop against the full network (from the stream's start) over the stream, D marked,
    and the segments of a switching stream shaded."""
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for i, seg in enumerate(res.get("segments") or []):
        if seg["scenario"] != "clean":
            ax.axvspan(seg["start"], seg["end"], color="0.9", label="shifted segment" if i == 1 else None)
    for name, s in res["series"].items():
        if name != "full" and "running_drop_points" in s:
            c, ls, label = METHOD_STYLES[name]
            ax.plot(s["window_end"], s["running_drop_points"], color=c, ls=ls, marker=".", label=label)
    ax.axhline(budget, color="k", ls="--", lw=1, label=f"D = {budget:g} points")
    ax.set_xlabel("images of the stream")
    ax.set_ylabel("running drop vs full network (points)")
    ax.set_title(title or "running accuracy drop against the full network")
    ax.legend(fontsize=8)
    return _save(fig, path)


def study_scenarios(study: dict) -> list[str]:
    """The scenarios ``study_figures`` draws, in its order (the report lists them the same way)."""
    names = list(dict.fromkeys(r["scenario"] for r in study["families"]))
    return names + ([study["mechanisms"]["scenario"]] if study.get("mechanisms") else [])
