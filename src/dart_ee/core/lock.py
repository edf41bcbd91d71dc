"""One writer per run folder: an advisory lock held while a command writes to it.

Two ``dart-ee run`` on one ``--out`` would interleave their models, traces and results; the second
one now stops at once with an error that names the first (its pid, host, command and start time).
The lock is ``fcntl.flock`` on ``RUN/.lock``: the kernel drops it when the holder exits, even on
SIGKILL, so a killed run never leaves a stale lock. Re-entrant within one process (``run`` calls
``train``, which locks the same folder).
"""

from __future__ import annotations

import functools
import inspect
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from dart_ee.core.errors import RunLockedError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are then not protected against a second writer
    fcntl = None  # type: ignore[assignment]

F = TypeVar("F", bound=Callable[..., Any])
LOCK_FILE = ".lock"
_held: dict[Path, int] = {}  # folders this process holds, with a nesting count


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the duration of the block; raise ``RunLockedError`` if another process has it."""
    run_dir = Path(run_dir).resolve()
    # under torchrun, rank 0 holds the lock for all the processes of its job (the others do not write)
    if run_dir in _held or fcntl is None or os.environ.get("RANK", "0") != "0":
        _held[run_dir] = _held.get(run_dir, 0) + 1
        try:
            yield
        finally:
            _held[run_dir] -= 1
            if not _held[run_dir]:
                del _held[run_dir]
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunLockedError(f"{run_dir} is in use by {holder}; wait for it to finish, or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} (`{' '.join(['dart-ee', *sys.argv[1:]])}`, "
            f"since {time.strftime('%Y-%m-%d %H:%M:%S')})")
    f.flush()
    _held[run_dir] = 1
    try:
        yield
    finally:
        del _held[run_dir]
        f.truncate(0)
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def holds_run_lock(arg: str) -> Callable[[F], F]:
    """Decorator: hold the lock of the run folder passed as argument ``arg`` while the function runs."""
    def deco(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with run_lock(sig.bind(*args, **kwargs).arguments[arg]):
                return fn(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return deco
