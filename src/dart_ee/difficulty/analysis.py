"""Tables computed from traces: difficulty statistics and the exit distribution by difficulty."""

from __future__ import annotations

import numpy as np

from dart_ee.difficulty.estimators import TERMS, oracle_depth, spearman
from dart_ee.trace import Trace

ABSOLUTE_BINS = (("easy (alpha < 0.3)", 0.0, 0.3), ("medium (0.3-0.7)", 0.3, 0.7), ("hard (> 0.7)", 0.7, 1.01))


def exit_groups(num_exits: int) -> list[list[int]]:
    """Split exits 1..N into three contiguous groups (1-2, 3-4, 5-6 for six exits)."""
    return [g.tolist() for g in np.array_split(np.arange(1, num_exits + 1), 3) if len(g)]


def difficulty_bins(alpha: np.ndarray, kind: str) -> list[tuple[str, np.ndarray]]:
    """Masks of the easy/medium/hard bins: ``absolute`` thresholds, or alpha ``terciles``."""
    if kind == "absolute":
        return [(name, (alpha >= lo) & (alpha < hi)) for name, lo, hi in ABSOLUTE_BINS]
    q1, q2 = np.quantile(alpha, [1 / 3, 2 / 3])
    return [(f"easy (alpha <= {q1:.2f})", alpha <= q1), (f"medium ({q1:.2f}-{q2:.2f})", (alpha > q1) & (alpha <= q2)),
            (f"hard (> {q2:.2f})", alpha > q2)]


def exit_distribution(alpha: np.ndarray, exits: np.ndarray, num_exits: int, kind: str) -> dict:
    """Share of each difficulty bin leaving in each exit group (``exits`` are 1-based; N+1 means the last)."""
    exits = np.minimum(exits, num_exits)
    groups = exit_groups(num_exits)
    rows = []
    for name, mask in difficulty_bins(alpha, kind):
        n = int(mask.sum())
        shares = [float(np.isin(exits[mask], g).mean()) if n else float("nan") for g in groups]
        rows.append({"difficulty": name, "n": n, "shares": shares})
    return {"kind": kind, "groups": [f"exit {g[0]}-{g[-1]}" if len(g) > 1 else f"exit {g[0]}" for g in groups],
            "rows": rows}


def accuracy_by_alpha(trace: Trace, alpha: np.ndarray, bins: int = 5) -> dict:
    """Accuracy of every exit within alpha quantile bins."""
    edges = np.unique(np.quantile(alpha, np.linspace(0, 1, bins + 1)))
    which = np.clip(np.searchsorted(edges, alpha, side="right") - 1, 0, len(edges) - 2)
    rows = []
    for b in range(len(edges) - 1):
        m = which == b
        rows.append({"alpha_range": [float(edges[b]), float(edges[b + 1])], "n": int(m.sum()),
                     "exit_accuracy": [float(a) for a in trace.correct[m].mean(0)] if m.any() else []})
    return {"bins": rows}


def correlations(trace: Trace) -> dict:
    """Spearman correlation with the oracle exit depth of every difficulty signal the trace holds."""
    depth = oracle_depth(trace.correct)
    out = {"exit1_confidence (negated)": spearman(-trace.conf[:, 0], depth)}
    for name in ("alpha_paper", "alpha_learned"):
        if name in trace.extra:
            out[name] = spearman(trace.extra[name], depth)
    if "terms" in trace.extra:
        out.update({f"term_{n}": spearman(trace.extra["terms"][:, i], depth) for i, n in enumerate(TERMS)})
    return out


def difficulty_report(trace: Trace, exits: np.ndarray | None = None, exits_label: str = "oracle") -> dict:
    """Everything ``dart-ee difficulty report`` prints: alpha stats, accuracy by bin, exits by difficulty."""
    if trace.alpha is None:
        raise ValueError("trace has no alpha; regenerate it with `dart-ee trace`")
    alpha = trace.alpha
    exits = oracle_depth(trace.correct) if exits is None else exits
    return {
        "split": trace.split, "n": trace.n, "alpha_source": trace.meta.get("difficulty", "?"),
        "alpha_stats": {"mean": float(alpha.mean()), "std": float(alpha.std()),
                        "quantiles": {str(q): float(np.quantile(alpha, q)) for q in (0.01, 0.25, 0.5, 0.75, 0.99)},
                        "histogram": np.histogram(alpha, bins=20, range=(0, 1))[0].tolist()},
        "accuracy_by_alpha": accuracy_by_alpha(trace, alpha),
        "exits_from": exits_label,
        "exit_distribution": {k: exit_distribution(alpha, exits, trace.num_exits, k) for k in ("absolute", "terciles")},
        "spearman_with_oracle_depth": correlations(trace),
    }


def distribution_markdown(dist: dict) -> str:
    head = "| Difficulty | n | " + " | ".join(dist["groups"]) + " |"
    lines = [head, "|" + "---|" * (len(dist["groups"]) + 2)]
    for r in dist["rows"]:
        cells = " | ".join("-" if np.isnan(s) else f"{100 * s:.0f}%" for s in r["shares"])
        lines.append(f"| {r['difficulty']} | {r['n']} | {cells} |")
    return "\n".join(lines)
