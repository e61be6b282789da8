"""The tasks with their data, model and results in a bucket of a real S3-compatible server on
127.0.0.1 (moto's), run through the CLI as a user runs them, against the same run on local files."""

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from s3_server import s3_server, upload_folder

from oi_ray import storage
from oi_ray.cli import main
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BUCKET = "oi-ray-line-3"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def s3():
    with s3_server(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def trained(s3, ray_local, tmp_path_factory) -> tuple[Path, Path, str]:
    """(spec, local results) after 2 epochs on tiny synthetic data, and the bucket prefix that
    holds the same dataset and checkpoint."""
    root = tmp_path_factory.mktemp("data")
    spec = synthesize_dataset(root / "set", SyntheticSpec(num_pairs=120, lights=("WhiteLight", "SolderLight"),
                                                          width=16, height=16, image_ext=".png", seed=5)).spec_path
    results = root / "results"
    assert main(["train", "-e", str(spec), f"results_dir={results}", "train.num_epochs=2",
                 "dataset.batch_size=8", "ray.num_workers=1"]) == 0
    prefix = f"s3://{BUCKET}/projects/r12"
    upload_folder(root / "set", f"{prefix}/set")
    storage.write_atomically(f"{prefix}/models/oi_model_latest.pth",
                             (results / "train/oi_model_latest.pth").read_bytes())
    return spec, results, prefix


def _in_bucket(prefix: str, split: str) -> list[str]:
    """Overrides that read ``split`` from the bucket (the generator's test.csv, as its spec names it)."""
    return [f"dataset.{split}.csv_path={prefix}/set/test.csv", f"dataset.{split}.images_dir={prefix}/set/images"]


def test_evaluate_and_inference_read_and_write_a_bucket_with_the_local_results(trained, capsys):
    spec, results, prefix = trained
    local = ["-e", str(spec), f"results_dir={results}"]
    assert main(["evaluate", *local]) == 0
    assert main(["inference", *local]) == 0
    capsys.readouterr()

    remote = ["-e", str(spec), f"results_dir={results}", f"evaluate.checkpoint={prefix}/models/oi_model_latest.pth",
              f"evaluate.results_dir={prefix}/evaluate", *_in_bucket(prefix, "test_dataset")]
    assert main(["evaluate", *remote]) == 0
    assert f"wrote {prefix}/evaluate/metrics.json" in capsys.readouterr().err
    report = json.loads(storage.read_bytes(f"{prefix}/evaluate/metrics.json"))
    expected = json.loads((results / "evaluate/metrics.json").read_text())
    assert report["checkpoint"] == f"{prefix}/models/oi_model_latest.pth"
    assert report["dataset"] == f"{prefix}/set/test.csv"
    assert report["auroc"] == pytest.approx(expected["auroc"], abs=1e-6)
    assert report["confusion_at_threshold"] == expected["confusion_at_threshold"]
    written = storage.list_files(f"{prefix}/evaluate")
    assert set(written) == {"metrics.json", "roc.png", "pr.png", "distance_histogram.png",
                            "false_alarms_vs_recall.png", "pairs.png", "spec.yaml"}, "no temporary left"
    assert storage.read_bytes(f"{prefix}/evaluate/roc.png")[:8] == PNG_MAGIC

    assert main(["inference", "-e", str(spec), f"results_dir={results}",
                 f"inference.checkpoint={prefix}/models/oi_model_latest.pth",
                 f"inference.results_dir={prefix}/inference", *_in_bucket(prefix, "infer_dataset")]) == 0
    scored = pd.read_csv(io.BytesIO(storage.read_bytes(f"{prefix}/inference/inference.csv")))
    reference = pd.read_csv(results / "inference/inference.csv")
    assert list(scored["input_path"]) == list(reference["input_path"])
    np.testing.assert_allclose(scored["siamese_score"], reference["siamese_score"], rtol=1e-5, atol=1e-6)
    assert list(scored["decision"]) == list(reference["decision"])


def test_a_missing_model_or_bucket_is_one_clear_line_before_ray_work(trained, capsys):
    spec, results, prefix = trained
    assert main(["evaluate", "-e", str(spec), f"results_dir={results}",
                 f"evaluate.checkpoint={prefix}/models/model_epoch_009.pth"]) == 1
    assert f"not found: {prefix}/models/model_epoch_009.pth" in capsys.readouterr().err
    assert main(["evaluate", "-e", str(spec), f"results_dir={results}",
                 "dataset.test_dataset.csv_path=s3://no-such-bucket/test.csv"]) == 1
    assert ("dataset.test_dataset.csv_path=s3://no-such-bucket/test.csv: the bucket 'no-such-bucket' "
            "does not exist") in capsys.readouterr().err


def test_export_into_a_bucket_then_evaluate_the_exported_model_from_it(trained, capsys):
    spec, results, prefix = trained
    model = f"{prefix}/export/oi_model.onnx"
    assert main(["export", "-e", str(spec), f"results_dir={results}",
                 f"export.checkpoint={prefix}/models/oi_model_latest.pth", f"export.onnx_file={model}"]) == 0
    assert f"uploaded oi_model.embed.onnx, oi_model.compare.onnx, oi_model.onnx, oi_model.onnx.json to " \
           f"{prefix}/export" in capsys.readouterr().err
    assert set(storage.list_files(f"{prefix}/export")) == {
        "oi_model.onnx", "oi_model.onnx.json", "oi_model.embed.onnx", "oi_model.compare.onnx"}
    card = json.loads(storage.read_bytes(f"{model}.json"))
    assert card["source_checkpoint"] == f"{prefix}/models/oi_model_latest.pth"

    assert main(["evaluate", "-e", str(spec), f"results_dir={results}", f"evaluate.checkpoint={model}",
                 f"evaluate.results_dir={prefix}/evaluate-onnx"]) == 0
    from_onnx = json.loads(storage.read_bytes(f"{prefix}/evaluate-onnx/metrics.json"))
    assert from_onnx["checkpoint"] == model
    assert main(["evaluate", "-e", str(spec), f"results_dir={results}"]) == 0
    from_pth = json.loads((results / "evaluate/metrics.json").read_text())
    assert from_onnx["auroc"] == pytest.approx(from_pth["auroc"], abs=1e-4)


def test_train_into_a_bucket_then_resume_from_it(trained, capsys):
    spec, results, prefix = trained
    run = f"{prefix}/runs/r1"
    command = ["train", "-e", str(spec), f"results_dir={results}", f"train.results_dir={run}",
               "dataset.batch_size=8", "ray.num_workers=1"]
    assert main([*command, "train.num_epochs=1"]) == 0
    assert set(storage.list_files(run)) == {"model_epoch_000.pth", "oi_model_latest.pth", "status.json",
                                            "spec.yaml"}, "whole files only, no temporaries"
    assert storage.read_bytes(f"{run}/oi_model_latest.pth") == storage.read_bytes(f"{run}/model_epoch_000.pth")
    capsys.readouterr()

    assert main([*command, "train.num_epochs=2"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from {run}/oi_model_latest.pth (epoch 1)" in err
    assert f"done: {run}/oi_model_latest.pth -> model_epoch_001.pth (epoch 2)" in err
    lines = [json.loads(line) for line in storage.read_bytes(f"{run}/status.json").decode().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2]
    assert storage.read_bytes(f"{run}/oi_model_latest.pth") == storage.read_bytes(f"{run}/model_epoch_001.pth")

    assert main([*command, "train.num_epochs=2", "train.tensorboard.enabled=true"]) == 1
    assert "train.tensorboard.enabled needs a local train.results_dir" in capsys.readouterr().err
