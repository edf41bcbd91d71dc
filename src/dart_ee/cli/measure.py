"""Commands that describe and measure: model info, the difficulty score, training and data-path speed, a synthetic tree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from dart_ee.cli.app import ConfigOpt, DataDirOpt, OutOpt, SetOpt, TraceOpt, _App, _fail, _recorded, app
from dart_ee.core.errors import DartError


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
