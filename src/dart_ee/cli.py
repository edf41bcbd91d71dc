"""The ``dart-ee`` command line."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import numpy as np
import typer

from dart_ee.config import AdaptConfig, BenchmarkConfig
from dart_ee.core.defaults import CONFIDENCE, FIT_SHARE
from dart_ee.core.errors import DartError
from dart_ee.core.runfiles import POLICY_DIR
from dart_ee.core.trust import trust_code
from dart_ee.deploy.onnx_runner import OPSETS

if TYPE_CHECKING:
    from dart_ee.trace import Trace

class _App(typer.Typer):
    """A Typer app whose commands all end the same way on bad input: one red line and exit status 2."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable], Callable]:  # type: ignore[override]
        register = super().command(*args, **kwargs)

        def wrap(fn: Callable) -> Callable:
            takes_run = "run" in inspect.signature(fn).parameters

            @functools.wraps(fn)  # typer reads the options from the wrapped signature
            def run(*a: Any, **kw: Any) -> Any:
                try:
                    with trust_code(kw.pop("trust_code", False)):
                        return fn(*a, **kw)
                except DartError as e:
                    _fail(e)
                except OSError as e:  # a read-only folder, a full disk, --out naming a file: name the path
                    where = f"{e.filename}: " if e.filename else ""
                    _fail(DartError(f"{where}{e.strerror or e}; check that the path exists and is writable, and that "
                                    "the disk has space"))
            if takes_run:  # every command that reads a run folder offers the opt-in to the code it may name
                sig = inspect.signature(fn, eval_str=True)
                run.__signature__ = sig.replace(parameters=[*sig.parameters.values(), inspect.Parameter(  # type: ignore[attr-defined]
                    "trust_code", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=TrustOpt)])
                run.__annotations__ = {**fn.__annotations__, "trust_code": TrustOpt}
            return register(run)
        return wrap


app = _App(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
           help="DART: difficulty-aware adaptive thresholds for early-exit networks.")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML experiment config (see configs/).")]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="Folder holding the dataset; default $DART_DATA.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config field, e.g. train.epochs=1. Repeatable.")]
_BENCH, _ADAPT = BenchmarkConfig(), AdaptConfig()  # the one source of the defaults the options show
RunOpt = Annotated[Path, typer.Option("--run", help="Run directory written by `dart-ee train`.")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust-code", help="Import the model class a custom run folder names (its code runs): only for runs you wrote "
    "or trust. Without it such a run is refused.")]


@app.callback()
def _root() -> None:
    """DART: difficulty-aware adaptive thresholds for early-exit networks."""


def _fail(e: DartError) -> None:
    typer.secho(f"error: {e}", fg="red", err=True)
    raise typer.Exit(2)


@app.command()
def train(config: ConfigOpt = None, data_dir: DataDirOpt = None,
          out: Annotated[Optional[Path], typer.Option("--out", help="Run directory; default runs/<config name>.")] = None,
          set_: SetOpt = None,
          resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run from its last checkpoint.")] = False,
          ) -> None:
    """Train a multi-exit network jointly and write a run directory (config, split, checkpoint, metrics)."""
    from dart_ee.config import load_config
    from dart_ee.training.train import train as run_training

    cfg = load_config(config, set_ or [])
    run_training(cfg, out or Path("runs") / cfg.name, data_dir, resume)


@app.command()
def run(config: ConfigOpt = None, data_dir: DataDirOpt = None,
        out: Annotated[Optional[Path], typer.Option("--out", help="Output directory; default runs/<config name>.")] = None,
        set_: SetOpt = None) -> None:
    """The whole pipeline from one config: train, trace, calibrate, sweep, benchmark, adapt, report (resumable)."""
    from dart_ee.config import load_config
    from dart_ee.pipeline import run_pipeline

    cfg = load_config(config, set_ or [])
    run_pipeline(cfg, out or Path("runs") / cfg.name, data_dir)


@app.command()
def report(run: RunOpt) -> None:
    """Redraw every figure and rewrite report.md of a finished `dart-ee run` from its results.json (no recomputing)."""
    from dart_ee.pipeline import render

    typer.echo(f"wrote {render(run)} and the figures beside it")


@app.command()
def demo(out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("runs/demo"),
         set_: SetOpt = None) -> None:
    """DART end to end in minutes, with no data to download: real 8x8 digits shipped with scikit-learn.

    Trains a 6-exit AlexNet, fits the difficulty estimators, calibrates every policy on a held-out
    split, sweeps, benchmarks with real early exit, measures adaptation under shift, writes report.md and
    prints the comparison table.
    """
    from importlib import resources

    from dart_ee.config import load_config
    from dart_ee.pipeline import run_pipeline
    from dart_ee.report.markdown import budget_words, certified_table, policy_table

    with resources.as_file(resources.files("dart_ee") / "configs" / "demo.yaml") as cfg_path:
        cfg = load_config(cfg_path, set_ or [])
    res = run_pipeline(cfg, out)
    c = res["compare"]
    typer.echo(f"\nDART demo: {cfg.data.dataset} ({res['training']['n_test']} test images), every policy calibrated on the "
               f"calibration split ({budget_words(c)}), measured on the test split:")
    typer.echo(policy_table([r["test"] for r in c["rows"]] + [c["oracle"]]))
    typer.echo("\n" + certified_table(c, res.get("compare_uncertified")))
    if res.get("benchmark"):
        from dart_ee.bench.benchmark import table_markdown

        typer.echo("\nMeasured on this machine (real early exit, static network in the same process):")
        typer.echo(table_markdown(res["benchmark"]))
    typer.echo(f"\nreport: {out / 'report.md'}   figures: {out}/*.png   every figure: {out / 'results.json'}")


@app.command()
def trace(run: RunOpt, data_dir: DataDirOpt = None) -> None:
    """Write RUN/trace_cal.npz and RUN/trace_test.npz: every exit's softmax for every sample (+ JSON metadata)."""
    from dart_ee.runs.tracing import trace_run
    from dart_ee.trace import load

    for split, path in trace_run(run, data_dir).items():
        t = load(path)
        accs = " ".join(f"{100 * a:.1f}" for a in t.exit_accuracy())
        typer.echo(f"{split}: {path} ({t.n} samples, {t.num_exits} exits, exit accuracy % {accs})")


@app.command()
def info(model: Annotated[str, typer.Option("--model", help="Registered model name (see list_models()).")] = "alexnet",
         dataset: Annotated[str, typer.Option("--dataset", help="Dataset whose input shape to use.")] = "cifar10",
         width_mult: Annotated[float, typer.Option("--width-mult", help="Channel width multiplier.")] = 1.0,
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
         timing: Annotated[bool, typer.Option("--timing", help="Also time every stage and head (batch 256 and 1) "
                                                               "against its share of the MACs.")] = False) -> None:
    """Per-exit cumulative MACs (measured with torch.utils.flop_counter) and parameter counts of a model."""
    from dart_ee.data.datasets import get_spec
    from dart_ee.difficulty.estimators import DifficultyEstimator
    from dart_ee.models.net import create_model
    from dart_ee.report.reference import PAPER_PARAMS

    spec = get_spec(dataset)
    rec = create_model(model, spec.num_classes, spec.in_channels, spec.image_size, width_mult=width_mult,
                       mean=spec.mean, std=spec.std).describe()
    rec["difficulty_estimator"] = DifficultyEstimator().flops(rec["input_shape"])
    if model in PAPER_PARAMS:
        rec["params"]["paper"] = PAPER_PARAMS[model]
        rec["params"]["paper_note"] = "the published count, for the ImageNet model (1,000 classes)"
    if as_json:
        typer.echo(json.dumps(rec, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    tab = Table(title=f"{model} on {dataset} {tuple(rec['input_shape'])}")
    for col in ("exit", "cumulative MMACs", "% of full", "stage MMACs", "head MMACs", "head/stage %"):
        tab.add_column(col, justify="right")
    for e in rec["exits"]:
        tab.add_row(str(e["exit"]), f"{e['cumulative_macs'] / 1e6:.2f}", f"{100 * e['fraction_of_full']:.1f}",
                    f"{e['stage_macs'] / 1e6:.2f}", f"{e['head_macs'] / 1e6:.3f}", f"{100 * e['head_to_stage']:.1f}")
    Console().print(tab)
    typer.echo(f"static network (no exit heads): {rec['static_macs'] / 1e6:.2f} MMACs; parameters: "
               f"{rec['params']['total']:,} ({rec['params']['heads']:,} in exit heads)"
               + (f"; published: {rec['params']['paper'] / 1e6:.1f} M ({rec['params']['paper_note']})"
                  if "paper" in rec["params"] else ""))
    est = rec["difficulty_estimator"]
    typer.echo(f"paper difficulty estimator: {est['total']:,} FLOPs per image ({est['method']})")
    if timing:
        from dart_ee.bench.benchmark import stage_times
        from dart_ee.core.malloc import keep_freed_memory

        keep_freed_memory()  # timed as `dart-ee benchmark` times: without page-faulting every activation afresh
        st = stage_times(model, dataset)
        for bs, rows in st["rows"].items():
            typer.echo(f"batch {bs} ({st['threads']} threads, inference-optimised, median): " + "; ".join(
                f"stage {r['exit']} {r['stage_ms']:.2f} ms ({100 * r['stage_time_share']:.1f}% of time, "
                f"{100 * r['stage_mac_share']:.1f}% of MACs), head {r['head_ms']:.2f} ms" for r in rows))


difficulty_app = _App(no_args_is_help=True, help="Difficulty score alpha: weight search, reports and cost.")
app.add_typer(difficulty_app, name="difficulty")
TraceOpt = Annotated[Path, typer.Option("--trace", help="Trace file written by `dart-ee trace` (RUN/trace_test.npz).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Output directory.")]


def _print_correlations(title: str, corr: dict) -> None:
    typer.echo(title)
    for k, v in corr.items():
        typer.echo(f"  {k:<28} {v:+.3f}")


@difficulty_app.command("fit-weights")
def difficulty_fit_weights(
        trace: Annotated[Path, typer.Option("--trace", help="Calibration trace (RUN/trace_cal.npz).")],
        test: Annotated[Optional[Path], typer.Option("--test", help="Test trace, to report held-out figures.")] = None,
        trials: int = typer.Option(500, min=1, help="Random weight vectors to try."),
        folds: int = typer.Option(5, min=2, help="Cross-validation folds."),
        seed: int = 0, out: Annotated[Optional[Path], typer.Option("--out", help="Write the result as JSON.")] = None,
) -> None:
    """Eq 8 weight search: pick (w1, w2, w3) on the calibration trace by k-fold CV of Spearman(alpha, oracle depth)."""
    from dart_ee.core import artifacts
    from dart_ee.difficulty.analysis import correlations
    from dart_ee.difficulty.estimators import fit_weights as search
    from dart_ee.difficulty.estimators import oracle_depth, spearman
    from dart_ee.trace import load

    cal = load(trace, expect_split="cal")
    if "terms" not in cal.extra:
        raise DartError(f"{trace} holds no difficulty terms; regenerate it with `dart-ee trace`")
    res = search(cal.extra["terms"], oracle_depth(cal.correct), trials, folds, seed)
    typer.echo(f"calibration trace {trace} ({cal.n} samples), {trials} random weight vectors, {folds}-fold CV")
    typer.echo(f"  default weights {res['default_weights']}: CV Spearman {res['cv_spearman_default']:+.3f}")
    typer.echo(f"  fitted  weights {[round(w, 3) for w in res['weights']]}: CV Spearman {res['cv_spearman_fitted']:+.3f}")
    _print_correlations("Spearman with the oracle exit depth on the calibration trace:", correlations(cal))
    if test is not None:
        t = load(test, expect_split="test")
        depth = oracle_depth(t.correct)
        w = np.asarray(res["weights"])
        res["test"] = {"spearman_default": spearman(np.clip(t.extra["terms"] @ np.array([0.4, 0.3, 0.3]), 0, 1), depth),
                       "spearman_fitted": spearman(np.clip(t.extra["terms"] @ w, 0, 1), depth), **correlations(t)}
        _print_correlations(f"Spearman with the oracle exit depth on the test trace {test} ({t.n} samples):",
                            {"paper alpha, default weights": res["test"]["spearman_default"],
                             "paper alpha, fitted weights": res["test"]["spearman_fitted"], **correlations(t)})
    if out:
        artifacts.write_json(out, res)


@difficulty_app.command("report")
def difficulty_report(trace: TraceOpt, out: OutOpt = None) -> None:
    """Alpha distribution, accuracy per alpha bin, and the exit distribution by difficulty (JSON, PNG, table)."""
    from dart_ee.core import artifacts
    from dart_ee.difficulty.analysis import difficulty_report as build
    from dart_ee.difficulty.analysis import distribution_markdown
    from dart_ee.report import plots
    from dart_ee.trace import load

    try:
        t = load(trace)
        rep = build(t)
    except (DartError, ValueError) as e:
        _fail(DartError(str(e)))
    out = out or Path(trace).parent / f"difficulty_{t.split}"
    st = rep["alpha_stats"]
    typer.echo(f"alpha ({rep['alpha_source']}) on {trace}: mean {st['mean']:.3f}, std {st['std']:.3f}, "
               f"median {st['quantiles']['0.5']:.3f}")
    typer.echo("accuracy per alpha quantile bin, exits 1..N (%):")
    for b in rep["accuracy_by_alpha"]["bins"]:
        lo, hi = b["alpha_range"]
        typer.echo(f"  [{lo:.2f}, {hi:.2f}] n={b['n']:5d}: " + " ".join(f"{100 * a:5.1f}" for a in b["exit_accuracy"]))
    for kind, dist in rep["exit_distribution"].items():
        typer.echo(f"\nExit distribution by difficulty ({kind} bins, {rep['exits_from']} exits):")
        typer.echo(distribution_markdown(dist))
    _print_correlations("\nSpearman with the oracle exit depth:", rep["spearman_with_oracle_depth"])
    scores: dict[str, np.ndarray] = {k: t.extra[k] for k in ("alpha_paper", "alpha_learned") if k in t.extra}
    if not scores and t.alpha is not None:
        scores = {"alpha": t.alpha}
    artifacts.write_json(out / "difficulty_report.json", rep)
    plots.alpha_histogram(scores, out / "alpha_histogram.png")
    plots.exit_distribution_plot(list(rep["exit_distribution"].values()), out / "exit_by_difficulty.png",
                                 f"Exit distribution by difficulty ({rep['exits_from']} exits, {t.split} split)")
    typer.echo(f"\nwrote {out}/difficulty_report.json, alpha_histogram.png, exit_by_difficulty.png")


def _recorded(rec: dict, out: Path | None) -> dict:
    """``rec`` with its provenance (command, git revision, hardware, date), written to ``out`` when given."""
    from dart_ee.core import artifacts
    from dart_ee.core.provenance import provenance

    rec = {**rec, "provenance": provenance()}
    if out:
        artifacts.write_json(out, rec)
    return rec


@difficulty_app.command("cost")
def difficulty_cost(model: str = typer.Option("alexnet", help="Model to compare against."),
                    dataset: str = typer.Option("cifar10", help="Dataset whose input shape to use."),
                    repeats: int = typer.Option(20, min=1, help="Timed repetitions (median reported)."),
                    threads: Annotated[Optional[int], typer.Option(min=1, help="Torch threads (default: all cores).")] = None,
                    as_json: Annotated[bool, typer.Option("--json")] = False,
                    out: Annotated[Optional[Path], typer.Option("--out", help="Also write the record (with its "
                                                                               "provenance) as JSON.")] = None) -> None:
    """FLOPs of the paper's estimator and its wall-clock share of a full forward pass, at batch 1 and 256."""
    from dart_ee.bench.benchmark import difficulty_cost as measure
    from dart_ee.core.malloc import keep_freed_memory

    keep_freed_memory()  # timed as `dart-ee benchmark` times (dart_ee.core.malloc)
    rec = _recorded(measure(model, dataset, repeats, threads), out)
    if as_json:
        typer.echo(json.dumps(rec, indent=2))
        return
    f = rec["flops"]
    typer.echo(f"estimator FLOPs per image: {f['total']:,} ({f['method']})")
    for k, v in f["by_hand"].items():
        typer.echo(f"  {k}: {v:,}")
    for r in rec["timing"]:
        typer.echo(f"batch {r['batch_size']:4d}: estimator {r['estimator_ms']:.3f} ms, {model} forward "
                   f"{r['model_ms']:.3f} ms -> share {100 * r['share']:.2f}% ({rec['threads']} threads)")


# ----------------------------------------------------------------------------------------------
# Policies: calibrate, evaluate, sweep, compare

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
        bound: Annotated[str, typer.Option("--bound", help="p-values: exact (binomial; for the drop, on new errors), "
                                                           "mcnemar (conditional McNemar, drop only) or hb "
                                                           "(Hoeffding-Bentkus).")] = "exact",
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
            params.update(risk=risk, seed=seed, fit_share=fit_share, bound=bound, in_expectation=in_expectation)
        elif risk != "drop" or bound != "exact":
            raise DartError("--risk and --bound apply to certified budgets: give --confidence too")
        pol, rec = run_calibration(policy, cal, beta_opt=beta_opt, max_drop=max_drop, confidence=confidence,
                                   tune_beta_diff=tune, **params)
        pol.save(out, calibration=rec)
    except (DartError, ValueError) as e:
        _fail(e if isinstance(e, DartError) else DartError(str(e)))
    c = rec["calibration"]
    typer.echo(f"{policy}: {rec['params']} -> calibration accuracy {100 * c['accuracy']:.2f}% "
               f"(drop {c['drop_points']:+.2f} points), MAC reduction {100 * c['mac_reduction']:.1f}%")
    g = rec.get("guarantee")
    if g:
        p = "" if g.get("p_value") is None else f" (p = {g['p_value']:.4g}, n_cert = {g['n_cert']:,}, fit n = {g['n_fit']:,})"
        typer.echo(("CERTIFIED: " if g["certified"] else "NOT CERTIFIED: ") + g["statement"] + p)
        typer.echo(g["not_guaranteed"])
    elif max_drop is not None:
        typer.echo("UNCERTIFIED: " + rec["target"]["note"] + f"; add --confidence {CONFIDENCE} for a certified budget"
                   + ("" if rec["budget_met"] else " [budget NOT met on calibration: most accurate point kept]"))
    typer.echo(f"wrote {out}")


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
    from dart_ee.core import artifacts
    from dart_ee.policies import certificate

    d = artifacts.read_json(path, "policy file")
    cal = d.get("calibration") or {}
    g = certificate(d)
    if g:
        return ("certified: " if g["certified"] else "NOT certified: ") + g["statement"]
    if cal.get("target", {}).get("mode") == "uncertified budget":
        return f"UNCERTIFIED budget of {cal['target']['max_drop']} points (in-sample search)"
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
    from dart_ee.report.markdown import frontier_markdown, grid_markdown

    prov = provenance()
    c, t = _load_pair(cal, test, alpha)
    chosen = tuple(dict.fromkeys(["threshold", *policy])) if policy else FRONTIER_POLICIES
    unknown = [p for p in chosen if p not in FRONTIER_POLICIES]
    if unknown:
        _fail(DartError(f"--policy {unknown[0]!r} is not one of {', '.join(FRONTIER_POLICIES)}"))
    res = run_sweep(c, t, chosen)
    rs = resplit_frontier(c, t, resplits, seed, chosen, confidence=confidence, risk=risk) if resplits else None
    artifacts.write_json(out / "sweep.json", res)
    plots.tradeoff_curves(res, out / "tradeoff_curves.png")
    typer.echo(grid_markdown(res))
    typer.echo(f"oracle: {100 * res['oracle']['accuracy']:.2f}% at {100 * res['oracle']['mac_fraction']:.1f}% of static MACs")
    typer.echo(f"wrote {out}/sweep.json and {out}/tradeoff_curves.png")
    if rs:
        artifacts.write_json(out / "resplits.json", {"provenance": prov, **rs})
        d = rs.get("auc_difference_dart_minus_threshold")
        if d:
            verdict = "DART beats the threshold" if d["low"] > 0 else "DART loses to the threshold" if d["high"] < 0 \
                else "no significant difference (tie)"
            typer.echo(f"\nAUC difference DART - threshold over {resplits} re-splits: {100 * d['mean']:+.3f} points, "
                       f"95% interval [{100 * d['low']:+.3f}, {100 * d['high']:+.3f}] (corrected resampled t): {verdict}")
        typer.echo(f"\nCertified frontier (mean over {resplits} re-splits, confidence {confidence}, risk {risk}): "
                   "MAC reduction on test (realised test drop)")
        typer.echo(frontier_markdown(rs["certified_frontier"]))
        typer.echo(f"wrote {out}/resplits.json")


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


@app.command()
def benchmark(run: RunOpt,
              policy: Annotated[list[Path], typer.Option("--policy", help="Fitted policy JSON. Repeatable.")],
              batch_size: int = typer.Option(_BENCH.batch_size, min=1, help="Batch size for the throughput measurement."),
              images: int = typer.Option(_BENCH.images, min=1, help="Test images timed per repetition (accuracy uses all)."),
              repeats: int = typer.Option(_BENCH.repeats, min=1, help="Alternating repetitions; the median is reported."),
              latency_images: int = typer.Option(_BENCH.latency_images, min=0,
                                                 help="Images timed one by one for p50/p95 latency (0: none)."),
              threads: Annotated[Optional[int], typer.Option(min=1, help="Torch threads (default: all cores).")] = None,
              device: str = typer.Option("cpu", help="cpu or cuda."),
              memory: Annotated[bool, typer.Option("--memory", help="Also measure peak memory per method "
                                                                      "(one process each, whole test split).")] = False,
              runner: Annotated[Optional[list[str]], typer.Option(
                  "--runner", help="eager (compact each batch stage by stage), queued (a queue per stage, full "
                                   "batches, CUDA graphs on a GPU) or onnxruntime (the exported graphs, routed like "
                                   "eager). Repeat to time several in alternation.")] = None,
              engine: Annotated[Optional[list[str]], typer.Option(
                  "--engine", help="torch (the eager runner) or onnxruntime: shorthand for --runner. Repeatable.")] = None,
              export_dir: Annotated[Optional[Path], typer.Option(
                  "--export", help="onnxruntime: an export folder that holds the run's model and the --policy files "
                                   "(`dart-ee export` makes it; never written here). Default RUN/export, made again "
                                   "when it is not current, unless it is an int8 export.")] = None,
              keep_memory: Annotated[bool, typer.Option(
                  "--keep-freed-memory/--default-malloc",
                  help="Keep freed memory in the process for reuse, as a CPU server should (dart_ee.core.malloc): with "
                       "glibc's default every large activation is page-faulted in afresh.")] = _BENCH.keep_freed_memory,
              data_dir: DataDirOpt = None,
              out: Annotated[Optional[Path], typer.Option("--out", help="Write the JSON record here.")] = None,
              as_json: Annotated[bool, typer.Option("--json", help="Print the JSON record.")] = False) -> None:
    """Measured wall-clock speedup (batch 256 and batch 1), energy where readable, and DAES: static vs policies."""
    from dart_ee.bench.benchmark import benchmark as run_bench
    from dart_ee.bench.benchmark import table_markdown
    from dart_ee.core import artifacts
    from dart_ee.core.malloc import keep_freed_memory

    if keep_memory:
        keep_freed_memory()

    engines = {"torch": "eager", "onnxruntime": "onnxruntime"}
    bad = [e for e in engine or [] if e not in engines]
    if bad:
        _fail(DartError(f"--engine {bad[0]!r} is not offered: choose torch or onnxruntime"))
    runners = list(dict.fromkeys([*(runner or []), *(engines[e] for e in engine or [])])) or ["eager"]
    rec = run_bench(run, policy, batch_size, images, repeats, latency_images, threads, device, data_dir, memory,
                    runners=runners, export_dir=export_dir)
    if out:
        artifacts.write_json(out, rec)
    if as_json:
        typer.echo(json.dumps(rec, indent=2))
        return
    typer.echo(f"{rec['hardware']['cpu']} ({rec['hardware']['device']}), {rec['threads']} threads, torch {rec['torch']}, "
               f"malloc: {rec['hardware']['malloc']}, "
               f"git {rec['git_revision']}; batch {rec['batch_size']} x {rec['timed_images']} images, "
               f"{rec['repeats']} repeats; energy: {rec['energy_source']}")
    typer.echo(table_markdown(rec))
    for r in rec["rows"]:
        if r.get("stages"):
            typer.echo(f"queued {r['method']}: " + ", ".join(
                f"stage {s['stage']} {s['calls']} calls, {100 * s['fill']:.0f}% full, {s['ms_per_image']:.4f} ms/img"
                for s in r["stages"]) + f"; decisions differing from eager: {r['decisions_differing_from_eager']}")
    if memory:
        for r in (r for r in rec["rows"] if "memory" in r):  # measured under the first runner
            m = r["memory"]
            typer.echo(f"memory {r['method']}: peak RSS {m['peak_rss_mb']:.0f} MB ({m['peak_ratio_vs_static']:.2f}x static), "
                       f"increase during the run {m['increase_mb']:.0f} MB ({m['increase_ratio_vs_static']:.2f}x static)")


@app.command()
def export(run: RunOpt,
           out: Annotated[Path, typer.Option("--out", help="Export folder (one ONNX file per stage, exit head, "
                                                            "estimator and policy decision, and manifest.json).")],
           policy: Annotated[Optional[list[Path]], typer.Option(
               "--policy", help="Fitted policy JSON to export (repeatable); default every RUN/policies/*.json.")] = None,
           opset: int = typer.Option(17, min=OPSETS.start, max=OPSETS.stop - 1, help="ONNX opset version."),
           dtype: str = typer.Option("fp32", help="fp32, or int8 (onnxruntime static quantisation calibrated on the "
                                                  "calibration split; the policies are re-fitted on an int8 trace)."),
           calibration_images: int = typer.Option(512, min=16, help="int8: calibration images for the activation "
                                                                    "ranges."),
           data_dir: DataDirOpt = None) -> None:
    """Export a finished run for onnxruntime: serve it with dart_ee.deploy.onnx_runner.OnnxRunner, without torch."""
    from dart_ee.deploy.export import export_run

    m = export_run(run, out, opset, dtype, policy, data_dir, calibration_images)
    typer.echo(f"wrote {out}: {len(m['files'])} files ({m['dtype']}, opset {m['opset']}), policies "
               + ", ".join(f"{k} ({'static network' if v['static'] else v['policy']})" for k, v in m["policies"].items()))
    if m.get("int8"):
        q = m["int8"]
        typer.echo("per-exit test accuracy, fp32 -> int8: " + ", ".join(
            f"{100 * a:.2f} -> {100 * b:.2f}" for a, b in zip(q["exit_test_accuracy_fp32"], q["exit_test_accuracy_int8"])))


@app.command("train-speed")
def train_speed(model: str = typer.Option("alexnet"), dataset: str = typer.Option("cifar10"),
                batch_size: int = typer.Option(256, min=1), steps: int = typer.Option(6, min=1),
                threads: Annotated[Optional[int], typer.Option(min=1, help="Torch threads (default: all cores).")] = None,
                out: Annotated[Optional[Path], typer.Option("--out", help="Also write the record (with its provenance) "
                                                                           "as JSON.")] = None) -> None:
    """Measure training-step time for fp32 vs bf16 autocast and NCHW vs channels_last on this machine."""
    from dart_ee.bench.benchmark import training_speed

    rec = _recorded(training_speed(model, dataset, batch_size, steps, threads), out)
    typer.echo(f"{model} on {dataset}, batch {batch_size}, {rec['threads']} threads, torch {rec['torch']}:")
    for r in rec["rows"]:
        typer.echo(f"  bf16={str(r['bf16']):5} channels_last={str(r['channels_last']):5} {r['ms_per_step']:7.0f} ms/step "
                   f"({r['speedup_vs_fp32_nchw']:.2f}x vs fp32 NCHW)")


@app.command("data-speed")
def data_speed(config: ConfigOpt = None, data_dir: DataDirOpt = None,
               steps: Annotated[int, typer.Option(min=1, help="Training steps per data path.")] = 100,
               mode: Annotated[Optional[list[str]], typer.Option(help="memory and/or stream (default both).")] = None,
               workers: Annotated[Optional[int], typer.Option(min=0, help="Streaming decode processes (default: "
                                                                          "data.workers, else the cores, at most 4).")] = None,
               cap_mb: Annotated[Optional[float], typer.Option(help="Also say whether each path stayed under this "
                                                                    "peak memory (MB).")] = None,
               repeats: Annotated[int, typer.Option(min=1, help="Rounds, the modes alternating; the median "
                                                                "images/s is reported.")] = 1,
               set_: SetOpt = None,
               out: Annotated[Optional[Path], typer.Option("--out", help="Also write the record (with its provenance) "
                                                                          "as JSON.")] = None) -> None:
    """Training throughput and peak memory of the in-memory and the streamed data paths, on one config."""
    from dart_ee.bench.data_speed import MODES
    from dart_ee.bench.data_speed import data_speed as measure

    if config is None:
        raise DartError("data-speed needs --config (the run to train for a few steps)")
    rec = _recorded(measure(config, steps, tuple(mode or MODES), workers, data_dir, cap_mb, set_ or [], repeats), out)
    typer.echo(f"{config}, {steps} steps, median of {repeats} round(s), {rec['hardware']['cpu']} "
               f"({rec['hardware']['cpu_count']} cores):")
    for r in rec["rows"]:
        cap = "" if r["under_cap"] is None else f", {'under' if r['under_cap'] else 'OVER'} the {cap_mb:.0f} MB cap"
        typer.echo(f"  {r['mode']:6} {r['images_per_s']:8.0f} images/s ({r['workers']} decode workers), setup "
                   f"{r['setup_s']:.0f} s, peak memory {r['peak_pss_mb']:.0f} MB{cap}")
    if rec["stream_vs_memory"] is not None:
        typer.echo(f"  streamed / in memory: {rec['stream_vs_memory']:.2f}x images/s")


@app.command("make-tree")
def make_tree(out: Annotated[Path, typer.Option("--out", help="Folder to create.")],
              train_images: Annotated[int, typer.Option(min=1)] = 200_000,
              test_images: Annotated[int, typer.Option(min=1)] = 10_000,
              size: Annotated[int, typer.Option(min=8)] = 64,
              classes: Annotated[int, typer.Option(min=2)] = 10) -> None:
    """Write a synthetic ImageFolder tree of JPEGs (for trying the streamed data path at scale)."""
    from dart_ee.bench.data_speed import make_tree as write

    rec = write(out, train_images, test_images, size, classes)
    typer.echo(f"wrote {rec['n_train']:,} + {rec['n_test']:,} images of {size}x{size} pixels ({rec['bytes'] / 2**20:.0f} "
               f"MB) under {out}; train on it with data.dataset: imagefolder, data.image_size: {size}")


PolicyDartOpt = Annotated[Optional[Path], typer.Option("--policy", help="Fitted DART policy JSON; default the run's "
                                                                          "(RUN/policies/dart.json, or its uncertified "
                                                                          "DART where that is the static network).")]


def _dart_policy_path(run: Path, policy: Path | None) -> Path:
    from dart_ee.adapt.study import run_policy

    return policy or run_policy(run)


@app.command("adapt-tune")
def adapt_tune(run: RunOpt, policy: PolicyDartOpt = None,
               images: Optional[int] = typer.Option(None, min=10, help="Clean and shifted images per development "
                                                                       "stream; default half the calibration split."),
               batch_size: int = typer.Option(_ADAPT.batch_size, min=1), seed: int = 0,
               data_dir: DataDirOpt = None) -> None:
    """Choose the adaptive controller's settings on development streams from the calibration split (RUN/adapt.json)."""
    from dart_ee.adapt import settings as adapt_settings
    from dart_ee.adapt import tuning as adapt_tuning
    from dart_ee.core.console import log

    rec = adapt_tuning.tune(run, _dart_policy_path(run, policy), n=images, batch_size=batch_size, seed=seed,
                            data_dir=data_dir, progress=log)
    path = adapt_settings.save_settings(run, rec)
    typer.echo(f"chose from {rec['candidates']} candidates in {rec['seconds']:.0f} s on the calibration split "
               f"(families {', '.join(rec['chosen_on']['families'])}; budget D = {rec['budget_points']:g} points):")
    typer.echo("  " + ", ".join(f"{k} {v}" for k, v in rec["settings"].items()))
    for r in rec["chosen_streams"]:
        typer.echo(f"  {r['family']:9} grade {r['level']}: shifted part adaptive {100 * r['shifted_accuracy']:.2f}% "
                   f"(full {100 * r['full_shifted_accuracy']:.2f}%, frozen {100 * r['frozen_shifted_accuracy']:.2f}%) "
                   f"at {100 * r['shifted_mac_fraction']:.1f}% MACs; within D: {'yes' if r['within_budget'] else 'no'}; "
                   f"clean MAC cost {r['clean_mac_cost_points']:+.2f} points")
    typer.echo(f"wrote {path}")


@app.command()
def adapt(run: RunOpt, policy: PolicyDartOpt = None,
          family: Annotated[Optional[list[str]], typer.Option("--family", help="Reporting-only shift family (impulse, "
                                                              "pixelate, brightness, jpeg). Repeatable.")] = None,
          level: Annotated[Optional[list[int]], typer.Option("--level", min=1, max=3, help="Severity grade 1-3. "
                                                             "Repeatable.")] = None,
          mechanisms: Optional[bool] = typer.Option(None, "--mechanisms/--no-mechanisms",
                                                    help="Also run the label-prior scenario: each mechanism alone at "
                                                         "each audit share."),
          clean: Optional[int] = typer.Option(None, min=1, help="Clean images before the shift."),
          shifted: Optional[int] = typer.Option(None, min=1, help="Shifted images after it."),
          batch_size: Optional[int] = typer.Option(None, min=1),
          overhead: bool = typer.Option(False, "--overhead", help="Also time the controller against the runner alone "
                                                                  "(stationary stream, batch 256, audits off)."),
          seed: int = 0, data_dir: DataDirOpt = None,
          out: Annotated[Optional[Path], typer.Option("--out", help="Where the study goes; default RUN/adapt/study.json "
                                                      "(read by dart-ee report).")] = None) -> None:
    """Adaptive DART against the full network, frozen DART and a matched-compute baseline on test-split streams that
    shift part-way, with settings chosen on the calibration split (dart-ee adapt-tune runs first when needed).
    Options left out come from the run's config (its adapt section)."""
    from dart_ee.adapt import tuning as adapt_tuning
    from dart_ee.adapt.study import study
    from dart_ee.core import artifacts
    from dart_ee.core.console import log
    from dart_ee.core.runfiles import RESULTS, STUDY
    from dart_ee.report import plots
    from dart_ee.report.markdown import adaptation_parts
    from dart_ee.runs.run import Run

    a = Run(run).config().adapt
    batch_size = batch_size or a.batch_size
    pol = _dart_policy_path(run, policy)
    adapt_tuning.ensure_settings(run, pol, a, seed, data_dir, batch_size, progress=log)
    res = study(run, pol, family or a.families, level or a.levels, clean or a.clean, shifted or a.shifted, batch_size,
                seed, data_dir, a.mechanisms if mechanisms is None else mechanisms, progress=log)
    path = artifacts.write_json(out or Path(run) / STUDY, res)
    if out is None and (Path(run) / RESULTS).is_file():  # the run's results point at its study
        results = artifacts.read_json(Path(run) / RESULTS, "results")
        artifacts.write_json(Path(run) / RESULTS, {**results, "adaptation": STUDY})
    plots.study_figures(res, path.parent)
    typer.echo("\n\n".join(adaptation_parts(res, h="#")))
    if overhead:
        from dart_ee.bench.benchmark import controller_overhead

        ov = controller_overhead(run, pol, data_dir=data_dir)
        artifacts.write_json(path.parent / "controller_overhead.json", ov)
        typer.echo(f"controller overhead: {ov['controller_ms_per_image']:.4f} vs {ov['runner_ms_per_image']:.4f} ms per "
                   f"image = {100 * ov['overhead']:+.2f}% ({ov['images']} stationary images, batch {ov['batch_size']}, "
                   f"audits off, {ov['updates']} updates, median of {ov['repeats']} alternating runs)")
    typer.echo(f"wrote {path} and its figures")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
