"""The one switch that lets dart-ee import code an artifact names (torch-free, so the CLI can read it at start).

A run folder holds weights, never code, but a custom run names the ``nn.Module`` class that rebuilds
its network, and importing that class runs its module. As with Hugging Face's ``trust_remote_code``,
that happens only when the user says so: ``with trust_code():`` (the CLI's ``--trust-code`` opens it
around a command), or ``Run(path, trust_code=True)``. ``dart_ee.models.custom.import_builder`` asks here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_TRUSTED: ContextVar[bool] = ContextVar("dart_ee_trust_code", default=False)


@contextmanager
def trust_code(trusted: bool = True) -> Iterator[None]:
    """Within the block, load run folders that name code to import (the CLI's ``--trust-code``)."""
    token = _TRUSTED.set(trusted or _TRUSTED.get())
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def code_trusted() -> bool:
    """Whether the caller is inside ``trust_code()``."""
    return _TRUSTED.get()
