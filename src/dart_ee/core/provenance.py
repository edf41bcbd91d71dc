"""Where a record was made: the command line, git revision, hardware, torch version and date.

Every benchmark and study record carries ``provenance()``, so that a published figure names what made
it (BENCHMARKS.md is generated from such records). A leaf module: anything may import it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from dart_ee.core.malloc import malloc_setting


def hardware_info(device: torch.device) -> dict:
    import platform

    cpu = platform.processor() or "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(), "device": str(device),
            "malloc": malloc_setting()}  # CPU times depend on it (dart_ee.core.malloc)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line() -> str:
    """The command this process runs, as one would type it again."""
    prog = Path(sys.argv[0]).name  # dart-ee, or python -m dart_ee (__main__.py), or a script of yours
    return " ".join(["dart-ee", *sys.argv[1:]] if prog in ("dart-ee", "__main__.py") else ["python", *sys.argv])


def provenance() -> dict:
    """Where and when a record was made: the command line, git revision, hardware, torch and date (UTC)."""
    return {"command": command_line(), "git_revision": git_revision(),
            "hardware": hardware_info(torch.device("cpu")), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
