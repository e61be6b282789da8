"""From the pipeline's uint8 pictures to the float32 model input, on the model's device."""

import numpy as np
import torch

from oi_ray.config.schema import DatasetConfig
from oi_ray.data.assemble import InputGeometry


class LightingGain:
    """oi-ray's photometric training augmentation: each lighting image of a side times its own
    gain from U[1 - spread, 1 + spread], clipped to 0..255 as a sensor clips.

    Drawn for the test and the golden side separately: a lamp drifts between the golden's shot
    and the test's, which TAO's colour jitter (one draw for both sides) does not show the model.
    Seeded per epoch (:meth:`start_epoch`), so a resumed run draws what an unbroken one does.
    """

    def __init__(self, geometry: InputGeometry, spread: float, seed: tuple[int, ...]) -> None:
        self.rows, self.columns = geometry.tiles
        self.spread = spread
        self.seed = seed
        self.generator = torch.Generator()
        self.start_epoch(1)

    @classmethod
    def of(cls, dataset: DatasetConfig, seed: tuple[int, ...]) -> "LightingGain | None":
        """The spec's ``dataset.augmentation_config.lighting_gain``; None when it is 0 (off)."""
        spread = dataset.augmentation_config.lighting_gain
        return cls(InputGeometry.from_config(dataset), spread, seed) if spread > 0 else None

    def start_epoch(self, epoch: int) -> None:
        """Draw the gains of ``epoch`` from here on."""
        self.generator.manual_seed(int(np.random.SeedSequence((*self.seed, epoch)).generate_state(1)[0]))

    def __call__(self, pictures: torch.Tensor) -> torch.Tensor:
        """``(B, H', W', 3)`` pictures (any device) -> the same, float32, each lighting image gained."""
        batch, height, width, channels = pictures.shape
        gains = torch.rand(batch, self.rows, 1, self.columns, 1, 1, generator=self.generator)
        gains = (1 + self.spread * (2 * gains - 1)).to(pictures.device)
        tiles = pictures.to(torch.float32).view(batch, self.rows, height // self.rows, self.columns,
                                                width // self.columns, channels)
        return (tiles * gains).clamp_(0, 255).view(batch, height, width, channels)


class InputNormalizer:
    """TAO's input transform: ``(B, H', W', 3)`` uint8 -> ``(B, 3, H', W')`` float32.

    ``(x / 255 - mean) / std`` per RGB channel, computed on ``device`` after the (4x smaller)
    uint8 copy. ``channels_last`` keeps the NHWC memory layout for convolutions that prefer it.
    ``gain``: training only, :class:`LightingGain` applied on ``device`` first.
    """

    def __init__(self, geometry: InputGeometry, device: torch.device | str = "cpu", *,
                 channels_last: bool = False, gain: LightingGain | None = None) -> None:
        self.device = torch.device(device)
        std = torch.tensor(geometry.std, dtype=torch.float32, device=self.device)
        mean = torch.tensor(geometry.mean, dtype=torch.float32, device=self.device)
        self._scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
        self._shift = (-mean / std).view(1, 3, 1, 1)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.gain = gain

    def start_epoch(self, epoch: int) -> None:
        """Training: draw ``epoch``'s augmentation from here on (nothing to do without one)."""
        if self.gain is not None:
            self.gain.start_epoch(epoch)

    def __call__(self, pictures: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Normalise one batch of pictures; the result lives on ``self.device``."""
        if isinstance(pictures, np.ndarray):  # Ray hands out read-only views; torch wants writable
            pictures = torch.from_numpy(np.require(pictures, requirements="W"))
        batch = pictures.to(self.device, non_blocking=True)
        if self.gain is not None:
            batch = self.gain(batch)
        nchw = batch.permute(0, 3, 1, 2).to(torch.float32)
        return torch.addcmul(self._shift, nchw, self._scale).contiguous(memory_format=self.memory_format)
