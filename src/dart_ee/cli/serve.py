"""Commands that serve a model over HTTP and load-test it: serve and loadtest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dart_ee.cli.app import DataDirOpt, _recorded, app
from dart_ee.config import ServeConfig
from dart_ee.core.errors import ConfigError

_SERVE = ServeConfig()  # the one source of the defaults the options show
ExportOpt = Annotated[Optional[Path], typer.Option("--export", help="An export folder (`dart-ee export`): served by "
                                                                     "onnxruntime in a process without torch.")]
MaxBatchOpt = Annotated[int, typer.Option(min=1, max=4096, help="Samples per batch at most (a request holds at most "
                                                                 "this many images).")]
MaxWaitOpt = Annotated[float, typer.Option(min=0, help="How long a batch's first request waits for more, in ms.")]
MaxHoldOpt = Annotated[float, typer.Option(min=0, help="A sample in the server this long (ms) goes first, whatever "
                                                        "its stage (bounds how long hard samples wait).")]
MaxQueueOpt = Annotated[int, typer.Option(min=1, help="Samples waiting at most; beyond, 503 with Retry-After.")]
ThreadsOpt = Annotated[Optional[int], typer.Option(min=1, help="Intra-op threads of the inference thread "
                                                               "(default: all cores).")]


@app.command()
def serve(policy: Annotated[str, typer.Option("--policy", help="The policy to serve: a name the export (or "
                                                                 "RUN/policies) holds, a policy JSON with --run, or "
                                                                 "`static` (the plain network).")],
          run: Annotated[Optional[Path], typer.Option("--run", help="A run folder: served by torch.")] = None,
          export: ExportOpt = None,
          host: str = typer.Option(_SERVE.host, help="Address to listen on (default: loopback only)."),
          port: int = typer.Option(_SERVE.port, min=0, max=65535),
          workers: int = typer.Option(_SERVE.workers, min=1, help="uvicorn worker processes, each with its own model."),
          ray_replicas: int = typer.Option(0, min=0, help="Serve with Ray Serve instead, this many replicas (needs "
                                                          "pip install -e '.[serve-ray]'; RAY_ADDRESS joins a cluster)."),
          max_batch: MaxBatchOpt = _SERVE.max_batch, max_wait_ms: MaxWaitOpt = _SERVE.max_wait_ms,
          max_hold_ms: MaxHoldOpt = _SERVE.max_hold_ms, max_queue: MaxQueueOpt = _SERVE.max_queue,
          max_body_bytes: int = typer.Option(_SERVE.max_body_bytes, min=1024, help="Larger request bodies get 413."),
          threads: ThreadsOpt = None,
          adapt: bool = typer.Option(False, "--adapt", help="Online risk control of the served policy (torch, --run "
                                                            "only): audits, theta along its path; README \"Serving\"."),
          adapt_state: Annotated[Optional[Path], typer.Option(
              "--adapt-state", help="With --adapt: read theta from this file at start, write it at shutdown.")] = None
          ) -> None:
    """Serve an early-exit model over HTTP: POST /predict, GET /healthz /readyz /metrics /info (README "Serving")."""
    from dart_ee.core.trust import code_trusted
    from dart_ee.serve.app import serve as run_server
    from dart_ee.serve.engine import make_engine

    if adapt and (workers > 1 or ray_replicas):
        raise ConfigError("--adapt keeps one theta per server process: serve it with --workers 1 and no Ray replicas")
    cfg = ServeConfig(host=host, port=port, workers=workers, max_batch=max_batch, max_wait_ms=max_wait_ms,
                      max_hold_ms=max_hold_ms, max_queue=max_queue, max_body_bytes=max_body_bytes, threads=threads)
    spec: dict[str, Any] = {"policy": policy, "run": str(run) if run else None,
                            "export": str(export) if export else None, "trust_code": code_trusted(), "adapt": adapt,
                            "adapt_state": str(adapt_state) if adapt_state else None}
    engine = make_engine(**spec, threads=threads)  # a bad folder or policy fails here, in one line, before uvicorn
    info = engine.info
    promise = f"certified: {info['certificate']}" if info["certified"] else "not certified"
    procs = f"{ray_replicas} Ray Serve replicas" if ray_replicas else f"{workers} worker{'s' * (workers > 1)}"
    typer.echo(f"serving {info['policy']} ({promise}) with {info['engine']} on http://{host}:{port} ({procs}, batches "
               f"of at most {max_batch}, waiting at most {max_wait_ms:g} ms); Ctrl-C stops after answering what was "
               "accepted", err=True)
    if ray_replicas:
        from dart_ee.serve import ray_serve

        ray_serve.run(spec, cfg, ray_replicas)
        return
    run_server(spec, cfg, engine if workers == 1 else None)


@app.command()
def loadtest(export: Annotated[Path, typer.Option("--export", help="The export folder to serve.")],
             policy: Annotated[list[str], typer.Option("--policy", help="Exported policy to compare with the static "
                                                                         "network. Repeatable.")],
             run: Annotated[Optional[Path], typer.Option("--run", help="Run folder whose test images are sent and "
                                                                         "whose trace checks the answers; default the "
                                                                         "export's run.")] = None,
             images: int = typer.Option(2000, min=1, help="Test images sent (a seeded sample of the test split) "
                                                                "and checked against the trace."),
             requests: int = typer.Option(1000, min=10, help="Requests per rate and server."),
             max_seconds: float = typer.Option(20.0, min=1, help="Seconds per rate and server at most."),
             concurrency: int = typer.Option(64, min=1, help="Requests in flight while measuring saturation."),
             slo_ms: float = typer.Option(50.0, min=0.1, help="The p99 latency SLO for the highest sustained rate."),
             max_batch: MaxBatchOpt = _SERVE.max_batch, max_wait_ms: MaxWaitOpt = _SERVE.max_wait_ms,
             max_hold_ms: MaxHoldOpt = _SERVE.max_hold_ms, max_queue: MaxQueueOpt = _SERVE.max_queue,
             threads: ThreadsOpt = None,
             data_dir: DataDirOpt = None,
             out: Annotated[Optional[Path], typer.Option("--out", help="Write the JSON record here.")] = None) -> None:
    """Serve the static network and each policy on loopback ports, load them alternately (Poisson arrivals at
    fractions of the static server's saturation, then up to a p99 SLO), and check the answers against the trace."""
    from dart_ee.serve.bench import loadtest as run_loadtest

    cfg = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, max_hold_ms=max_hold_ms, max_queue=max_queue,
                      threads=threads)
    rec = _recorded(run_loadtest(export, policy, cfg, images, requests, max_seconds, concurrency, slo_ms, run, data_dir),
                    out)
    typer.echo("saturation (req/s): " + ", ".join(f"{k} {v:.0f}" for k, v in rec["saturation"].items()))
    typer.echo("| server | load | rate | throughput | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|---|")
    for r in rec["rows"]:
        typer.echo(f"| {r['server']} | {r['fraction']:.2f} | {r['rate']:.0f} | {r['throughput']:.0f} | {r['p50_ms']:.1f} "
                   f"| {r['p99_ms']:.1f} | {r['errors']} |")
    typer.echo(f"highest rate with p99 under {slo_ms:g} ms: " + ", ".join(
        f"{k} {v:.0f}/s" if v else f"{k} none" for k, v in rec["max_rate_under_slo"].items()))
    typer.echo("answers against the trace: " + json.dumps({k: {m: v[m] for m in ("served_accuracy", "trace_accuracy",
                                                                                   "classes_differing")}
                                                           for k, v in rec["answers"].items()}))
