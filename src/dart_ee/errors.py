"""Errors raised by dart-ee. Every message names the file or field at fault and says what to do."""


class DartError(Exception):
    """Base class for every error dart-ee raises on bad input."""


class DataError(DartError):
    """A dataset file or directory is missing, malformed or inconsistent."""


class ConfigError(DartError):
    """A config file or override is invalid."""


class ArtifactError(DartError):
    """A saved artifact (checkpoint, trace, policy) is missing, corrupt or of the wrong version."""


class InputError(DartError):
    """A tensor handed to the API has the wrong shape, dtype or non-finite values."""


class RunLockedError(DartError):
    """Another process is writing to the same run folder."""
