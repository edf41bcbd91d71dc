"""Measured energy, never estimated: NVML's total-energy counter on NVIDIA GPUs, RAPL on CPUs.

Where neither can be read, ``EnergyMeter.available`` is False and callers report "unavailable".
"""

from __future__ import annotations

from pathlib import Path

import torch

RAPL_ROOT = Path("/sys/class/powercap")


class EnergyMeter:
    """Cumulative energy in joules from a hardware counter; ``read()`` is None when unavailable."""

    source = "unavailable"
    available = False

    def read(self) -> float | None:
        return None


class NvmlMeter(EnergyMeter):
    """NVML total energy since driver load (mJ), for one GPU."""

    source = "nvml"
    available = True

    def __init__(self, index: int) -> None:
        import pynvml

        pynvml.nvmlInit()
        self._nvml = pynvml
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)  # raises if unsupported

    def read(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1e3


class RaplMeter(EnergyMeter):
    """Sum of the RAPL package domains (``intel-rapl:N/energy_uj``), with counter wrap-around handled."""

    source = "rapl"
    available = True

    def __init__(self, root: Path = RAPL_ROOT) -> None:
        self.domains = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1)
        if not self.domains:
            raise OSError("no RAPL package domains")
        self._max = [int((d / "max_energy_range_uj").read_text()) for d in self.domains]
        self._last = [self._raw(d) for d in self.domains]
        self._total = 0.0

    @staticmethod
    def _raw(d: Path) -> int:
        return int((d / "energy_uj").read_text())

    def read(self) -> float:
        for k, d in enumerate(self.domains):
            now = self._raw(d)
            delta = now - self._last[k]
            if delta < 0:  # the counter wrapped
                delta += self._max[k] + 1
            self._total += delta / 1e6
            self._last[k] = now
        return self._total


def energy_meter(device: torch.device | str = "cpu") -> EnergyMeter:
    """The best meter for ``device``, or a meter that says energy is unavailable."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return NvmlMeter(device.index or 0)
        return RaplMeter()
    except Exception:  # noqa: BLE001 - NVML and sysfs raise many types: any failure means unavailable
        return EnergyMeter()
