"""Freed memory kept in the process: large tensors stop page-faulting, and records say what was in effect."""

import subprocess
import sys

import pytest
import torch

from dart_ee.core import malloc
from dart_ee.core.provenance import hardware_info

# Allocate and free a 64 MiB tensor (above glibc's largest mmap threshold) ten times, writing every page;
# print the minor page faults that took. Kept, the heap first grows by a few such blocks (an aligned request
# does not fit the block just freed until neighbours have merged), then reuses them: so 12 rounds of warm-up.
# In a child: the setting is for the rest of a process.
_CHILD = """
import resource, sys, torch
from dart_ee.core import malloc
if sys.argv[1] == "keep":
    assert malloc.keep_freed_memory()
for _ in range(12):
    torch.ones(2**24)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(2**24)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, malloc.malloc_setting(), sep="|")
"""


def _faults(mode: str, **env: str) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True,
                         env={"PATH": "", "OMP_NUM_THREADS": "1", **env}).stdout.strip()
    n, setting = out.split("|")
    return int(n), setting


@pytest.mark.skipif(not malloc.is_glibc(), reason="the setting is glibc's (mallopt)")
def test_kept_memory_stops_the_page_faults_of_large_tensors():
    default, kept = _faults("default"), _faults("keep")
    assert default[1] == "glibc default" and kept[1].startswith("glibc, freed memory kept")
    assert default[0] > 10 * 16384 * 0.9  # each 64 MiB tensor faulted in afresh, 4 KiB at a time
    assert kept[0] < default[0] / 20  # reused: almost no faults
    # the same without dart_ee, set before the process starts (the README's line for a server)
    tuned = _faults("default", GLIBC_TUNABLES="glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647")
    assert tuned[0] < default[0] / 20 and tuned[1].startswith("glibc, GLIBC_TUNABLES=")


def test_records_say_how_freed_memory_is_treated():
    setting = hardware_info(torch.device("cpu"))["malloc"]
    assert setting == malloc.malloc_setting()
    assert malloc.freed_memory_kept() == setting.startswith("glibc, freed memory kept")
