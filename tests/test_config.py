"""Spec loading: TAO's example specs verbatim, overrides, and every validation error."""

import logging
from pathlib import Path

import pytest
import yaml
from helpers import TAO_SPECS
from omegaconf import OmegaConf

from oi_ray.cli import main
from oi_ray.config import load_config, save_resolved_spec, to_yaml
from oi_ray.config.validate import INERT_KEYS, reconcile_gpus
from oi_ray.errors import ConfigError

SHIPPED_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipes"
TRAIN_SPEC = TAO_SPECS / "train.yaml"


@pytest.mark.parametrize("name", ["train.yaml", "evaluate_inference.yaml", "export.yaml"])
def test_tao_example_specs_load_verbatim(name):
    config = load_config(TAO_SPECS / name)
    assert config.results_dir == "/path/to/experiment_results"
    assert list(config.dataset.input_map) == ["LowAngleLight", "SolderLight", "UniformLight", "WhiteLight"]
    assert config.dataset.num_input == 4
    assert (config.dataset.image_width, config.dataset.image_height) == (100, 100)
    assert config.model.model_type == "Siamese_3"
    assert config.dataset.augmentation_config.rgb_input_std == [0.229, 0.224, 0.225]


def test_interpolations_resolve():
    evaluate = load_config(TAO_SPECS / "evaluate_inference.yaml")
    assert evaluate.evaluate.checkpoint == "/path/to/experiment_results/train/oi_model_lastest.pth"
    assert evaluate.inference.results_dir == "/path/to/experiment_results/inference"
    export = load_config(TAO_SPECS / "export.yaml")
    assert export.export.onnx_file == "/path/to/experiment_results/export/oi_model.onnx"
    assert export.export.batch_size == 32
    train = load_config(TRAIN_SPEC, ["results_dir=/tmp/run"])
    assert train.train.results_dir == "/tmp/run/train"
    assert train.ray.storage_path == "/tmp/run/train/ray"


def test_tao_dataclass_defaults_apply_to_omitted_keys():
    config = load_config(TRAIN_SPEC)
    assert config.train.optim.momentum == 0.9
    assert config.train.optim.weight_decay == 0.0005
    assert config.train.clip_grad_norm == 0.0
    assert config.export.opset_version == 17
    assert config.export.do_constant_folding is False
    assert config.evaluate.batch_size == -1
    assert config.dataset.augmentation_config.augment is False


def test_defaults_without_spec():
    config = load_config(None)
    assert config.dataset.input_map is None
    assert config.dataset.num_input == 1
    assert (config.dataset.image_width, config.dataset.image_height) == (128, 128)
    assert config.dataset.image_ext == ".jpg"


def test_overrides_win_over_spec_and_parse_types():
    config = load_config(TRAIN_SPEC, ["train.num_epochs=20", "dataset.batch_size=8",
                                      "train.optim.lr=1e-3", "ray.num_workers=2"])
    assert config.train.num_epochs == 20
    assert config.dataset.batch_size == 8
    assert config.train.optim.lr == pytest.approx(1e-3)
    assert config.ray.num_workers == 2


def test_later_spec_files_win_and_each_is_named_in_errors(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  model_type: SiameseSpatial\ntrain:\n  num_epochs: 12\n  optim:\n"
                      "    lr: 0.002\n    lr_schedule: cosine\n")
    config = load_config([TRAIN_SPEC, recipe], ["train.num_epochs=6"])
    assert (config.model.model_type, config.train.optim.lr, config.train.optim.lr_schedule) == (
        "SiameseSpatial", 0.002, "cosine")
    assert config.train.num_epochs == 6  # overrides still win over every file
    assert config.dataset.batch_size == 32 and config.train.checkpoint_interval == 5  # from TAO's spec
    recipe.write_text("train:\n  num_epoch: 12\n")
    assert f"train.num_epoch ({recipe}): did you mean 'train.num_epochs'?" in _error([TRAIN_SPEC, recipe], [])


def test_mapping_override_replaces_and_subkey_override_adds():
    replaced = load_config(TRAIN_SPEC, ["dataset.input_map={WhiteLight: 0}", "dataset.num_input=1"])
    assert replaced.dataset.input_map == {"WhiteLight": 0}
    added = load_config(TRAIN_SPEC, ["dataset.input_map.Extra=4", "dataset.num_input=5"])
    assert list(added.dataset.input_map)[-1] == "Extra"


def test_num_input_defaults_to_input_map_length(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("dataset:\n  input_map:\n    B: 1\n    A: 0\n")
    config = load_config(spec)
    assert config.dataset.num_input == 2
    assert list(config.dataset.input_map) == ["B", "A"], "file order is the lighting order"


def _error(spec, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(spec, overrides)
    return str(info.value)


def test_unknown_key_in_file_names_dotted_path_and_suggestion(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("dataset:\n  image_widht: 64\ntrain:\n  optim:\n    learning_rate: 0.1\n")
    message = _error(spec)
    assert f"dataset.image_widht ({spec}): did you mean 'dataset.image_width'?" in message
    assert "train.optim.learning_rate" in message and "valid keys: type, lr, momentum" in message


def test_unknown_key_in_override():
    message = _error(TRAIN_SPEC, ["modle.margin=1"])
    assert "modle (override): did you mean 'model'?" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("num_epochs=3", "num_epochs (override): did you mean 'train.num_epochs'?"),
        ("lr=0.1", "lr (override): did you mean 'train.optim.lr'?"),
        ("dataset.num_epochs=3", "dataset.num_epochs (override): did you mean 'train.num_epochs'?"),
        ("epochs=3", "epochs (override): did you mean 'train.num_epochs'?"),
        ("imagewidth=64", "imagewidth (override): did you mean 'dataset.image_width'?"),
        ("num_gpus=2", "num_gpus (override): did you mean one of 'train.num_gpus', 'evaluate.num_gpus', "
                       "'inference.num_gpus'?"),
    ],
)
def test_misplaced_key_suggests_dotted_keys_anywhere_in_the_schema(override, expected):
    assert expected in _error(TRAIN_SPEC, [override])


def test_section_given_a_scalar():
    assert "dataset.grid_map (override): is a section" in _error(TRAIN_SPEC, ["dataset.grid_map=5"])


def test_bad_type_names_key_and_value():
    message = _error(TRAIN_SPEC, ["dataset.image_width=wide"])
    assert message.startswith("dataset.image_width:") and "'wide'" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["dataset.concat_type=grd"], "dataset.concat_type='grd' is not one of ['linear', 'grid']"),
        (["dataset.num_input=3"], "dataset.num_input=3 is invalid: dataset.input_map lists 4 lightings"),
        (["dataset.concat_type=grid", "dataset.grid_map.x=3"],
         "dataset.grid_map='x=3, y=2' is invalid: concat_type grid needs grid_map x*y == dataset.num_input (4)"),
        (["train.num_epochs=3"], "train.checkpoint_interval=5 is invalid: expected 1 <= value <= 3"),
        (["dataset.fpratio_sampling=0"], "dataset.fpratio_sampling=0.0 is invalid"),
        (["dataset.image_ext=jpg"], "dataset.image_ext='jpg' is invalid: include the dot"),
        (["model.model_type=ResNet"],
         "model.model_type='ResNet' is not one of ['Siamese_3', 'Siamese_1', 'Siamese', 'SiameseSpatial']"),
        (["model.spatial.neighbourhood=4"], "model.spatial.neighbourhood=4 is invalid: expected an odd number >= 1"),
        (["model.spatial.blocks=-1"], "model.spatial.blocks=-1 is invalid: expected >= 0"),
        (["train.optim.type=AdamW"], "train.optim.type='AdamW' is not one of ['Adam', 'SGD']"),
        (["train.optim.lr_schedule=step"], "train.optim.lr_schedule='step' is not one of ['constant', 'cosine']"),
        (["train.loss=triplet"], "train.loss='triplet' is not one of ['contrastive']"),
        (["dataset.augmentation_config.rgb_input_std=[0.2,0.2]"], "rgb_input_std=[0.2, 0.2] is invalid: expected 3 values"),
        (["gen_trt_engine.tensorrt.data_type=fp8"], "gen_trt_engine.tensorrt.data_type='fp8' is not one of"),
        (["dataset.augmentation_config.lighting_gain=1.5"],
         "dataset.augmentation_config.lighting_gain=1.5 is invalid: expected 0 (off) <= lighting_gain < 1"),
        (["gen_trt_engine.tensorrt.opt_batch_size=8", "gen_trt_engine.tensorrt.max_batch_size=4"],
         "gen_trt_engine.tensorrt.opt_batch_size=8 is invalid: expected <= max_batch_size (4)"),
        (["export.batch_size=0"], "export.batch_size=0 is invalid: expected -1 (dynamic) or >= 1"),
        (["ray.cpus_per_worker=0"], "ray.cpus_per_worker=0.0 is invalid: expected > 0"),
        (["dataset.input_map=null"], "without dataset.input_map there is one image per side"),
        (["serve.port=70000"], "serve.port=70000 is invalid: expected 1 <= value <= 65535"),
        (["serve.route_prefix=api"], "serve.route_prefix='api' is invalid: expected a path starting with '/'"),
        (["serve.autoscaling_config.min_replicas=3"],
         "serve.autoscaling_config.max_replicas=1 is invalid: expected >= 1 and >= min_replicas (3)"),
        (["serve.batching.max_batch_size=0"], "serve.batching.max_batch_size=0 is invalid: expected >= 1"),
        (["serve.num_gpus=-0.5"], "serve.num_gpus=-0.5 is invalid: expected >= 0"),
        (["serve.auth_token_env=my-token"], "serve.auth_token_env='my-token' is invalid: expected the name of an "
                                            "environment variable"),
    ],
)
def test_bad_values_name_key_value_and_allowed(overrides, expected):
    assert expected in _error(TRAIN_SPEC, overrides)


def test_all_problems_are_reported_together():
    message = _error(TRAIN_SPEC, ["dataset.concat_type=grd", "model.margin=-1"])
    assert "dataset.concat_type" in message and "model.margin=-1.0" in message


def test_missing_spec_file_and_bad_yaml(tmp_path):
    assert "spec file not found" in _error(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("dataset: [unclosed\n")
    assert "not valid YAML" in _error(broken)
    assert "not of the form dotted.key=value" in _error(TRAIN_SPEC, ["train.num_epochs"])


def test_unresolvable_interpolation():
    assert "cannot resolve interpolation" in _error(TRAIN_SPEC, ["results_dir=${nope}"])


@pytest.mark.parametrize(
    ("num_gpus", "gpu_ids", "expected"),
    [
        (1, [0], (1, [0])),
        (2, [0, 1], (2, [0, 1])),
        (2, [0], (2, [0, 1])),
        (1, [2, 3], (2, [2, 3])),
        (3, [1], (3, [0, 1, 2])),
    ],
)
def test_tao_gpu_reconciliation(num_gpus, gpu_ids, expected):
    assert reconcile_gpus(num_gpus, gpu_ids) == expected


def test_gpu_reconciliation_is_applied_on_load():
    config = load_config(TRAIN_SPEC, ["train.num_gpus=1", "train.gpu_ids=[2,3]"])
    assert (config.train.num_gpus, config.train.gpu_ids) == (2, [2, 3])


def test_print_config_prints_resolved_yaml(capsys):
    status = main(["train", "-e", str(TRAIN_SPEC), "results_dir=/tmp/x", "--print-config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert status == 0
    assert printed["train"]["results_dir"] == "/tmp/x/train"
    assert printed["dataset"]["input_map"]["WhiteLight"] == 3
    assert yaml.safe_load(to_yaml(load_config(TRAIN_SPEC, ["results_dir=/tmp/x"]))) == printed


def test_overrides_may_follow_options(capsys):
    assert main(["train", "-e", str(TRAIN_SPEC), "results_dir=/tmp/x", "--print-config", "model.margin=1.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["results_dir"], printed["model"]["margin"]) == ("/tmp/x", 1.5)
    with pytest.raises(SystemExit):
        main(["train", "-e", str(TRAIN_SPEC), "--print-config", "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_cli_reports_config_error_in_one_line(capsys):
    status = main(["train", "-e", str(TRAIN_SPEC), "dataset.imagewidth=5"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("oi-ray train: error: unknown or misplaced spec keys")
    assert "Traceback" not in err


def test_a_bad_cluster_yaml_is_refused_before_anything_starts(capsys, tmp_path):
    assert main(["train", "-e", str(TRAIN_SPEC), "--cluster", str(tmp_path / "missing.yaml")]) == 1
    assert f"--cluster {tmp_path / 'missing.yaml'}: cannot read it" in capsys.readouterr().err
    misspelt = tmp_path / "cluster.yaml"
    misspelt.write_text("cluster_name: x\nprovider: {type: local, head_ip: 10.0.0.1, worker_ips: []}\n"
                        "auth: {ssh_user: u}\nhead_start_ray_command: [ray start --head]\n")
    assert main(["train", "-e", str(TRAIN_SPEC), "--cluster", str(misspelt)]) == 1
    assert "'head_start_ray_command' was unexpected" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "-e", str(TRAIN_SPEC), "--cluster", str(misspelt), "--address", "http://h:8265"])
    assert "not allowed with argument" in capsys.readouterr().err


def _unmatched(written: dict, loaded: dict, prefix: str = "") -> list[str]:
    """The keys of ``written`` (nested) whose value ``loaded`` does not hold."""
    missing = []
    for key, value in written.items():
        if isinstance(value, dict) and value and isinstance(loaded.get(key), dict):
            missing += _unmatched(value, loaded[key], f"{prefix}{key}.")
        elif key not in loaded or loaded[key] != value:
            missing.append(f"{prefix}{key}: {value!r} written, {loaded.get(key, '(absent)')!r} loaded")
    return missing


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_with_every_key_they_set(path):
    """A shipped spec loads, and each key it sets is the loaded spec's value (none is dropped
    or read as something else)."""
    written = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    assert written, f"{path.name} sets no keys"
    assert _unmatched(written, yaml.safe_load(to_yaml(load_config(path)))) == []


@pytest.mark.parametrize("recipe, model_type, epochs, schedule", [
    ("siamese_3.yaml", "Siamese_3", 5, "constant"), ("siamese_spatial.yaml", "SiameseSpatial", 8, "cosine")])
def test_a_training_recipe_applies_over_a_dataset_spec(recipe, model_type, epochs, schedule):
    config = load_config([TRAIN_SPEC, RECIPES / recipe])
    assert (config.model.model_type, config.train.num_epochs, config.train.optim.lr_schedule) == (
        model_type, epochs, schedule)
    assert (config.dataset.batch_size, config.train.optim.lr) == (32, 5e-4)  # TAO's
    assert config.dataset.train_dataset.csv_path == "/path/to/split/train.csv"  # the data stay the spec's
    assert sorted(path.name for path in RECIPES.glob("*.yaml")) == ["siamese_3.yaml", "siamese_spatial.yaml"]


def test_tao_specs_are_present():
    assert sorted(p.name for p in TAO_SPECS.glob("*.yaml")) == ["evaluate_inference.yaml", "export.yaml", "train.yaml"]


@pytest.fixture
def warnings_seen(caplog, monkeypatch):
    """The WARNING lines oi-ray logs (the CLI stops 'oi_ray' records from reaching the root)."""
    monkeypatch.setattr(logging.getLogger("oi_ray"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="oi_ray")
    return lambda: [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


@pytest.mark.parametrize("name", ["train.yaml", "evaluate_inference.yaml", "export.yaml"])
def test_tao_example_specs_load_without_warnings(name, warnings_seen):
    load_config(TAO_SPECS / name)
    assert warnings_seen() == []


def test_resolved_spec_reloads_without_warnings(tmp_path, warnings_seen):
    saved = save_resolved_spec(load_config(TRAIN_SPEC, ["results_dir=/tmp/x"]), tmp_path)
    assert saved == str(tmp_path / "spec.yaml")
    assert load_config(saved).train.results_dir == "/tmp/x/train"
    assert warnings_seen() == []


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.imagenet_pretrained=true"],
         "model.imagenet_pretrained=True: not used by oi-ray; the custom backbone has no ImageNet weights"),
        (["train.num_nodes=2"], "train.num_nodes=2: not used by oi-ray; Ray places the training workers on "
                                "the nodes of the Ray cluster"),
        (["evaluate.num_nodes=2"], "evaluate.num_nodes=2: not used by oi-ray; Ray places the scoring replicas"),
        (["inference.num_nodes=4"], "inference.num_nodes=4: not used by oi-ray"),
        (["export.gpu_id=1"], "export.gpu_id=1: not used by oi-ray; export traces the model on the CPU"),
        (["gen_trt_engine.gpu_id=1"], "gen_trt_engine.gpu_id=1: not used by oi-ray; TensorRT builds on the GPU "
                                      "that CUDA exposes"),
        (["gen_trt_engine.tensorrt.layers_precision=[conv1:fp32]"],
         "gen_trt_engine.tensorrt.layers_precision=['conv1:fp32']: not used by oi-ray"),
        (["gen_trt_engine.tensorrt.calibration.cal_batches=8"],
         "gen_trt_engine.tensorrt.calibration.cal_batches=8: not used by oi-ray; int8 engines are not built"),
        (["dataset_convert.project_name=pcb", "dataset_convert.bot_top=top"],
         "dataset_convert.project_name='pcb', dataset_convert.bot_top='top': not used by oi-ray; oi-ray has no "
         "dataset_convert task"),
        (["wandb.enable=true"], "wandb.enable=True: not used by oi-ray; oi-ray does not log to Weights & Biases"),
        (["wandb.project=aoi"], "wandb.project='aoi': not used by oi-ray; oi-ray does not log to Weights"),
        (["model_name=my_oi"], "model_name='my_oi': not used by oi-ray"),
        (["train.gpu_ids=[2,3]", "train.num_gpus=2"],
         "train.gpu_ids=[2, 3]: on Ray only their number (2 GPUs, TAO's num_gpus rule) is used and Ray assigns "
         "the GPUs; to run on these devices set CUDA_VISIBLE_DEVICES=2,3 before Ray starts"),
        (["inference.gpu_ids=[1]"], "inference.gpu_ids=[1]: on Ray only their number (1 GPU,"),
    ],
)
def test_inert_tao_keys_warn_once_naming_the_key(overrides, expected, warnings_seen):
    load_config(TRAIN_SPEC, overrides)
    seen = warnings_seen()
    assert len(seen) == 1 and seen[0].startswith(expected), seen


def test_inert_keys_at_their_defaults_and_reconciled_gpu_ids_do_not_warn(warnings_seen):
    load_config(TRAIN_SPEC, ["wandb.enable=false", "train.num_nodes=1", "evaluate.gpu_ids=[0,1]",
                             "evaluate.num_gpus=2", "export.gpu_id=0", "model.imagenet_pretrained=false"])
    assert warnings_seen() == []
    load_config(TRAIN_SPEC, ["train.num_gpus=3"])  # ids become 0..2 by TAO's rule: one notice, no more
    assert len(warnings_seen()) == 1 and "TAO rule" in warnings_seen()[0]


def test_every_inert_key_is_a_schema_key():
    defaults = load_config(None)
    for inert in INERT_KEYS:
        section, _, name = inert.key.rpartition(".")
        node = defaults
        for part in filter(None, section.split(".")):
            node = getattr(node, part)
        assert hasattr(node, name), inert.key


def test_validate_reads_the_config_and_leaves_deriving_to_resolve_derived():
    import copy

    from oi_ray.config.schema import ExperimentConfig
    from oi_ray.config.validate import resolve_derived, validate

    config = ExperimentConfig()
    config.dataset.input_map = {"A": 0, "B": 1}
    config.train.num_gpus, config.train.gpu_ids = 2, [0]
    resolve_derived(config)
    assert (config.dataset.num_input, config.train.num_gpus, config.train.gpu_ids) == (2, 2, [0, 1])
    config.train.gpu_ids = [0]  # a mismatch again: validate reports or ignores it, and changes nothing
    before = copy.deepcopy(config)
    validate(config)
    assert config == before
