"""Torch's intra-op threads, set in one place: every measurement and every step of a run says how many it used."""

from __future__ import annotations

import os

import torch

from dart_ee.core.errors import ConfigError


def set_threads(n: int | None) -> int:
    """Torch's intra-op threads: ``n``, or every core when None."""
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ConfigError(f"threads must be a positive integer, got {n!r}")
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n
