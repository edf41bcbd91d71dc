"""The ``dart-ee`` command line: one module per command group, each command parsing its options and calling the
library. The groups register their commands on ``app`` when imported here."""

from dart_ee.cli import runs, measure, calibrate, deploy, adapt, serve  # noqa: F401, I001  (registers the commands in this order)
from dart_ee.cli.app import app, main

__all__ = ["app", "main"]
