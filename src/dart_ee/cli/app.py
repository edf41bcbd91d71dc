"""The ``dart-ee`` application: one red line and exit status 2 on bad input, the opt-in to named code on every
command that reads a run folder, and the options the command groups share."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dart_ee.config import AdaptConfig, BenchmarkConfig
from dart_ee.core.errors import DartError
from dart_ee.core.trust import trust_code


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


TraceOpt = Annotated[Path, typer.Option("--trace", help="Trace file written by `dart-ee trace` (RUN/trace_test.npz).")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Output directory.")]


def _recorded(rec: dict, out: Path | None) -> dict:
    """``rec`` with its provenance (command, git revision, hardware, date), written to ``out`` when given."""
    from dart_ee.core import artifacts
    from dart_ee.core.provenance import provenance

    rec = {**rec, "provenance": provenance()}
    if out:
        artifacts.write_json(out, rec)
    return rec


def main() -> None:
    app()
