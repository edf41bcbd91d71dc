"""Code named by reference: the ``nn.Module`` class that rebuilds a network, as ``"package.module:Class"`` or
``"path/to/file.py:Class"``. Importing it runs its module, so nothing is imported unless the user trusts it
(``dart_ee.core.trust``); the file is parsed first and must define that class by a ``class`` statement, and a
relative path resolves against the folder that named it (a run folder), never the current directory.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from dart_ee.core.errors import ConfigError, UntrustedCodeError
from dart_ee.core.trust import code_trusted


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
