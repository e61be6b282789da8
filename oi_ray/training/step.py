"""TAO's Siamese optimisation step as a plain function: no Ray, no files, no distributed state.

``oi-ray train``'s Ray Train workers, the benchmarks' bare PyTorch loop and the parity tests
all train through :func:`training_steps`, so the loss, the precision handling, gradient
clipping and the learning-rate schedule are written once.
"""

from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from oi_ray.config.schema import ExperimentConfig, OptimConfig, OptimizerType
from oi_ray.model.loss import contrastive_loss
from oi_ray.training.schedule import learning_rate, set_learning_rate, training_progress

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # normalised test, golden; 0/1 targets
PairModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (test, golden) -> distance (B,)


class Precision:
    """Optional autocast (bf16 on CPU, fp16 with gradient scaling on CUDA) and the optimizer step."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.device_type = device.type
        self.enabled = enabled
        self.dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled and device.type == "cuda")

    def autocast(self) -> AbstractContextManager:
        """The context the forward pass runs in."""
        if not self.enabled:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                          clip_grad_norm: float) -> None:
        """Backpropagate ``loss``, clip the gradients of every optimised parameter to
        ``clip_grad_norm`` (0: no clipping) and take the optimizer's step."""
        self.scaler.scale(loss).backward()
        if clip_grad_norm > 0:
            self.scaler.unscale_(optimizer)
            parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
            torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()


@dataclass(frozen=True)
class StepRule:
    """How each step trains: the loss's margin, gradient clipping and the learning-rate schedule."""

    margin: float
    optim: OptimConfig
    num_epochs: int
    clip_grad_norm: float = 0.0

    @classmethod
    def of(cls, config: ExperimentConfig) -> "StepRule":
        """The spec's rule: ``model.margin``, ``train.optim``, ``num_epochs`` and ``clip_grad_norm``."""
        train = config.train
        return cls(config.model.margin, train.optim, train.num_epochs, train.clip_grad_norm)


def training_steps(model: PairModel, optimizer: torch.optim.Optimizer, batches: Iterable[Batch],
                   rule: StepRule, precision: Precision, *, epoch: int, steps: int) -> Iterator[torch.Tensor]:
    """Train on each of ``batches`` (``steps`` of them make 1-based ``epoch``) in turn; yield
    each step's loss, detached and left on its device (reading it is the caller's host sync).

    Each step sets the schedule's learning rate, runs the forward pass under ``precision``,
    takes the contrastive loss (in float32) and the optimizer's step."""
    for step, (test, golden, target) in enumerate(batches):
        set_learning_rate(optimizer, learning_rate(rule.optim, training_progress(epoch, step, steps,
                                                                                 rule.num_epochs)))
        with precision.autocast():
            distance = model(test, golden)
        loss = contrastive_loss(distance.float(), target, rule.margin)
        optimizer.zero_grad(set_to_none=True)
        precision.backward_and_step(loss, optimizer, rule.clip_grad_norm)
        yield loss.detach()


def make_optimizer(parameters: Iterable[torch.nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    """TAO's rule: ``Adam`` -> Adam(lr) without weight decay; ``SGD`` -> SGD(lr, momentum, wd)."""
    if optim.type == OptimizerType.ADAM:
        return torch.optim.Adam(parameters, lr=optim.lr)
    return torch.optim.SGD(parameters, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Restore the saved moments and step counts, keeping the spec's hyperparameters: a rerun
    with a new ``train.optim.lr`` trains with it (``load_state_dict`` alone would restore the old one)."""
    from_spec = [{key: value for key, value in group.items() if key != "params"}
                 for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, hyperparameters in zip(optimizer.param_groups, from_spec, strict=True):
        group.update(hyperparameters)
