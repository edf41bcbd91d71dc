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

import ast
import hashlib
import importlib
import importlib.util
import inspect
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from torch import nn

from dart_ee import artifacts
from dart_ee.console import log
from dart_ee.data import ImageSet
from dart_ee.errors import ArtifactError, ConfigError, UntrustedCodeError
from dart_ee.trust import code_trusted

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


def _locate(ref: str, base: Path | None) -> tuple[str, Path | None, list[str]]:
    """``(module or file, the source file, qualname parts)`` of a reference; a relative file path is
    resolved against ``base`` (the run folder), never against the current directory."""
    where, sep, qualname = ref.rpartition(":")
    if not sep or not where or not qualname or not all(p.isidentifier() for p in qualname.split(".")):
        raise ConfigError(f"builder {ref!r}: expected 'package.module:Class' or 'path/to/file.py:Class'")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_absolute() and base is not None:
            path = base / path
        return str(path), path.resolve(), qualname.split(".")
    if not all(p.isidentifier() for p in where.split(".")):
        raise ConfigError(f"builder {ref!r}: {where!r} is not a module name")
    return where, None, qualname.split(".")


def _defines_class(source: Path, parts: list[str]) -> bool:
    """Whether the file defines the (nested) class by a ``class`` statement: checked by parsing, before any of
    its code runs, so that a run cannot name a function (``os:system``) or a module that acts on import."""
    try:
        body: list[ast.stmt] = ast.parse(source.read_bytes(), str(source)).body
    except (OSError, SyntaxError, ValueError):
        return False
    for part in parts:
        found = [n for n in body if isinstance(n, ast.ClassDef) and n.name == part]
        if not found:
            return False
        body = found[-1].body
    return True


def check_trusted(refs: dict[str, str], base: Path | None = None, trusted: bool | None = None) -> None:
    """Refuse (``UntrustedCodeError``, naming every class and file) unless ``trusted`` (default: inside
    ``dart_ee.trust_code()``): nothing named is imported before the user opts in."""
    if code_trusted() if trusted is None else trusted:
        return
    named = []
    for what, ref in refs.items():
        where, source, parts = _locate(ref, base)
        named.append(f"{what} class {'.'.join(parts)!r} from {source or where}")
    raise UntrustedCodeError(
        f"it names code to import ({'; '.join(named)}). dart-ee never runs code that a run folder names unless you "
        "trust it: if you wrote that code or trust it, pass --trust-code (Python: Run(path, trust_code=True) or "
        "`with dart_ee.trust_code():`)")


def import_builder(ref: str, base: Path | None = None, trusted: bool | None = None, what: str = "builder") -> type[nn.Module]:
    """The ``nn.Module`` class a reference names. Refused (``UntrustedCodeError``) unless ``trusted`` (default:
    inside ``trust_code()``); the file is parsed, not run, to check that it defines that class; then imported."""
    where, source, parts = _locate(ref, base)
    check_trusted({what: ref}, base, trusted)
    if source is None:  # a module: find its file without running it (a package's parents are imported)
        try:
            spec = importlib.util.find_spec(where)
        except (ImportError, ValueError) as e:
            raise ConfigError(f"cannot find the module of {what} {ref!r} ({e}); install your package or set "
                              "PYTHONPATH") from e
        if spec is None:
            raise ConfigError(f"cannot find the module of {what} {ref!r}; install your package or set PYTHONPATH")
        if not (spec.origin and spec.origin.endswith(".py")):
            raise ConfigError(f"{what} {ref!r}: {where} has no Python source to check that it defines the class; a "
                              "run names an nn.Module class written in Python")
        origin = Path(spec.origin)
    else:
        if not source.is_file():
            raise ConfigError(f"{what} {ref!r}: no file {source}")
        origin = source
    if not _defines_class(origin, parts):
        raise ConfigError(f"{what} {ref!r}: {origin} defines no class {'.'.join(parts)!r}; a run names the class "
                          "that builds its network, never a function or a module to run")
    try:
        obj: Any = _module(where, source)
        for part in parts:
            obj = getattr(obj, part)
    except Exception as e:  # import errors of the user's code come in every type
        raise ConfigError(f"cannot import the {what} {ref!r} ({type(e).__name__}: {e}); make that module "
                          "importable (install your package, or set PYTHONPATH) and try again") from e
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)):
        raise ConfigError(f"{what} {ref!r} is not an nn.Module class; a run names the class that builds its "
                          "network, never a function to call")
    return obj


def _module(where: str, source: Path | None) -> ModuleType:
    """The module, imported once per process. The script being run is the module already running (importing
    its file again would run a script without a main guard twice)."""
    if source is None:
        return importlib.import_module(where)
    main = sys.modules.get("__main__")
    main_file = getattr(main, "__file__", None)
    if main is not None and isinstance(main_file, str) and Path(main_file).resolve() == source:
        return main
    name = f"dart_ee_builder_{hashlib.sha256(str(source).encode()).hexdigest()[:12]}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, source)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return module


def rebuild(arch: dict, base: Path | None = None, trusted: bool | None = None) -> MultiExitNet:
    """An untrained copy of a custom model from its ``arch`` record (load the state dict into it). Its builder
    and head are imported only when trusted (see ``import_builder``); relative paths resolve against ``base``."""
    from dart_ee.models import MultiExitNet, attach_exits

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
