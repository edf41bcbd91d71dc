"""Commands on a run folder: train, run (the whole pipeline), report, demo, trace."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dart_ee.cli.app import ConfigOpt, DataDirOpt, RunOpt, SetOpt, app


@app.command()
def train(config: ConfigOpt = None, data_dir: DataDirOpt = None,
          out: Annotated[Optional[Path], typer.Option("--out", help="Run directory; default runs/<config name>.")] = None,
          set_: SetOpt = None,
          resume: Annotated[bool, typer.Option("--resume", help="Continue a killed run from its last checkpoint.")] = False,
          ) -> None:
    """Train a multi-exit network jointly and write a run directory (config, split, checkpoint, metrics)."""
    from dart_ee.config import load_config
    from dart_ee.training import distributed
    from dart_ee.training.train import train as run_training

    cfg = load_config(config, set_ or [])
    with distributed.session():  # under torchrun
        run_training(cfg, out or Path("runs") / cfg.name, data_dir, resume)


@app.command()
def run(config: ConfigOpt = None, data_dir: DataDirOpt = None,
        out: Annotated[Optional[Path], typer.Option("--out", help="Output directory; default runs/<config name>.")] = None,
        set_: SetOpt = None) -> None:
    """The whole pipeline from one config: train, trace, calibrate, sweep, benchmark, adapt, report (resumable)."""
    from dart_ee.config import load_config
    from dart_ee.pipeline import run_pipeline
    from dart_ee.training import distributed

    cfg = load_config(config, set_ or [])
    with distributed.session():  # under torchrun
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
