"""TAO's contrastive loss on pair distances."""

import torch


def contrastive_loss(distance: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """``mean((1 - y) d^2 + y clamp(margin - d, 0)^2)`` with ``y = 1`` for defect pairs.

    PASS pairs are pulled together; defect pairs are pushed at least ``margin`` apart.
    """
    target = target.to(distance.dtype)
    pull = (1 - target) * distance.pow(2)
    push = target * torch.clamp(margin - distance, min=0.0).pow(2)
    return torch.mean(pull + push)
