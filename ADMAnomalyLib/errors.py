"""Exceptions raised by the engine.

Every user-facing failure is an :class:`ADMError` subclass with a one-line message that names the
file or value at fault, so the CLI and the Slicer module can show it without a traceback.
"""

from __future__ import annotations


class ADMError(Exception):
    """Base class of every error the engine reports to a user."""

    exit_code = 1


class InputError(ADMError):
    """An input image, case or folder cannot be used (missing, mismatched, malformed)."""

    exit_code = 2


class GridMismatchError(InputError):
    """The volumes of one case do not share one voxel grid."""


class ModelFileError(ADMError):
    """A model file is missing, truncated, corrupt, of another version or not an ADMAnomaly model."""

    exit_code = 3


class TrainingDataError(InputError):
    """A training folder holds no usable normal slice."""


class OutputError(ADMError):
    """An output location cannot be written."""

    exit_code = 4


class DeviceError(ADMError):
    """A requested compute device is not available."""

    exit_code = 5


class CancelledError(ADMError):
    """The caller cancelled a running job."""

    exit_code = 130
