"""From the pipeline's uint8 pictures to the float32 model input, on the model's device."""

import numpy as np
import torch

from oi_ray.data.assemble import InputGeometry


class InputNormalizer:
    """TAO's input transform: ``(B, H', W', 3)`` uint8 -> ``(B, 3, H', W')`` float32.

    ``(x / 255 - mean) / std`` per RGB channel, computed on ``device`` after the (4x smaller)
    uint8 copy. ``channels_last`` keeps the NHWC memory layout for convolutions that prefer it.
    """

    def __init__(self, geometry: InputGeometry, device: torch.device | str = "cpu", *,
                 channels_last: bool = False) -> None:
        self.device = torch.device(device)
        std = torch.tensor(geometry.std, dtype=torch.float32, device=self.device)
        mean = torch.tensor(geometry.mean, dtype=torch.float32, device=self.device)
        self._scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
        self._shift = (-mean / std).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, pictures: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalise one batch of pictures; the result lives on ``self.device``."""
        if isinstance(pictures, np.ndarray):  # Ray hands out read-only views; torch wants writable
            pictures = torch.from_numpy(np.require(pictures, requirements="W"))
        batch = pictures.to(self.device, non_blocking=True)
        nchw = batch.permute(0, 3, 1, 2).to(torch.float32)
        return torch.addcmul(self._shift, nchw, self._scale).contiguous(memory_format=self.memory_format)
