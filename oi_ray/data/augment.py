"""TAO's paired training augmentation on uint8 lighting stacks (numpy and PIL).

One random draw per pair is applied to every lighting image of both sides, in TAO's order:
horizontal/vertical flip, rotation by one of ``angle_list[:3]``, random resized crop
(scale 0.8-1.2, square), Gaussian blur of radius U[0, 1), colour jitter with probability
``1 - color_probability``. Images arrive already resized (bicubic, as TAO does when
augmenting). Colour jitter applies brightness, contrast, saturation, hue in that fixed order
(torchvision permutes it per image; one order keeps both sides identical).
"""

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from oi_ray.config.schema import AugmentationConfig

CROP_SCALE = (0.8, 1.2)
CROP_ATTEMPTS = 10


@dataclass(frozen=True)
class PairDraw:
    """The random choices for one pair; applied identically to every image."""

    hflip: bool
    vflip: bool
    angle: float | None
    crop: tuple[int, int, int, int] | None  # top, left, height, width
    blur_radius: float | None
    color: tuple[float, float, float, float] | None  # brightness, contrast, saturation, hue


def draw(config: AugmentationConfig, height: int, width: int, rng: np.random.Generator) -> PairDraw:
    """Draw one pair's augmentation parameters with TAO's probabilities."""
    flip = config.random_flip
    hflip = flip.enable and rng.random() < flip.hflip_probability
    vflip = flip.enable and rng.random() < flip.vflip_probability
    rotate = config.random_rotate
    angle = None
    if rotate.enable and rng.random() < rotate.rotate_probability:
        choices = rotate.angle_list[:3]
        angle = float(choices[rng.integers(len(choices))])
    crop = _crop_box(height, width, rng) if config.with_random_crop else None
    blur = float(rng.random()) if config.with_random_blur else None
    color = None
    jitter = config.random_color
    if jitter.enable and rng.random() > jitter.color_probability:
        color = (
            float(rng.uniform(max(0.0, 1 - jitter.brightness), 1 + jitter.brightness)),
            float(rng.uniform(max(0.0, 1 - jitter.contrast), 1 + jitter.contrast)),
            float(rng.uniform(max(0.0, 1 - jitter.saturation), 1 + jitter.saturation)),
            float(rng.uniform(-jitter.hue, jitter.hue)),
        )
    return PairDraw(hflip, vflip, angle, crop, blur, color)


def augment_pair(test: np.ndarray, golden: np.ndarray, pair_draw: PairDraw) -> tuple[np.ndarray, np.ndarray]:
    """Apply one draw to both ``(L, H, W, 3)`` uint8 stacks; returns new stacks."""
    return _apply(test, pair_draw), _apply(golden, pair_draw)


def _apply(stack: np.ndarray, pair_draw: PairDraw) -> np.ndarray:
    return np.stack([_apply_image(Image.fromarray(image), pair_draw) for image in stack])


def _apply_image(image: Image.Image, d: PairDraw) -> np.ndarray:
    size = image.size
    if d.hflip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if d.vflip:
        image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    if d.angle is not None:
        image = image.rotate(d.angle)  # counter-clockwise, nearest, same size, as torchvision
    if d.crop is not None:
        top, left, height, width = d.crop
        image = image.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + width, top + height))
    if d.blur_radius is not None:
        image = image.filter(ImageFilter.GaussianBlur(radius=d.blur_radius))
    if d.color is not None:
        brightness, contrast, saturation, hue = d.color
        image = ImageEnhance.Brightness(image).enhance(brightness)
        image = ImageEnhance.Contrast(image).enhance(contrast)
        image = ImageEnhance.Color(image).enhance(saturation)
        image = _shift_hue(image, hue)
    return np.asarray(image, dtype=np.uint8)


def _shift_hue(image: Image.Image, hue: float) -> Image.Image:
    """Rotate the hue by ``hue`` turns (-0.5..0.5), like torchvision's adjust_hue."""
    if hue == 0:
        return image
    h, s, v = image.convert("HSV").split()
    shift = int(round(hue * 255))
    h = h.point(lambda value: (value + shift) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def _crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params with scale 0.8-1.2 and aspect ratio 1."""
    area = height * width
    for _ in range(CROP_ATTEMPTS):
        side = int(round(math.sqrt(area * rng.uniform(*CROP_SCALE))))
        if 0 < side <= width and 0 < side <= height:
            top = int(rng.integers(0, height - side + 1))
            left = int(rng.integers(0, width - side + 1))
            return top, left, side, side
    side = min(height, width)  # fallback: central square crop
    return (height - side) // 2, (width - side) // 2, side, side
