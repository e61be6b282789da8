"""Errors a user can cause and fix.

The CLI prints an :class:`OiRayError` as one clear message and exits non-zero; any other
exception is a bug and keeps its traceback.
"""


class OiRayError(Exception):
    """Base class for errors caused by user input or environment."""

    exit_code = 1  # what the CLI exits with

    def __init__(self, message: str) -> None:
        super().__init__(message)
        # Kept apart from ``args``: Ray appends retry advice to the args of task errors.
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(OiRayError):
    """A spec file or override is invalid (unknown key, bad value, missing field)."""


class DataError(OiRayError):
    """A dataset CSV or image is invalid, missing or unreadable."""


class ImageSizeError(DataError):
    """An image has another size than the model takes, and resizing it is turned off."""


class BackendUnavailableError(OiRayError):
    """An optional runtime (TensorRT, CUDA) is not installed or has no device."""


class TrainingDivergedError(OiRayError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class TaskInterrupted(OiRayError):
    """The user stopped the task (Ctrl-C); nothing half-written is left behind."""

    exit_code = 130  # 128 + SIGINT, as shells report it


def find_user_error(error: BaseException) -> OiRayError | None:
    """The OiRayError behind ``error``, unwrapping Ray task errors and exception chains."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # a Ray task error wraps the original here
        if isinstance(current, OiRayError) and not isinstance(cause, OiRayError):
            return current
        pending.extend([current.__context__, current.__cause__, cause])
    return None
