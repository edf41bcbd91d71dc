"""dart-ee: DART, difficulty-aware adaptive thresholds for early-exit networks."""

from dart_ee.errors import ArtifactError, ConfigError, DartError, DataError, InputError
from dart_ee.models import MultiExitNet, attach_exits, create_model, list_models

__version__ = "0.1.0"
__all__ = ["ArtifactError", "ConfigError", "DartError", "DataError", "InputError", "MultiExitNet",
           "attach_exits", "create_model", "list_models", "__version__"]
