"""The decision rule, in one place: which threshold applies, and what a distance decides.

A pair is flagged ``NO_PASS`` when its distance is strictly greater than the threshold (TAO's
rule), else ``PASS``. The threshold is, in order: an explicit override (``evaluate.threshold``,
``inference.threshold``, ``serve.threshold``), the calibrated one the model file carries (a
checkpoint stores it, an exported model's card carries it), else TAO's ``model.margin``.
Evaluate, inference, serving and the metrics all decide through this module.
"""

from dataclasses import dataclass

import numpy as np

PASS = "PASS"
NO_PASS = "NO_PASS"


@dataclass(frozen=True)
class CarriedThreshold:
    """The decision threshold a model file carries, and where it was read."""

    value: float | None  # None: the file carries none (model.margin decides)
    source: str  # "the checkpoint <path>" or "the model card <path>"
    rule: str | None = None  # how it was calibrated, when the file says


@dataclass(frozen=True)
class DecisionThreshold:
    """The threshold a run decides with, and why it is that one."""

    value: float
    source: str


def choose_threshold(override: float | None, override_key: str, carried: CarriedThreshold,
                     margin: float) -> DecisionThreshold:
    """The threshold that applies: ``override`` (named ``override_key``), else the model's
    calibrated one, else ``margin``."""
    if override is not None:
        return DecisionThreshold(float(override), override_key)
    if carried.value is not None:
        rule = f"by {carried.rule}; " if carried.rule else ""
        return DecisionThreshold(float(carried.value),
                                 f"calibrated on the validation set ({rule}stored in {carried.source})")
    return DecisionThreshold(float(margin),
                             f"model.margin ({carried.source} carries no calibrated threshold)")


def flagged(distances: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean per pair: ``distance > threshold`` (a defect call)."""
    return np.asarray(distances) > threshold


def decisions(distances: np.ndarray, threshold: float) -> np.ndarray:
    """``"NO_PASS"`` or ``"PASS"`` per pair."""
    return np.where(flagged(distances, threshold), NO_PASS, PASS)
