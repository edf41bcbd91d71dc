"""Runs of your own model and data: how a network with exits attached from Python is saved so that
every command (`dart-ee evaluate`, `benchmark`, `adapt`, `export`...) can rebuild it.

A run folder stores weights, never code (``torch.load(weights_only=True)``). A registered model is
rebuilt from its name; a custom one from its **builder**: the ``nn.Module`` class that makes the
original network, named as ``"package.module:Class"`` or ``"path/to/file.py:Class"``, with JSON
keyword arguments, plus the cuts and head width ``attach_exits`` used. Loading a custom run imports
that class, as ``import`` would: load custom runs whose code you trust. Only ``nn.Module`` classes
are accepted, so a run folder cannot name an arbitrary function (``os:system``) to call.

    model = attach_exits(MyNet(), after=["layer1", "layer2"], example_input=x)   # builder: MyNet
    fit_exits(model, train_loader, val_loader, run_dir="runs/mine")            # config, model, metrics
    make_trace(model, cal_loader, "cal", estimator, run_dir="runs/mine")       # trace, estimator, images
    make_trace(model, test_loader, "test", estimator, run_dir="runs/mine")
    # then: dart-ee benchmark / adapt / export --run runs/mine; calibrate, compare, evaluate on its traces
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from torch import nn

from dart_ee import artifacts
from dart_ee.console import log
from dart_ee.data import ImageSet
from dart_ee.errors import ArtifactError, ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from dart_ee.models import MultiExitNet

CUSTOM = "custom"  # arch["name"] and config data.dataset of a run written from Python
IMAGES = "images_{split}.npz"  # a custom run's own images (uint8 x, int64 y), which benchmark and adapt read


def builder_ref(cls: type[nn.Module] | str) -> str | None:
    """``"module:Class"`` (or ``"file.py:Class"`` for a class defined in the script being run) naming an
    ``nn.Module`` class; ``None`` when it cannot be named (checked again when the run is saved)."""
    if isinstance(cls, str):
        return cls
    module = cls.__module__
    if module == "__main__":  # a script: name its file, which imports without running its __main__ block
        main = getattr(sys.modules["__main__"], "__file__", None)
        return f"{Path(main).resolve()}:{cls.__qualname__}" if main else None
    return f"{module}:{cls.__qualname__}"


def import_builder(ref: str) -> type[nn.Module]:
    """The ``nn.Module`` class a builder reference names, with an error that says how to make it importable."""
    where, sep, qualname = ref.rpartition(":")
    if not sep or not where or not qualname:
        raise ConfigError(f"builder {ref!r}: expected 'package.module:Class' or 'path/to/file.py:Class'")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            name = f"dart_ee_builder_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
            module = sys.modules.get(name)
            if module is None:
                spec = importlib.util.spec_from_file_location(name, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        obj: Any = module
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # import errors of the user's code come in every type
        raise ConfigError(f"cannot import the model builder {ref!r} ({type(e).__name__}: {e}); make that module "
                          "importable (install your package, or set PYTHONPATH) and try again") from e
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
        raise ConfigError(f"builder {ref!r} is not an nn.Module class; a run names the class that builds its "
                          "network, never a function to call")
    return obj


def rebuild(arch: dict) -> MultiExitNet:
    """An untrained copy of a custom model from its ``arch`` record (load the state dict into it)."""
    from dart_ee.models import MultiExitNet, attach_exits

    if not arch.get("builder"):
        raise ArtifactError("this custom model records no builder, so it cannot be rebuilt; pass "
                            "builder='package.module:Class' to attach_exits or MultiExitNet.from_stages")
    net = import_builder(arch["builder"])(**arch.get("builder_kwargs", {}))
    shape = (arch["in_channels"], arch["image_size"], arch["image_size"])
    if arch.get("after") is None:  # stages listed by hand: the builder makes the sequence of stages
        stages = list(cast("Iterable[nn.Module]", net))
        return MultiExitNet.from_stages(stages, shape, arch["head_width"], builder=arch["builder"],
                                        builder_kwargs=arch.get("builder_kwargs"), head=arch.get("head"))
    return attach_exits(net, arch["after"], input_shape=shape, head_width=arch["head_width"],
                        builder=arch["builder"], builder_kwargs=arch.get("builder_kwargs"), head=arch.get("head"))


def check_rebuilds(model: MultiExitNet) -> None:
    """Refuse to save a custom model that commands could not load back (before anything is written)."""
    if model.arch.get("name") != CUSTOM:
        return
    copy = rebuild(model.arch)
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
