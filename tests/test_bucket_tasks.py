"""The tasks with their data, model and results in a bucket of a real S3-compatible server on
127.0.0.1 (moto's), run through the CLI as a user runs them, against the same run on local files."""

import base64
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
import requests
from helpers import free_port, kill_group, start_interruptible, wait_serving
from s3_server import s3_server, upload_folder

from oi_ray import storage
from oi_ray.cli import main
from oi_ray.config import load_config
from oi_ray.data.pairs import load_split
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


@pytest.fixture(scope="module")
def exported(trained) -> tuple[str, str]:
    """The bucket's checkpoint exported into the bucket: (the model's URI, what export logged)."""
    spec, results, prefix = trained
    model = f"{prefix}/export/oi_model.onnx"
    with pytest.MonkeyPatch.context() as patch:
        logged = io.StringIO()
        patch.setattr(sys, "stderr", logged)
        assert main(["export", "-e", str(spec), f"results_dir={results}",
                     f"export.checkpoint={prefix}/models/oi_model_latest.pth", f"export.onnx_file={model}"]) == 0
    return model, logged.getvalue()


def test_export_into_a_bucket_then_evaluate_the_exported_model_from_it(trained, exported):
    spec, results, prefix = trained
    model, logged = exported
    assert (f"uploaded oi_model.embed.onnx, oi_model.compare.onnx, oi_model.onnx, oi_model.onnx.json to "
            f"{prefix}/export") in logged
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


def test_serve_a_model_and_keep_goldens_in_a_bucket(trained, exported, tmp_path):
    """A real `oi-ray serve` process (its own embedded Ray, 127.0.0.1) serving the bucket's
    model, its golden library in the bucket: a registered golden scores a test shot as the
    uploaded golden does, and a restarted service still serves it."""
    spec, results, prefix = trained
    model, _ = exported
    table = load_split(load_config(spec).dataset, "test_dataset")
    lights = tuple(load_config(spec).dataset.input_map)
    files = {side: {light: Path(path).read_bytes() for light, path in zip(lights, paths, strict=True)}
             for side, paths in (("test", table.test_paths[0]), ("golden", table.golden_paths[0]))}
    pair = {side: {light: base64.b64encode(data).decode() for light, data in shots.items()}
            for side, shots in files.items()}
    for attempt in ("first", "restarted"):
        port = free_port()
        serving = tmp_path / f"{attempt}.yaml"
        serving.write_text(f"serve:\n  model: {model}\n  port: {port}\n  golden_store: {prefix}/goldens\n"
                           "ray:\n  num_cpus: 2\n")
        url = f"http://127.0.0.1:{port}"
        log = tmp_path / f"{attempt}.txt"
        with log.open("w") as stderr:
            process = start_interruptible([sys.executable, "-m", "oi_ray.cli", "serve", "-e", str(serving)],
                                          stdout=stderr, stderr=subprocess.STDOUT)
        try:
            wait_serving(url, process, log)
            if attempt == "first":
                put = requests.put(f"{url}/v1/goldens/C12", json={"golden": pair["golden"]}, timeout=60)
                assert put.status_code == 201, put.text
            uploaded = requests.post(f"{url}/v1/inspect", json={"pairs": [{"id": "up", **pair}]}, timeout=60)
            named = requests.post(f"{url}/v1/inspect", timeout=60, json={
                "pairs": [{"id": "named", "golden_id": "C12", "test": pair["test"]}]})
            assert uploaded.status_code == named.status_code == 200, (uploaded.text, named.text)
            assert named.json()["results"][0]["distance"] == pytest.approx(
                uploaded.json()["results"][0]["distance"], abs=1e-5)
            os.killpg(process.pid, signal.SIGINT)
            assert process.wait(timeout=120) == 0, log.read_text()
        finally:
            kill_group(process)
    assert "C12" in {name.split("/")[0] for name in _names_under(f"{prefix}/goldens")}


def _names_under(prefix: str) -> list[str]:
    filesystem, path = storage.resolve(prefix)
    return [info.path[len(path) + 1:] for info in filesystem.get_file_info(
        pafs.FileSelector(path, recursive=True))]


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


def test_pack_a_bucket_then_train_on_its_shards_as_on_the_files(trained, capsys):
    spec, results, prefix = trained
    packed = f"{prefix}/packed"
    from_bucket = [f"dataset.{split}.{key}={prefix}/set/{name}" for split, csv in
                   (("train_dataset", "train.csv"), ("validation_dataset", "val.csv"))
                   for key, name in (("csv_path", csv), ("images_dir", "images"))]
    assert main(["pack", "-e", str(spec), *from_bucket, "dataset.test_dataset.csv_path=null",
                 "dataset.infer_dataset.csv_path=null", f"pack.results_dir={packed}"]) == 0
    err = capsys.readouterr().err
    assert f"wrote {packed}/dataset.yaml; read the shards with: " in err
    assert f" train -e '<your spec>' -e {packed}/dataset.yaml\n" in err, "the hint names the fragment's URI"
    manifest = json.loads(storage.read_bytes(f"{packed}/train_dataset/manifest.json"))
    assert manifest["csv_path"] == f"{prefix}/set/train.csv"
    assert set(storage.list_files(f"{packed}/train_dataset")) == \
        {"manifest.json", *(entry["name"] for entry in manifest["files"])}, "shards and the manifest only"

    fragment = f"{packed}/dataset.yaml"  # read from the bucket, as pack's closing line says
    run = f"{prefix}/runs/packed"
    assert main(["train", "-e", str(spec), "-e", fragment, f"train.results_dir={run}", "train.num_epochs=2",
                 "dataset.batch_size=8", "ray.num_workers=1"]) == 0
    assert f"{packed}/train_dataset: " in capsys.readouterr().err
    ours = [json.loads(line) for line in storage.read_bytes(f"{run}/status.json").decode().splitlines()]
    files = [json.loads(line) for line in (results / "train/status.json").read_text().splitlines()]
    for metric in ("train_loss", "val_loss", "val_auroc", "threshold"):
        assert [line[metric] for line in ours] == pytest.approx([line[metric] for line in files], abs=1e-6), metric

    assert main(["train", "-e", str(spec), "-e", f"{packed}/nothing.yaml"]) == 1
    assert f"spec file not found: {packed}/nothing.yaml" in capsys.readouterr().err
