"""oi-ray evaluate and inference on a checkpoint trained in the module's own local Ray."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oi_ray.cli import main
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.metrics import auroc, tao_metrics

pytestmark = pytest.mark.ray
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory) -> tuple[Path, Path]:
    """(spec, results_dir) after 2 epochs of training on tiny synthetic data."""
    root = tmp_path_factory.mktemp("data")
    spec = synthesize_dataset(root, SyntheticSpec(num_pairs=120, lights=("WhiteLight", "SolderLight"),
                                                  width=16, height=16, image_ext=".png", seed=5)).spec_path
    results = root / "results"
    assert main(["train", "-e", str(spec), f"results_dir={results}", "train.num_epochs=2",
                 "dataset.batch_size=8", "ray.num_workers=1"]) == 0
    return spec, results


def _run(task: str, trained, *overrides: str) -> int:
    spec, results = trained
    return main([task, "-e", str(spec), f"results_dir={results}", *overrides])


def test_inference_writes_one_row_per_input_in_order(trained):
    spec, results = trained
    assert _run("inference", trained, "inference.batch_size=4") == 0
    written = pd.read_csv(results / "inference/inference.csv", dtype=str, keep_default_na=False)
    source = pd.read_csv(spec.parent / "test.csv", dtype=str, keep_default_na=False)
    assert list(written.columns) == [*source.columns, "siamese_score", "decision"]
    pd.testing.assert_frame_equal(written[source.columns], source)
    scores = written["siamese_score"].astype(float).to_numpy()
    assert np.all(scores >= 0) and len(np.unique(scores)) > 1
    threshold = float(np.median(scores))
    assert _run("inference", trained, f"inference.threshold={threshold}") == 0
    again = pd.read_csv(results / "inference/inference.csv", dtype=str, keep_default_na=False)
    np.testing.assert_allclose(again["siamese_score"].astype(float), scores, rtol=1e-5)
    expected = np.where(scores > threshold, "NO_PASS", "PASS")
    assert again["decision"].tolist() == expected.tolist()


def test_evaluate_reports_tao_and_calibrated_metrics(trained, capsys):
    spec, results = trained
    assert _run("evaluate", trained) == 0
    out = capsys.readouterr().out
    report = json.loads((results / "evaluate/metrics.json").read_text())
    assert report["split"] == "test_dataset" and report["pairs"] == len(pd.read_csv(spec.parent / "test.csv"))
    assert report["threshold"]["source"].startswith("calibrated on the validation set")
    assert set(report["tao_metrics_at_margin"]) == {
        "margin", "total_accuracy", "defect_accuracy", "false_alarm", "false_negative"}
    assert 0 <= report["auroc"] <= 1 and 0 <= report["aupr"] <= 1
    assert report["at_100_defect_recall"]["defect_recall"] == 1.0
    matrix = report["confusion_matrix"]
    assert sum(matrix.values()) == report["pairs"]
    assert matrix["caught_defect"] + matrix["missed_defect"] == report["defects"]
    for name in ("roc.png", "pr.png", "distance_histogram.png"):
        assert (results / "evaluate" / name).read_bytes()[:8] == PNG_MAGIC
    assert f"Tot Comp {report['pairs']} Total Accuracy" in out and "for Margin 2.0" in out

    # The same numbers from inference's scores, computed independently here.
    assert _run("inference", trained, "inference.batch_size=8") == 0
    scored = pd.read_csv(results / "inference/inference.csv")
    targets = (scored["label"] != "PASS").to_numpy().astype(int)
    distances = scored["siamese_score"].to_numpy()
    assert report["auroc"] == pytest.approx(auroc(distances, targets), abs=1e-6)
    tao = tao_metrics(distances, targets, 2.0)
    assert report["tao_metrics_at_margin"]["total_accuracy"] == pytest.approx(tao["total_accuracy"])


def test_evaluate_falls_back_to_validation_and_honours_threshold(trained, capsys):
    assert _run("evaluate", trained, "dataset.test_dataset.csv_path=null", "evaluate.threshold=0.5") == 0
    _, results = trained
    report = json.loads((results / "evaluate/metrics.json").read_text())
    assert report["split"] == "validation_dataset"
    assert report["threshold"] == {"value": 0.5, "source": "evaluate.threshold"}
    assert "dataset.test_dataset is not set: evaluate uses dataset.validation_dataset" in capsys.readouterr().err


def test_scoring_errors_are_one_clear_line(trained, tmp_path, capsys):
    spec, results = trained
    assert _run("evaluate", trained, f"evaluate.checkpoint={tmp_path}/missing.pth") == 1
    assert f"oi-ray evaluate: error: checkpoint not found: {tmp_path}/missing.pth" in capsys.readouterr().err

    checkpoint = results / "train/oi_model_latest.pth"
    assert _run("inference", trained, f"inference.checkpoint={checkpoint}", "model.model_type=Siamese_1") == 1
    err = capsys.readouterr().err
    assert "holds a Siamese_3 model with input 3x32x16; the spec asks for model.model_type=Siamese_1" in err
    assert "Traceback" not in err

    bad = tmp_path / "bad.csv"
    bad.write_text("input_path,golden_path,object_name,label\nboards/none,golden/none,X1,PASS\n")
    assert _run("evaluate", trained, f"dataset.test_dataset.csv_path={bad}",
                f"dataset.test_dataset.images_dir={spec.parent / 'images'}") == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "row 1 (line 2), column 'input_path'" in err and "Traceback" not in err
