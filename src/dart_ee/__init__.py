"""dart-ee: DART, difficulty-aware adaptive thresholds for early-exit networks."""

from typing import Any

from dart_ee.core.errors import ArtifactError, ConfigError, DartError, DataError, InputError, UntrustedCodeError
from dart_ee.core.trust import trust_code

__version__ = "0.1.0"
__all__ = ["ArtifactError", "ConfigError", "DartError", "DataError", "InputError", "MultiExitNet",
           "UntrustedCodeError", "attach_exits", "create_model", "list_models", "trust_code", "__version__"]
_MODELS = ("MultiExitNet", "attach_exits", "create_model", "list_models")


def __getattr__(name: str) -> Any:
    """The model API loads torch on first use, so that ``dart_ee.deploy.onnx_runner`` can serve without it."""
    if name in _MODELS:
        from dart_ee.models import net as models

        return getattr(models, name)
    raise AttributeError(f"module 'dart_ee' has no attribute {name!r}")
