"""Why the workers ended a training run before its last epoch (rank 0 tells the driver)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Stopped:
    """The user asked the run to stop (Ctrl-C) during ``epoch``."""

    epoch: int


@dataclass(frozen=True)
class Diverged:
    """The loss became NaN or infinite at ``step`` of ``steps`` in ``epoch`` (on some rank)."""

    epoch: int
    step: int
    steps: int


EarlyEnd = Stopped | Diverged
