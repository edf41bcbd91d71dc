"""Commands of the adaptive controller: adapt-tune and adapt."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dart_ee.cli.app import _ADAPT, DataDirOpt, RunOpt, app

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
