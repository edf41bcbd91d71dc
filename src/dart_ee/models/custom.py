"""Runs of your own model and data: how a network with exits attached from Python is saved so that
every command (`dart-ee evaluate`, `benchmark`, `adapt`, `export`...) can rebuild it.

A run folder stores weights, never code (``torch.load(weights_only=True)``). A registered model is
rebuilt from its name; a custom one from its **builder**: the ``nn.Module`` class that makes the
original network, named as ``"package.module:Class"`` or ``"path/to/file.py:Class"``, with JSON
keyword arguments, plus the cuts and head width ``attach_exits`` used. Loading a custom run imports
that class, as ``import`` would, so it is refused unless the user trusts the code (``--trust-code``,
``Run(path, trust_code=True)`` or ``with trust_code():``). The named file is parsed before it is
imported and must define that class, so a run folder cannot name a function (``os:system``) or a
module that acts on import; a relative path resolves inside the run folder.

    model = attach_exits(MyNet(), after=["layer1", "layer2"], example_input=x)   # builder: MyNet
    fit_exits(model, train_loader, val_loader, run_dir="runs/mine")            # config, model, metrics
    make_trace(model, cal_loader, "cal", estimator, run_dir="runs/mine")       # trace, estimator, images
    make_trace(model, test_loader, "test", estimator, run_dir="runs/mine")
    # then: dart-ee benchmark / adapt / export --run runs/mine --trust-code; calibrate, compare, evaluate on its traces
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
from torch import nn

from dart_ee.core import artifacts
from dart_ee.core.console import log
from dart_ee.core.errors import ArtifactError, ConfigError
from dart_ee.data.datasets import ImageSet
from dart_ee.models.coderef import check_trusted, import_builder
from dart_ee.models.net import MultiExitNet, attach_exits

if TYPE_CHECKING:
    from collections.abc import Iterable

CUSTOM = "custom"  # arch["name"] and config data.dataset of a run written from Python
IMAGES = "images_{split}.npz"  # a custom run's own images (uint8 x, int64 y), which benchmark and adapt read


def rebuild(arch: dict, base: Path | None = None, trusted: bool | None = None) -> MultiExitNet:
    """An untrained copy of a custom model from its ``arch`` record (load the state dict into it). Its builder
    and head are imported only when trusted (see ``import_builder``); relative paths resolve against ``base``."""
    if not arch.get("builder"):
        raise ArtifactError("this custom model records no builder, so it cannot be rebuilt; pass "
                            "builder='package.module:Class' to attach_exits or MultiExitNet.from_stages")
    check_trusted({"builder": arch["builder"], **({"head": arch["head"]} if arch.get("head") else {})}, base, trusted)
    cls = import_builder(arch["builder"], base, True)
    head = import_builder(arch["head"], base, True, "head") if arch.get("head") else None
    try:
        net = cls(**arch.get("builder_kwargs", {}))
    except TypeError as e:  # the class's signature changed since the run was saved
        raise ArtifactError(f"the builder {arch['builder']!r} no longer takes the arguments the run recorded "
                            f"({arch.get('builder_kwargs') or {}}): {e}; restore the class or train the run again") from e
    shape = (arch["in_channels"], arch["image_size"], arch["image_size"])
    if arch.get("after") is None:  # stages listed by hand: the builder makes the sequence of stages
        stages = list(cast("Iterable[nn.Module]", net))
        model = MultiExitNet.from_stages(stages, shape, arch["head_width"], builder=arch["builder"],
                                         builder_kwargs=arch.get("builder_kwargs"), head=head)
    else:
        model = attach_exits(net, arch["after"], input_shape=shape, head_width=arch["head_width"],
                             builder=arch["builder"], builder_kwargs=arch.get("builder_kwargs"), head=head)
    model.arch["head"] = arch.get("head")  # as recorded (the imported class's module name is a private one)
    return model


def check_rebuilds(model: MultiExitNet) -> None:
    """Refuse to save a custom model that commands could not load back (before anything is written). The user
    is running their own code here, so it is trusted."""
    if model.arch.get("name") != CUSTOM:
        return
    copy = rebuild(model.arch, trusted=True)
    mine, theirs = model.state_dict(), copy.state_dict()
    bad = [k for k in mine if k not in theirs or theirs[k].shape != mine[k].shape] + [k for k in theirs if k not in mine]
    if bad:
        raise ConfigError(f"the builder {model.arch['builder']!r} with {model.arch.get('builder_kwargs') or {}} makes a "
                          f"network whose weights do not match this model's (first: {bad[0]!r}); pass the "
                          "builder's keyword arguments to attach_exits(..., builder_kwargs={...})")


def save_images(path: Path, images: list[np.ndarray], labels: np.ndarray) -> bool:
    """Keep a custom run's images for the commands that run the model (benchmark, adapt, int8 export).

    Only uint8 pixels (or floats that are exactly k/255) are kept, so that the stored images give the
    very inputs the trace saw; returns whether they were written."""
    x = np.concatenate(images)
    if x.dtype != np.uint8:
        q = np.round(x.astype(np.float64) * 255)
        if not np.array_equal(q / 255, x.astype(np.float64)):
            log(f"[yellow]{path.parent}: the images are floats that uint8 cannot hold exactly, so they are not kept; "
                "`dart-ee benchmark`/`adapt` on this run need them (pass uint8 pixels to make_trace)[/yellow]")
            return False
        x = q.astype(np.uint8)
    y = np.asarray(labels, np.int64)
    artifacts.atomic_write(path, lambda p: np.savez(p.open("wb"), x=x, y=y))
    return True


def load_images(path: Path) -> ImageSet:
    try:
        with np.load(path) as z:
            x, y = z["x"], z["y"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{path} could not be read ({type(e).__name__}: {e}); it may be truncated: write it "
                            "again with make_trace(..., run_dir=...)") from e
    classes = tuple(str(c) for c in range(int(y.max()) + 1 if len(y) else 0))
    return ImageSet(x, y, classes)
