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

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from oi_ray.config.schema import ConcatType, DatasetConfig
from oi_ray.errors import DataError, ImageSizeError
from oi_ray.storage import is_uri, read_bytes

# TAO's transforms: torchvision Resize (bilinear) for plain inputs, bicubic when augmenting.
RESIZE_PLAIN = Image.Resampling.BILINEAR
RESIZE_AUGMENT = Image.Resampling.BICUBIC
# Bytes a complete file ends with: a cheap check for truncated downloads, copies and uploads.
FILE_TRAILERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
ImageSource = str | bytes  # an image file's path or URI, or an encoded image's bytes


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
        if dataset.concat_type == ConcatType.GRID and dataset.grid_map is not None:
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
    def tiles(self) -> tuple[int, int]:
        """``(rows, columns)`` of lighting images in the assembled input."""
        columns, rows = self.grid or (1, self.num_lights)
        return rows, columns

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The assembled model input ``(3, H', W')``."""
        rows, columns = self.tiles
        return 3, rows * self.height, columns * self.width


def read_image(source: ImageSource, size_hw: tuple[int, int], resample: Image.Resampling = RESIZE_PLAIN, *,
               name: str | None = None, allow_resize: bool = True) -> np.ndarray:
    """Decode ``source`` (a file path or URI, or an encoded image's bytes named ``name``) as RGB
    and resize it to ``size_hw``: ``(H, W, 3)`` uint8. ``allow_resize=False`` refuses another size."""
    height, width = size_hw
    named = name or (source if isinstance(source, str) else f"of {len(source)} bytes")
    try:
        if isinstance(source, str) and is_uri(source):
            source = read_bytes(source)
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            if isinstance(source, bytes):
                problem = truncation_problem(image.format, source)
                if problem:
                    raise DataError(f"cannot decode image {named}: {problem}")
            rgb = image.convert("RGB")
            if rgb.size != (width, height):
                if not allow_resize:
                    raise ImageSizeError(f"image {named} is {rgb.width}x{rgb.height} pixels; the model takes "
                                    f"{width}x{height} (width x height)")
                rgb = rgb.resize((width, height), resample)
            return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot decode image {named}: {error}") from None


def truncation_problem(image_format: str | None, data_or_tail: bytes) -> str | None:
    """Why an encoded JPEG/PNG ending in ``data_or_tail`` is incomplete, or None.

    A file cut short often still opens (the header is intact); its end marker is missing."""
    trailer = FILE_TRAILERS.get(image_format or "")
    if trailer and not data_or_tail.endswith(trailer):
        return f"truncated {image_format} file (no end marker)"
    return None


def read_stack(sources: Sequence[ImageSource], geometry: InputGeometry,
               resample: Image.Resampling = RESIZE_PLAIN, names: Sequence[str] | None = None) -> np.ndarray:
    """Decode one side's lighting images: ``(L, H, W, 3)`` uint8, in lighting order; ``names``
    name encoded bytes in errors."""
    size = (geometry.height, geometry.width)
    names = names or [None] * len(sources)
    return np.stack([read_image(source, size, resample, name=name)
                     for source, name in zip(sources, names, strict=True)])


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


def read_pictures(sides: Sequence[Sequence[ImageSource]], geometry: InputGeometry) -> np.ndarray:
    """Decode and tile several sides in this process (no Ray): ``(B, H', W', 3)`` uint8."""
    return assemble(np.stack([read_stack(sources, geometry) for sources in sides]), geometry)
