"""oi-ray export, the ONNX / TensorRT predictors, encryption at rest and gen_trt_engine."""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from helpers import spec_model, tao_architecture

from oi_ray.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from oi_ray.cli import main
from oi_ray.config import load_config
from oi_ray.crypto import MAGIC
from oi_ray.data.assemble import InputGeometry, read_pictures
from oi_ray.data.pairs import load_split
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.errors import DataError
from oi_ray.model_card import ModelCard, card_path, read_card
from oi_ray.model_file import open_model_file
from oi_ray.predictors import BatchLimits

INPUT_SHAPE = (3, 32, 16)  # 2 lightings of 16x16, linear
HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return synthesize_dataset(root, SyntheticSpec(num_pairs=60, lights=("WhiteLight", "SolderLight"),
                                                  width=16, height=16, image_ext=".png", seed=9)).spec_path


def _checkpoint(folder: Path, key: str | None = None) -> Path:
    torch.manual_seed(0)
    model = tao_architecture("Siamese_3", INPUT_SHAPE, 5).build()
    path = folder / "model.pth"
    save_checkpoint(Checkpoint(model.state_dict(), epoch=3, threshold=0.25, model_type="Siamese_3",
                               input_shape=INPUT_SHAPE, embedding_dim=5), path, key)
    return path


def _export(spec: Path, checkpoint: Path, onnx_file: Path, *overrides: str) -> int:
    return main(["export", "-e", str(spec), f"export.checkpoint={checkpoint}", f"export.onnx_file={onnx_file}",
                 f"export.results_dir={onnx_file.parent}", *overrides])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_export_has_tao_interface_and_a_model_card(spec, tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path)
    onnx_file = tmp_path / "out/oi_model.onnx"
    assert _export(spec, checkpoint, onnx_file) == 0
    err = capsys.readouterr().err
    resolved = tmp_path / "out/spec.yaml"
    assert load_config(resolved).export.checkpoint == str(checkpoint), "the resolved spec is saved"
    assert f" evaluate -e {resolved} evaluate.checkpoint={onnx_file}" in err.splitlines()[-1]
    graph = onnx.load(onnx_file).graph
    assert [i.name for i in graph.input] == ["input_1", "input_2"]
    assert [o.name for o in graph.output] == ["output_1", "output_2"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 32, 16]
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(3, *INPUT_SHAPE)).astype(np.float32)
    first, second = session.run(None, {"input_1": x, "input_2": x[::-1].copy()})
    assert first.shape == second.shape == (3, 5)

    card = json.loads((tmp_path / "out/oi_model.onnx.json").read_text())
    assert card["lights"] == ["WhiteLight", "SolderLight"] and card["input_shape"] == [3, 32, 16]
    assert card["threshold"] == 0.25 and card["batch_size"] == -1 and card["opset_version"] == 17
    assert card["rgb_mean"] == [0.485, 0.456, 0.406] and card["concat_type"] == "linear"
    assert card["source_checkpoint_sha256"] == _sha256(checkpoint)
    assert card["model_sha256"] == _sha256(onnx_file)
    assert card["parts"] == {name: {"file": f"oi_model.{name}.onnx", "sha256": _sha256(onnx_file.with_name(
        f"oi_model.{name}.onnx"))} for name in ("embed", "compare")} and card["features_per_pair"] == [1, 5]
    assert sorted(p.name for p in onnx_file.parent.iterdir()) == [
        "oi_model.compare.onnx", "oi_model.embed.onnx", "oi_model.onnx", "oi_model.onnx.json", "spec.yaml"]


def test_export_verbose_prints_the_exported_graph(spec, tmp_path, capfd):
    checkpoint = _checkpoint(tmp_path)
    assert _export(spec, checkpoint, tmp_path / "quiet.onnx") == 0
    assert "Exported graph" not in capfd.readouterr().out
    assert _export(spec, checkpoint, tmp_path / "verbose.onnx", "export.verbose=true") == 0
    assert "Exported graph: graph(%input_1 : Float(*, 3, 32, 16" in capfd.readouterr().out


def test_batch_limits_cut_and_pad_and_drop_the_padding():
    calls = []

    def run(test, golden):
        calls.append(len(test))
        return test[:, 0, 0, 0].astype(np.float32) + golden[:, 0, 0, 0]

    test = np.arange(11, dtype=np.uint8).reshape(11, 1, 1, 1)
    golden = np.full_like(test, 100)
    np.testing.assert_array_equal(BatchLimits(4, 4).score(run, test, golden), np.arange(100, 111))
    assert calls == [4, 4, 4], "11 pairs: two full batches and one padded from 3 to 4"
    calls.clear()
    np.testing.assert_array_equal(BatchLimits(2, 8).score(run, test[:1], golden[:1]), [100])
    assert calls == [2]
    calls.clear()
    assert BatchLimits().score(run, test, golden).shape == (11,) and calls == [11]


def test_fixed_batch_export_scores_like_the_dynamic_one_pair_by_pair(spec, tmp_path):
    checkpoint = _checkpoint(tmp_path)
    dynamic, fixed = tmp_path / "dynamic.onnx", tmp_path / "fixed4.onnx"
    assert _export(spec, checkpoint, dynamic) == 0
    assert _export(spec, checkpoint, fixed, "export.batch_size=4") == 0
    config = load_config(spec)
    geometry = InputGeometry.from_config(config.dataset)
    table = load_split(config.dataset, "train_dataset")
    rows = range(30)  # not a multiple of 4
    test = read_pictures([table.test_paths[row] for row in rows], geometry)
    golden = read_pictures([table.golden_paths[row] for row in rows], geometry)
    expected = torch.from_numpy(spec_model(dynamic, config).load().distances(test, golden))
    predictor = spec_model(fixed, config).load()
    assert predictor.limits == BatchLimits(4, 4)
    assert read_card(fixed).batch_size == 4
    for size in (1, 3, 7, 30):
        scored = np.concatenate([predictor.distances(test[start:start + size], golden[start:start + size])
                                 for start in range(0, len(test), size)])
        torch.testing.assert_close(torch.from_numpy(scored), expected, rtol=1e-5, atol=1e-6)
    assert expected.std() > 0, "distinct pairs give distinct distances"


def test_fixed_batch_and_size_checks(spec, tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path)
    assert _export(spec, checkpoint, tmp_path / "b2.onnx", "export.batch_size=2") == 0
    dims = [d.dim_param or d.dim_value for d in onnx.load(tmp_path / "b2.onnx").graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 32, 16]
    assert _export(spec, checkpoint, tmp_path / "bad.onnx", "export.input_height=512") == 1
    assert "export.input_height=512 contradicts the assembled input 32" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()


def test_encryption_key_protects_checkpoints_and_models(spec, tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path, key="s3cret")
    assert checkpoint.read_bytes().startswith(MAGIC)
    assert load_checkpoint(checkpoint, "s3cret").threshold == 0.25
    with pytest.raises(Exception, match="is encrypted: set encryption_key"):
        load_checkpoint(checkpoint)
    with pytest.raises(Exception, match="wrong encryption_key, or the file was modified"):
        load_checkpoint(checkpoint, "guess")

    onnx_file = tmp_path / "enc.onnx"
    assert _export(spec, checkpoint, onnx_file, "encryption_key=s3cret") == 0
    assert onnx_file.read_bytes().startswith(MAGIC)
    for half in ("enc.embed.onnx", "enc.compare.onnx"):
        assert (tmp_path / half).read_bytes().startswith(MAGIC), half
    assert _export(spec, checkpoint, tmp_path / "x.onnx", "encryption_key=wrong") == 1
    err = capsys.readouterr().err
    assert f"error: cannot decrypt {checkpoint}: wrong encryption_key" in err and "Traceback" not in err


@pytest.mark.ray
def test_pth_and_onnx_evaluate_to_the_same_metrics(ray_local, spec, tmp_path):
    checkpoint = _checkpoint(tmp_path, key="k")
    onnx_file = tmp_path / "m.onnx"
    assert _export(spec, checkpoint, onnx_file, "encryption_key=k") == 0
    reports = []
    for name, model in (("pth", checkpoint), ("onnx", onnx_file)):
        results = tmp_path / name
        assert main(["evaluate", "-e", str(spec), f"evaluate.checkpoint={model}", "encryption_key=k",
                     f"evaluate.results_dir={results}"]) == 0
        reports.append(json.loads((results / "metrics.json").read_text()))
    pth, onnx_report = reports
    assert (pth["checkpoint"], onnx_report["checkpoint"]) == (str(checkpoint.resolve()), str(onnx_file.resolve()))
    assert round(pth["auroc"], 4) == round(onnx_report["auroc"], 4)
    assert pth["tao_metrics_at_margin"] == onnx_report["tao_metrics_at_margin"]
    assert pth["threshold"]["value"] == onnx_report["threshold"]["value"] == 0.25


@pytest.mark.ray
def test_onnx_model_for_another_layout_is_refused(ray_local, spec, tmp_path, capsys):
    onnx_file = tmp_path / "m.onnx"
    assert _export(spec, _checkpoint(tmp_path), onnx_file) == 0
    assert main(["inference", "-e", str(spec), f"inference.checkpoint={onnx_file}",
                 "dataset.input_map={SolderLight: 0, WhiteLight: 1}"]) == 1
    err = capsys.readouterr().err
    assert "was exported for another input layout than the spec's: lights: model ('WhiteLight', 'SolderLight')" in err

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(onnx_file.read_bytes()[:1000])
    broken.with_name("broken.onnx.json").write_text(onnx_file.with_name("m.onnx.json").read_text())
    capsys.readouterr()
    assert main(["inference", "-e", str(spec), f"inference.checkpoint={broken}"]) == 1
    err = capsys.readouterr().err
    assert (f"error: {broken} does not match its model card broken.onnx.json (SHA-256 differs): the file is "
            f"truncated, corrupt or was replaced; export it again") in err and "Traceback" not in err


@pytest.mark.ray
def test_fixed_batch_model_scores_every_pair_of_a_split(ray_local, spec, tmp_path):
    checkpoint = _checkpoint(tmp_path)
    scores = {}
    for name, batch in (("dynamic", "-1"), ("fixed", "5")):  # 12 test pairs: batches of 5, 5 and 2 padded
        model = tmp_path / f"{name}.onnx"
        assert _export(spec, checkpoint, model, f"export.batch_size={batch}") == 0
        results = tmp_path / name
        assert main(["inference", "-e", str(spec), f"inference.checkpoint={model}",
                     f"inference.results_dir={results}", "inference.batch_size=16"]) == 0
        scores[name] = pd.read_csv(results / "inference.csv")["siamese_score"].to_numpy()
    assert len(scores["fixed"]) == 12
    torch.testing.assert_close(torch.tensor(scores["fixed"]), torch.tensor(scores["dynamic"]),
                               rtol=1e-5, atol=1e-6)


def test_driver_checks_model_files_without_loading_them(spec, tmp_path):
    config = load_config(spec)
    checkpoint = _checkpoint(tmp_path)
    assert spec_model(checkpoint, config).carried.value == 0.25
    assert spec_model(checkpoint, config).carried.source == f"the checkpoint {checkpoint}"
    onnx_file = tmp_path / "m.onnx"
    assert _export(spec, checkpoint, onnx_file) == 0
    carried = spec_model(onnx_file, config).carried
    assert (carried.value, carried.source) == (0.25, f"the model card {card_path(onnx_file)}")

    engine = tmp_path / "m.engine"  # checked by its card's digest: no GPU needed
    engine.write_bytes(b"serialized engine bytes")
    card = dataclasses.replace(read_card(onnx_file), model_sha256=_sha256(engine))
    card.write(engine)
    assert spec_model(engine, config).carried.value == 0.25
    engine.write_bytes(b"serialized engine byte")
    with pytest.raises(DataError, match=r"m.engine does not match its model card m.engine.json \(SHA-256"):
        spec_model(engine, config)

    legacy = tmp_path / "legacy.onnx"  # a card from before model_sha256: the graph is checked instead
    legacy.write_bytes(onnx_file.read_bytes()[:-100])
    card_path(legacy).write_text(json.dumps({k: v for k, v in json.loads(card_path(onnx_file).read_text()).items()
                                             if k != "model_sha256"}))
    assert read_card(legacy).model_sha256 is None
    with pytest.raises(DataError, match=f"cannot load ONNX model {legacy}"):
        spec_model(legacy, config)


def test_encrypted_model_with_a_wrong_key_is_refused_by_the_driver(spec, tmp_path):
    checkpoint = _checkpoint(tmp_path, key="k")
    onnx_file = tmp_path / "enc.onnx"
    assert _export(spec, checkpoint, onnx_file, "encryption_key=k") == 0
    assert read_card(onnx_file).model_sha256 == _sha256(onnx_file), "the digest of the encrypted bytes"
    assert spec_model(onnx_file, load_config(spec, ["encryption_key=k"])).carried.value == 0.25
    for path in (checkpoint, onnx_file):
        with pytest.raises(DataError, match=f"cannot decrypt {path}: wrong encryption_key"):
            spec_model(path, load_config(spec, ["encryption_key=guess"]))
    config = load_config(spec, ["encryption_key=k"])
    geometry = InputGeometry.from_config(config.dataset)
    table = load_split(config.dataset, "test_dataset")
    test, golden = (read_pictures(paths, geometry) for paths in (table.test_paths, table.golden_paths))
    onnx_distances, torch_distances = (spec_model(path, config).load().distances(test, golden)
                                       for path in (onnx_file, checkpoint))
    torch.testing.assert_close(torch.from_numpy(onnx_distances), torch.from_numpy(torch_distances),
                               rtol=1e-4, atol=1e-5)


def test_gen_trt_engine_names_a_model_that_is_not_an_onnx_export(spec, tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path)
    for wrong, message in ((checkpoint, f"gen_trt_engine.onnx_file={str(checkpoint)!r}: expected the .onnx model"),
                           (tmp_path / "absent.onnx", f"model not found: {tmp_path / 'absent.onnx'}")):
        assert main(["gen_trt_engine", "-e", str(spec), f"gen_trt_engine.onnx_file={wrong}"]) == 1
        assert message in capsys.readouterr().err


@pytest.mark.skipif(HAS_GPU, reason="checks the message on machines without an NVIDIA GPU")
def test_gen_trt_engine_without_gpu_says_what_is_missing(spec, tmp_path, capsys):
    onnx_file = tmp_path / "m.onnx"
    assert _export(spec, _checkpoint(tmp_path), onnx_file) == 0
    capsys.readouterr()
    assert main(["gen_trt_engine", "-e", str(spec), f"gen_trt_engine.onnx_file={onnx_file}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["oi-ray gen_trt_engine: error: TensorRT needs an NVIDIA GPU with CUDA and none is visible; "
                   "install the gpu extra on a machine with an NVIDIA GPU: pip install -e '.[gpu]'"]


@pytest.mark.gpu
@pytest.mark.trt
@pytest.mark.ray
@pytest.mark.skipif(not HAS_GPU, reason="TensorRT needs an NVIDIA GPU; none is visible")
def test_tensorrt_engine_scores_like_onnx(ray_local, spec, tmp_path):
    pytest.importorskip("tensorrt", reason="the gpu extra (tensorrt) is not installed")
    onnx_file, engine = tmp_path / "m.onnx", tmp_path / "m.engine"
    assert _export(spec, _checkpoint(tmp_path), onnx_file) == 0
    assert main(["gen_trt_engine", "-e", str(spec), f"gen_trt_engine.onnx_file={onnx_file}",
                 f"gen_trt_engine.trt_engine={engine}", "dataset.batch_size=8"]) == 0
    reports = []
    for key, model in (("checkpoint", onnx_file), ("trt_engine", engine)):
        results = tmp_path / key
        assert main(["evaluate", "-e", str(spec), f"evaluate.{key}={model}", f"evaluate.results_dir={results}",
                     "dataset.batch_size=8"]) == 0
        reports.append(json.loads((results / "metrics.json").read_text()))
    assert round(reports[0]["auroc"], 3) == round(reports[1]["auroc"], 3)


@pytest.mark.parametrize(("overrides", "card_batch", "expected"), [
    ([], -1, (1, 8, 8)),  # opt and max default to dataset.batch_size
    (["gen_trt_engine.tensorrt.max_batch_size=64"], -1, (1, 8, 64)),
    (["gen_trt_engine.batch_size=16"], -1, (16, 16, 16)),  # TAO: a fixed engine batch
    (["gen_trt_engine.batch_size=16"], 4, None),  # a fixed-batch model needs no profile
])
def test_tensorrt_batch_profile(spec, overrides, card_batch, expected):
    from oi_ray.tasks.gen_trt_engine import _batch_profile

    config = load_config(spec, ["dataset.batch_size=8", *overrides])
    card = ModelCard.describe(config, None, batch_size=card_batch, opset_version=17, oi_ray_version="x",
                              source_checkpoint="c", source_checkpoint_sha256="0" * 64)
    assert _batch_profile(config, card) == expected


def test_opening_a_model_file_checks_type_presence_and_layout(spec, tmp_path):
    config = load_config(spec)
    with pytest.raises(DataError, match=r"m\.bin: unknown model file type; expected \.pth, \.onnx or \.engine"):
        spec_model(tmp_path / "m.bin", config)
    with pytest.raises(DataError, match=f"model not found: {tmp_path / 'absent.onnx'}"):
        spec_model(tmp_path / "absent.onnx", config)
    checkpoint = _checkpoint(tmp_path)
    opened = spec_model(checkpoint, config)
    assert (opened.backend, opened.card.threshold, opened.card.source_checkpoint) == ("torch", 0.25, str(checkpoint))
    assert opened.card.source_checkpoint_sha256 == "", "scoring a split reads no digest"
    served = open_model_file(checkpoint, None, ModelCard.expected_by(config), checkpoint_digest=True)
    assert served.name == f"{checkpoint.name}@{_sha256(checkpoint)[:12]}"
    onnx_file = tmp_path / "m.onnx"
    assert _export(spec, checkpoint, onnx_file) == 0
    other = load_config(spec, ["dataset.image_width=64"])
    with pytest.raises(DataError, match=r"m\.onnx was exported for another input layout than the spec's: input_shape"):
        spec_model(onnx_file, other)
    assert open_model_file(onnx_file, None, None).card == read_card(onnx_file), "serving: the card decides"
