"""Keep freed memory in the process, so that CPU inference does not page-fault on every large tensor.

glibc's malloc serves a large block (above a threshold that it moves up to 32 MiB) with a fresh ``mmap``
and unmaps it on ``free``; it also gives the heap's free top back to the kernel. A CNN on the CPU
allocates and frees activations of several to tens of MiB in every layer call, so every call maps new
pages and the kernel faults in and zeroes each 4 KiB of them: kernel time that grows with the batch, and
that the static network and early exit pay alike. With ``mmap`` off (every block from the heap) and
trimming off, freed blocks are reused and the faults go away (BENCHMARKS.md section 4 measures both).

The cost: the process keeps the memory of its largest batches until it exits, and somewhat more, since an
aligned request does not always fit the block just freed and the heap grows by a few blocks of each size
before it reuses them. ``dart-ee benchmark`` (and the benchmark step of ``dart-ee run``) keeps freed memory
unless told ``--default-malloc``, as do ``dart-ee info --timing`` and ``dart-ee difficulty cost``; training does
not, so that its peak memory stays as measured.

The same, set before a process starts (for a server that does not import dart_ee first)::

    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647 python serve.py
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt's parameter numbers (glibc's malloc.h)
_TRIM_NEVER = 2**31 - 1  # mallopt takes an int: trim only when 2 GiB lie free at the heap's top
_kept = False
KEPT = "glibc, freed memory kept (mmap_max=0, trim_threshold=2 GiB)"  # malloc_setting() once kept


def is_glibc() -> bool:
    """Whether this process runs on glibc (where ``mallopt`` exists and the setting applies)."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse, for the rest of this process (see the module docstring).

    Returns whether it is in effect; False, with nothing changed, where the C library is not glibc."""
    global _kept
    if _kept:
        return True
    if not is_glibc():
        return False
    libc = ctypes.CDLL("libc.so.6")
    # mallopt returns 1 on success; the order matters little, both take effect for later allocations
    _kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))
    return _kept


def freed_memory_kept() -> bool:
    """Whether ``keep_freed_memory`` is in effect in this process."""
    return _kept


def malloc_setting() -> str:
    """How this process's malloc treats freed memory, for a benchmark record."""
    if _kept:
        return KEPT
    if not is_glibc():
        return f"not glibc ({platform.system()}): the C library's own"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables:
        return f"glibc, GLIBC_TUNABLES={tunables}"
    return "glibc default"
