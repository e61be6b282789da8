"""The learning rate at each optimisation step (``train.optim.lr_schedule``).

A pure function of how far training has come, so a resumed or restarted run takes the same
rate at the same step without any scheduler state in the checkpoint.
"""

import math

import torch

from oi_ray.config.schema import LrSchedule, OptimConfig


def learning_rate(optim: OptimConfig, progress: float) -> float:
    """The rate after ``progress`` (0 at the first step, 1 at the end) of all training:
    ``constant`` (TAO's) is ``optim.lr`` throughout; ``cosine`` falls from ``optim.lr`` to 0
    along half a cosine."""
    if optim.lr_schedule == LrSchedule.COSINE:
        return optim.lr * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return optim.lr


def training_progress(epoch: int, step: int, steps: int, num_epochs: int) -> float:
    """Share of training done before ``step`` (0-based) of ``steps`` in 1-based ``epoch``."""
    return (epoch - 1 + step / max(steps, 1)) / num_epochs


def set_learning_rate(optimizer: torch.optim.Optimizer, rate: float) -> None:
    """Every parameter group of ``optimizer`` takes ``rate``."""
    for group in optimizer.param_groups:
        group["lr"] = rate
