"""Derived defaults and value checks for a merged ExperimentConfig.

Every problem is reported with its full dotted key, the offending value and what is
allowed; all problems are collected so a user fixes them in one go.
"""

import dataclasses
import functools
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from oi_ray.config.schema import (
    DATASET_SPLITS,
    Backbone,
    CalibrationRule,
    ConcatType,
    DatasetConfig,
    ExperimentConfig,
    ExportConfig,
    Loss,
    LrSchedule,
    ModelConfig,
    ModelType,
    OptimizerType,
    ProxyLocation,
    RayConfig,
    SchedulerType,
    SearchAlg,
    ServeConfig,
    TensorRTConfig,
    TrainConfig,
    TrtDataType,
    TuneConfig,
    TuneMode,
)

log = logging.getLogger(__name__)

MAX_PORT = 65535
JOB_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
# What every training epoch reports (training/worker.py), the metrics a sweep can rank trials by
TUNE_METRICS = ("val_auroc", "val_loss", "val_acc", "val_fpr", "val_defect_recall_fraction_of_defects",
                "val_false_alarm_fraction_of_pass_pairs",
                "val_false_alarm_fraction_of_pass_pairs_at_99_defect_recall", "train_loss")


@dataclass(frozen=True)
class InertKey:
    """A TAO key (or a whole section) oi-ray accepts so TAO specs load, but does not act on."""

    key: str  # dotted key or section; a section covers every key under it
    instead: str  # what oi-ray does instead, said to the user


# The one list of accepted-but-inert TAO keys: a spec that gives any of them a value other than
# the schema default gets one warning at load naming the key and what oi-ray does instead.
INERT_KEYS: tuple[InertKey, ...] = (
    InertKey("model_name", "oi-ray identifies a model by model.model_type and the checkpoint file"),
    InertKey("model.imagenet_pretrained", "the custom backbone has no ImageNet weights; to start "
             "from trained weights set train.pretrained_model_path"),
    *(InertKey(f"{task}.num_nodes", f"Ray places the {what} on the nodes of the Ray cluster it runs "
               f"on (ray.address); {count}")
      for task, what, count in (
          ("train", "training workers", "their number is ray.num_workers"),
          ("evaluate", "scoring replicas", "their number is evaluate.num_gpus"),
          ("inference", "scoring replicas", "their number is inference.num_gpus"))),
    InertKey("export.gpu_id", "export traces the model on the CPU; the ONNX file runs on any device"),
    InertKey("gen_trt_engine.gpu_id", "TensorRT builds on the GPU that CUDA exposes to the process; "
             "choose it with CUDA_VISIBLE_DEVICES"),
    InertKey("gen_trt_engine.tensorrt.layers_precision", "every layer is built at "
             "gen_trt_engine.tensorrt.data_type"),
    InertKey("gen_trt_engine.tensorrt.calibration", "int8 engines are not built yet, so nothing is "
             "calibrated; use data_type fp16 or fp32"),
    InertKey("dataset_convert", "oi-ray has no dataset_convert task; write the pairs CSVs "
             "(input_path, golden_path, object_name, label) directly"),
    InertKey("wandb", "oi-ray does not log to Weights & Biases; per-epoch metrics go to "
             "train.results_dir/status.json, and to TensorBoard with train.tensorboard.enabled"),
)
GPU_ID_SECTIONS = ("train", "evaluate", "inference")


def resolve_derived(config: ExperimentConfig) -> None:
    """Fill values TAO derives: ``num_input`` from ``input_map``; GPU count vs ids."""
    dataset = config.dataset
    if dataset.num_input is None:
        dataset.num_input = len(dataset.input_map) if dataset.input_map else 1
    for section_name in ("train", "evaluate", "inference"):
        section = getattr(config, section_name)
        num_gpus, gpu_ids = reconcile_gpus(section.num_gpus, section.gpu_ids)
        if (num_gpus, gpu_ids) != (section.num_gpus, section.gpu_ids):
            log.warning(
                "%s.num_gpus=%s does not match %s.gpu_ids=%s; using num_gpus=%s, gpu_ids=%s (TAO rule)",
                section_name, section.num_gpus, section_name, section.gpu_ids, num_gpus, gpu_ids,
            )
            section.num_gpus, section.gpu_ids = num_gpus, gpu_ids


def reconcile_gpus(num_gpus: int, gpu_ids: list[int]) -> tuple[int, list[int]]:
    """TAO's rule: take the larger count; ids become 0..n-1 unless they already match it."""
    if num_gpus == len(gpu_ids):
        return num_gpus, list(gpu_ids)
    count = max(num_gpus, len(gpu_ids))
    return count, list(gpu_ids) if len(gpu_ids) == count else list(range(count))


def inert_key_warnings(config: ExperimentConfig) -> list[str]:
    """One message per entry of INERT_KEYS the config sets, and per ``gpu_ids`` that are not 0..n-1."""
    defaults = ExperimentConfig()
    messages = []
    for inert in INERT_KEYS:
        changed = _changed_keys(_select(config, inert.key), _select(defaults, inert.key), inert.key)
        if changed:
            values = ", ".join(f"{key}={_select(config, key)!r}" for key in changed)
            messages.append(f"{values}: not used by oi-ray; {inert.instead}")
    for name in GPU_ID_SECTIONS:
        gpu_ids = getattr(config, name).gpu_ids
        if gpu_ids != list(range(len(gpu_ids))):
            messages.append(
                f"{name}.gpu_ids={gpu_ids}: on Ray only their number ({len(gpu_ids)} "
                f"GPU{'s' if len(gpu_ids) > 1 else ''}, TAO's num_gpus rule) is used and Ray assigns the "
                f"GPUs; to run on these devices set "
                f"CUDA_VISIBLE_DEVICES={','.join(map(str, gpu_ids))} before Ray starts (before oi-ray for "
                f"its embedded Ray, before `ray start` on each node of a cluster) and list them here as "
                f"{list(range(len(gpu_ids)))}")
    return messages


def warn_inert_keys(config: ExperimentConfig) -> None:
    """Log :func:`inert_key_warnings` (once per load)."""
    for message in inert_key_warnings(config):
        log.warning("%s", message)


def _select(node: Any, dotted: str) -> Any:
    return functools.reduce(getattr, dotted.split("."), node)


def _changed_keys(value: Any, default: Any, dotted: str) -> list[str]:
    """Dotted keys under ``dotted`` whose value differs from the default."""
    if dataclasses.is_dataclass(value) and dataclasses.is_dataclass(default):
        return [key for field in dataclasses.fields(value) for key in _changed_keys(
            getattr(value, field.name), getattr(default, field.name), f"{dotted}.{field.name}")]
    return [] if value == default else [dotted]


class _Problems:
    """Collects problems; each check names the dotted key, the value and what is allowed."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def check(self, ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            self.messages.append(f"{key}={value!r} is invalid: {allowed}")

    def one_of(self, key: str, value: Any, choices: Iterable[str]) -> None:
        allowed = [str(choice) for choice in choices]
        if value not in allowed:
            self.messages.append(f"{key}={value!r} is not one of {allowed}")

    def in_range(self, key: str, value: float, low: float, high: float) -> None:
        self.check(low <= value <= high, key, value, f"expected {low} <= value <= {high}")

    def at_least(self, key: str, value: float, low: float) -> None:
        self.check(value >= low, key, value, f"expected >= {low}")


def validate(config: ExperimentConfig) -> list[str]:
    """Return human-readable problems (empty when the config is valid); reads ``config`` only
    (derive TAO's implied values first: :func:`resolve_derived`)."""
    p = _Problems()
    _check_model(p, config.model)
    _check_dataset(p, config.dataset)
    _check_train(p, config.train)
    for name in ("evaluate", "inference"):
        section = getattr(config, name)
        p.at_least(f"{name}.num_gpus", section.num_gpus, 1)
        p.at_least(f"{name}.num_nodes", section.num_nodes, 1)
    _check_export(p, config.export)
    _check_tensorrt(p, config.gen_trt_engine.tensorrt)
    p.check(config.gen_trt_engine.batch_size == -1 or config.gen_trt_engine.batch_size >= 1,
            "gen_trt_engine.batch_size", config.gen_trt_engine.batch_size, "expected -1 (profile) or >= 1")
    p.check(config.pack.shard_mb > 0, "pack.shard_mb", config.pack.shard_mb, "expected > 0 (megabytes)")
    _check_ray(p, config.ray)
    _check_serve(p, config.serve)
    _check_tune(p, config.tune)
    return p.messages


def _check_model(p: _Problems, model: ModelConfig) -> None:
    p.one_of("model.model_type", model.model_type, ModelType)
    p.one_of("model.model_backbone", model.model_backbone, Backbone)
    p.at_least("model.embedding_vectors", model.embedding_vectors, 1)
    p.check(model.margin > 0, "model.margin", model.margin, "expected > 0")
    spatial = model.spatial
    p.check(spatial.stride in (2, 4), "model.spatial.stride", spatial.stride, "expected 2 or 4")
    p.check(spatial.neighbourhood >= 1 and spatial.neighbourhood % 2 == 1, "model.spatial.neighbourhood",
            spatial.neighbourhood, "expected an odd number >= 1 (1: no shift tolerance)")
    p.at_least("model.spatial.width", spatial.width, 2)
    p.at_least("model.spatial.blocks", spatial.blocks, 0)
    p.at_least("model.spatial.features", spatial.features, 1)


def _check_dataset(p: _Problems, dataset: DatasetConfig) -> None:
    p.check(dataset.image_ext.startswith("."), "dataset.image_ext", dataset.image_ext,
            "include the dot, e.g. '.jpg'")
    p.at_least("dataset.batch_size", dataset.batch_size, 1)
    p.at_least("dataset.workers", dataset.workers, 0)
    p.check(0 < dataset.fpratio_sampling <= 1, "dataset.fpratio_sampling",
            dataset.fpratio_sampling, "expected 0 < value <= 1 (defects drawn per PASS pair)")
    p.at_least("dataset.image_width", dataset.image_width, 1)
    p.at_least("dataset.image_height", dataset.image_height, 1)
    p.at_least("dataset.num_input", dataset.num_input, 1)
    p.one_of("dataset.concat_type", dataset.concat_type, ConcatType)
    for split in DATASET_SPLITS:
        paths = getattr(dataset, split)
        replaced = [key for key in ("csv_path", "images_dir") if getattr(paths, key)]
        also = " and ".join(f"dataset.{split}.{key}" for key in replaced)
        p.check(not (paths.shards and also), f"dataset.{split}.shards", paths.shards,
                f"packed shards replace {also}: set null what they replace (the dataset.yaml that oi-ray "
                f"pack writes does)")

    lights = dataset.input_map
    if lights:
        p.check(dataset.num_input == len(lights), "dataset.num_input", dataset.num_input,
                f"dataset.input_map lists {len(lights)} lightings ({', '.join(lights)})")
        if list(lights.values()) != list(range(len(lights))):
            log.warning(
                "dataset.input_map values %s are ignored: lightings are used in the order "
                "written (%s), as TAO does", list(lights.values()), ", ".join(lights),
            )
    else:
        p.check(dataset.num_input == 1, "dataset.num_input", dataset.num_input,
                "without dataset.input_map there is one image per side, so num_input must be 1")

    grid = dataset.grid_map
    if dataset.concat_type == ConcatType.GRID:
        layout = "unset" if grid is None else f"x={grid.x}, y={grid.y}"
        p.check(grid is not None and grid.x >= 1 and grid.y >= 1
                and grid.x * grid.y == dataset.num_input, "dataset.grid_map", layout,
                f"concat_type grid needs grid_map x*y == dataset.num_input ({dataset.num_input})")

    aug = dataset.augmentation_config
    prefix = "dataset.augmentation_config"
    for name in ("rgb_input_mean", "rgb_input_std"):
        values = getattr(aug, name)
        p.check(len(values) == 3, f"{prefix}.{name}", values, "expected 3 values (R, G, B)")
    p.check(all(s > 0 for s in aug.rgb_input_std), f"{prefix}.rgb_input_std",
            aug.rgb_input_std, "every std must be > 0")
    p.in_range(f"{prefix}.random_flip.hflip_probability", aug.random_flip.hflip_probability, 0, 1)
    p.in_range(f"{prefix}.random_flip.vflip_probability", aug.random_flip.vflip_probability, 0, 1)
    p.in_range(f"{prefix}.random_rotate.rotate_probability",
               aug.random_rotate.rotate_probability, 0, 1)
    p.check(len(aug.random_rotate.angle_list) >= 1, f"{prefix}.random_rotate.angle_list",
            aug.random_rotate.angle_list, "expected at least one angle")
    color = aug.random_color
    p.in_range(f"{prefix}.random_color.color_probability", color.color_probability, 0, 1)
    for name in ("brightness", "contrast", "saturation"):
        p.at_least(f"{prefix}.random_color.{name}", getattr(color, name), 0)
    p.in_range(f"{prefix}.random_color.hue", color.hue, 0, 0.5)
    p.check(0 <= aug.lighting_gain < 1, f"{prefix}.lighting_gain", aug.lighting_gain,
            "expected 0 (off) <= lighting_gain < 1")


def _check_train(p: _Problems, train: TrainConfig) -> None:
    p.at_least("train.num_gpus", train.num_gpus, 1)
    p.at_least("train.num_nodes", train.num_nodes, 1)
    p.at_least("train.seed", train.seed, -1)
    p.at_least("train.num_epochs", train.num_epochs, 1)
    for name in ("checkpoint_interval", "validation_interval"):
        p.in_range(f"train.{name}", getattr(train, name), 1, train.num_epochs)
    p.one_of("train.optim.type", train.optim.type, OptimizerType)
    p.check(train.optim.lr > 0, "train.optim.lr", train.optim.lr, "expected > 0")
    p.one_of("train.optim.lr_schedule", train.optim.lr_schedule, LrSchedule)
    p.in_range("train.optim.momentum", train.optim.momentum, 0, 1)
    p.at_least("train.optim.weight_decay", train.optim.weight_decay, 0)
    p.one_of("train.loss", train.loss, Loss)
    p.at_least("train.clip_grad_norm", train.clip_grad_norm, 0)
    calibration = train.calibration
    p.one_of("train.calibration.rule", calibration.rule, CalibrationRule)
    p.check(0 < calibration.target_recall <= 1, "train.calibration.target_recall", calibration.target_recall,
            "expected 0 < value <= 1 (a share of the validation defects)")
    p.check(0 <= calibration.safety_margin < 1, "train.calibration.safety_margin", calibration.safety_margin,
            "expected 0 <= value < 1 (a share of the weakest defect's score)")


def _check_export(p: _Problems, export: ExportConfig) -> None:
    p.at_least("export.opset_version", export.opset_version, 7)
    p.check(export.batch_size == -1 or export.batch_size >= 1, "export.batch_size",
            export.batch_size, "expected -1 (dynamic) or >= 1")
    p.check(export.input_channel == 3, "export.input_channel", export.input_channel,
            "the model takes RGB inputs (3)")


def _check_tensorrt(p: _Problems, trt: TensorRTConfig) -> None:
    prefix = "gen_trt_engine.tensorrt"
    p.one_of(f"{prefix}.data_type", trt.data_type, TrtDataType)
    p.at_least(f"{prefix}.workspace_size", trt.workspace_size, 0)
    p.at_least(f"{prefix}.min_batch_size", trt.min_batch_size, 1)
    for name in ("opt_batch_size", "max_batch_size"):
        value = getattr(trt, name)
        p.check(value is None or value >= trt.min_batch_size, f"{prefix}.{name}", value,
                f"expected >= min_batch_size ({trt.min_batch_size})")
    if trt.opt_batch_size is not None and trt.max_batch_size is not None:
        p.check(trt.opt_batch_size <= trt.max_batch_size, f"{prefix}.opt_batch_size",
                trt.opt_batch_size, f"expected <= max_batch_size ({trt.max_batch_size})")


def _check_ray(p: _Problems, ray: RayConfig) -> None:
    p.check(ray.num_workers is None or ray.num_workers >= 1, "ray.num_workers", ray.num_workers,
            "expected >= 1")
    p.check(ray.cpus_per_worker > 0, "ray.cpus_per_worker", ray.cpus_per_worker, "expected > 0")
    p.at_least("ray.gpus_per_worker", ray.gpus_per_worker, 0)
    p.at_least("ray.max_failures", ray.max_failures, -1)
    p.check(ray.torch_threads is None or ray.torch_threads >= 1, "ray.torch_threads",
            ray.torch_threads, "expected >= 1")
    p.check(ray.num_cpus is None or ray.num_cpus >= 1, "ray.num_cpus", ray.num_cpus,
            "expected >= 1")
    p.check(ray.metrics_export_port is None or 1 <= ray.metrics_export_port <= MAX_PORT,
            "ray.metrics_export_port", ray.metrics_export_port, f"expected a port 1..{MAX_PORT}")
    p.check(ray.job_id is None or re.fullmatch(JOB_ID_PATTERN, ray.job_id) is not None, "ray.job_id",
            ray.job_id, "expected letters, digits, '.', '_' or '-' (it names a folder), starting with a "
            "letter or digit")


def _check_serve(p: _Problems, serve: ServeConfig) -> None:
    p.check(bool(serve.app_name.strip()), "serve.app_name", serve.app_name, "expected a name")
    p.in_range("serve.port", serve.port, 1, MAX_PORT)
    p.one_of("serve.proxy_location", serve.proxy_location, ProxyLocation)
    p.check(serve.route_prefix.startswith("/"), "serve.route_prefix", serve.route_prefix,
            "expected a path starting with '/', e.g. / or /inspection")
    p.at_least("serve.max_pairs_per_request", serve.max_pairs_per_request, 1)
    p.check(serve.max_request_mb > 0, "serve.max_request_mb", serve.max_request_mb, "expected > 0")
    p.check(serve.request_timeout_s > 0, "serve.request_timeout_s", serve.request_timeout_s, "expected > 0")
    p.at_least("serve.batching.max_batch_size", serve.batching.max_batch_size, 1)
    p.at_least("serve.batching.batch_wait_timeout_s", serve.batching.batch_wait_timeout_s, 0)
    scaling = serve.autoscaling_config
    prefix = "serve.autoscaling_config"
    p.at_least(f"{prefix}.min_replicas", scaling.min_replicas, 0)
    p.check(scaling.max_replicas >= max(1, scaling.min_replicas), f"{prefix}.max_replicas",
            scaling.max_replicas, f"expected >= 1 and >= min_replicas ({scaling.min_replicas})")
    p.check(scaling.initial_replicas is None
            or scaling.min_replicas <= scaling.initial_replicas <= scaling.max_replicas,
            f"{prefix}.initial_replicas", scaling.initial_replicas,
            f"expected min_replicas {scaling.min_replicas} <= value <= max_replicas {scaling.max_replicas}")
    p.check(scaling.target_ongoing_requests > 0, f"{prefix}.target_ongoing_requests",
            scaling.target_ongoing_requests, "expected > 0")
    p.at_least(f"{prefix}.upscale_delay_s", scaling.upscale_delay_s, 0)
    p.at_least(f"{prefix}.downscale_delay_s", scaling.downscale_delay_s, 0)
    p.at_least("serve.max_ongoing_requests", serve.max_ongoing_requests, 1)
    p.check(serve.max_queued_requests == -1 or serve.max_queued_requests >= 0, "serve.max_queued_requests",
            serve.max_queued_requests, "expected >= 0, or -1 for no limit")
    p.check(serve.num_cpus > 0, "serve.num_cpus", serve.num_cpus, "expected > 0")
    p.at_least("serve.num_gpus", serve.num_gpus, 0)
    p.check(serve.threshold is None or serve.threshold > 0, "serve.threshold", serve.threshold,
            "expected > 0 (pairs farther apart are NO_PASS)")
    p.check(serve.auth_token_env is None or serve.auth_token_env.isidentifier(), "serve.auth_token_env",
            serve.auth_token_env, "expected the name of an environment variable, e.g. OI_RAY_SERVE_TOKEN")


def _check_tune(p: _Problems, tune: TuneConfig) -> None:
    p.at_least("tune.num_samples", tune.num_samples, 1)
    p.one_of("tune.metric", tune.metric, TUNE_METRICS)
    p.one_of("tune.mode", tune.mode, TuneMode)
    p.one_of("tune.scheduler.type", tune.scheduler.type, SchedulerType)
    p.at_least("tune.scheduler.grace_period", tune.scheduler.grace_period, 1)
    p.check(tune.scheduler.reduction_factor > 1, "tune.scheduler.reduction_factor",
            tune.scheduler.reduction_factor, "expected > 1")
    p.one_of("tune.search_alg", tune.search_alg, SearchAlg)
    p.check(tune.max_concurrent_trials is None or tune.max_concurrent_trials >= 1,
            "tune.max_concurrent_trials", tune.max_concurrent_trials, "expected >= 1")
    resources = tune.resources_per_trial
    p.check(resources.num_workers is None or resources.num_workers >= 1,
            "tune.resources_per_trial.num_workers", resources.num_workers, "expected >= 1")
    p.check(resources.cpus_per_worker is None or resources.cpus_per_worker > 0,
            "tune.resources_per_trial.cpus_per_worker", resources.cpus_per_worker, "expected > 0")
    p.check(resources.gpus_per_worker is None or resources.gpus_per_worker >= 0,
            "tune.resources_per_trial.gpus_per_worker", resources.gpus_per_worker, "expected >= 0")
    p.check(bool(tune.name.strip()) and "/" not in tune.name, "tune.name", tune.name,
            "expected a folder name (no '/')")
