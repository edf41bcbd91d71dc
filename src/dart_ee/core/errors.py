"""Errors raised by dart-ee. Every message names the file or field at fault and says what to do."""


class DartError(Exception):
    """Base class for every error dart-ee raises on bad input.

    Raised in a DataLoader worker, torch re-raises it in the main process as ``type(e)(message)`` with the
    worker's whole traceback as the message; the original one line is recovered here, so that the user
    reads the same error whether the data is decoded in a worker or in memory.
    """

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught ") and "Original Traceback" in args[0]:
            tag = f"{type(self).__module__}.{type(self).__qualname__}: "
            head, sep, tail = args[0].rpartition(tag)
            if sep:
                args = (tail.strip(),)
        super().__init__(*args)


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


class UntrustedCodeError(DartError):
    """An artifact names code to import, and the user has not said that they trust it (``--trust-code``)."""


def check_batch(images: object, batch_size: object) -> None:
    """A runner's ``run(images, batch_size)`` arguments: at least one image, a positive integer batch size."""
    if not hasattr(images, "__len__") or len(images) == 0:  # type: ignore[arg-type]
        raise InputError("no images to run: pass at least one")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
