"""Errors a user can cause and fix.

The CLI prints an :class:`OiRayError` as one clear message and exits non-zero; any other
exception is a bug and keeps its traceback.
"""


class OiRayError(Exception):
    """Base class for errors caused by user input or environment."""


class ConfigError(OiRayError):
    """A spec file or override is invalid (unknown key, bad value, missing field)."""


class DataError(OiRayError):
    """A dataset CSV or image is invalid, missing or unreadable."""


class BackendUnavailableError(OiRayError):
    """An optional runtime (TensorRT, CUDA) is not installed or has no device."""


class TaskNotImplementedError(OiRayError):
    """The task exists in the CLI but is not built yet."""
