"""Model input assembly (TAO's linear/grid concatenation, resize, normalise) and augmentation."""


import numpy as np
import pytest
import torch
from helpers import TAO_SPECS
from PIL import Image

from oi_ray.config import load_config
from oi_ray.config.schema import AugmentationConfig
from oi_ray.data import augment
from oi_ray.data.assemble import InputGeometry, assemble, read_image, read_stack, tile
from oi_ray.errors import DataError
from oi_ray.model.inputs import InputNormalizer, LightingGain

UNIT = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def _geometry(num_lights, grid=None, height=2, width=3, mean_std=UNIT):
    return InputGeometry(num_lights, height, width, grid, *mean_std)


def _stacks(num_lights, height=2, width=3):
    """One side whose lighting ``k`` is filled with the value ``k + 1``: (1, L, H, W, 3)."""
    values = np.arange(1, num_lights + 1, dtype=np.uint8)[:, None, None, None]
    return np.broadcast_to(values, (num_lights, height, width, 3)).copy()[None]


def test_linear_concatenates_along_height_in_lighting_order():
    pictures = tile(_stacks(4), _geometry(4))
    assert pictures.shape == (1, 8, 3, 3)
    assert pictures[0, :, 0, 0].tolist() == [1, 1, 2, 2, 3, 3, 4, 4]


def test_grid_fills_rows_of_x_images_row_major():
    pictures = tile(_stacks(6), _geometry(6, grid=(3, 2)))
    assert pictures.shape == (1, 4, 9, 3)
    # rows 0-1 hold lightings 1,2,3 left to right; rows 2-3 hold 4,5,6
    assert pictures[0, 0, ::3, 0].tolist() == [1, 2, 3]
    assert pictures[0, 3, ::3, 0].tolist() == [4, 5, 6]
    assert pictures[0, :, 0, 0].tolist() == [1, 1, 4, 4]


def test_grid_matches_hand_built_layout():
    stacks = np.random.default_rng(0).integers(0, 255, (2, 4, 2, 3, 3), dtype=np.uint8)
    pictures = tile(stacks, _geometry(4, grid=(2, 2)))
    for sample, lights in zip(pictures, stacks, strict=True):
        top = np.concatenate([lights[0], lights[1]], axis=1)
        bottom = np.concatenate([lights[2], lights[3]], axis=1)
        assert np.array_equal(sample, np.concatenate([top, bottom], axis=0))


def test_normalize_matches_hand_computation():
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 2.0)
    stacks = np.zeros((1, 1, 1, 2, 3), dtype=np.uint8)
    stacks[0, 0, 0, 0] = (255, 0, 51)
    stacks[0, 0, 0, 1] = (0, 255, 102)
    pictures = assemble(stacks, _geometry(1, height=1, width=2, mean_std=(mean, std)))
    assert pictures.shape == (1, 1, 2, 3) and pictures.dtype == np.uint8
    inputs = InputNormalizer(_geometry(1, height=1, width=2, mean_std=(mean, std)))(pictures).numpy()
    assert inputs.shape == (1, 3, 1, 2) and inputs.dtype == np.float32
    np.testing.assert_allclose(inputs[0, :, 0, 0], [1.0, -1.0, 0.1], rtol=1e-6)
    np.testing.assert_allclose(inputs[0, :, 0, 1], [-1.0, 3.0, 0.2], rtol=1e-6)


@pytest.mark.parametrize("grid", [None, (2, 2)])
def test_lighting_gain_scales_each_lighting_of_each_side_on_its_own_and_clips(grid):
    geometry = _geometry(4, grid=grid, height=3, width=5)
    flat = torch.full((64, *geometry.input_shape[1:], 3), 230, dtype=torch.uint8)
    gain = LightingGain(geometry, 0.2, seed=(7,))
    test, golden = gain(flat), gain(flat)  # the two sides of a batch, drawn one after the other
    rows, columns = geometry.tiles
    tiles = test.view(64, rows, 3, columns, 5, 3)
    per_light = tiles[:, :, :1, :, :1, :1]
    assert test.dtype == torch.float32 and test.shape == flat.shape
    assert torch.equal(tiles, per_light.expand_as(tiles)), "one gain over a whole lighting image"
    assert 184 <= per_light.min() < 195 and per_light.max() == 255, "U[0.8, 1.2] x 230, clipped at 255"
    assert per_light.flatten(1).std(dim=1).min() > 0, "every pair's lightings get their own gains"
    assert not torch.equal(test, golden), "test and golden drawn separately"
    gain.start_epoch(1)
    assert torch.equal(gain(flat), test), "an epoch's draws repeat (a resumed run draws the same)"
    gain.start_epoch(2)
    assert not torch.equal(gain(flat), test)


def test_normalizer_applies_the_training_gain_before_the_affine_map():
    geometry = _geometry(2, height=1, width=1)
    pictures = np.full((4, 2, 1, 3), 100, dtype=np.uint8)
    gained = InputNormalizer(geometry, gain=LightingGain(geometry, 0.1, seed=(0,)))(pictures)
    plain = InputNormalizer(geometry)(pictures)
    ratio = gained / plain  # (4, 3, 2, 1); unit mean and std: the input is x / 255, the ratio the gain
    assert torch.all((ratio >= 0.9) & (ratio <= 1.1))
    assert torch.equal(ratio[:, 0], ratio[:, 1]) and torch.equal(ratio[:, 0], ratio[:, 2]), "R, G, B alike"
    assert not torch.equal(ratio[:, :, 0], ratio[:, :, 1]), "each lighting (a row here) its own gain"


@pytest.mark.parametrize(("concat", "expected"), [("linear", (3, 400, 100)), ("grid", (3, 200, 200))])
def test_input_shape_from_tao_spec(concat, expected):
    spec = TAO_SPECS / "train.yaml"
    geometry = InputGeometry.from_config(load_config(spec, [f"dataset.concat_type={concat}"]).dataset)
    assert geometry.input_shape == expected
    assert geometry.mean == (0.485, 0.456, 0.406)


def test_read_image_converts_to_rgb_and_resizes_bilinear(tmp_path):
    gray = np.tile(np.array([0, 100, 200, 255], dtype=np.uint8), (4, 1))
    path = tmp_path / "g.png"
    Image.fromarray(gray, mode="L").save(path)
    pixels = read_image(str(path), (2, 2))
    assert pixels.shape == (2, 2, 3) and pixels.dtype == np.uint8
    expected = np.asarray(Image.fromarray(gray).convert("RGB").resize((2, 2), Image.Resampling.BILINEAR))
    assert np.array_equal(pixels, expected)
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_read_stack_keeps_lighting_order(tmp_path):
    paths = []
    for value in (10, 20, 30):
        path = tmp_path / f"{value}.png"
        Image.fromarray(np.full((3, 3, 3), value, dtype=np.uint8)).save(path)
        paths.append(str(path))
    stack = read_stack(paths, _geometry(3, height=3, width=3))
    assert stack.shape == (3, 3, 3, 3)
    assert stack[:, 0, 0, 0].tolist() == [10, 20, 30]


def test_corrupt_image_error_names_path(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(DataError, match=f"cannot decode image {path}"):
        read_image(str(path), (4, 4))


def _always(config: AugmentationConfig) -> AugmentationConfig:
    config.random_flip.hflip_probability = 1.0
    config.random_flip.vflip_probability = 0.0
    config.random_rotate.rotate_probability = 0.0
    config.with_random_crop = False
    config.with_random_blur = False
    config.random_color.enable = False
    return config


def test_augmentation_applies_the_same_draw_to_both_sides_and_every_lighting():
    rng = np.random.default_rng(3)
    test = rng.integers(0, 255, (2, 6, 6, 3), dtype=np.uint8)
    draw = augment.draw(_always(AugmentationConfig()), 6, 6, rng)
    assert draw.hflip and not draw.vflip and draw.angle is None and draw.crop is None
    out_test, out_golden = augment.augment_pair(test, test.copy(), draw)
    assert np.array_equal(out_test, test[:, :, ::-1])
    assert np.array_equal(out_test, out_golden)


def test_rotation_uses_first_three_angles_counter_clockwise():
    config = _always(AugmentationConfig())
    config.random_flip.hflip_probability = 0.0
    config.random_rotate.rotate_probability = 1.0
    config.random_rotate.angle_list = [90.0, 90.0, 90.0, 45.0]
    rng = np.random.default_rng(0)
    angles = {augment.draw(config, 4, 4, rng).angle for _ in range(50)}
    assert angles == {90.0}
    image = np.arange(16, dtype=np.uint8).reshape(4, 4)[None, :, :, None].repeat(3, axis=3)
    rotated, _ = augment.augment_pair(image, image, augment.draw(config, 4, 4, rng))
    assert np.array_equal(rotated[0, ..., 0], np.rot90(image[0, ..., 0]))


def test_full_augmentation_is_deterministic_and_keeps_shape():
    config = AugmentationConfig(augment=True)
    stack = np.random.default_rng(1).integers(0, 255, (3, 10, 10, 3), dtype=np.uint8)
    first = augment.augment_pair(stack, stack, augment.draw(config, 10, 10, np.random.default_rng(7)))
    again = augment.augment_pair(stack, stack, augment.draw(config, 10, 10, np.random.default_rng(7)))
    assert first[0].shape == stack.shape and first[0].dtype == np.uint8
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[0], first[1])


def test_crop_box_stays_inside_the_image():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, height, width = augment._crop_box(12, 12, rng)
        assert height == width and 0 < height <= 12
        assert 0 <= top <= 12 - height and 0 <= left <= 12 - width
