"""``python -m dart_ee`` is the ``dart-ee`` command (for environments where the script is not on PATH)."""

from dart_ee.cli import app

app(prog_name="dart-ee")
