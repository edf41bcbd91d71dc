"""``report.md`` from ``results.json``: the original README's tables and the paper's Table I, filled in."""

from __future__ import annotations

from pathlib import Path

from dart_ee.bench.benchmark import table_markdown
from dart_ee.calibration.record import CalibrationRecord
from dart_ee.core import artifacts
from dart_ee.core.defaults import CONFIDENCE
from dart_ee.core.malloc import KEPT
from dart_ee.core.runfiles import STUDY
from dart_ee.difficulty.analysis import distribution_markdown
from dart_ee.report.plots import study_scenarios
from dart_ee.report.reference import PAPER_TABLE_I, PAPER_TABLE_II, README_SAVINGS, TABLE_I_COLUMNS


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def training_table(metrics: dict) -> str:
    lines = ["| Exit | Test accuracy | Calibration accuracy | Cumulative MACs | % of full |", "|---|---|---|---|---|"]
    for i, (a, c, m, f) in enumerate(zip(metrics["exit_test_accuracy"], metrics["exit_cal_accuracy"],
                                         metrics["exit_macs"], metrics["exit_macs_fraction"])):
        lines.append(f"| {i + 1} | {_pct(a)} | {_pct(c)} | {m / 1e6:.2f} M | {100 * f:.1f}% |")
    return "\n".join(lines)


def savings_table(res: dict) -> str:
    """The original README's "Accuracy vs. Computational Savings" table, measured."""
    speed = {r["method"]: r["speedup"] for r in (res.get("benchmark") or {}).get("rows", [])}
    lines = ["| Method | Accuracy | FLOPs (MACs) reduction | Throughput gain (measured, batch 256) |", "|---|---|---|---|"]
    names = {"static": "Baseline (static, no early exit)", "threshold": "Static threshold", "branchynet": "BranchyNet",
             "patience": "Patience (PABEE)", "rl": "RL agent", "dart": "**DART**"}
    for row in res["compare"]["rows"]:
        t = row["test"]
        gain = f"{speed[row['policy']]:.2f}x" if row["policy"] in speed else "not benchmarked"
        lines.append(f"| {names.get(row['policy'], row['policy'])} | {_pct(t['accuracy'])} | "
                     f"{100 * t['mac_reduction']:.1f}% | {gain} |")
    o = res["compare"]["oracle"]
    lines.append(f"| Oracle (upper bound, not a policy) | {_pct(o['accuracy'])} | {100 * o['mac_reduction']:.1f}% | - |")
    if res.get("single_exit_baseline"):
        b = res["single_exit_baseline"]
        lines.insert(2, f"| Baseline (No EE: single-exit training, same recipe and budget) | "
                        f"{_pct(b['exit_test_accuracy'][-1])} | 0% | 1.00x |")
    return "\n".join(lines)


def paper_tables(res: dict, h: str = "##") -> list[str]:
    """This run next to the paper's Table I row for the same model and dataset, and the README's table (CIFAR-10)."""
    cfg = res["config"]
    key = (cfg["data"]["dataset"], cfg["model"]["name"])
    test = {r["policy"]: r["test"] for r in res["compare"]["rows"]}
    bench = {r["method"]: r for r in (res.get("benchmark") or {}).get("rows", [])}

    def ours(method: str, field: str) -> str:
        if field == "accuracy":
            return _pct(test[method]["accuracy"]) if method in test else "-"
        if field == "mac_reduction":
            return f"{100 * test[method]['mac_reduction']:.1f}%" if method in test else "-"
        row = bench.get(method, {})
        v = row.get(field)
        if v is None:
            return "-"
        return f"{v:.2f}x" if field == "speedup" else f"{v:.3f}" + (" (PE=1)" if row.get("daes_note") else "")

    out = []
    if key in PAPER_TABLE_I:
        col = {c: i for i, c in enumerate(TABLE_I_COLUMNS)}
        lines = ["| Method | Accuracy: paper | Accuracy: this run | Speedup: paper (modelled) | "
                 "Speedup: this run (measured, batch 256) | MAC reduction: this run | DAES: paper | DAES: this run |",
                 "|---|---|---|---|---|---|---|---|"]
        for method, paper in PAPER_TABLE_I[key].items():
            lines.append(f"| {method} | {paper[col['accuracy']]:.2f}% | {ours(method, 'accuracy')} | "
                         f"{paper[col['speedup']]:.2f}x | "
                         f"{ours(method, 'speedup')} | {ours(method, 'mac_reduction')} | {paper[col['daes']]:.3f} | "
                         f"{ours(method, 'daes')} |")
        out += [f"{h} Side by side with the paper's Table I ({key[1]} on {key[0]})",
                "The paper's figures are its published claims (A100, modelled latency, its own training budget); "
                "this run's are measured here" + ("; energy was unavailable, so its DAES takes power efficiency as 1 "
                                                    "(PE=1)." if any(r.get("daes_note") for r in bench.values()) else "."),
                "\n".join(lines)]
    if key[0] == "cifar10" and key[1] in PAPER_TABLE_II:
        lines = ["| Method | Accuracy: paper | Accuracy: this run | MMACs: paper | MMACs: this run | Time (ms): paper | "
                 "Time (ms per image, batch 256): this run | Speedup: paper | Speedup: this run |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for method, paper in PAPER_TABLE_II[key[1]].items():
            mine = f"{test[method]['macs_per_image'] / 1e6:.1f}" if method in test else "-"
            t = bench.get(method, {}).get("time_ms")
            lines.append(f"| {method} | {paper[0]:.2f}% | {ours(method, 'accuracy')} | {paper[1]:.1f} | {mine} | "
                         f"{paper[2]:.2f} | {'-' if t is None else f'{t:.3f}'} | {paper[3]:.2f}x | "
                         f"{ours(method, 'speedup')} |")
        out += [f"{h} Side by side with the paper's Table II ({key[1]} on CIFAR-10)",
                "The paper's figures are its published claims (pretrained LeViT, A100); this run's are measured here, "
                "trained from scratch on this run's budget.", "\n".join(lines)]
    if key[0] == "cifar10":
        base = res.get("single_exit_baseline")
        lines = ["| Method | Accuracy: README | Accuracy: this run | FLOPs reduction: README | MAC reduction: this run | "
                 "Throughput: README | Throughput: this run (measured, batch 256) |", "|---|---|---|---|---|---|---|"]
        for method, readme in README_SAVINGS.items():
            if method == "baseline":
                acc = _pct(base["exit_test_accuracy"][-1]) + " (single-exit)" if base else ours("static", "accuracy")
                red, thr = "0%", "1.00x"
            else:
                acc, red, thr = ours(method, "accuracy"), ours(method, "mac_reduction"), ours(method, "speedup")
            lines.append(f"| {method} | {readme['accuracy']:.1f}% | {acc} | {readme['flops_reduction']:.0f}% | {red} | "
                         f"{readme['throughput']:.1f}x | {thr} |")
        out += [f"{h} Side by side with the original README's CIFAR-10 table", "\n".join(lines)]
    return out


def policy_table(rows: list[dict]) -> str:
    lines = ["| Policy | Accuracy | Drop (points) | MAC reduction | Exit histogram |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {100 * r['accuracy']:.2f}% | {r['drop_points']:+.2f} | "
                     f"{100 * r['mac_reduction']:.1f}% | {' / '.join(map(str, r['exit_histogram']))} |")
    return "\n".join(lines)


def ablation_table(rows: list[dict]) -> str:
    lines = ["| Variant | Certified | Test accuracy | Test drop (points) | MAC reduction (test) |", "|---|---|---|---|---|"]
    for r in rows:
        ok = {True: "yes", False: "no: static network", None: "uncertified search"}[r.get("certified")]
        t = r["test"]
        lines.append(f"| {r['variant']} | {ok} | {100 * t['accuracy']:.2f}% | {t['drop_points']:+.2f} | "
                     f"{100 * t['mac_reduction']:.1f}% |")
    return "\n".join(lines)


def budget_words(comp: dict) -> str:
    if comp.get("confidence"):
        return (f"budget: at most {comp['max_drop']} points of expected {comp['risk']}, certified at confidence "
                f"{comp['confidence']}")
    return f"budget: at most {comp['max_drop']} points below the final exit, uncertified (in-sample search)"


def certification_parts(res: dict) -> list[str]:
    """What the certificate promises, each policy's certified figures, and the certified frontier."""
    comp = res["compare"]
    if not comp.get("confidence"):
        return ["These figures are **uncertified**: the budget search judged each candidate on the calibration split "
                "it was fitted on, so the drop on unseen data is typically larger than the budget."]
    dart = next((r for r in comp["rows"] if r["policy"] == "dart"), None)
    g = (dart or {}).get("guarantee") or {}
    parts = ["## What the budget promises",
             "Certified calibration (Learn-then-Test, fixed-sequence testing, `dart_ee.calibration.certify`): "
             f"{g.get('statement', '')}. "
             f"Policies with a learned candidate sequence fit on {100 * res['config']['calibration']['fit_share']:.0f}% of "
             "the calibration split and certify on the rest; the global threshold and patience need no fit and certify on "
             f"all of it. {g.get('not_guaranteed', '')[:1].upper()}{g.get('not_guaranteed', '')[1:]}.",
             certified_table(comp, res.get("compare_uncertified"))]
    fr = res.get("certified_frontier")
    if fr:
        parts += [f"### Certified frontier (confidence {fr['confidence']}, risk {fr['risk']}): MAC reduction on the "
                  "test split, with its realised test drop", frontier_markdown(fr)]
        missing = [r["policy"] for r in comp["rows"] if r["policy"] != "static" and not r.get("certified")]
        for name in missing:
            b = smallest_certified(fr, name)
            parts.append(f"{name} cannot be certified at {comp['max_drop']} points with this calibration split; "
                         + (f"the smallest budget it certifies in the frontier is {b} points." if b else
                            "it certifies none of the frontier's budgets."))
    return parts


def grid_markdown(res: dict) -> str:
    """The 25 / 50 / 75% grid: each point chosen on calibration, its test accuracy, test MACs and overshoot."""
    lines = ["| Policy | @25% MACs | @50% MACs | @75% MACs | AUC (feasible budgets) |", "|---|---|---|---|---|"]

    def cell(g: dict) -> str:
        if not g["feasible"]:
            return "infeasible"
        over = f", over by {100 * g['overshoot']:.1f}" if g["overshoot"] > 0 else ""
        return f"{100 * g['accuracy']:.2f}% at {100 * g['mac_fraction']:.1f}%{over}"

    for name, g in res["grid"].items():
        auc = "n/a" if g["auc"] != g["auc"] else f"{100 * g['auc']:.2f}% (from {100 * g['auc_from']:.0f}%)"
        lines.append(f"| {name} | {cell(g['at_25'])} | {cell(g['at_50'])} | {cell(g['at_75'])} | {auc} |")
    return "\n".join(lines)


def certified_table(comp: dict, uncertified: dict | None = None) -> str:
    """Every policy at one budget: certified or not, the realised test drop and MAC reduction, and the
    uncertified search's figures beside them (labelled)."""
    unc = {r["policy"]: r["test"] for r in (uncertified or {}).get("rows", [])}
    head = "| Policy | Certified | Test drop (points) | MAC reduction (test) | p-value | n_cert |"
    if unc:
        head += " Uncertified search: test drop | Uncertified: MAC reduction |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in comp["rows"]:
        g, t = r.get("guarantee") or {}, r["test"]
        ok = ("yes (risk 0)" if r["policy"] == "static" else "yes" if r.get("certified") else
              "uncertified search" if r.get("certified") is None else "**no**: static network instead")
        p = g.get("p_value")
        row = (f"| {r['policy']} | {ok} | {t['drop_points']:+.2f} | {100 * t['mac_reduction']:.1f}% | "
               f"{'-' if p is None else f'{p:.4f}'} | {g.get('n_cert', '-')} |")
        if unc:
            u = unc.get(r["policy"])
            row += f" {u['drop_points']:+.2f} | {100 * u['mac_reduction']:.1f}% |" if u else " - | - |"
        lines.append(row)
    return "\n".join(lines)


def frontier_markdown(frontier: dict) -> str:
    """Certified MAC reduction (and the test drop) of every policy at every budget."""
    table = frontier["table"]
    budgets = list(next(iter(table.values())))
    lines = ["| Policy | " + " | ".join(f"D = {b} point{'' if b == '1' else 's'}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for name, row in table.items():
        cells = []
        for b in budgets:
            c = row[b]
            if c["errors"] and not c["certified"]:
                cells.append("too little data")
            elif c["certified"] == 0:
                cells.append("not certifiable")
            else:
                share = f" ({c['certified']}/{c['splits']} certified)" if c["certified"] < c["splits"] else ""
                vs = c.get("vs_threshold")
                diff = (f"; {100 * vs['mean']:+.1f} vs threshold [{100 * vs['low']:+.1f}, {100 * vs['high']:+.1f}]"
                        if vs else "")
                cells.append(f"{100 * c['mean_mac_reduction']:.1f}% (drop {c['mean_test_drop_points']:+.2f}{diff}){share}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "oracle_mean_mac_reduction" in frontier:
        lines.append(f"| oracle (no loss, not a policy) | {100 * frontier['oracle_mean_mac_reduction']:.1f}% |"
                     + " |" * (len(budgets) - 1))
    return "\n".join(lines)


def resplit_summary(rs: dict) -> str:
    """`dart-ee sweep --resplits`' verdict: the paired AUC difference DART - threshold, then the certified frontier."""
    parts, d = [], rs.get("auc_difference_dart_minus_threshold")
    if d:
        verdict = ("DART beats the threshold" if d["low"] > 0 else "DART loses to the threshold" if d["high"] < 0
                   else "no significant difference (tie)")
        parts.append(f"AUC difference DART - threshold over {rs['resplits']} re-splits: {100 * d['mean']:+.3f} points, "
                     f"95% interval [{100 * d['low']:+.3f}, {100 * d['high']:+.3f}] (corrected resampled t): {verdict}\n")
    f = rs["certified_frontier"]
    parts += [f"Certified frontier (mean over {rs['resplits']} re-splits, confidence {f['confidence']}, risk {f['risk']}): "
              "MAC reduction on test (realised test drop)", frontier_markdown(f)]
    return "\n".join(parts)


def calibration_lines(policy: str, rec: CalibrationRecord) -> list[str]:
    """What `dart-ee calibrate` prints: the chosen parameters and calibration metrics, then what the budget promises
    (the certificate, or the word uncertified) and, where made, the inner choice."""
    c, g = rec["calibration"], rec.get("guarantee")
    lines = [f"{policy}: {rec['params']} -> calibration accuracy {100 * c['accuracy']:.2f}% "
             f"(drop {c['drop_points']:+.2f} points), MAC reduction {100 * c['mac_reduction']:.1f}%"]
    if g:
        p = "" if g.get("p_value") is None else f" (p = {g['p_value']:.4g}, n_cert = {g['n_cert']:,}, fit n = {g['n_fit']:,})"
        lines += [("CERTIFIED: " if g["certified"] else "NOT CERTIFIED: ") + g["statement"] + p, g["not_guaranteed"]]
        if "inner_choice" in rec:
            ch = rec["inner_choice"]
            lines.append(f"settings chosen on the fit split ({ch['folds']} inner repetitions): {ch['params'] or 'defaults'}, "
                         f"test {ch['bound']}")
    elif rec["target"].get("mode") == "uncertified budget":
        lines.append("UNCERTIFIED: " + rec["target"]["note"] + f"; add --confidence {CONFIDENCE} for a certified budget"
                     + ("" if rec["budget_met"] else " [budget NOT met on calibration: most accurate point kept]"))
    return lines


def smallest_certified(frontier: dict, policy: str) -> str | None:
    """The smallest budget in the frontier at which ``policy`` was certified (None: none)."""
    for b, c in frontier["table"].get(policy, {}).items():
        if c["certified"]:
            return b
    return None


def difficulty_parts(res: dict, h: str = "##") -> list[str]:
    """DART's exits by difficulty, and how the paper's alpha correlates with the oracle exit depth."""
    parts = []
    for kind, dist in (res.get("dart_exit_distribution") or {}).items():
        parts += [f"{h} Exit distribution by difficulty (DART's exits, {kind} alpha bins)", distribution_markdown(dist)]
    d = res["difficulty"]
    return parts + [f"Alpha: paper score, mean {d['alpha_stats']['mean']:.3f} on the {d['split']} split. "
                    "Spearman correlation with the oracle exit depth: "
                    + ", ".join(f"{k} {v:+.3f}" for k, v in d["spearman_with_oracle_depth"].items())]


def malloc_note(hw: dict) -> str:
    """How a record's process treated freed memory, where it did not keep it (``dart_ee.core.malloc``)."""
    setting = hw.get("malloc")
    if setting is None:
        return "; glibc's default malloc: freed memory not kept (dart_ee.core.malloc)"
    return "" if setting == KEPT else f"; malloc: {setting}"


def timing_note(rec: dict) -> str:
    """What a benchmark record timed and how, where it differs from what the benchmark does now."""
    note = malloc_note(rec["hardware"])
    if rec.get("image_sample"):
        return note
    return (f"; timed on the test split's first {rec['timed_images']:,} images, batch 1 on its first "
            f"{rec.get('latency_images', 0):,} (made before the benchmark drew its images at random: where the split "
            f"is listed by class, as CIFAR-10's image folders list it, those are a few classes only){note}")


def benchmark_parts(res: dict, h: str = "##") -> list[str]:
    """Table I measured: every policy against the static network in one process, and DART against its MACs."""
    b = res.get("benchmark")
    if not b:
        return []
    parts = [f"{h} Table I (measured on this machine)",
             f"{b['hardware']['cpu']}, {b['threads']} threads, batch {b['batch_size']}, {b['repeats']} repeats; "
             f"energy: {b['energy_source']}{timing_note(b)}.", table_markdown(b)]
    d = next((r for r in b["rows"] if r["method"] == "dart"), None)
    if d:
        lat = (f"; at batch 1, {d['latency_speedup']:.2f}x ({d['latency_speedup_vs_mac_prediction']:.2f} of it)"
               if d.get("latency_speedup") is not None else "")
        parts.append(f"DART: **{d['speedup']:.2f}x** measured at batch {b['batch_size']} against the "
                     f"{d['mac_speedup']:.2f}x its MACs predict ({d['speedup_vs_mac_prediction']:.2f} of the "
                     f"prediction){lat}.")
    return parts


def _cell(part: dict) -> str:
    return f"{_pct(part['accuracy'])}, {100 * part['mac_fraction']:.1f}%"


def settings_words(study: dict) -> str:
    """Where the controller's settings came from, and what they are."""
    src = study["settings_source"]
    on = src.get("chosen_on")
    where = (f"chosen by `dart-ee adapt-tune` on development streams from the calibration split ({on['n_clean']} clean "
             f"+ {on['n_shift']} shifted images each; families {', '.join(on['families'])} at grades "
             f"{', '.join(map(str, on['levels']))}); the test split and the families below were not read"
             if on else src["source"])
    st = ", ".join(f"{k} {v}" for k, v in study["settings"].items())
    return f"Controller settings: {st}; {where}."


def adaptation_parts(study: dict, h: str = "##") -> list[str]:
    """An adaptation study (``dart_ee.adapt.study.study``): settings, each reporting family and grade, and the
    label-prior scenario with each mechanism alone at each audit share."""
    d = study["budget_points"]
    rows = ["| Family | Grade (severity) | Full network | Frozen DART | Matched compute | Adaptive DART | "
            f"Adaptive within {d:g} points of full | Clean-part MAC cost (points) |", "|---|---|---|---|---|---|---|---|"]
    for r in study["families"]:
        t, sm = r["totals"], r["summary"]
        rows.append(f"| {r['scenario']} | {r['level']} ({r['severity']:g}) | {_cell(t['full']['shifted'])} | "
                    f"{_cell(t['frozen']['shifted'])} | {_cell(t['matched']['shifted'])} | {_cell(t['adaptive']['shifted'])} | "
                    f"{'yes' if sm['within_budget'] else 'no'} | {sm['clean_mac_cost_points']:+.2f} |")
    n_in = sum(r["summary"]["within_budget"] for r in study["families"])
    source = "" if study.get("policy_file", "policies/dart.json") == "policies/dart.json" else (
        f" DART could not be certified at this budget, so the uncertified DART ({study['policy_file']}) adapts.")
    parts = [f"{h} Adaptation under shift (test split, reporting-only families)",
             "Adaptation changes the thresholds at deployment, so no certificate covers it: whether adaptive DART "
             f"stays within the budget D = {d:g} points of the full network on shifted data is measured here." + source,
             settings_words(study),
             "Each cell: accuracy and MACs (% of the static network, audits included) on the shifted part. Matched "
             "compute: frozen DART with its exit coefficients scaled to spend what adaptive DART spent there. "
             f"Adaptive DART within D on {n_in} of {len(study['families'])} streams.", "\n".join(rows)]
    mech = study.get("mechanisms")
    if mech:
        parts += mechanism_parts(mech, h)
    if study.get("switching"):
        parts += risk_parts(study, h)
    return parts


RISK_METHODS = ("frozen", "adaptive", "risk")


def risk_parts(study: dict, h: str = "##") -> list[str]:
    """Online risk control beside frozen and adaptive DART: each stream's running drop against the full network
    (final, worst after the warm-up, share of time points over D), MACs and audits."""
    d = study["budget_points"]
    mech = study.get("mechanisms") or {}
    plotted = [r for r in mech.get("runs", []) if r.get("running") and "risk" in r["running"]]
    streams = [(f"{r['scenario']} {r['level']}", r) for r in study["families"]] + \
        [(f"{mech['scenario']} (label prior)", r) for r in plotted] + [("switching", study["switching"])]
    rows = ["| Stream | " + " | ".join(f"{m}: final / worst running drop, share over D" for m in RISK_METHODS)
            + " | Risk: MACs (audits incl.) | Frozen MACs | Audit share | Guard raised | Matched (shifted part) |",
            "|---|" + "---|" * (len(RISK_METHODS) + 5)]
    kept = 0
    for name, r in streams:
        run, t = r["running"], r["totals"]
        cells = [f"{run[m]['final_running_drop_points']:+.2f} / {run[m]['worst_running_drop_points']:+.2f}, "
                 f"{100 * run[m]['share_over_budget']:.0f}%" for m in RISK_METHODS]
        macs = {m: 100 * (r["n_clean"] * t[m]["clean"]["mac_fraction"] + r["n_shift"] * t[m]["shifted"]["mac_fraction"])
                / (r["n_clean"] + r["n_shift"]) for m in ("risk", "frozen")}
        kept += run["risk"]["worst_running_drop_points"] <= d
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {macs['risk']:.1f}% | {macs['frozen']:.1f}% | "
                    f"{100 * r['risk']['audit_share']:.1f}% | {_share(r['risk'].get('guard_alarm_share'))} | "
                    f"{_cell(t['matched']['shifted'])} |")
    rs = study["risk_settings"]
    guard = (f"; its label-free shift guard (`dart_ee.adapt.guard`, a CUSUM on the first exit's confidence, drift "
             f"{rs['guard_drift']:g}, threshold {rs['guard_threshold']:g}) holds theta at {rs['guard_floor']:g} or more "
             "while raised (1: the full network)"
             if rs.get("guard_threshold") is not None else "; no shift guard")
    return [f"{h} Online risk control: a budget that holds under shift",
            f"The certified policy under online risk control (`dart_ee.adapt.risk`; audit rate {rs['audit_rate']:g}, step "
            f"{rs['step']:g}, {study['risk_settings_source']['source']}{guard}): its running disagreement with the full "
            f"network, and so its running drop, is guaranteed to stay within D = {d:g} points plus a slack that shrinks "
            "as 1/T, on any stream, while the audits are random. Running drops in points from the stream's start, "
            f"judged after {study['switching']['warmup']} images. Risk control kept the worst running drop within D on "
            f"{kept} of {len(streams)} streams.", "\n".join(rows)]


def _share(x: float | None) -> str:
    """A share as a percentage, or a dash where the record has none (no guard, or a record from before it)."""
    return "-" if x is None else f"{100 * x:.1f}%"


def _why_not(mechanism: str, runs: list[dict]) -> str:
    """Why a mechanism never beat the matched-compute baseline, from what its runs recorded."""
    if mechanism == "ucb1":
        spread = max((max(a["mean_reward"] for a in r["ucb1"]) - min(a["mean_reward"] for a in r["ucb1"])
                      for r in runs if r["ucb1"]), default=0.0)
        return (f"its arms' mean rewards differed by at most {spread:.3f}, within their noise over so few updates, "
                "and a global scale is what the matched baseline already sets")
    fired = max(r["updates_fired"]["eq13"] + r["updates_fired"]["eq14"] for r in runs)
    if fired == 0:
        return "its updates never fired: the audits never showed a gap to the calibration targets beyond the z gate"
    return (f"its updates fired (up to {fired} changes per run) but bought no more accuracy than frozen DART scaled "
            "to the same MACs")


def mechanism_parts(mech: dict, h: str = "##") -> list[str]:
    """The label-prior scenario: each mechanism alone at each audit share, the updates that fired, UCB1's arms."""
    first = mech["runs"][0]["totals"]
    rows = ["| Audit share | Mechanism | Adaptive DART | Matched compute | vs frozen (points) | vs matched (points) | "
            "Eq 13 updates | Eq 14 updates |", "|---|---|---|---|---|---|---|---|"]
    helps: dict[str, tuple[float, float, int]] = {}  # mechanism: (audit share, points above matched, images)
    for r in mech["runs"]:
        t, sm = r["totals"], r["summary"]
        rows.append(f"| {r['audit_share']:g} | {r['mechanism']} | {_cell(t['adaptive']['shifted'])} | "
                    f"{_cell(t['matched']['shifted'])} | {100 * sm['accuracy_recovered']:+.2f} | "
                    f"{sm['above_matched_points']:+.2f} | {r['updates_fired']['eq13']} | {r['updates_fired']['eq14']} |")
        acted = r["mechanism"] == "ucb1" or r["updates_fired"]["eq13"] + r["updates_fired"]["eq14"] > 0
        if acted and sm["above_matched_points"] > 0:  # a mechanism that never changed a coefficient did nothing
            helps.setdefault(r["mechanism"], (r["audit_share"], sm["above_matched_points"], r["n_shift"]))
    names = dict.fromkeys(r["mechanism"] for r in mech["runs"])
    verdict = "; ".join(f"{m}: from an audit share of {helps[m][0]:g} ({helps[m][1]:+.2f} points: "
                        f"{round(helps[m][1] * helps[m][2] / 100)} of {helps[m][2]} images)" if m in helps else
                        f"{m}: at no audit share tried ({_why_not(m, [r for r in mech['runs'] if r['mechanism'] == m])})"
                        for m in names)
    arms = []
    for r in mech["runs"]:
        if r["ucb1"]:
            arms.append(f"{r['mechanism']} at {r['audit_share']:g}: " + ", ".join(
                f"x{a['scale']:g} chosen {a['count']} times (mean reward {a['mean_reward']:.3f})" for a in r["ucb1"]))
    return [f"{h} The paper's updates at work: a label-prior shift",
            f"The shifted part is {100 * mech['severity']:.0f}% images of classes {mech['classes']}, the classes whose "
            "early exits are most often wrong on the calibration split. Full network on the shifted part: "
            f"{_cell(first['full']['shifted'])}; frozen DART: {_cell(first['frozen']['shifted'])}. Each mechanism "
            "runs alone (the shift guard as chosen); an update counts when it changed a coefficient.",
            "\n".join(rows),
            f"Better than the matched-compute baseline (the audit share at which a mechanism starts to help): {verdict}.",
            "UCB1's arms (scale on every threshold): " + ("; ".join(arms) if arms else "UCB1 did not run") + "."]


def write_report(res: dict, out: Path) -> Path:
    """Write ``out/report.md`` from a results dict (see ``dart_ee.pipeline``)."""
    cfg, tr = res["config"], res["training"]
    parts = [
        f"# DART report: {cfg['name']}",
        f"Model `{cfg['model']['name']}` on `{cfg['data']['dataset']}`, seed {res['seed']}, git {res['git_revision']}, "
        f"torch {res['torch']}, {res['hardware']['cpu']} ({res['hardware']['cpu_count']} cores), {res['date']}. "
        f"Training: {tr['epochs']} epochs, {tr['train_wall_time_s'] / 60:.1f} min on {tr.get('device', 'cpu')}. "
        "Every policy is calibrated on the "
        f"calibration split ({tr['n_cal']} images held out from training) and measured on the test split "
        f"({tr['n_test']} images).",
        "## Exits: accuracy against cumulative cost", training_table(tr),
        f"## Accuracy vs. computational savings ({budget_words(res['compare'])})",
        savings_table(res),
    ]
    parts += certification_parts(res)
    parts += ["Exit histograms (exits 1..N):",
              policy_table([r["test"] for r in res["compare"]["rows"]] + [res["compare"]["oracle"]])]
    parts += difficulty_parts(res) + ["![alpha histogram](alpha_histogram.png)",
                                      "![exit by difficulty](exit_by_difficulty_dart.png)"]
    parts += benchmark_parts(res)
    parts += paper_tables(res)
    parts += ["## Accuracy at 25 / 50 / 75% of static MACs", grid_markdown(res["sweep"]),
              "![trade-off curves](tradeoff_curves.png)",
              f"## Ablation ({budget_words(res['compare'])}, every variant calibrated the same way)",
              ablation_table(res["ablation"])]
    if (out / STUDY).is_file():
        study = artifacts.read_json(out / STUDY, "adaptation study")
        parts += adaptation_parts(study)
        for sc in study_scenarios(study):
            parts += [f"![over time]({sc}_over_time.png)", f"![coefficients]({sc}_coefficients.png)"]
    return artifacts.write_text(out / "report.md", "\n\n".join(parts) + "\n")
