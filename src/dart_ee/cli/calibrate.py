"""Commands on traces: calibrate, evaluate, sweep, compare, guarantee, and publish (BENCHMARKS.md from records)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from dart_ee.cli.app import OutOpt, SetOpt, TraceOpt, _fail, app
from dart_ee.core.defaults import CONFIDENCE, FIT_SHARE
from dart_ee.core.errors import DartError
from dart_ee.core.runfiles import POLICY_DIR

if TYPE_CHECKING:
    from dart_ee.trace import Trace


def _load_trace(path: Path, split: str | None, alpha: str | None = None) -> Trace:
    from dart_ee.trace import load

    t = load(path, expect_split=split)
    return t.with_alpha(f"alpha_{alpha}") if alpha else t


def _load_pair(cal: Path, test: Path, alpha: str | None = None) -> tuple[Trace, Trace]:
    """A run's calibration and test traces, checked to belong together."""
    from dart_ee.trace import check_pair

    c, t = _load_trace(cal, "cal", alpha), _load_trace(test, "test", alpha)
    check_pair(c, t, str(cal), str(test))
    return c, t


AlphaOpt = Annotated[Optional[str], typer.Option("--alpha", help="Difficulty score to use: paper or learned "
                                                                    "(default: the run's configured one).")]


ConfidenceOpt = Annotated[Optional[float], typer.Option(
    "--confidence", help="Certify the budget with this probability (e.g. 0.95): Learn-then-Test on a fit / cert split. "
                         "Without it the budget is an uncertified in-sample search.")]
RiskOpt = Annotated[str, typer.Option("--risk", help="What the budget bounds: drop (accuracy drop against the final exit), "
                                                     "new-errors, or disagree (label-free).")]


@app.command()
def calibrate(
        trace: Annotated[Path, typer.Option("--trace", help="Calibration trace (RUN/trace_cal.npz); never the test trace.")],
        policy: Annotated[str, typer.Option("--policy", help="static, threshold, branchynet, patience, rl, dart or "
                                                             "score (DART's thresholds on a learned exit score).")],
        out: Annotated[Path, typer.Option("--out", help="Where to write the fitted policy JSON.")],
        max_drop: Annotated[Optional[float], typer.Option(
            "--max-drop", help="Accuracy budget: at most X points below the final exit.")] = None,
        beta_opt: Annotated[Optional[float], typer.Option(
            "--beta-opt", help="Trade-off target instead of a budget (Eq 10).")] = None,
        confidence: ConfidenceOpt = None,
        risk: RiskOpt = "drop",
        fit_share: Annotated[float, typer.Option("--fit-share", help="Share of the calibration split that fits "
                                                                     "(certified only); the rest certifies.")] = FIT_SHARE,
        seed: Annotated[int, typer.Option("--seed", help="Seed of the fit / cert split (recorded).")] = 0,
        bound: Annotated[Optional[str], typer.Option(
            "--bound", help="p-values: exact (binomial; for the drop, on new errors; the default), mcnemar (conditional "
                            "McNemar, drop only) or hb (Hoeffding-Bentkus).")] = None,
        inner_folds: Annotated[int, typer.Option(
            "--inner-folds", help="Choose a learned policy's settings and the test by K inner repetitions of the whole "
                                  "certify step on its fit split (certified only; 0: the defaults).")] = 0,
        in_expectation: Annotated[bool, typer.Option(
            "--in-expectation", help="Conformal risk control instead: the budget holds in expectation over "
                                     "calibration and test draws, not for this draw.")] = False,
        beta_diff: Annotated[str, typer.Option(
            "--beta-diff", help="DART margin: a number, or 'tune' to search it on the calibration split.")] = "tune",
        alpha: AlphaOpt = None,
        set_: SetOpt = None,
) -> None:
    """Fit a policy on the calibration trace for an accuracy budget (--max-drop, certified with --confidence) or a
    trade-off (--beta-opt)."""
    import yaml

    from dart_ee.calibration.calibrate import calibrate as run_calibration

    try:
        cal = _load_trace(trace, "cal", alpha)
        params = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in (set_ or []))}
        tune = policy == "dart" and beta_diff == "tune"
        if policy == "dart" and not tune:
            params["beta_diff"] = float(beta_diff)
        if confidence is not None or in_expectation:  # conformal risk control has no confidence level
            params.update(risk=risk, seed=seed, fit_share=fit_share, inner_folds=inner_folds,
                          **({"bound": bound} if bound else {}), **({"in_expectation": True} if in_expectation else {}))
        elif risk != "drop" or bound or inner_folds:
            raise DartError("--risk, --bound and --inner-folds apply to certified budgets: give --confidence too")
        pol, rec = run_calibration(policy, cal, beta_opt=beta_opt, max_drop=max_drop, confidence=confidence,
                                   tune_beta_diff=tune, **params)
        pol.save(out, calibration=rec)
    except (DartError, ValueError) as e:
        _fail(e if isinstance(e, DartError) else DartError(str(e)))
    from dart_ee.report.markdown import calibration_lines

    typer.echo("\n".join([*calibration_lines(policy, rec), f"wrote {out}"]))


@app.command()
def evaluate(trace: TraceOpt,
             policy: Annotated[list[Path], typer.Option("--policy", help="Fitted policy JSON. Repeatable.")],
             as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Accuracy, drop against the final exit, expected MACs and the exit histogram of fitted policies on a trace."""
    from dart_ee.calibration.evaluation import evaluate as run_eval
    from dart_ee.calibration.evaluation import oracle
    from dart_ee.policies import load_policy
    from dart_ee.report.markdown import policy_table

    rows = []
    for p in policy:
        pol = load_policy(p)
        src = getattr(pol, "alpha_source_", None)
        rows.append({**run_eval(pol, _load_trace(trace, None, src)), "file": str(p), "budget": _budget_note(p)})
    rows.append(oracle(_load_trace(trace, None)))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    else:
        typer.echo(policy_table(rows))
        for r in rows[:-1]:
            typer.echo(f"{r['file']}: {r['budget']}")


def _budget_note(path: Path) -> str:
    """What a policy file's budget promises: its certificate (none if edited since), or the word uncertified."""
    from dart_ee.calibration.record import recorded
    from dart_ee.core import artifacts
    from dart_ee.policies import certificate

    d = artifacts.read_json(path, "policy file")
    rec = recorded(d, str(path))
    g = certificate(d)
    if g:
        return ("certified: " if g["certified"] else "NOT certified: ") + g["statement"]
    if rec and rec["target"].get("mode") == "uncertified budget":
        return f"UNCERTIFIED budget of {rec['target'].get('max_drop')} points (in-sample search)"
    return "no budget (trade-off or hand-set parameters): nothing certified"


@app.command()
def sweep(cal: Annotated[Path, typer.Option("--cal", help="Calibration trace.")],
          test: Annotated[Path, typer.Option("--test", help="Test trace.")],
          out: Annotated[Path, typer.Option("--out", help="Output directory.")],
          resplits: Annotated[int, typer.Option("--resplits", min=0, help="Also compare over this many random "
                                                "calibration / test re-splits of the pooled traces (paired AUC "
                                                "difference DART - threshold, certified frontier). 0: none.")] = 0,
          confidence: Annotated[float, typer.Option("--confidence", help="Certified frontier confidence.")] = CONFIDENCE,
          risk: RiskOpt = "drop",
          seed: int = 0,
          alpha: AlphaOpt = None,
          inner_folds: Annotated[int, typer.Option(
              "--inner-folds", min=0, help="With --resplits: also certify DART and the score policy with their "
                                           "settings and test chosen by K inner repetitions on each fit split, as "
                                           "rows 'dart (inner)' and 'score (inner)'.")] = 0,
          policy: Annotated[Optional[list[str]], typer.Option(
              "--policy", help="Only these policies (repeatable; the threshold is added, as every comparison's "
                               "reference). Default: all.")] = None) -> None:
    """Every policy's accuracy-vs-MACs curve: each point chosen on the calibration trace, measured on the test trace."""
    from dart_ee.calibration.frontier import COMPARED as FRONTIER_POLICIES
    from dart_ee.calibration.frontier import resplit_frontier
    from dart_ee.calibration.frontier import sweep as run_sweep
    from dart_ee.core import artifacts
    from dart_ee.core.provenance import provenance
    from dart_ee.report import plots
    from dart_ee.report.markdown import grid_markdown, resplit_summary

    prov = provenance()
    c, t = _load_pair(cal, test, alpha)
    chosen = tuple(dict.fromkeys(["threshold", *policy])) if policy else FRONTIER_POLICIES
    unknown = [p for p in chosen if p not in FRONTIER_POLICIES]
    if unknown:
        _fail(DartError(f"--policy {unknown[0]!r} is not one of {', '.join(FRONTIER_POLICIES)}"))
    res = run_sweep(c, t, chosen)
    rs = (resplit_frontier(c, t, resplits, seed, chosen, confidence=confidence, risk=risk, inner_folds=inner_folds)
          if resplits else None)
    artifacts.write_json(out / "sweep.json", res)
    plots.tradeoff_curves(res, out / "tradeoff_curves.png")
    typer.echo(grid_markdown(res))
    typer.echo(f"oracle: {100 * res['oracle']['accuracy']:.2f}% at {100 * res['oracle']['mac_fraction']:.1f}% of static MACs")
    typer.echo(f"wrote {out}/sweep.json and {out}/tradeoff_curves.png")
    if rs:
        artifacts.write_json(out / "resplits.json", {"provenance": prov, **rs})
        typer.echo("\n" + resplit_summary(rs) + f"\nwrote {out}/resplits.json")


@app.command()
def compare(cal: Annotated[Path, typer.Option("--cal", help="Calibration trace.")],
            test: Annotated[Path, typer.Option("--test", help="Test trace.")],
            max_drop: Annotated[float, typer.Option("--max-drop", help="Accuracy budget in points.")] = 0.5,
            confidence: Annotated[Optional[float], typer.Option(
                "--confidence", help="Certify at this confidence; --uncertified for the in-sample search.")] = CONFIDENCE,
            uncertified: Annotated[bool, typer.Option("--uncertified", help="Uncertified in-sample budget search.")] = False,
            risk: RiskOpt = "drop",
            seed: int = 0,
            out: OutOpt = None, ablation: Annotated[bool, typer.Option(help="Also run the DART ablation.")] = True,
            ) -> None:
    """Calibrate every policy at one budget on the calibration split and measure it on the test split."""
    from dart_ee.calibration.calibrate import compare as run_compare
    from dart_ee.calibration.calibrate import dart_ablation
    from dart_ee.core import artifacts
    from dart_ee.report.markdown import ablation_table, budget_words, certified_table

    conf = None if uncertified else confidence
    c, t = _load_pair(cal, test)
    res = run_compare(c, t, max_drop, conf, risk, seed)
    abl = dart_ablation(c, t, max_drop, conf, seed) if ablation else []
    out = out or Path(cal).parent / POLICY_DIR
    for name, (pol, rec) in res.pop("fitted").items():
        pol.save(out / f"{name}.json", calibration=rec)
    typer.echo(f"Every policy calibrated on {cal} ({budget_words(res)}), measured on {test}:")
    typer.echo(certified_table(res))
    if abl:
        typer.echo("\nDART ablation (same budget, same calibration):")
        typer.echo(ablation_table(abl))
    artifacts.write_json(out / "compare.json", {**res, "ablation": abl})
    typer.echo(f"wrote {out}/compare.json and one fitted policy JSON per method")


@app.command()
def guarantee(cal: Annotated[Optional[Path], typer.Option("--cal", help="Calibration trace.")] = None,
              test: Annotated[Optional[Path], typer.Option("--test", help="Test trace.")] = None,
              policy: Annotated[Optional[list[str]], typer.Option("--policy", help="Policy to check. Repeatable.")] = None,
              max_drop: Annotated[float, typer.Option("--max-drop")] = 0.5,
              confidence: Annotated[float, typer.Option("--confidence")] = CONFIDENCE,
              risk: RiskOpt = "drop",
              resplits: Annotated[int, typer.Option("--resplits", min=1, help="Re-splits (or generator draws).")] = 200,
              synthetic: Annotated[Optional[str], typer.Option(
                  "--synthetic", help="Instead of traces: a generator with known truth (nested, independent, two-type).")] = None,
              seed: int = 0,
              as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
              out: Annotated[Optional[Path], typer.Option("--out", help="Write every draw as JSON.")] = None) -> None:
    """Check that certified budgets hold: re-splits of the pooled traces (both designs), or a generator with known truth.

    Pass: at most 15 of 200 draws exceed the budget (P(Bin(200, 0.05) >= 16) = 0.044).
    """
    from dart_ee.calibration.coverage import population_coverage, resplit_coverage
    from dart_ee.core import artifacts
    from dart_ee.core.provenance import provenance

    policies = policy or ["dart", "threshold"]
    results, prov = [], provenance()  # the code that computes the figures, read before any of them is
    if synthetic:
        for p in policies:
            results.append(population_coverage(p, synthetic, max_drop, confidence, risk, draws=resplits, seed=seed))
    else:
        if cal is None or test is None:
            raise DartError("give --cal and --test traces, or --synthetic KIND for the generator with known truth")
        c, t = _load_pair(cal, test)
        for p in policies:
            results.append(resplit_coverage(c, t, p, max_drop, confidence, risk, resplits, seed))
    summary = [{k: v for k, v in r.items() if k != "rows"} | {d: {k: v for k, v in r[d].items() if k != "rows"}
                                                            for d in ("replacement", "split") if d in r} for r in results]
    if out:
        artifacts.write_json(out, {"provenance": prov, "results": results})
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for r in summary:
        parts = [r] if synthetic else [r["replacement"], r["split"]]
        for d in parts:
            where = f"generator '{synthetic}'" if synthetic else f"design '{d['design']}'"
            verdict = "PASS" if d["passed"] else "FAIL"
            line = (f"{r['policy']} ({where}): {d['exceed']} of {d['draws']} exceed {max_drop} points of {risk} "
                    f"[{verdict}: at most {15 * d['draws'] // 200}]; certified in {d['certified']}; reference risk mean "
                    f"{d['mean_reference_risk_points']:.3f}, max {d['max_reference_risk_points']:.3f} points; MAC reduction "
                    f"mean {100 * d['mean_mac_reduction']:.1f}% (sd {100 * d['sd_mac_reduction']:.1f})")
            if "mean_test_drop_points" in d:
                line += (f"; realised test drop mean {d['mean_test_drop_points']:+.3f}, "
                         f"95th percentile {d['p95_test_drop_points']:+.3f} points")
            typer.echo(line)


@app.command()
def publish(file: Annotated[Optional[list[Path]], typer.Option(
                "--file", help="A document to regenerate (repeatable); default BENCHMARKS.md and README.md.")] = None,
            records: Annotated[Path, typer.Option("--records", help="Folder of committed JSON records.")] = Path("benchmarks"),
            check: Annotated[bool, typer.Option("--check", help="Only check: exit 1 when a document differs "
                                                               "from its records.")] = False) -> None:
    """Regenerate the generated sections of BENCHMARKS.md and README.md (tables and the sentences that quote figures)."""
    from dart_ee.report.publish import publish as run_publish

    files = file or [Path("BENCHMARKS.md"), Path("README.md")]
    changed = run_publish(files, records, check)
    if check and changed:
        typer.secho(f"{', '.join(map(str, changed))} differs from the records in {records}: run `dart-ee publish` "
                    "(and never edit generated sections by hand)", fg="red", err=True)
        raise typer.Exit(1)
    for f in files:
        typer.echo(f"{f}: " + ("regenerated from " if f in changed else "up to date with ") + str(records))
