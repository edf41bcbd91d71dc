"""The ``dart-ee`` command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from dart_ee.errors import DartError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="DART: difficulty-aware adaptive thresholds for early-exit networks.")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML experiment config (see configs/).")]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="Folder holding the dataset; default $DART_DATA.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a config field, e.g. train.epochs=1. Repeatable.")]
RunOpt = Annotated[Path, typer.Option("--run", help="Run directory written by `dart-ee train`.")]


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
    from dart_ee.training import train as run_training

    try:
        cfg = load_config(config, set_ or [])
        run_training(cfg, out or Path("runs") / cfg.name, data_dir, resume)
    except DartError as e:
        _fail(e)


@app.command()
def trace(run: RunOpt, data_dir: DataDirOpt = None) -> None:
    """Write RUN/trace_cal.npz and RUN/trace_test.npz: every exit's softmax for every sample (+ JSON metadata)."""
    from dart_ee.trace import load, trace_run

    try:
        for split, path in trace_run(run, data_dir).items():
            t = load(path)
            accs = " ".join(f"{100 * a:.1f}" for a in t.exit_accuracy())
            typer.echo(f"{split}: {path} ({t.n} samples, {t.num_exits} exits, exit accuracy % {accs})")
    except DartError as e:
        _fail(e)


@app.command()
def info(model: Annotated[str, typer.Option("--model", help="Registered model name (alexnet, resnet18, vgg16).")] = "alexnet",
         dataset: Annotated[str, typer.Option("--dataset", help="Dataset whose input shape to use.")] = "cifar10",
         width_mult: Annotated[float, typer.Option("--width-mult", help="Channel width multiplier.")] = 1.0,
         as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> None:
    """Per-exit cumulative MACs (measured with torch.utils.flop_counter) and parameter counts of a model."""
    from dart_ee.data import get_spec
    from dart_ee.models import create_model

    try:
        spec = get_spec(dataset)
        rec = create_model(model, spec.num_classes, spec.in_channels, spec.image_size, width_mult=width_mult,
                           mean=spec.mean, std=spec.std).describe()
    except DartError as e:
        _fail(e)
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
               f"{rec['params']['total']:,} ({rec['params']['heads']:,} in exit heads)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
