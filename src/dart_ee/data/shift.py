"""Deterministic, seeded input streams with a distribution shift part-way (for ``dart-ee adapt``).

A stream is ``n_clean`` clean images, then ``n_shift`` shifted ones. The shifts come in two kinds:

- **Corruption families**, each with three severity grades (``Family.levels``). They are split in two,
  so that the adaptive controller is never judged on a shift its settings were chosen on:
  ``CHOOSE`` families build the development streams, from the *calibration* split, on which
  ``dart_ee.adapt.tuning`` chooses the controller's settings; ``REPORT`` families are used only to
  report, on the *test* split.
- **Scenarios** that are not corruptions: ``class-prior`` (the shifted part drawn mostly from a few
  classes: given ones, or random) and ``ramp`` (noise that grows over the shifted part).

Every builder takes uint8 NCHW images and labels; pixels come back as floats in [0, 1].
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dart_ee.core.errors import ConfigError
from dart_ee.data.datasets import to_float


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


def impulse_noise(x: torch.Tensor, share: float, gen: torch.Generator) -> torch.Tensor:
    """Salt and pepper: each pixel value (per channel) is set to 0 or 1 with probability ``share``."""
    hit = torch.rand(x.shape, generator=gen) < share
    salt = (torch.rand(x.shape, generator=gen) < 0.5).to(x.dtype)
    return torch.where(hit, salt, x)


def pixelate(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Average down to ``scale`` of the side, then blow back up with nearest neighbours (blocky edges)."""
    if scale >= 1:
        return x
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def brightness(x: torch.Tensor, amount: float) -> torch.Tensor:
    """Every pixel brighter by ``amount`` (clipped: bright regions saturate)."""
    return (x + amount).clamp(0, 1)


def jpeg(x: torch.Tensor, quality: float) -> torch.Tensor:
    """Round trip through JPEG at ``quality`` (Pillow; block artefacts, lost high frequencies)."""
    from PIL import Image

    u8 = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for img in u8:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="JPEG", quality=int(quality))
        arr = np.asarray(Image.open(buf))
        out.append(arr[..., None] if arr.ndim == 2 else arr)
    return to_float(torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous())


@dataclass(frozen=True)
class Family:
    """A corruption, graded: ``levels`` are its severities at grades 1, 2 and 3 (mild, moderate, severe)."""

    name: str
    role: str  # "choose": development streams (calibration split); "report": reported only (test split)
    levels: tuple[float, float, float]
    help: str
    apply: Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


FAMILIES = {f.name: f for f in (
    Family("noise", "choose", (0.04, 0.08, 0.12), "standard deviation of additive Gaussian pixel noise (pixels in [0, 1])",
           gaussian_noise),
    Family("blur", "choose", (0.6, 1.0, 1.5), "standard deviation, in pixels, of a Gaussian blur",
           lambda x, s, g: gaussian_blur(x, s)),
    Family("contrast", "choose", (0.4, 0.6, 0.8), "share of contrast removed: x -> mean + (1 - s) * (x - mean)",
           lambda x, s, g: contrast_drop(x, s)),
    Family("impulse", "report", (0.01, 0.03, 0.06), "share of pixel values set to 0 or 1 (salt and pepper)",
           impulse_noise),
    Family("pixelate", "report", (0.75, 0.5, 0.375), "side kept before nearest-neighbour upscaling",
           lambda x, s, g: pixelate(x, s)),
    Family("brightness", "report", (0.1, 0.2, 0.3), "added to every pixel (pixels in [0, 1], clipped)",
           lambda x, s, g: brightness(x, s)),
    Family("jpeg", "report", (30, 15, 8), "JPEG quality of a round trip", lambda x, s, g: jpeg(x, s)),
)}
CHOOSE = tuple(n for n, f in FAMILIES.items() if f.role == "choose")
REPORT = tuple(n for n, f in FAMILIES.items() if f.role == "report")
SCENARIOS = (*FAMILIES, "class-prior", "ramp")
SEVERITY_HELP = {**{n: f.help for n, f in FAMILIES.items()},
                 "class-prior": "share of the shifted stream drawn from 3 dominant classes",
                 "ramp": "final noise standard deviation of a linear ramp from 0 over the shifted part"}
SEVERITY = {**{n: f.levels[1] for n, f in FAMILIES.items()}, "class-prior": 0.9, "ramp": 0.15}  # when none is given


def severity(family: str, level: int) -> float:
    """The severity of ``family`` at grade ``level`` (1, 2 or 3)."""
    if family not in FAMILIES:
        raise ConfigError(f"unknown shift family {family!r}; choose one of {tuple(FAMILIES)}")
    if level not in (1, 2, 3):
        raise ConfigError(f"severity grade must be 1, 2 or 3, got {level}")
    return float(FAMILIES[family].levels[level - 1])


@dataclass
class Stream:
    x: torch.Tensor  # (N, C, H, W) float in [0, 1]
    y: torch.Tensor  # (N,)
    shift_start: int
    scenario: str
    severity: float


def make_stream(images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, scenario: str, severity: float,
                n_clean: int, n_shift: int, seed: int = 0, classes: Sequence[int] | None = None) -> Stream:
    """``n_clean`` clean images, then ``n_shift`` shifted ones, drawn without replacement where possible.

    ``classes`` (class-prior only): the dominant classes; three drawn at random when not given.
    """
    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown shift scenario {scenario!r}; choose one of {SCENARIOS}")
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    y_all = np.asarray(labels)
    n = len(y_all)
    order = rng.permutation(n)
    # a split smaller than the stream is drawn with replacement (the shift still starts at n_clean)
    clean_idx = order[:n_clean] if n >= n_clean else rng.choice(n, n_clean)
    rest = order[n_clean:] if n - n_clean >= n_shift else rng.permutation(n)
    if scenario == "class-prior":
        dominant = np.asarray(classes) if classes is not None else rng.choice(np.unique(y_all), size=3, replace=False)
        is_dom = np.isin(y_all[rest], dominant)
        pool_dom, pool_other = rest[is_dom], rest[~is_dom]
        if not len(pool_dom) or not len(pool_other):
            raise ConfigError(f"class-prior: classes {dominant.tolist()} leave no images on one side of the split")
        n_dom = int(round(severity * n_shift))
        shift_idx = np.concatenate([rng.choice(pool_dom, n_dom, replace=n_dom > len(pool_dom)),
                                    rng.choice(pool_other, n_shift - n_dom, replace=n_shift - n_dom > len(pool_other))])
        shift_idx = rng.permutation(shift_idx)
    else:
        shift_idx = rest[:n_shift] if len(rest) >= n_shift else rng.choice(rest, n_shift)
    clean = to_float(torch.as_tensor(np.asarray(images)[clean_idx]))
    shifted = to_float(torch.as_tensor(np.asarray(images)[shift_idx]))
    if scenario in FAMILIES:
        shifted = FAMILIES[scenario].apply(shifted, severity, gen)
    elif scenario == "ramp":
        shifted = gaussian_noise(shifted, torch.linspace(0, severity, len(shifted)), gen)
    y = torch.as_tensor(np.concatenate([y_all[clean_idx], y_all[shift_idx]]))
    return Stream(torch.cat([clean, shifted]), y, n_clean, scenario, severity)
