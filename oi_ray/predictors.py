"""Scoring backends behind one interface: tiled uint8 picture batches in, pair distances out.

Every consumer (validation during training, ``evaluate``, ``inference``, and later serving)
hands a predictor the ``test`` / ``golden`` columns of a pipeline batch and gets one distance
per pair; larger means more likely a defect. Preprocessing beyond tiling happens inside the
predictor, so every backend sees exactly the same model input.
"""

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from oi_ray.checkpoint import load_checkpoint, load_weights
from oi_ray.config.schema import ExperimentConfig
from oi_ray.data.assemble import InputGeometry
from oi_ray.model.inputs import InputNormalizer
from oi_ray.model.siamese import SiameseNet, build_model


class Predictor(Protocol):
    """What every scoring backend offers."""

    threshold: float | None  # the decision threshold the artefact carries (None: unknown)

    def distances(self, test: np.ndarray, golden: np.ndarray) -> np.ndarray:
        """``(B, H', W', 3)`` uint8 test and golden pictures -> ``(B,)`` float32 distances."""
        ...


class TorchPredictor:
    """A :class:`SiameseNet` in eval mode, on ``device``."""

    def __init__(self, model: SiameseNet, geometry: InputGeometry, *, device: torch.device | str = "cpu",
                 threshold: float | None = None, channels_last: bool = False) -> None:
        self.model = model
        self.normalize = InputNormalizer(geometry, device, channels_last=channels_last)
        self.threshold = threshold

    @torch.inference_mode()
    def distances(self, test: np.ndarray, golden: np.ndarray) -> np.ndarray:
        was_training = self.model.training
        self.model.eval()
        try:
            scores = self.model.distance(self.normalize(test), self.normalize(golden))
        finally:
            self.model.train(was_training)
        return scores.float().cpu().numpy()


def load_torch_predictor(path: str | Path, config: ExperimentConfig,
                         device: torch.device | str = "cpu") -> TorchPredictor:
    """A :class:`TorchPredictor` for the ``.pth`` at ``path``, checked against the spec's model."""
    geometry = InputGeometry.from_config(config.dataset)
    model = build_model(config.model.model_type, geometry.input_shape, config.model.embedding_vectors)
    checkpoint = load_checkpoint(path)
    load_weights(model, checkpoint, path, config.model.model_type, geometry.input_shape)
    return TorchPredictor(model.to(device), geometry, device=device, threshold=checkpoint.threshold)
