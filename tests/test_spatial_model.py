"""SiameseSpatial: what its distance responds to (and what it ignores), every layout, its ONNX
graph, and its checkpoints against TAO's models."""

import copy
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import tao_architecture

from oi_ray.checkpoint import Checkpoint, check_fits, load_checkpoint, save_checkpoint
from oi_ray.cli import main
from oi_ray.config import load_config
from oi_ray.config.schema import CalibrationRuleConfig
from oi_ray.data.assemble import InputGeometry
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.errors import DataError
from oi_ray.metrics import describe_rule
from oi_ray.model.folding import fold_batch_norms
from oi_ray.model.registry import Architecture
from oi_ray.model.spatial import WINDOW_CHUNK, SiameseSpatial
from oi_ray.model_card import INPUT_NAMES
from oi_ray.tasks.export import export_onnx


def _architecture(overrides: list[str]) -> Architecture:
    config = load_config(None, ["model.model_type=SiameseSpatial", *overrides])
    return Architecture.of(config.model, InputGeometry.from_config(config.dataset))


def _model(tiles=(1, 1), **options) -> SiameseSpatial:
    torch.manual_seed(0)
    return SiameseSpatial(tiles, **options).eval()


def _board(size: int = 32) -> torch.Tensor:
    """A golden tile: two pads and a trace on a uniform background, in the middle of ``size`` x
    ``size`` pixels (32: the pattern's edges 8 pixels from the border)."""
    image = torch.zeros(1, 3, size, size)
    pattern = image[:, :, (size - 32) // 2:, (size - 32) // 2:]
    pattern[:, :, 8:14, 8:14] = 1.0
    pattern[:, :, 18:24, 18:24] = 1.0
    pattern[:, :, 10:12, 14:18] = 0.6
    return image


def _normalised(pictures: torch.Tensor) -> torch.Tensor:
    """Pictures in [0, 1] on the scale the model sees them: TAO's ImageNet mean and std."""
    return (pictures - 0.45) / 0.226


@pytest.mark.parametrize("overrides, tiles, input_shape", [
    ([], (1, 1), (3, 128, 128)),  # the defaults: one lighting, 128x128
    (["dataset.input_map={A: 0, B: 1, C: 2}", "dataset.image_width=24", "dataset.image_height=16"],
     (3, 1), (3, 48, 24)),
    (["dataset.input_map={A: 0, B: 1, C: 2, D: 3}", "dataset.concat_type=grid", "dataset.grid_map={x: 2, y: 2}",
      "dataset.image_width=20", "dataset.image_height=12", "model.spatial.stride=4"], (2, 2), (3, 24, 40)),
    (["dataset.input_map={A: 0, B: 1}", "dataset.image_width=37", "dataset.image_height=29",
      "model.spatial.neighbourhood=1", "model.spatial.width=8", "model.spatial.blocks=0"], (2, 1), (3, 58, 37)),
])
def test_every_layout_and_size_gives_one_distance_per_pair(overrides, tiles, input_shape):
    architecture = _architecture(overrides)
    assert (architecture.tiles, architecture.input_shape) == (tiles, input_shape)
    torch.manual_seed(0)
    model = architecture.build()
    test, golden = torch.randn(3, *input_shape), torch.randn(3, *input_shape)
    distance = model.distance(test, golden)
    assert distance.shape == (3,) and bool((distance > 0).all())
    distance.sum().backward()
    assert all(parameter.grad is not None for parameter in model.parameters())
    weights = sum(parameter.numel() for parameter in model.parameters())
    assert weights < 100_000  # tens of thousands at most, whatever the input size


def test_identical_sides_are_zero_apart():
    model = _model(tiles=(2, 1))
    images = torch.randn(4, 3, 64, 32)
    assert model.distance(images, images).max().item() < 1e-5


def test_a_one_cell_shift_scores_far_below_a_small_local_defect():
    model = _model()  # stride 2: one feature cell is 2 pixels
    golden = _board(64)  # the trunk sees ~20 pixels around a feature: the tile's border stays out of view
    shifted = torch.roll(golden, shifts=(2, -2), dims=(2, 3))  # the background wraps round: uniform
    spur = golden.clone()
    spur[:, :, 32:34, 30:31] = 1.0  # a 2x1-pixel spur of copper between the pads
    with torch.no_grad():
        shift_score, defect_score = model.distance(shifted, golden).item(), model.distance(spur, golden).item()
    assert shift_score < 1e-4 < defect_score and defect_score > 100 * shift_score
    no_tolerance = _model(neighbourhood=1)
    with torch.no_grad():  # without the neighbourhood the same shift is a large difference
        assert no_tolerance.distance(shifted, golden).item() > 0.5 * no_tolerance.distance(spur, golden).item()


def test_a_lamp_drift_between_shots_scores_well_below_a_local_change():
    """Tiles are not standardised one by one (a flat tile's spread is no scale, see the next test):
    a lamp a few per cent brighter or dimmer in one shot (the generator's drift) scores well
    below a mouse bite even untrained; training on the line's own pairs teaches larger ones."""
    model = _model()
    golden = _board()
    bite = golden.clone()
    bite[:, :, 8:10, 12:14] = 0.0  # a mouse bite out of one pad's corner
    with torch.no_grad():
        local = model.distance(_normalised(bite), _normalised(golden)).item()
        for drifted in (1.03 * golden, golden + 0.03, 0.97 * golden - 0.03):
            assert model.distance(_normalised(drifted), _normalised(golden)).item() < 0.35 * local


def test_a_few_edge_pixels_at_the_border_of_a_uniform_tile_score_below_a_small_local_defect():
    """The false alarm found on real boards (DeepPCB): an all-substrate tile whose test shot has a
    few pixels of an edge at its border (the golden's edge lies just outside the frame). Scaling
    each tile by its own spread made it the board's largest distance; now its score is what the
    same pixels score on any tile, below a small defect's."""
    model = _model()
    uniform = torch.zeros(1, 3, 64, 64)
    with_edge = uniform.clone()
    with_edge[:, :, 28:34, 0:1] = 1.0  # 6 pixels of copper at the left border
    golden = _board(64)
    speck = golden.clone()
    speck[:, :, 40:43, 24:27] = 1.0  # a 3x3 speck of copper on the substrate between the pads
    golden_with_edge = golden.clone()
    golden_with_edge[:, :, 28:34, 0:1] = 1.0
    with torch.no_grad():
        edge_on_uniform = model.distance(_normalised(with_edge), _normalised(uniform)).item()
        edge_on_board = model.distance(_normalised(golden_with_edge), _normalised(golden)).item()
        defect = model.distance(_normalised(speck), _normalised(golden)).item()
    assert edge_on_uniform < 0.75 * defect
    assert edge_on_uniform == pytest.approx(edge_on_board, rel=0.1)  # not amplified by the flat tile


def _clamped_window_minimum(source: torch.Tensor, target: torch.Tensor, neighbourhood: int) -> torch.Tensor:
    """The definition, position by position: the smallest squared distance from each ``source``
    feature to the ``target`` features in the window around it, clamped at the edges."""
    reach, (height, width) = neighbourhood // 2, source.shape[-2:]
    nearest = torch.full(source[:, 0].shape, torch.inf)
    for row in range(height):
        for column in range(width):
            window = target[..., max(0, row - reach):row + reach + 1, max(0, column - reach):column + reach + 1]
            squared = (window - source[..., row:row + 1, column:column + 1]).pow(2).sum(dim=1)
            nearest[:, row, column] = squared.flatten(1).amin(dim=1)
    return nearest


@pytest.mark.parametrize("neighbourhood", [3, 5])
def test_scoring_matches_both_ways_from_one_pass_exactly(neighbourhood):
    """Scoring computes each shift's distances once for both sides: each side must equal the
    clamped-window minimum by definition, edges and corners included."""
    model = _model(neighbourhood=neighbourhood).eval()
    torch.manual_seed(2)
    test, golden = (torch.randn(3, 8, 7, 9).contiguous(memory_format=torch.channels_last) for _ in range(2))
    with torch.no_grad():
        test_side, golden_side = model._nearest_both_ways(test, golden)
    torch.testing.assert_close(test_side, _clamped_window_minimum(test, golden, neighbourhood), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(golden_side, _clamped_window_minimum(golden, test, neighbourhood),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_training_finds_the_same_nearest_neighbours_with_the_same_gradients(memory_format):
    """Training matches each position without autograd (a few tiles at a time) and differentiates
    only the chosen pair: the values and the gradients must be those of scoring's minimum over
    the window, both ways, in either memory layout."""
    model = _model(neighbourhood=5)
    torch.manual_seed(1)
    tiles = WINDOW_CHUNK + 3  # more than one chunk of the search
    source, target = (torch.randn(tiles, 8, 9, 11).contiguous(memory_format=memory_format).requires_grad_()
                      for _ in range(2))
    results = {}
    for training in (True, False):
        model.train(training)
        test_side, golden_side = model._nearest_both_ways(source, target)
        weights = torch.linspace(0, 1, test_side.numel()).view_as(test_side)
        ((test_side * weights).sum() + (golden_side * weights.flip(0)).sum()).backward()
        results[training] = (test_side.detach(), golden_side.detach(), source.grad.clone(), target.grad.clone())
        source.grad, target.grad = None, None
    for trained, plain in zip(results[True], results[False], strict=True):
        assert torch.allclose(trained, plain, atol=1e-6)


def test_a_defect_in_one_lighting_tile_is_seen_and_tiles_are_never_compared_across():
    model = _model(tiles=(3, 1))
    golden = torch.cat([_board(), 0.5 * _board(), _board().flip(3)], dim=2)  # 3 lightings, stacked
    test = golden.clone()
    test[:, :, 32 + 20:32 + 22, 4:6] = 0.8  # a speck in the second lighting only
    with torch.no_grad():
        assert model.distance(test, golden).item() > 100 * model.distance(golden, golden).item()
        # a pad at the top of lighting 2 moved up by one cell, across the seam into lighting 1: read
        # as one picture it is a small shift; read as the two lightings it is, it is a defect in each
        golden, test = torch.zeros(1, 3, 64, 32), torch.zeros(1, 3, 64, 32)
        golden[:, :, 32:38, 10:16], test[:, :, 30:36, 10:16] = 1.0, 1.0
        as_one_picture = _model().distance(test, golden).item()
        assert _model(tiles=(2, 1)).distance(test, golden).item() > 10 * as_one_picture


def test_batch_norms_folded_for_inference_give_the_same_distances_and_halves():
    model = _model(tiles=(2, 1))
    with torch.no_grad():
        for norm in (module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)):
            norm.running_mean.uniform_(-1, 1)  # statistics and affine parameters as training leaves them
            norm.running_var.uniform_(0.5, 2)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    folded = fold_batch_norms(copy.deepcopy(model))
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in folded.modules())
    assert sum(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules()) == 4
    test, golden = torch.randn(5, 3, 64, 32), torch.randn(5, 3, 64, 32)
    with torch.no_grad():
        expected = model.distance(test, golden)
        torch.testing.assert_close(folded.distance(test, golden), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(folded.compare(folded.embed(test), folded.embed(golden)), expected,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(SiameseSpatial((1, 1)))


def test_onnx_graph_outputs_the_distance_within_1e_4():
    architecture = _architecture(["dataset.input_map={A: 0, B: 1}", "dataset.image_width=24",
                                  "dataset.image_height=20"])
    torch.manual_seed(0)
    model = architecture.build().eval()
    onnx_bytes = export_onnx(model, architecture, 1, dynamic=True, opset=17, constant_folding=True)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()] == ["distance"]
    test, golden = torch.randn(5, *architecture.input_shape), torch.randn(5, *architecture.input_shape)
    golden[2] = test[2]
    (onnx_distance,) = session.run(None, {INPUT_NAMES[0]: test.numpy(), INPUT_NAMES[1]: golden.numpy()})
    with torch.no_grad():
        expected = model.distance(test, golden).numpy()
    assert onnx_distance.shape == (5,)
    assert np.abs(onnx_distance - expected).max() < 1e-4


def test_checkpoints_refuse_the_other_kind_naming_both(tmp_path):
    spatial = _architecture(["dataset.image_width=16", "dataset.image_height=16"])
    tao = tao_architecture("Siamese_3", spatial.input_shape)
    for saved, asked in ((spatial, tao), (tao, spatial)):
        path = tmp_path / f"{saved.model_type}.pth"
        save_checkpoint(Checkpoint(saved.build().state_dict(), model_type=saved.model_type,
                                   input_shape=saved.input_shape, model_options=dict(saved.options)), path)
        with pytest.raises(DataError) as refused:
            check_fits(load_checkpoint(path), path, asked)
        assert saved.model_type in str(refused.value) and asked.model_type in str(refused.value)
    # the same model type with another neighbourhood is another model too
    path = tmp_path / "SiameseSpatial.pth"
    wider = _architecture(["dataset.image_width=16", "dataset.image_height=16", "model.spatial.neighbourhood=5"])
    with pytest.raises(DataError, match=r"holds a SiameseSpatial model \(stride 2, neighbourhood 3, width 32, blocks 2, "
                                        r"features 16\) with input 3x16x16; the spec asks for model.model_type="
                                        r"SiameseSpatial \(stride 2, neighbourhood 5, width 32, blocks 2, features 16\)"):
        check_fits(load_checkpoint(path), path, wider)


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("spatial")
    return synthesize_dataset(root / "data", SyntheticSpec(num_pairs=160, lights=("A", "B"), width=16, height=16,
                                                           image_ext=".png", seed=7)).spec_path


@pytest.mark.ray
@pytest.mark.slow
def test_it_trains_resumes_exports_and_scores_alike_on_every_backend(ray_local, spec, tmp_path):
    results = tmp_path / "run"
    latest = results / "train" / "oi_model_latest.pth"
    onnx = results / "export" / "oi_model.onnx"
    common = ["-e", str(spec), f"results_dir={results}", "model.model_type=SiameseSpatial", "dataset.batch_size=8",
              f"export.checkpoint={latest}"]
    assert main(["train", *common, "train.num_epochs=2"]) == 0
    assert main(["train", *common, "train.num_epochs=3"]) == 0  # continues from epoch 2
    epochs = [json.loads(line)["epoch"] for line in (results / "train" / "status.json").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    saved = load_checkpoint(latest)
    assert (saved.epoch, saved.model_type, saved.model_options) == (
        3, "SiameseSpatial", {"stride": 2, "neighbourhood": 3, "width": 32, "blocks": 2, "features": 16})
    assert saved.threshold is not None and saved.threshold_rule == describe_rule(CalibrationRuleConfig())

    assert main(["export", *common]) == 0
    card = json.loads(Path(f"{onnx}.json").read_text())
    assert card["output_names"] == ["distance"] and card["outputs_meaning"].startswith("the pair's distance")
    assert (card["threshold"], card["threshold_rule"]) == (saved.threshold, saved.threshold_rule)
    reports = {}
    for model in (latest, onnx):
        folder = tmp_path / model.suffix[1:]
        assert main(["evaluate", *common, f"evaluate.checkpoint={model}", f"evaluate.results_dir={folder}"]) == 0
        reports[model.suffix] = json.loads((folder / "metrics.json").read_text())
    pth, exported = reports[".pth"], reports[".onnx"]
    assert exported["threshold"]["value"] == pth["threshold"]["value"] == saved.threshold
    assert exported["auroc"] == pytest.approx(pth["auroc"], abs=1e-6)
    assert [pair["distance"] for pair in exported["weakest_defects"]] == pytest.approx(
        [pair["distance"] for pair in pth["weakest_defects"]], abs=1e-4)
