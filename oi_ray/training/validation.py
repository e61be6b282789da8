"""Validation after a training epoch: loss, TAO's KPIs, AUROC and the calibrated threshold."""

from typing import Any

import numpy as np
import torch

from oi_ray.config.schema import CalibrationRuleConfig
from oi_ray.data.assemble import InputGeometry
from oi_ray.data.dataset import DecodedCache
from oi_ray.data.epochs import CacheReader, batches_of
from oi_ray.metrics import at_defect_recall, auroc, calibrate, tao_metrics
from oi_ray.model.loss import contrastive_loss
from oi_ray.predictors import TorchPredictor
from oi_ray.scoring import score_batches

RECALL_TARGET = 0.99


def validate(net: torch.nn.Module, cache: DecodedCache, geometry: InputGeometry, *, margin: float,
             calibration: CalibrationRuleConfig, batch_size: int, device: torch.device,
             channels_last: bool = False) -> dict[str, Any]:
    """Score every pair of ``cache`` with ``net`` and return the epoch's validation metrics.

    The threshold is calibrated by the ``calibration`` rule (``train.calibration``); TAO's
    KPIs (``val_acc``, ``val_fpr``) and the loss use ``margin`` (``model.margin``)."""
    predictor = TorchPredictor(net, geometry, device=device, channels_last=channels_last)
    reader = CacheReader(cache)
    batches = batches_of(reader, np.arange(len(reader)), geometry, batch_size=batch_size)
    scores = score_batches(predictor, batches)
    distances, targets = scores.distances, scores.targets
    tao = tao_metrics(distances, targets, margin)
    calibrated = calibrate(distances, targets, calibration)
    at_recall = at_defect_recall(distances, targets, RECALL_TARGET)
    loss = contrastive_loss(torch.from_numpy(distances), torch.from_numpy(targets), margin)
    return {
        "val_loss": float(loss), "val_acc": tao["total_accuracy"], "val_fpr": tao["false_alarm"],
        "val_auroc": auroc(distances, targets), "threshold": calibrated.threshold,
        # oi-ray's own rates at the calibrated threshold, named as metrics.json names them
        "val_defect_recall_fraction_of_defects": calibrated.defect_recall,
        "val_false_alarm_fraction_of_pass_pairs": calibrated.false_alarm_rate,
        "val_false_alarm_fraction_of_pass_pairs_at_99_defect_recall": at_recall.false_alarm_rate,
    }
