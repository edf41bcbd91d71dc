"""The package's shape, checked: functions short enough to read (ruff's C901 and PLR0915 check complexity and
statements; this checks length, docstrings included)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dart_ee"
MAX_LINES = 80


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"split these into named steps: {long}"
