"""Commands that run the model for real: benchmark and export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from dart_ee.cli.app import _BENCH, DataDirOpt, RunOpt, _fail, app
from dart_ee.core.errors import DartError
from dart_ee.deploy.onnx_runner import OPSETS


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
