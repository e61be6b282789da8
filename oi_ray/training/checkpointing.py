"""A training worker's checkpoints: where it starts from, and each epoch's file written and
reported to Ray Train.

Rank 0 writes ``model_epoch_NNN.pth`` and repoints ``oi_model_latest.pth``; the same file is
the Ray Train checkpoint that a restarted worker group resumes from.
"""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import torch

from oi_ray import storage
from oi_ray.checkpoint import (
    LATEST_NAME,
    Checkpoint,
    epoch_checkpoint_name,
    epoch_checkpoint_path,
    load_checkpoint,
    load_weights,
    point_latest_to,
    save_checkpoint,
)
from oi_ray.config import to_yaml
from oi_ray.config.schema import ExperimentConfig
from oi_ray.metrics import describe_rule
from oi_ray.model.registry import Architecture

RAY_CHECKPOINT_FILE = "checkpoint.pth"


def restore(net: torch.nn.Module, architecture: Architecture, *, resume_from: str | None,
            pretrained: str | None, key: str | None) -> tuple[Checkpoint, bool]:
    """Load the weights to start from into ``net``; return that checkpoint (its epoch, optimizer
    state, threshold) and whether Ray Train restarted this worker group after a failure. The
    weights: Ray Train's last checkpoint after such a restart, else ``resume_from``, else the
    ``pretrained`` weights (epoch 0), else ``net``'s fresh weights."""
    ray_checkpoint = ray.train.get_checkpoint()
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as folder:
            path = Path(folder) / RAY_CHECKPOINT_FILE
            checkpoint = load_checkpoint(path, key)
            load_weights(net, checkpoint, path, architecture)
        return checkpoint, True
    if resume_from is not None:
        path, checkpoint = resume_from, load_checkpoint(resume_from, key)
    elif pretrained:
        path = pretrained
        weights = load_checkpoint(path, key)
        checkpoint = Checkpoint(model_state=weights.model_state, model_type=weights.model_type,
                                input_shape=weights.input_shape, model_options=weights.model_options)
    else:
        return Checkpoint(model_state=net.state_dict()), False
    load_weights(net, checkpoint, path, architecture)
    return checkpoint, False


def epoch_checkpoint(net: torch.nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                     config: ExperimentConfig, architecture: Architecture, threshold: float | None,
                     extra: dict[str, Any]) -> Checkpoint:
    """The checkpoint of ``epoch``: weights, optimizer state, the resolved spec, the calibrated
    ``threshold`` and the rule that chose it, the architecture, and ``extra`` (last metrics)."""
    return Checkpoint(
        model_state=net.state_dict(), epoch=epoch, optimizer_state=optimizer.state_dict(),
        config_yaml=to_yaml(config), threshold=threshold,
        threshold_rule=describe_rule(config.train.calibration) if threshold is not None else None,
        model_type=architecture.model_type, input_shape=architecture.input_shape,
        embedding_dim=architecture.embedding_dim, model_options=dict(architecture.options), extra=extra)


def report_with_checkpoint(metrics: dict[str, Any], checkpoint: Checkpoint, results_dir: str,
                           key: str | None) -> None:
    """Write ``model_epoch_NNN.pth``, repoint ``oi_model_latest.pth``, report it to Ray Train.

    In a bucket (``results_dir`` a URI) the checkpoint is written locally for Ray Train, then
    uploaded, and ``oi_model_latest.pth`` is a server-side copy of it (a bucket has no links)."""
    with tempfile.TemporaryDirectory(prefix="oi-ray-ckpt-") as folder:
        staged = Path(folder) / RAY_CHECKPOINT_FILE
        if storage.is_uri(results_dir):
            save_checkpoint(checkpoint, staged, key)
            path = storage.join(results_dir, epoch_checkpoint_name(checkpoint.epoch))
            storage.upload(staged, path)
            storage.copy_in_store(path, storage.join(results_dir, LATEST_NAME))
        else:
            path = epoch_checkpoint_path(results_dir, checkpoint.epoch)
            save_checkpoint(checkpoint, path, key)
            point_latest_to(path)
            try:
                os.link(path, staged)
            except OSError:  # another file system
                shutil.copyfile(path, staged)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
