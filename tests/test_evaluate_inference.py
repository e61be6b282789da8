"""oi-ray evaluate and inference on a checkpoint trained in the module's own local Ray."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from oi_ray.cli import main
from oi_ray.config import load_config
from oi_ray.config.schema import CalibrationRuleConfig
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.metrics import describe_rule, tao_metrics

pytestmark = pytest.mark.ray
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

DEFAULT_RULE = describe_rule(CalibrationRuleConfig())  # train.calibration by default, in words


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


def test_inference_writes_one_row_per_input_in_order(trained, capsys):
    spec, results = trained
    output = results / "inference/inference.csv"
    output.unlink(missing_ok=True)
    assert _run("inference", trained, "inference.batch_size=4") == 0
    assert "replacing" not in capsys.readouterr().err
    written = pd.read_csv(output, dtype=str, keep_default_na=False)
    source = pd.read_csv(spec.parent / "test.csv", dtype=str, keep_default_na=False)
    assert list(written.columns) == [*source.columns, "siamese_score", "decision"]
    pd.testing.assert_frame_equal(written[source.columns], source)
    scores = written["siamese_score"].astype(float).to_numpy()
    assert np.all(scores >= 0) and len(np.unique(scores)) > 1
    threshold = float(np.median(scores))
    assert _run("inference", trained, f"inference.threshold={threshold}") == 0
    assert capsys.readouterr().err.count(f"replacing the earlier {output}\n") == 1
    again = pd.read_csv(output, dtype=str, keep_default_na=False)
    np.testing.assert_allclose(again["siamese_score"].astype(float), scores, rtol=1e-5)
    expected = np.where(scores > threshold, "NO_PASS", "PASS")
    assert again["decision"].tolist() == expected.tolist()


def test_evaluate_reports_tao_and_calibrated_metrics(trained, capsys):
    spec, results = trained
    assert _run("evaluate", trained) == 0
    out = capsys.readouterr().out
    report = json.loads((results / "evaluate/metrics.json").read_text())
    assert report["split"] == "test_dataset" and report["pairs"] == len(pd.read_csv(spec.parent / "test.csv"))
    assert report["threshold"]["source"] == (
        f"calibrated on the validation set (by {DEFAULT_RULE}; stored in the checkpoint "
        f"{results / 'train/oi_model_latest.pth'})")
    assert set(report["tao_metrics_at_margin"]) == {
        "margin", "total_accuracy_percent", "defect_accuracy_percent_of_defects",
        "false_alarm_percent_of_all_pairs", "false_negative_percent_of_all_pairs"}
    assert report["at_100_defect_recall"]["defect_recall_fraction_of_defects"] == 1.0
    assert report["by_group"] is None and report["by_object_name"]["column"] == "object_name"
    pairs = report["confusion_at_threshold"]
    assert sum(pairs.values()) == report["pairs"]
    assert pairs["caught_defect_pairs"] + pairs["missed_defect_pairs"] == report["defects"]
    for name in ("roc.png", "pr.png", "distance_histogram.png", "false_alarms_vs_recall.png", "pairs.png"):
        assert (results / "evaluate" / name).read_bytes()[:8] == PNG_MAGIC
    assert f"Tot Comp {report['pairs']} Total Accuracy" in out and "for Margin 2.0" in out
    for recall in ("99", "99_5", "99_9", "100"):
        assert f"at {recall.replace('_', '.')}% defect recall: false alarms" in out
        assert 0 <= report[f"at_{recall}_defect_recall"]["false_alarm_fraction_of_pass_pairs"] <= 1
    assert "false alarms, % of all pairs" in out and "of PASS pairs (threshold" in out

    # The same numbers from inference's scores, computed independently here.
    assert _run("inference", trained, "inference.batch_size=8") == 0
    scored = pd.read_csv(results / "inference/inference.csv")
    targets = (scored["label"] != "PASS").to_numpy().astype(int)
    distances = scored["siamese_score"].to_numpy()
    assert report["auroc"] == pytest.approx(roc_auc_score(targets, distances), abs=1e-6)
    assert report["aupr"] == pytest.approx(average_precision_score(targets, distances), abs=1e-6)
    # TAO's percentages: false alarms and missed defects over all pairs, caught over defects
    at_threshold = report["tao_metrics_at_threshold"]
    flagged = distances > report["threshold"]["value"]
    passes, defects = targets == 0, targets == 1
    assert at_threshold["false_alarm_percent_of_all_pairs"] == pytest.approx(
        100 * np.sum(flagged & passes) / len(targets))
    assert at_threshold["false_negative_percent_of_all_pairs"] == pytest.approx(
        100 * np.sum(~flagged & defects) / len(targets))
    assert at_threshold["defect_accuracy_percent_of_defects"] == pytest.approx(
        100 * np.sum(flagged & defects) / np.sum(defects))
    assert pairs["false_alarm_pairs"] == np.sum(flagged & passes)
    # oi-ray's rates: shares of PASS pairs and of defects
    point = report["at_99_defect_recall"]
    flagged_there = distances > point["threshold"]
    assert point["false_alarm_fraction_of_pass_pairs"] == pytest.approx(np.mean(flagged_there[passes]))
    assert point["defect_recall_fraction_of_defects"] == pytest.approx(np.mean(flagged_there[defects]))
    tao = tao_metrics(distances, targets, 2.0)
    assert report["tao_metrics_at_margin"]["total_accuracy_percent"] == pytest.approx(tao["total_accuracy"])
    # the weakest defects and the top false alarms: the lowest-scored defects and highest-scored PASS
    # pairs, with their CSV rows (1-based data rows, as inference.csv lists them)
    for key, chosen in (("weakest_defects", scored[defects].nsmallest(10, "siamese_score")),
                        ("top_false_alarms", scored[passes].nlargest(10, "siamese_score"))):
        listed = report[key]
        assert [pair["distance"] for pair in listed] == pytest.approx(chosen["siamese_score"].tolist(), rel=1e-5)
        assert [(pair["input_path"], pair["object_name"], pair["label"]) for pair in listed] == list(
            zip(chosen["input_path"], chosen["object_name"], chosen["label"], strict=True))
        assert all(pair["line"] == pair["row"] + 1 for pair in listed)
        assert [pair["flagged"] for pair in listed] == [d > report["threshold"]["value"] for d in chosen["siamese_score"]]
    weakest = report["weakest_defects"][0]
    assert f"row {weakest['row']} (line {weakest['line']}) {weakest['label']} {weakest['object_name']}" in out


def test_evaluate_reports_how_far_to_trust_the_operating_point_and_groups_errors(trained, tmp_path, capsys):
    spec, results = trained
    # every split in one CSV, so components recur across boards, with an extra column to group by
    pairs = pd.concat([pd.read_csv(spec.parent / f"{split}.csv", dtype=str, keep_default_na=False)
                       for split in ("train", "val", "test")], ignore_index=True)
    pairs["station"] = [f"S{row % 3}" for row in range(len(pairs))]
    csv_path = tmp_path / "all.csv"
    pairs.to_csv(csv_path, index=False)
    dataset = (f"dataset.test_dataset.csv_path={csv_path}", f"dataset.test_dataset.images_dir={spec.parent / 'images'}",
               f"dataset.infer_dataset.csv_path={csv_path}", "evaluate.batch_size=8", "inference.batch_size=8")
    assert _run("evaluate", trained, *dataset, "evaluate.group_by=station",
                f"evaluate.results_dir={tmp_path / 'evaluate'}") == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "evaluate/metrics.json").read_text())
    assert (tmp_path / "evaluate/false_alarms_vs_recall.png").read_bytes()[:8] == PNG_MAGIC
    assert _run("inference", trained, *dataset, f"inference.results_dir={tmp_path / 'inference'}") == 0
    scored = pd.read_csv(tmp_path / "inference/inference.csv", dtype=str, keep_default_na=False)
    distances = scored["siamese_score"].astype(float).to_numpy()
    defects, passes = (scored["label"] != "PASS").to_numpy(), (scored["label"] == "PASS").to_numpy()
    assert report["pairs"] == len(pairs) and report["defects"] == defects.sum() > 5

    # 100 % recall of the rest: every PASS pair scoring at least the weakest defect kept is flagged
    by_distance = np.flatnonzero(defects)[np.argsort(distances[defects], kind="stable")]
    left_out = report["at_100_defect_recall_without_weakest_defects"]
    assert [entry["weakest_defects_left_out"] for entry in left_out] == [1, 2, 3, 5]
    for entry in left_out:
        count = entry["weakest_defects_left_out"]
        assert entry["left_out_rows"] == [int(index) + 1 for index in by_distance[:count]]
        weakest_kept = distances[by_distance[count]]
        assert entry["false_alarm_fraction_of_pass_pairs"] == pytest.approx(np.mean(distances[passes] >= weakest_kept))
        assert np.mean(distances[passes] > entry["threshold"]) == entry["false_alarm_fraction_of_pass_pairs"]
        assert entry["defect_recall_fraction_of_defects"] == np.mean(distances[defects] > entry["threshold"])
        assert entry["defect_recall_fraction_of_defects"] >= (report["defects"] - count) / report["defects"]
        assert f"at 100% recall without the {count} weakest defect" in out
    # the most defects any threshold catches flagging at most 0.1 % / 1 % of the PASS pairs
    limits = report["defect_recall_at_false_alarm_limits"]
    assert [entry["false_alarm_limit_fraction_of_pass_pairs"] for entry in limits] == [0.001, 0.01]
    for entry in limits:
        flagged = distances > entry["threshold"]
        assert entry["false_alarm_fraction_of_pass_pairs"] == np.mean(flagged[passes]) <= entry[
            "false_alarm_limit_fraction_of_pass_pairs"]
        assert entry["defect_recall_fraction_of_defects"] == np.mean(flagged[defects])
        best = max(np.mean(distances[defects] >= cut) for cut in np.r_[distances, np.inf]
                   if np.mean(distances[passes] >= cut) <= entry["false_alarm_limit_fraction_of_pass_pairs"])
        assert entry["defect_recall_fraction_of_defects"] == best
        assert f"at most {entry['false_alarm_limit_fraction_of_pass_pairs'] * 100:g}% false alarms: defect recall" in out

    # per object_name and per station: the errors at the decision threshold, counted here with pandas
    scored["false_alarm"] = passes & (distances > report["threshold"]["value"])
    scored["missed"] = defects & (distances <= report["threshold"]["value"])
    scored["is_pass"], scored["is_defect"] = passes, defects
    for key, column in (("by_object_name", "object_name"), ("by_group", "station")):
        breakdown = report[key]
        assert breakdown["column"] == column
        expected = scored.groupby(column)[["is_pass", "false_alarm", "is_defect", "missed"]].sum()
        got = {group["value"]: (group["pass_pairs"], group["false_alarm_pairs"], group["defect_pairs"],
                                group["missed_defect_pairs"]) for group in breakdown["groups"]}
        assert got == {value: tuple(row) for value, row in expected.iterrows()}
        errors = [group["false_alarm_pairs"] + group["missed_defect_pairs"] for group in breakdown["groups"]]
        assert errors == sorted(errors, reverse=True)
    assert scored["object_name"].duplicated().any(), "components recur: the groups hold several pairs"
    for group in report["by_group"]["groups"]:
        assert group["defect_recall_fraction_of_defects"] == pytest.approx(
            1 - group["missed_defect_pairs"] / group["defect_pairs"])
        assert group["false_alarm_fraction_of_pass_pairs"] == pytest.approx(
            group["false_alarm_pairs"] / group["pass_pairs"])
    listed = {group["value"]: (group["in_weakest_defects_pairs"], group["in_top_false_alarms_pairs"])
              for group in report["by_object_name"]["groups"]}
    for key, position in (("weakest_defects", 0), ("top_false_alarms", 1)):
        names = pd.Series([pair["object_name"] for pair in report[key]]).value_counts()
        assert {value: counts[position] for value, counts in listed.items() if counts[position]} == names.to_dict()
    assert "by object_name: " in out and "by station (evaluate.group_by): 3 values" in out
    weakest = report["weakest_defects"][0]  # the listed pairs carry the group_by column's value
    assert weakest["station"] == pairs["station"][weakest["row"] - 1]
    assert f"row {weakest['row']} (line {weakest['line']}) {weakest['label']} {weakest['object_name']} " \
           f"station={weakest['station']}: " in out
    top = report["by_object_name"]["groups"][0]
    assert f"  {top['value']:<24}" in out


def test_a_group_by_column_missing_from_the_csv_is_refused_before_ray_starts(trained, capsys, monkeypatch):
    spec, _ = trained
    sessions = []
    monkeypatch.setattr("oi_ray.tasks.scoring_setup.ray_session", lambda config: sessions.append(config))
    assert _run("evaluate", trained, "evaluate.group_by=Label") == 1
    err = capsys.readouterr().err
    assert (f"oi-ray evaluate: error: evaluate.group_by='Label': {spec.parent / 'test.csv'} has no column "
            f"'Label'; its columns are ['input_path', 'golden_path', 'object_name', 'label'] "
            f"(did you mean 'label'?)") in err
    assert sessions == [] and "Traceback" not in err


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


def test_evaluate_and_inference_save_their_resolved_spec(trained):
    spec, results = trained
    assert _run("evaluate", trained, "evaluate.threshold=0.7") == 0
    assert _run("inference", trained, "inference.batch_size=8") == 0
    for task in ("evaluate", "inference"):
        saved = load_config(results / task / "spec.yaml")
        assert saved.results_dir == str(results)
        assert saved.dataset.test_dataset.csv_path == str(spec.parent / "test.csv")
    assert load_config(results / "evaluate/spec.yaml").evaluate.threshold == 0.7
    assert load_config(results / "inference/spec.yaml").inference.batch_size == 8


def test_exported_model_threshold_source_names_its_model_card(trained):
    _, results = trained
    onnx_file = results / "export/oi_model.onnx"
    assert _run("export", trained, f"export.checkpoint={results / 'train/oi_model_latest.pth'}",
                f"export.onnx_file={onnx_file}") == 0
    assert _run("evaluate", trained, f"evaluate.checkpoint={onnx_file}",
                f"evaluate.results_dir={results / 'evaluate_onnx'}") == 0
    report = json.loads((results / "evaluate_onnx/metrics.json").read_text())
    assert report["threshold"]["source"] == (
        f"calibrated on the validation set (by {DEFAULT_RULE}; stored in the model card {onnx_file}.json)")
