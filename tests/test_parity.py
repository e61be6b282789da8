"""ONNX Runtime and TensorRT score like torch, pair by pair, on trained weights.

Every registered model type (TAO's two and SiameseSpatial) and both layouts: a few Adam
steps on real synthetic pictures (in-process, no Ray, through the training step
``oi-ray train`` takes) move the weights and BatchNorm statistics away from their
initialisation; then oi-ray's own predictors score the same real pairs from the ``.pth`` and
from the exported ``.onnx`` (and, on a GPU, from a TensorRT engine).
"""

import dataclasses
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import spec_model

from oi_ray import predictors
from oi_ray.checkpoint import Checkpoint, save_checkpoint
from oi_ray.cli import main
from oi_ray.config import load_config
from oi_ray.config.schema import ExperimentConfig, ModelType, OptimConfig
from oi_ray.data.assemble import InputGeometry, read_pictures
from oi_ray.data.pairs import load_split
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.errors import DataError
from oi_ray.fileio import sha256_of
from oi_ray.golden_reuse import GoldenReuse
from oi_ray.model.inputs import InputNormalizer
from oi_ray.model.registry import Architecture
from oi_ray.model_card import ModelCard, read_card
from oi_ray.predictors import BatchLimits, check_halves, load_halves_predictor
from oi_ray.training.step import Precision, StepRule, make_optimizer, training_steps

HAS_GPU = torch.cuda.is_available()
LAYOUTS = {
    "linear": ["dataset.concat_type=linear"],
    "grid": ["dataset.concat_type=grid", "dataset.grid_map.x=2", "dataset.grid_map.y=2"],
}
# every model type ("Siamese" is TAO's other name of Siamese_1: the same network)
MODEL_TYPES = [model_type for model_type in ModelType if model_type != ModelType.SIAMESE]
CASES = [(model_type, layout) for model_type in MODEL_TYPES for layout in LAYOUTS]
STEPS, BATCH = 6, 8


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return synthesize_dataset(root, SyntheticSpec(num_pairs=60, width=16, height=16, image_ext=".png",
                                                  seed=5)).spec_path  # 4 lightings


def _overrides(model_type: str, layout: str) -> list[str]:
    return [f"model.model_type={model_type}", *LAYOUTS[layout]]


def _train(config: ExperimentConfig, path: Path) -> None:
    """A few optimizer steps on the training split; the checkpoint as training writes it."""
    geometry = InputGeometry.from_config(config.dataset)
    table = load_split(config.dataset, "train_dataset")
    normalize = InputNormalizer(geometry)
    test = normalize(read_pictures(table.test_paths, geometry))
    golden = normalize(read_pictures(table.golden_paths, geometry))
    targets = torch.from_numpy(table.targets.astype(np.float32))
    torch.manual_seed(0)
    architecture = Architecture.of(config.model, geometry)
    model = architecture.build()
    initial = {key: value.clone() for key, value in model.state_dict().items()}
    optim = OptimConfig(type="Adam", lr=1e-3)
    optimizer = make_optimizer(model.parameters(), optim)
    draws = (torch.randperm(len(targets))[:BATCH] for _ in range(STEPS))
    batches = ((test[rows], golden[rows], targets[rows]) for rows in draws)
    rule = StepRule(config.model.margin, optim, num_epochs=1)
    list(training_steps(model.distance, optimizer, batches, rule, Precision(torch.device("cpu"), False),
                        epoch=1, steps=STEPS))
    # (Biases that shift both embeddings alike cancel in the distance and get no gradient.)
    untrained = [key for key, value in model.state_dict().items()
                 if key.endswith(("weight", "running_mean", "running_var")) and torch.equal(initial[key], value)]
    assert not untrained, "every weight and BatchNorm statistic moved"
    save_checkpoint(Checkpoint(model.state_dict(), epoch=1, optimizer_state=optimizer.state_dict(),
                               model_type=architecture.model_type, input_shape=architecture.input_shape,
                               embedding_dim=architecture.embedding_dim,
                               model_options=dict(architecture.options)), path)


def _test_pairs(config: ExperimentConfig) -> tuple[np.ndarray, np.ndarray]:
    geometry = InputGeometry.from_config(config.dataset)
    table = load_split(config.dataset, "test_dataset")
    return read_pictures(table.test_paths, geometry), read_pictures(table.golden_paths, geometry)


def _trained_and_exported(spec: Path, folder: Path, overrides: list[str]) -> tuple[ExperimentConfig, Path, Path]:
    config = load_config(spec, overrides)
    checkpoint, onnx_file = folder / "trained.pth", folder / "trained.onnx"
    _train(config, checkpoint)
    assert main(["export", "-e", str(spec), *overrides, f"export.checkpoint={checkpoint}",
                 f"export.onnx_file={onnx_file}", f"export.results_dir={folder}"]) == 0
    return config, checkpoint, onnx_file


@pytest.mark.parametrize(("model_type", "layout"), CASES)
def test_onnx_scores_like_torch_pair_by_pair(spec, tmp_path, model_type, layout):
    config, checkpoint, onnx_file = _trained_and_exported(spec, tmp_path, _overrides(model_type, layout))
    expected_shape = {"linear": (3, 64, 16), "grid": (3, 32, 32)}[layout]
    assert InputGeometry.from_config(config.dataset).input_shape == expected_shape
    test, golden = _test_pairs(config)
    torch_distances = torch.from_numpy(spec_model(checkpoint, config).load().distances(test, golden))
    onnx_distances = torch.from_numpy(spec_model(onnx_file, config).load().distances(test, golden))
    assert torch_distances.shape == (len(test),) and torch_distances.std() > 1e-3
    torch.testing.assert_close(onnx_distances, torch_distances, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("model_type", "layout"), CASES)
def test_the_exported_halves_score_each_test_against_a_kept_golden_like_the_whole_pair(spec, tmp_path, monkeypatch,
                                                                                        model_type, layout):
    """``oi_model.embed.onnx`` embeds the golden once; ``oi_model.compare.onnx`` compares every
    test shot's features with it: the distance of the whole pair, within 1e-5."""
    config, checkpoint, onnx_file = _trained_and_exported(spec, tmp_path, _overrides(model_type, layout))
    card = read_card(onnx_file)
    assert set(card.parts) == {"embed", "compare"}
    sessions = {}
    for name, part in card.parts.items():
        path = onnx_file.with_name(part["file"])
        assert path.name == f"trained.{name}.onnx" and part["sha256"] == sha256_of(path)
        sessions[name] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    test, golden = _test_pairs(config)
    normalize = InputNormalizer(InputGeometry.from_config(config.dataset))
    kept = sessions["embed"].run(None, {"images": normalize(golden[:1]).numpy()})[0]  # one golden, once
    assert kept.shape == card.features_per_pair
    assert kept.shape[0] == (4 if model_type == ModelType.SPATIAL else 1)  # a row per lighting tile, or one
    tests = sessions["embed"].run(None, {"images": normalize(test).numpy()})[0]
    goldens = np.concatenate([kept] * len(test))
    halves = sessions["compare"].run(None, {"test_features": tests, "golden_features": goldens})[0]
    whole = spec_model(checkpoint, config).load().distances(test, np.repeat(golden[:1], len(test), axis=0))
    assert halves.shape == (len(test),) and whole.std() > 1e-3
    np.testing.assert_allclose(halves, whole, rtol=0, atol=1e-5)
    for model in (checkpoint, onnx_file):  # oi-ray's own predictors of the halves, from either file
        predictor = load_halves_predictor(model, card, None)
        kept = predictor.embed(golden[:1])
        scored = predictor.compare(predictor.embed(test), np.concatenate([kept] * len(test)))
        np.testing.assert_allclose(scored, whole, rtol=0, atol=1e-5)
    monkeypatch.setattr(predictors, "COMPARE_CHUNK_BYTES", 1)  # a compare call per pair, two at once
    chunked = load_halves_predictor(onnx_file, card, None, threads=2)
    assert chunked.chunk_pairs == 1 and len(test) > 2
    np.testing.assert_allclose(chunked.compare(tests, goldens), halves, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_a_split_whose_rows_share_goldens_embeds_each_golden_once_and_keeps_the_distances(spec, tmp_path,
                                                                                           model_type):
    """evaluate and inference score in halves: the same distances as the whole pairs, each
    distinct golden embedded once across batches, even when the kept features outgrow their bound."""
    config, checkpoint, onnx_file = _trained_and_exported(spec, tmp_path, _overrides(model_type, "linear"))
    test, golden = _test_pairs(config)
    shared = golden[np.arange(len(test)) % 3]  # three goldens, each shared by a third of the rows
    whole = spec_model(checkpoint, config).load().distances(test, shared)
    assert whole.std() > 1e-3
    for model in (checkpoint, onnx_file):
        scorer = spec_model(model, config).load_scorer()
        assert isinstance(scorer, GoldenReuse)
        halves = np.concatenate([scorer.distances(test[start:start + 4], shared[start:start + 4])
                                 for start in range(0, len(test), 4)])
        np.testing.assert_allclose(halves, whole, rtol=0, atol=1e-5)
        assert scorer.goldens_embedded == 3, f"{model.name}: each golden embedded once"
    tight = GoldenReuse(spec_model(onnx_file, config).load_halves(), cache_bytes=1)  # keeps nothing
    np.testing.assert_allclose(tight.distances(test, shared), whole, rtol=0, atol=1e-5)
    assert tight.goldens_embedded == 3 and len(tight.cache) == 0, "one batch embeds each golden once"
    np.testing.assert_allclose(tight.distances(test, shared), whole, rtol=0, atol=1e-5)
    assert tight.goldens_embedded == 6, "nothing kept: the next batch embeds them again"


def test_halves_of_an_export_that_lacks_them_or_was_changed_are_refused(spec, tmp_path):
    _, _, onnx_file = _trained_and_exported(spec, tmp_path, _overrides("Siamese_3", "linear"))
    card = read_card(onnx_file)
    embed = onnx_file.with_name(card.parts["embed"]["file"])
    embed.write_bytes(embed.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"trained.embed.onnx does not match the model card of trained.onnx"):
        load_halves_predictor(onnx_file, card, None)
    embed.unlink()
    with pytest.raises(DataError, match=r"trained.embed.onnx is missing: the embed half of trained.onnx"):
        load_halves_predictor(onnx_file, card, None)
    with pytest.raises(DataError, match=r"exported without its embed and compare halves .*export it again"):
        load_halves_predictor(onnx_file, dataclasses.replace(card, parts={}), None)


def test_halves_of_a_tensorrt_engine_are_checked_like_an_exports(spec, tmp_path):
    """The engines gen_trt_engine builds of the halves are named in the engine's card and checked
    before anything loads them (no GPU needed to check)."""
    halves = {name: tmp_path / f"m.{name}.engine" for name in ("embed", "compare")}
    for name, path in halves.items():
        path.write_bytes(f"{name} engine bytes".encode())
    described = ModelCard.describe(load_config(spec), None, batch_size=-1, opset_version=17, oi_ray_version="x",
                                   source_checkpoint="c", source_checkpoint_sha256="0" * 64)
    card = dataclasses.replace(described, parts={name: {"file": path.name, "sha256": sha256_of(path)}
                                                 for name, path in halves.items()})
    engine = tmp_path / "m.engine"
    assert check_halves(engine, card) == halves
    halves["compare"].write_bytes(b"another engine")
    with pytest.raises(DataError, match=r"m.compare.engine does not match the model card of m.engine"):
        check_halves(engine, card)
    with pytest.raises(DataError, match=r"m.engine was built without its embed and compare halves .*"
                                        r"build it again \(`oi-ray gen_trt_engine`\) from an export that has them"):
        check_halves(engine, dataclasses.replace(card, parts={}))


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.parametrize(("model_type", "layout"), CASES)
@pytest.mark.skipif(not HAS_GPU, reason="TensorRT needs an NVIDIA GPU; none is visible")
def test_tensorrt_scores_like_torch_pair_by_pair(spec, tmp_path, model_type, layout):
    pytest.importorskip("tensorrt", reason="the gpu extra (tensorrt) is not installed")
    overrides = _overrides(model_type, layout)
    config, checkpoint, onnx_file = _trained_and_exported(spec, tmp_path, overrides)
    engine, cache = tmp_path / "trained.engine", tmp_path / "timing.cache"
    # A fixed profile of 4 (an engine that takes only batches of 4): 11 pairs score as 4, 4, 3 + 1 padded.
    build = ["gen_trt_engine", "-e", str(spec), *overrides, f"gen_trt_engine.onnx_file={onnx_file}",
             f"gen_trt_engine.trt_engine={engine}", f"gen_trt_engine.timing_cache={cache}",
             f"gen_trt_engine.results_dir={tmp_path}", "gen_trt_engine.tensorrt.min_batch_size=4",
             "gen_trt_engine.tensorrt.opt_batch_size=4", "gen_trt_engine.tensorrt.max_batch_size=4"]
    assert main(build) == 0
    assert cache.stat().st_size > 0, "the timing cache is saved after the build"
    assert main(build) == 0, "and read by the next build"
    test, golden = _test_pairs(config)
    predictor = spec_model(engine, config).load(use_gpu=True)
    assert predictor.limits == BatchLimits(4, 4)
    torch_distances = torch.from_numpy(spec_model(checkpoint, config).load().distances(test, golden))
    trt_distances = torch.from_numpy(predictor.distances(test[:11], golden[:11]))
    # TensorRT may use TF32 for fp32 matrix products on Ampere and newer GPUs.
    torch.testing.assert_close(trt_distances, torch_distances[:11], rtol=5e-3, atol=1e-3)
    model = spec_model(engine, config)
    assert set(model.card.parts) == {"embed", "compare"} and model.scores_in_halves
    halves = model.load_halves(use_gpu=True)  # engines of the export's halves, built beside the model's
    assert (halves.embed_limits, halves.compare_limits) == (BatchLimits(4, 4), BatchLimits(4, 4))
    kept = halves.embed(golden[:11])
    assert kept.shape == (11 * model.card.features_per_pair[0], *model.card.features_per_pair[1:])
    from_kept = torch.from_numpy(halves.compare(halves.embed(test[:11]), kept))
    torch.testing.assert_close(from_kept, torch_distances[:11], rtol=5e-3, atol=1e-3)
