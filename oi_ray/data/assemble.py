"""Model input assembly, exactly as TAO builds it (pure numpy and PIL).

One side of a pair is ``num_input`` lighting images. Each is decoded to RGB, resized to
``(image_height, image_width)`` and the images are tiled into one picture: ``linear``
stacks them along the height, ``grid`` fills ``grid_map.y`` rows of ``grid_map.x`` images
row-major. The pipelines carry these pictures as compact ``(H', W', 3)`` uint8; scaling to
[0, 1] and normalising with the RGB mean/std happens where the model runs
(:func:`oi_ray.model.inputs.to_model_input`), so a quarter of the bytes cross the object
store and the host-to-device copy. Decoding/resizing is split from tiling so the pipeline
can cache the uint8 lighting stacks and finish batches later.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from oi_ray.config.schema import DatasetConfig
from oi_ray.errors import DataError

# TAO's transforms: torchvision Resize (bilinear) for plain inputs, bicubic when augmenting.
RESIZE_PLAIN = Image.Resampling.BILINEAR
RESIZE_AUGMENT = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class InputGeometry:
    """How one side's lighting images become a model input."""

    num_lights: int
    height: int  # of one lighting image
    width: int
    grid: tuple[int, int] | None  # (x, y) images per row and rows; None: linear
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_config(cls, dataset: DatasetConfig) -> "InputGeometry":
        grid = None
        if dataset.concat_type == "grid" and dataset.grid_map is not None:
            grid = (dataset.grid_map.x, dataset.grid_map.y)
        aug = dataset.augmentation_config
        return cls(
            num_lights=int(dataset.num_input or 1),
            height=dataset.image_height,
            width=dataset.image_width,
            grid=grid,
            mean=tuple(aug.rgb_input_mean),
            std=tuple(aug.rgb_input_std),
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The assembled model input ``(3, H', W')``."""
        columns, rows = self.grid or (1, self.num_lights)
        return 3, rows * self.height, columns * self.width


def read_image(path: str, size_hw: tuple[int, int], resample: Image.Resampling = RESIZE_PLAIN) -> np.ndarray:
    """Decode ``path`` as RGB and resize to ``size_hw``: ``(H, W, 3)`` uint8."""
    height, width = size_hw
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            if rgb.size != (width, height):
                rgb = rgb.resize((width, height), resample)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot decode image {path}: {error}") from None


def read_stack(paths: Sequence[str], geometry: InputGeometry,
               resample: Image.Resampling = RESIZE_PLAIN) -> np.ndarray:
    """Decode one side's lighting images: ``(L, H, W, 3)`` uint8, in lighting order."""
    size = (geometry.height, geometry.width)
    return np.stack([read_image(path, size, resample) for path in paths])


def tile(stacks: np.ndarray, geometry: InputGeometry) -> np.ndarray:
    """Tile ``(B, L, H, W, C)`` lighting stacks into ``(B, H', W', C)`` pictures."""
    batch, lights, height, width, channels = stacks.shape
    if geometry.grid is None:
        return stacks.reshape(batch, lights * height, width, channels)
    columns, rows = geometry.grid
    grid = stacks.reshape(batch, rows, columns, height, width, channels)
    return grid.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows * height, columns * width, channels)


def assemble(stacks: np.ndarray, geometry: InputGeometry) -> np.ndarray:
    """Lighting stacks ``(B, L, H, W, 3)`` -> contiguous tiled pictures ``(B, H', W', 3)`` uint8."""
    return np.ascontiguousarray(tile(stacks, geometry))


def read_pictures(sides: Sequence[Sequence[str]], geometry: InputGeometry) -> np.ndarray:
    """Decode and tile several sides in this process (no Ray): ``(B, H', W', 3)`` uint8."""
    return assemble(np.stack([read_stack(paths, geometry) for paths in sides]), geometry)
