"""One exception hierarchy for cxr-triage.

Every error raised on purpose by ``triage_core`` (and by the packages built on it) derives from
:class:`TriageError`, so callers at a boundary (the C-STORE handler, the CLI) can catch exactly
our errors and let programming errors surface.
"""

from __future__ import annotations


class TriageError(Exception):
    """Base class of every error cxr-triage raises on purpose."""


class ImageReadError(TriageError):
    """An input file or dataset could not be read or decoded.

    The message names the file (when known) and the cause.
    """

    def __init__(self, source: str, cause: str) -> None:
        self.source = source
        self.cause = cause
        super().__init__(f"{source}: {cause}")


class NotDicomError(ImageReadError):
    """The file is neither DICOM nor a supported raster image."""


class TruncatedFileError(ImageReadError):
    """The file ends before its declared content (a partial transfer or copy)."""


class PixelDecodeError(ImageReadError):
    """The pixel data is present but cannot be decoded (codec missing or corrupt stream)."""


class UnsupportedImageError(ImageReadError):
    """The image is readable but of a kind we do not handle (e.g. colour, multi-frame)."""


class CheckpointError(TriageError):
    """A checkpoint is missing, malformed or inconsistent with its ``ModelSpec``."""


class SpecMismatchError(CheckpointError):
    """A ``ModelSpec`` field is invalid or does not match what was expected.

    ``field`` names the offending field.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"ModelSpec field '{field}': {message}")


class PretrainedWeightsError(CheckpointError):
    """ImageNet weights were requested but cannot be obtained (offline, missing file)."""


class ConfigError(TriageError):
    """Invalid settings (bad port, unwritable storage, unreachable database...)."""


class InvalidUIDError(TriageError):
    """A DICOM UID that breaks the UID grammar (PS3.5 section 9.1)."""


class WorklistError(TriageError):
    """A worklist (database) operation failed or was refused."""


class DeliveryError(TriageError):
    """A result object could not be sent to a destination."""


class DicomOutputError(TriageError):
    """An SR or SC dataset could not be built from the given inputs."""


class CommandError(TriageError):
    """A ``triage`` subcommand cannot do what it was asked; ``status`` is the exit status.

    Commands raise it with a message for the operator (no traceback, no patient data); the
    console script (``dicom_node.cli.main``) prints ``triage CMD: error: MESSAGE`` once and exits
    with ``status``. It lives here, not in ``dicom_node``, so that the training commands raise
    the same error.
    """

    def __init__(self, message: str, status: int = 1) -> None:
        if status == 0:
            raise ValueError("a CommandError needs a non-zero exit status")
        self.status = status
        super().__init__(message)
