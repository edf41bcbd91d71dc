"""Deterministic, seeded input streams with a distribution shift part-way (for ``dart-ee adapt``).

Each builder takes a test split (uint8 NCHW images and labels) and returns a ``Stream``: float
pixels in [0, 1], labels, and the index where the shift starts. Severity is documented per scenario.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dart_ee.data import to_float
from dart_ee.errors import ConfigError

SCENARIOS = ("noise", "blur", "contrast", "class-prior", "ramp")
SEVERITY = {"noise": 0.1, "blur": 1.0, "contrast": 0.7, "class-prior": 0.9, "ramp": 0.15}  # when none is given
SEVERITY_HELP = {
    "noise": "standard deviation of additive Gaussian pixel noise (pixels in [0, 1])",
    "blur": "standard deviation, in pixels, of a Gaussian blur",
    "contrast": "share of contrast removed: x -> mean + (1 - s) * (x - mean)",
    "class-prior": "share of the shifted stream drawn from 3 dominant classes",
    "ramp": "final noise standard deviation of a linear ramp from 0 over the shifted part",
}


@dataclass
class Stream:
    x: torch.Tensor  # (N, C, H, W) float in [0, 1]
    y: torch.Tensor  # (N,)
    shift_start: int
    scenario: str
    severity: float


def gaussian_noise(x: torch.Tensor, sigma: float | torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=x.dtype)
    s = s.view(-1, 1, 1, 1) if s.dim() else s
    return (x + s * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    r = max(1, int(round(3 * sigma)))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype) ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def contrast_drop(x: torch.Tensor, amount: float) -> torch.Tensor:
    mean = x.mean((1, 2, 3), keepdim=True)
    return (mean + (1 - amount) * (x - mean)).clamp(0, 1)


def make_stream(images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, scenario: str, severity: float,
                n_clean: int, n_shift: int, seed: int = 0) -> Stream:
    """``n_clean`` clean images, then ``n_shift`` shifted ones, drawn without replacement where possible."""
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown shift scenario {scenario!r}; choose one of {SCENARIOS}")
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    y_all = np.asarray(labels)
    n = len(y_all)
    order = rng.permutation(n)
    # a test split smaller than the stream is drawn with replacement (the shift still starts at n_clean)
    clean_idx = order[:n_clean] if n >= n_clean else rng.choice(n, n_clean)
    rest = order[n_clean:] if n - n_clean >= n_shift else rng.permutation(n)
    if scenario == "class-prior":
        dominant = rng.choice(np.unique(y_all), size=3, replace=False)
        pool_dom, pool_other = rest[np.isin(y_all[rest], dominant)], rest[~np.isin(y_all[rest], dominant)]
        n_dom = int(round(severity * n_shift))
        shift_idx = np.concatenate([rng.choice(pool_dom, n_dom, replace=n_dom > len(pool_dom)),
                                    rng.choice(pool_other, n_shift - n_dom, replace=n_shift - n_dom > len(pool_other))])
        shift_idx = rng.permutation(shift_idx)
    else:
        shift_idx = rest[:n_shift] if len(rest) >= n_shift else rng.choice(rest, n_shift)
    clean = to_float(torch.as_tensor(np.asarray(images)[clean_idx]))
    shifted = to_float(torch.as_tensor(np.asarray(images)[shift_idx]))
    if scenario == "noise":
        shifted = gaussian_noise(shifted, severity, gen)
    elif scenario == "blur":
        shifted = gaussian_blur(shifted, severity)
    elif scenario == "contrast":
        shifted = contrast_drop(shifted, severity)
    elif scenario == "ramp":
        shifted = gaussian_noise(shifted, torch.linspace(0, severity, len(shifted)), gen)
    y = torch.as_tensor(np.concatenate([y_all[clean_idx], y_all[shift_idx]]))
    return Stream(torch.cat([clean, shifted]), y, n_clean, scenario, severity)
