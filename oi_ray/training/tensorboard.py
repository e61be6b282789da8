"""TensorBoard event files of a training run (rank 0 writes them)."""

from pathlib import Path
from typing import Any

import torch

TENSORBOARD_DIR = "tensorboard"


class TensorBoardLog:
    """Event files under ``<results_dir>/tensorboard``: every numeric per-epoch metric as a
    scalar, and weight histograms every ``histogram_every`` epochs."""

    def __init__(self, results_dir: str | Path, histogram_every: int) -> None:
        from tensorboardX import SummaryWriter  # installed with ray[tune]

        self.writer = SummaryWriter(logdir=str(Path(results_dir) / TENSORBOARD_DIR))
        self.histogram_every = max(1, histogram_every)

    def epoch_done(self, metrics: dict[str, Any], net: torch.nn.Module) -> None:
        """Log one epoch's metrics (and, every few epochs, ``net``'s weights)."""
        epoch = metrics["epoch"]
        for name, value in metrics.items():
            if name != "epoch" and isinstance(value, int | float):
                self.writer.add_scalar(name, value, epoch)
        if epoch % self.histogram_every == 0:
            for name, parameter in net.named_parameters():
                self.writer.add_histogram(f"weights/{name}", parameter.detach().float().cpu().numpy(), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
