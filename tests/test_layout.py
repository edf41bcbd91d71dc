"""The package's shape, checked: layers that only point down (import-linter's contract in pyproject.toml, also run
by CI as `lint-imports`), no function-local import of dart_ee's own modules outside a short allow-list, and
functions short enough to read (ruff's C901 and PLR0915 check complexity and statements; this checks length)."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dart_ee"
MAX_LINES = 80
# the only modules whose functions import dart_ee modules lazily, and why
LAZY = {
    "__init__.py": "`import dart_ee` loads no torch, so the onnxruntime runner serves without it",
    "config.py": "validating a config names the shift families without importing torch (the CLI starts fast)",
    "serve/engine.py": "a server of an export runs in a process without torch; the torch engine loads it when built",
    "cli/": "each command imports its library code when it runs: `dart-ee --help`, `publish` and the "
            "torch-free commands start without torch",
}


def _functions(path: Path):
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_is_longer_than_80_lines():
    long = [f"{p.relative_to(SRC)}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
            for p in sorted(SRC.rglob("*.py")) for fn in _functions(p) if fn.end_lineno - fn.lineno + 1 > MAX_LINES]
    assert not long, f"split these into named steps: {long}"


def test_dart_ee_modules_are_imported_at_the_top_of_a_module_except_where_laziness_is_the_point():
    found = []
    for p in sorted(SRC.rglob("*.py")):
        rel = p.relative_to(SRC).as_posix()
        if any(rel == k or (k.endswith("/") and rel.startswith(k)) for k in LAZY):
            continue
        for fn in _functions(p):
            found += [f"{rel}:{n.lineno} in {fn.name}: from {n.module} import ..." for n in ast.walk(fn)
                      if isinstance(n, ast.ImportFrom) and n.module and n.module.split(".")[0] == "dart_ee"]
    assert not found, ("import these at the top of the module (layers only point down, so a cycle cannot hide); "
                       f"or add the module to LAZY with its reason: {found}")


def _lint_imports(package_root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    return subprocess.run([exe, "--no-cache"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_layers_contract_holds_and_fails_on_an_upward_import(tmp_path):
    kept = _lint_imports(ROOT / "src")
    assert kept.returncode == 0 and "KEPT" in kept.stdout, kept.stdout[-2000:] + kept.stderr[-2000:]
    copy = tmp_path / "src"
    shutil.copytree(SRC, copy / "dart_ee", ignore=shutil.ignore_patterns("__pycache__"))
    low = copy / "dart_ee" / "core" / "artifacts.py"
    low.write_text(low.read_text() + "\n\ndef _upward():\n    from dart_ee.bench.benchmark import benchmark\n\n"
                   "    return benchmark\n")
    broken = _lint_imports(copy)
    assert broken.returncode != 0 and "BROKEN" in broken.stdout, broken.stdout[-2000:]
    assert "dart_ee.core.artifacts -> dart_ee.bench.benchmark" in broken.stdout, broken.stdout[-2000:]


def test_the_package_imports_without_torch_for_serving():
    code = ("import sys, dart_ee, dart_ee.cli, dart_ee.deploy.onnx_runner, dart_ee.bench.timing; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
