"""``oi-ray tune``: the search space is checked before any trial starts; real sweeps on a local Ray."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import ctrl_c_once_logged
from omegaconf import OmegaConf

from oi_ray.cli import main
from oi_ray.config import load_config
from oi_ray.config.schema import SearchDimension
from oi_ray.data.synthetic import SyntheticSpec, synthesize_dataset
from oi_ray.tuning.results import TrialSummary, write_best
from oi_ray.tuning.search import grid_points, param_space, search_problems


def _base() -> dict:
    return OmegaConf.to_container(OmegaConf.structured(load_config(None)), resolve=True)


@pytest.mark.parametrize("key, entry, expected", [
    ("model.margin", SearchDimension("uniform", low=3.0, high=0.5), "low=3.0 is above high=0.5"),
    ("train.optim.lr", SearchDimension("loguniform", low=0.0, high=1e-3), "loguniform needs low > 0"),
    ("dataset.fpratio_sampling", SearchDimension("choice", values=[]), "type choice needs a non-empty list"),
    ("dataset.fpratio_sampling", SearchDimension("choice", values=[0.1, 2.0]),
     "the value 2.0 is refused: invalid spec tune.search_space.dataset.fpratio_sampling:\n"
     "  - dataset.fpratio_sampling=2.0 is invalid: expected 0 < value <= 1"),
    ("model.model_type", SearchDimension("grid", values=["Siamese_3", "ResNet"]),
     "the value 'ResNet' is refused"),
    ("model.margn", SearchDimension("uniform", low=1, high=2), "did you mean 'model.margin'?"),
    ("dataset.image_width", SearchDimension("choice", values=[64]),
     "it changes the decoded images, which the trials share; set tune.share_decoded_images=false"),
    ("dataset.input_map", SearchDimension("choice", values=[{"A": 0}]), "every trial shares it with the sweep"),
    ("ray.num_cpus", SearchDimension("choice", values=[2]), "only model.*, train.* and dataset.* keys"),
    ("train.num_epochs", SearchDimension("randint", low=3, high=3), "randint needs low < high"),
    ("model.margin", SearchDimension("quniform", low=1, high=2), "quniform needs a step q > 0"),
    ("model.margin", SearchDimension("normal", low=1, high=2), "type 'normal' is not one of"),
])
def test_bad_entries_are_named_before_any_trial(key, entry, expected):
    problems = search_problems({key: entry}, _base())
    assert len(problems) == 1 and problems[0].startswith(f"tune.search_space.{key}: ")
    assert expected in problems[0]


def test_good_entries_become_ray_tune_domains():
    space = {"model.margin": SearchDimension("uniform", low=0.5, high=3.0),
             "train.optim.lr": SearchDimension("loguniform", low=1e-5, high=1e-2),
             "dataset.fpratio_sampling": SearchDimension("grid", values=[0.1, 0.5]),
             "model.model_type": SearchDimension("grid", values=["Siamese_3", "Siamese_1"]),
             "dataset.batch_size": SearchDimension("randint", low=8, high=33)}
    assert search_problems(space, _base()) == []
    domains = param_space(space)
    assert type(domains["model.margin"]).__name__ == "Float" and domains["dataset.fpratio_sampling"] == {
        "grid_search": [0.1, 0.5]}
    assert grid_points(space) == 4


def test_image_size_can_be_swept_when_each_trial_decodes_its_own():
    space = {"dataset.image_width": SearchDimension("grid", values=[32, 48])}
    assert search_problems(space, _base(), shared_decode=False) == []
    assert len(search_problems(space, _base(), shared_decode=True)) == 1


def test_cli_refuses_a_bad_sweep_in_one_message(capsys, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("tune:\n  search_space:\n    model.margin: {type: uniform, low: 2, high: 1}\n"
                    "    train.optim.lr: {type: loguniform, low: -1, high: 0.1}\n")
    assert main(["tune", "-e", str(spec), "tune.results_dir=s3://aoi/sweeps"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("oi-ray tune: error: invalid sweep:")
    assert "tune.search_space.model.margin: low=2.0 is above high=1.0" in error
    assert "tune.search_space.train.optim.lr: loguniform needs low > 0" in error
    assert "tune.results_dir=s3://aoi/sweeps: a sweep writes into a local folder" in error


def test_best_delivers_the_checkpoint_of_the_epoch_that_was_judged(tmp_path):
    """A stopped trial can finish one more epoch before its training ends: best/ is the epoch
    whose metric chose it, not the trial's newest file."""
    trial = tmp_path / "trials" / "trial_1"
    trial.mkdir(parents=True)
    for epoch in range(3):
        (trial / f"model_epoch_{epoch:03d}.pth").write_bytes(bytes([epoch]))
    os.symlink("model_epoch_002.pth", trial / "oi_model_latest.pth")
    (trial / "status.json").write_text("".join(f'{{"epoch": {epoch}, "loss": 1.0}}\n' for epoch in (1, 2, 3)))
    summary = TrialSummary(name="trial_1", params={"model.margin": 1.5}, status="early_stopped", best=0.9,
                           last=0.9, epochs=2, seconds=1.0, error=None, curve=[(1, 0.8), (2, 0.9)])
    spec = write_best(summary, _base(), tmp_path / "trials", tmp_path)
    best = tmp_path / "best"
    assert os.readlink(best / "oi_model_latest.pth") == "model_epoch_001.pth"
    assert (best / "model_epoch_001.pth").read_bytes() == bytes([1])
    assert [json.loads(line)["epoch"] for line in (best / "status.json").read_text().splitlines()] == [1, 2]
    assert load_config(spec).model.margin == 1.5


@pytest.fixture(scope="module")
def ray_with_state_api():
    """A small embedded Ray with the dashboard: Ray Train frees stopped trials through its state API."""
    from oi_ray.config.schema import RayConfig
    from oi_ray.runtime import ray_session

    with ray_session(RayConfig(num_cpus=4, object_store_memory_mb=512, include_dashboard=True)):
        yield


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tune")
    return synthesize_dataset(root / "data", SyntheticSpec(num_pairs=160, lights=("A", "B"), width=16, height=16,
                                                           image_ext=".png", seed=3)).spec_path


@pytest.mark.ray
@pytest.mark.slow
def test_random_sweep_with_asha_stops_trials_early_and_delivers_the_best(ray_with_state_api, sweep_data, tmp_path,
                                                                         capsys):
    """One trial at a time, so ASHA sees the rungs in a fixed order: two learning trials (lr 2e-3),
    one that barely moves from its initial weights (lr 1e-9: val AUROC 0.86 after epoch 1, where
    the learning ones reach 0.99) and a diverging one. ASHA stops a trial at a rung when it is
    below the median of the trials there before it, so the barely-moving trial is stopped at the
    first rung, and the first trial (first at every rung) is never stopped."""
    import ray

    results = tmp_path / "results"
    assert main(["tune", "-e", str(sweep_data), f"results_dir={results}", "train.num_epochs=4",
                 "dataset.batch_size=8", "tune.num_samples=1", "tune.max_concurrent_trials=1",
                 "tune.search_space={model.margin: {type: uniform, low: 1.0, high: 2.5}, "
                 "train.optim.lr: {type: grid, values: [0.002, 0.0021, 1.0e-9, 1.0e+30]}}"]) == 0
    sweep = results / "tune" / "sweep"
    table = pd.read_csv(sweep / "results.csv", keep_default_na=False)
    assert list(table["train.optim.lr"]) == [0.002, 0.0021, 1e-9, 1e30]  # the order the trials ran in
    assert table["model.margin"].between(1.0, 2.5).all() and table["model.margin"].nunique() == 4
    first, still = table.iloc[0], table[table["train.optim.lr"] == 1e-9]
    assert (first["status"], first["epochs"]) == ("completed", 4)
    # stopped at the first rung; the stop reaches a running trial asynchronously, so a fast epoch
    # can still be reported after it
    assert len(still) == 1 and (still["status"] == "early_stopped").all() and (still["epochs"] <= 2).all()
    diverged = table[table["train.optim.lr"] == 1.0e30]
    assert len(diverged) == 1 and (diverged["status"] == "failed").all()
    assert diverged["error"].str.contains("training diverged: the loss became NaN or infinite").all()
    finished = table[table["status"] != "failed"]
    best_row = finished.loc[finished["last_val_auroc"].astype(float).idxmax()]
    for _, row in finished.iterrows():
        trial = sweep / "trials" / row["trial"]
        assert (trial / "spec.yaml").is_file() and (trial / "oi_model_latest.pth").is_symlink()
        assert (trial / f"model_epoch_{row['epochs'] - 1:03d}.pth").is_file()
    assert (sweep / "val_auroc.png").stat().st_size > 1000
    best = sweep / "best"
    spec = load_config(best / "spec.yaml")
    assert spec.model.margin == pytest.approx(best_row["model.margin"])
    assert spec.export.checkpoint == str(best / "oi_model_latest.pth")
    assert (best / "oi_model_latest.pth").resolve().name == f"model_epoch_{best_row['epochs'] - 1:03d}.pth"
    output = capsys.readouterr()
    assert f"{best_row['trial']}" in output.out and "early_stopped" in output.out
    # every trial's Ray Train workers are gone: no placement group holds CPUs after the sweep (Ray
    # Train's cleaner removes the last one within seconds of its controller's end)
    deadline = time.monotonic() + 60
    while [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]:
        assert time.monotonic() < deadline, "a placement group outlived the sweep"
        time.sleep(1)
    assert ray.available_resources().get("CPU") == 4
    assert main(["export", "-e", str(best / "spec.yaml")]) == 0
    assert (best / "export" / "oi_model.onnx").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_grid_sweep_runs_every_point_once(ray_with_state_api, sweep_data, tmp_path):
    """Each trial decodes its own images here, so the image size is one of the grid's keys."""
    from oi_ray.checkpoint import load_checkpoint

    results = tmp_path / "results"
    assert main(["tune", "-e", str(sweep_data), f"results_dir={results}", "train.num_epochs=1",
                 "dataset.batch_size=8", "tune.num_samples=1", "tune.search_alg=grid", "tune.scheduler.type=none",
                 "tune.max_concurrent_trials=2", "tune.resources_per_trial.cpus_per_worker=0.5",
                 "tune.share_decoded_images=false",
                 "tune.search_space={model.margin: {type: grid, values: [1.0, 2.0]}, "
                 "dataset.image_width: {type: grid, values: [16, 24]}}"]) == 0
    table = pd.read_csv(results / "tune" / "sweep" / "results.csv")
    points = sorted(zip(table["model.margin"], table["dataset.image_width"], strict=True))
    assert points == [(1.0, 16), (1.0, 24), (2.0, 16), (2.0, 24)]
    assert (table["status"] == "completed").all()
    for trial, width in zip(table["trial"], table["dataset.image_width"], strict=True):
        folder = results / "tune" / "sweep" / "trials" / trial
        spec = load_config(folder / "spec.yaml")  # each trial trained with tune.resources_per_trial
        assert (spec.ray.num_workers, spec.ray.cpus_per_worker) == (1, 0.5)
        # the model saw the trial's image size: 2 lightings of 16 rows stacked (linear layout)
        assert tuple(load_checkpoint(folder / "oi_model_latest.pth").input_shape)[1:] == (2 * 16, width)


@pytest.mark.ray
@pytest.mark.slow
def test_optuna_sweep_draws_within_the_bounds(ray_with_state_api, sweep_data, tmp_path):
    pytest.importorskip("optuna", reason="the tune extra (optuna) is not installed")
    results = tmp_path / "results"
    assert main(["tune", "-e", str(sweep_data), f"results_dir={results}", "train.num_epochs=1",
                 "dataset.batch_size=8", "tune.num_samples=2", "tune.search_alg=optuna", "tune.scheduler.type=none",
                 "tune.max_concurrent_trials=2",
                 "tune.search_space={model.margin: {type: uniform, low: 0.5, high: 3.0}, "
                 "dataset.fpratio_sampling: {type: choice, values: [0.2, 0.5]}}"]) == 0
    table = pd.read_csv(results / "tune" / "sweep" / "results.csv")
    assert len(table) == 2 and (table["status"] == "completed").all()
    assert table["model.margin"].between(0.5, 3.0).all() and set(table["dataset.fpratio_sampling"]) <= {0.2, 0.5}
    assert table["model.margin"].nunique() == 2  # drawn by optuna, one value per trial


def test_optuna_refuses_grid_entries(capsys, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("dataset:\n  validation_dataset: {csv_path: val.csv}\ntune:\n  search_alg: optuna\n"
                    "  search_space:\n    model.margin: {type: grid, values: [1.0, 2.0]}\n")
    assert main(["tune", "-e", str(spec)]) == 1
    assert "tune.search_space.model.margin: optuna draws every value itself and takes no grid entries" in (
        capsys.readouterr().err)


@pytest.mark.ray
@pytest.mark.slow
def test_resume_finishes_an_interrupted_sweep_without_redoing_trials(sweep_data, tmp_path):
    """Ctrl-C (SIGINT to the process group this test started) after the first trial, then --resume."""
    command = [sys.executable, "-m", "oi_ray.cli", "tune", "-e", str(sweep_data), f"results_dir={tmp_path}",
               "train.num_epochs=2", "dataset.batch_size=8", "tune.num_samples=2", "tune.max_concurrent_trials=1",
               "tune.scheduler.type=none", "ray.num_cpus=2",
               "tune.search_space={model.margin: {type: uniform, low: 0.5, high: 3.0}}"]
    logs = ctrl_c_once_logged(command, tmp_path / "first.log", ": completed, val_auroc")
    assert "rerun the same command with --resume" in logs
    trials = tmp_path / "tune" / "sweep" / "trials"
    first = {path.parent.name: path.read_text() for path in trials.glob("*/status.json")
             if len(path.read_text().splitlines()) == 2}
    assert len(first) >= 1

    done = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    table = pd.read_csv(tmp_path / "tune" / "sweep" / "results.csv")
    assert len(table) == 2 and (table["status"] == "completed").all()
    for name, status in first.items():  # finished trials were not run again
        assert (trials / name / "status.json").read_text() == status
