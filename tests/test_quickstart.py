"""oi-ray quickstart end to end on a tiny dataset: one spec of its own, runnable printed commands."""

import json
import shlex

import pandas as pd
import pytest
import yaml

from oi_ray.cli import main
from oi_ray.config import load_config

pytestmark = pytest.mark.ray


def test_quickstart_runs_from_its_own_spec_and_prints_working_commands(ray_local, tmp_path, capsys):
    output = tmp_path / "qs"
    assert main(["quickstart", "--output", str(output), "--num-pairs", "40", "--epochs", "1"]) == 0
    printed = capsys.readouterr().err

    spec = output / "spec.yaml"
    written = yaml.safe_load(spec.read_text())
    assert written["results_dir"] == str(output / "results")
    assert written["train"]["num_epochs"] == 1 and written["train"]["checkpoint_interval"] == 1
    assert written["dataset"]["fpratio_sampling"] == 0.5
    assert written["dataset"]["test_dataset"]["csv_path"] == str(output / "data/test.csv")
    config = load_config(spec)
    assert config.evaluate.results_dir == str(output / "results/evaluate")

    # every output lies under results_dir of that spec, and only the final checkpoint is kept
    results = output / "results"
    report = json.loads((results / "evaluate/metrics.json").read_text())
    assert report["checkpoint"] == str((results / "train/model_epoch_000.pth").resolve())
    assert sorted(p.name for p in (results / "train").glob("*.pth")) == ["model_epoch_000.pth",
                                                                          "oi_model_latest.pth"]
    assert len(pd.read_csv(results / "inference/inference.csv")) == report["pairs"]
    assert (results / "export/oi_model.onnx").is_file()
    assert not (output / "data/results").exists()

    commands = [line.strip() for line in printed.splitlines() if f" -e {spec}" in line]
    for task in ("train", "evaluate", "inference", "export"):  # the rerun lines carry no overrides
        assert sum(line.endswith(f" {task} -e {spec}") for line in commands) == 2, task  # step header + rerun
    assert "SPEC" not in printed and "next: oi-ray check_dataset" not in printed

    onnx_line = next(line for line in commands if "inference.checkpoint=" in line)
    arguments = shlex.split(onnx_line)
    assert main(arguments[arguments.index("inference"):]) == 0
    onnx_scores = pd.read_csv(results / "inference_onnx/inference.csv")["siamese_score"]
    pth_scores = pd.read_csv(results / "inference/inference.csv")["siamese_score"]
    # both score in the model's halves (each golden embedded once): the export's parity, 1e-5 absolute
    pd.testing.assert_series_equal(onnx_scores, pth_scores, rtol=1e-4, atol=1e-5)
    assert "stored in the model card" in capsys.readouterr().err


def test_printed_commands_quote_what_the_shell_would_split():
    from oi_ray.console import command

    line = command("evaluate", "-e", "/data/my runs/spec.yaml", "evaluate.checkpoint=/m/a.onnx")
    assert line.endswith(" evaluate -e '/data/my runs/spec.yaml' evaluate.checkpoint=/m/a.onnx")
