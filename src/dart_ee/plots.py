"""Figures (matplotlib, Agg backend): every axis labelled with its unit, every series in a legend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dart_ee import artifacts  # noqa: E402

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
