"""Console output: rich progress bars on a terminal, plain lines otherwise (CI logs stay readable)."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def _speaks() -> bool:
    """One voice under torchrun: rank 0 logs, the other processes stay silent."""
    return os.environ.get("RANK", "0") == "0"


def is_tty() -> bool:
    return sys.stderr.isatty()


def progress() -> Progress:
    """A progress bar with an ETA; disabled (silent) when stderr is not a terminal."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console,
                    disable=not (is_tty() and _speaks()))


def log(msg: str) -> None:
    if _speaks():
        console.print(msg, highlight=False, soft_wrap=True)
