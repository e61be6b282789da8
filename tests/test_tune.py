"""``oi-ray tune``: the search space is checked before any trial starts (no Ray here)."""

import pytest
from omegaconf import OmegaConf

from oi_ray.cli import main
from oi_ray.config import load_config
from oi_ray.config.schema import SearchDimension
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
    ("dataset.image_width", SearchDimension("choice", values=[64]), "every trial shares it with the sweep"),
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


def test_cli_refuses_a_bad_sweep_in_one_message(capsys, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("tune:\n  search_space:\n    model.margin: {type: uniform, low: 2, high: 1}\n"
                    "    train.optim.lr: {type: loguniform, low: -1, high: 0.1}\n")
    assert main(["tune", "-e", str(spec)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("oi-ray tune: error: invalid sweep:")
    assert "tune.search_space.model.margin: low=2.0 is above high=1.0" in error
    assert "tune.search_space.train.optim.lr: loguniform needs low > 0" in error
