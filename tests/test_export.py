"""oi-ray export, the ONNX / TensorRT predictors, encryption at rest and gen_trt_engine."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from oi_ray.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from oi_ray.cli import main
from oi_ray.crypto import MAGIC
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.model.siamese import build_model

INPUT_SHAPE = (3, 32, 16)  # 2 lightings of 16x16, linear
HAS_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return synthesize_dataset(root, SyntheticSpec(num_pairs=60, lights=("WhiteLight", "SolderLight"),
                                                  width=16, height=16, image_ext=".png", seed=9)).spec_path


def _checkpoint(folder: Path, key: str | None = None) -> Path:
    torch.manual_seed(0)
    model = build_model("Siamese_3", INPUT_SHAPE, 5)
    path = folder / "model.pth"
    save_checkpoint(Checkpoint(model.state_dict(), epoch=3, threshold=0.25, model_type="Siamese_3",
                               input_shape=INPUT_SHAPE, embedding_dim=5), path, key)
    return path


def _export(spec: Path, checkpoint: Path, onnx_file: Path, *overrides: str) -> int:
    return main(["export", "-e", str(spec), f"export.checkpoint={checkpoint}", f"export.onnx_file={onnx_file}",
                 *overrides])


def test_export_has_tao_interface_and_a_model_card(spec, tmp_path):
    checkpoint = _checkpoint(tmp_path)
    onnx_file = tmp_path / "out/oi_model.onnx"
    assert _export(spec, checkpoint, onnx_file) == 0
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
    assert len(card["source_checkpoint_sha256"]) == 64


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

    fixed = tmp_path / "fixed.onnx"
    assert _export(spec, _checkpoint(tmp_path), fixed, "export.batch_size=2") == 0
    capsys.readouterr()
    assert main(["inference", "-e", str(spec), f"inference.checkpoint={fixed}"]) == 1
    assert "exported with a fixed batch of 2; scoring needs the dynamic batch axis" in capsys.readouterr().err

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(onnx_file.read_bytes()[:1000])
    broken.with_name("broken.onnx.json").write_text(onnx_file.with_name("m.onnx.json").read_text())
    assert main(["inference", "-e", str(spec), f"inference.checkpoint={broken}"]) == 1
    err = capsys.readouterr().err
    assert f"error: cannot load ONNX model {broken}:" in err and "Traceback" not in err


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
