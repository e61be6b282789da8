"""One training epoch on one rank: the optimisation steps, and the ranks' agreement to go on.

Every few steps the ranks agree (one small all-reduce on their device) on whether to go on: a
non-finite loss on any rank, or a stop asked for with Ctrl-C, ends the run on every rank at the
same step. That is the only host sync of the epoch besides the progress bar's loss.
"""

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from oi_ray.model.inputs import InputNormalizer
from oi_ray.training.early_end import Diverged, EarlyEnd, Stopped
from oi_ray.training.progress import ProgressFeed
from oi_ray.training.step import Batch, PairModel, Precision, StepRule, training_steps

CHECK_EVERY_STEPS = 10  # ranks agree on going on, rank 0 updates the progress bar (one host sync)


@dataclass(frozen=True)
class EpochOutcome:
    """What one epoch's optimisation steps gave, the same on every rank."""

    steps: int
    mean_loss: float  # over every rank's steps
    ended: EarlyEnd | None  # the run ends here, before this epoch's checkpoint


@dataclass
class EpochRunner:
    """Runs one epoch of :func:`training_steps` on this rank's batches."""

    model: PairModel  # the pair distance, DDP-wrapped when world > 1
    optimizer: torch.optim.Optimizer
    rule: StepRule
    precision: Precision
    normalize: InputNormalizer
    batch_size: int
    progress: ProgressFeed | None  # rank 0 only
    world: int

    def run(self, batches: Iterator[dict[str, np.ndarray]], epoch: int, steps: int) -> EpochOutcome:
        """Train on ``steps`` batches unless the ranks agree to end the run early."""
        device = self.normalize.device
        self.normalize.start_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        healthy = torch.ones((), dtype=torch.bool, device=device)  # every loss so far was finite
        healthy_steps = torch.zeros((), dtype=torch.int64, device=device)
        step = 0
        losses = training_steps(self.model, self.optimizer, self._tensors(batches), self.rule, self.precision,
                                epoch=epoch, steps=steps)
        for step, loss in enumerate(losses, start=1):
            loss_sum += loss
            healthy &= torch.isfinite(loss)
            healthy_steps += healthy
            if step % CHECK_EVERY_STEPS == 0 or step == steps:
                if self.progress is not None:
                    pairs = self.batch_size * self.world
                    self.progress.step(epoch, step * pairs, steps * pairs, loss.item())
                ended = self._agree_to_end(healthy, healthy_steps, epoch, steps)
                if ended is not None:
                    return EpochOutcome(step, float("nan"), ended)
        return EpochOutcome(step, _mean_over_ranks(loss_sum, step, self.world), None)

    def _tensors(self, batches: Iterator[dict[str, np.ndarray]]) -> Iterator[Batch]:
        device = self.normalize.device
        for batch in batches:
            target = torch.from_numpy(batch["target"].copy()).to(device, non_blocking=True)
            yield self.normalize(batch["test"]), self.normalize(batch["golden"]), target

    def _agree_to_end(self, healthy: torch.Tensor, healthy_steps: torch.Tensor, epoch: int,
                      steps: int) -> EarlyEnd | None:
        """One all-reduce (on this rank's device) of: a non-finite loss anywhere, the first step
        that had one, and a stop request (rank 0 asks the driver). Same answer on every rank.

        The first bad step travels negated so that MAX finds the earliest: a healthy rank's
        ``-(steps so far + 1)`` is below every bad rank's ``-first_bad``.
        """
        stop = self.progress is not None and self.progress.stop_requested()
        flags = torch.stack([(~healthy).to(torch.float64), -(healthy_steps + 1).to(torch.float64),
                             healthy.new_tensor(float(stop), dtype=torch.float64)])
        if self.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        diverged, first_bad, stopped = flags.tolist()
        if diverged:
            return Diverged(epoch, int(-first_bad), steps)
        if stopped:
            return Stopped(epoch)
        return None


def _mean_over_ranks(loss_sum: torch.Tensor, steps: int, world: int) -> float:
    """The mean loss over every rank's steps, all-reduced on the loss's own device (NCCL needs it)."""
    totals = torch.stack([loss_sum.detach().double(), loss_sum.new_tensor(float(steps), dtype=torch.float64)])
    if world > 1:
        dist.all_reduce(totals)
    total_loss, total_steps = totals.tolist()
    return total_loss / total_steps if total_steps > 0 else float("nan")
