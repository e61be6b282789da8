"""Scores to metrics: TAO's four percentages, ROC/PR summaries, FAR at a defect recall (also
with the weakest defects left out), defect recall at a false-alarm rate, and the threshold
calibration rule. Pure numpy; every score is a pair distance where larger means "more likely a
defect", and the decision is ``score > threshold`` (TAO's rule).
"""

from dataclasses import dataclass

import numpy as np

from oi_ray.config.schema import CalibrationRule, CalibrationRuleConfig
from oi_ray.decision import flagged


@dataclass(frozen=True)
class OperatingPoint:
    """A threshold and what it does on a labelled set."""

    threshold: float
    defect_recall: float  # caught defects / all defects
    false_alarm_rate: float  # flagged PASS pairs / all PASS pairs


def tao_metrics(scores: np.ndarray, targets: np.ndarray, threshold: float) -> dict[str, float]:
    """TAO's evaluate metrics, in percent, exactly as TAO computes them.

    ``total_accuracy`` = correct / all; ``defect_accuracy`` = caught / all defects (0 without
    defects); ``false_alarm`` = flagged PASS / **all pairs**; ``false_negative`` = missed
    defects / **all pairs**.
    """
    scores, targets = _checked(scores, targets)
    calls = flagged(scores, threshold)
    defect = targets == 1
    total = len(scores)
    caught = int(np.count_nonzero(calls & defect))
    num_defects = int(np.count_nonzero(defect))
    return {  # plain Python floats: they go into checkpoints that load with weights_only=True
        "total_accuracy": 100.0 * int(np.count_nonzero(calls == defect)) / total,
        "defect_accuracy": 100.0 * caught / num_defects if num_defects else 0.0,
        "false_alarm": 100.0 * int(np.count_nonzero(calls & ~defect)) / total,
        "false_negative": 100.0 * int(np.count_nonzero(~calls & defect)) / total,
    }


def confusion_matrix(scores: np.ndarray, targets: np.ndarray, threshold: float) -> dict[str, int]:
    """Counts of the decision ``score > threshold`` against the labels."""
    scores, targets = _checked(scores, targets)
    calls, defect = flagged(scores, threshold), targets == 1
    return {
        "true_pass": int(np.count_nonzero(~calls & ~defect)),
        "false_alarm": int(np.count_nonzero(calls & ~defect)),
        "missed_defect": int(np.count_nonzero(~calls & defect)),
        "caught_defect": int(np.count_nonzero(calls & defect)),
    }


def roc_curve(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False-alarm rate, defect recall and threshold at every distinct score, from strict to lax.

    Point ``i`` flags the pairs whose score is >= ``thresholds[i]``; a leading (0, 0) point
    with threshold +inf is included.
    """
    scores, targets = _checked(scores, targets, need_both=True)
    order = np.argsort(-scores, kind="mergesort")
    ranked, labels = scores[order], targets[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    caught = np.cumsum(labels == 1)[last_of_value]
    alarms = np.cumsum(labels == 0)[last_of_value]
    recall = np.r_[0.0, caught / caught[-1]]
    false_alarm = np.r_[0.0, alarms / alarms[-1]]
    return false_alarm, recall, np.r_[np.inf, ranked[last_of_value]]


def auroc(scores: np.ndarray, targets: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half)."""
    false_alarm, recall, _ = roc_curve(scores, targets)
    return float(np.trapezoid(recall, false_alarm))


def pr_curve(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Defect recall and precision at every distinct score, from strict to lax."""
    scores, targets = _checked(scores, targets, need_both=True)
    order = np.argsort(-scores, kind="mergesort")
    ranked, labels = scores[order], targets[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    caught = np.cumsum(labels == 1)[last_of_value]
    return caught / caught[-1], caught / (last_of_value + 1)


def aupr(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision of defect detection: sum over thresholds of recall gain x precision."""
    recall, precision = pr_curve(scores, targets)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def at_defect_recall(scores: np.ndarray, targets: np.ndarray, recall: float,
                     safety_margin: float = 0.0) -> OperatingPoint:
    """The strictest threshold that still catches at least ``recall`` of the defects.

    The threshold sits halfway between the weakest defect that must be caught and the next
    lower score, so ``score > threshold`` reproduces the point on new data with ties; with a
    ``safety_margin``, at most ``(1 - safety_margin)`` x the weakest caught defect's score, so a
    new defect scoring a little lower than every validation defect is still caught.
    """
    scores, targets = _checked(scores, targets, need_both=True)
    weakest = weakest_caught(scores, targets, recall)
    lower = scores[scores < weakest]
    threshold = float((weakest + lower.max()) / 2) if len(lower) else float(np.nextafter(weakest, -np.inf))
    if safety_margin > 0:
        threshold = min(threshold, float(weakest * (1 - safety_margin)))
    return _operating_point(scores, targets, threshold)


def without_weakest_defects(scores: np.ndarray, targets: np.ndarray, left_out: int) -> OperatingPoint | None:
    """The strictest threshold catching every defect but the ``left_out`` weakest (``None`` when
    that leaves none), as :func:`at_defect_recall` places it.

    All PASS pairs count; the point's ``defect_recall`` is over all defects, so a left-out
    defect that ties the weakest kept one counts as caught (ties are flagged together).
    """
    defects = int(np.count_nonzero(np.asarray(targets) == 1))
    if left_out >= defects:
        return None
    return at_defect_recall(scores, targets, (defects - left_out) / defects)


def at_false_alarm_rate(scores: np.ndarray, targets: np.ndarray, max_rate: float) -> OperatingPoint:
    """The threshold catching the most defects while flagging at most ``max_rate`` of the PASS
    pairs; the strictest of those. Pairs with equal scores are flagged together, so a PASS pair
    tied with a defect costs its false alarm wherever that defect is caught."""
    false_alarm, recall, thresholds = roc_curve(scores, targets)
    best = recall[false_alarm <= max_rate + 1e-12].max()  # the (0, 0) point is always allowed
    index = int(np.argmax(recall >= best))
    return _operating_point(*_checked(scores, targets), _threshold_flagging(thresholds, index))


def weakest_caught(scores: np.ndarray, targets: np.ndarray, recall: float) -> float:
    """The score of the weakest defect among the ``recall`` share of defects scored highest."""
    defect_scores = np.sort(np.asarray(scores, dtype=np.float64)[np.asarray(targets) == 1])[::-1]
    needed = max(1, int(np.ceil(recall * len(defect_scores) - 1e-9)))
    return float(defect_scores[needed - 1])


def describe_rule(rule: CalibrationRuleConfig) -> str:
    """The calibration rule in words, as checkpoints and model cards record it."""
    if rule.rule == CalibrationRule.DEFECT_RECALL:
        return (f"defect_recall: catches {rule.target_recall:.2%} of the validation defects, at most "
                f"{1 - rule.safety_margin:.0%} of the weakest caught defect's distance")
    return "balanced_accuracy: the best (defect recall + 1 - false-alarm rate) / 2 on the validation set"


def calibrate(scores: np.ndarray, targets: np.ndarray, rule: CalibrationRuleConfig) -> OperatingPoint:
    """The decision threshold by ``rule`` (``train.calibration``): the defect-recall operating point
    or the best balanced accuracy."""
    if rule.rule == CalibrationRule.DEFECT_RECALL:
        return at_defect_recall(scores, targets, rule.target_recall, rule.safety_margin)
    return calibrate_threshold(scores, targets)


def calibrate_threshold(scores: np.ndarray, targets: np.ndarray) -> OperatingPoint:
    """The threshold that maximises balanced accuracy ``(recall + (1 - FAR)) / 2``.

    Candidates are midpoints between consecutive distinct scores; among equally good ones the
    lowest threshold (the one catching the most defects) wins.
    """
    false_alarm, recall, thresholds = roc_curve(scores, targets)
    balanced = recall - false_alarm  # = 2 * balanced accuracy - 1
    best = int(np.argmax(balanced[::-1]))
    index = len(balanced) - 1 - best
    return _operating_point(*_checked(scores, targets), _threshold_flagging(thresholds, index))


def _threshold_flagging(thresholds: np.ndarray, index: int) -> float:
    """A threshold for ``score > threshold`` that flags what ROC point ``index`` of
    :func:`roc_curve` flags (the scores >= ``thresholds[index]``): halfway to the next lower score."""
    if index == 0:  # flag nothing: the highest score
        return float(thresholds[1])
    if index + 1 == len(thresholds):  # flag everything: just below the lowest score
        return float(np.nextafter(thresholds[index], -np.inf))
    return float((thresholds[index] + thresholds[index + 1]) / 2)


def _operating_point(scores: np.ndarray, targets: np.ndarray, threshold: float) -> OperatingPoint:
    calls = flagged(scores, threshold)
    defect = targets == 1
    return OperatingPoint(
        threshold=threshold,
        defect_recall=float(np.count_nonzero(calls & defect) / max(1, np.count_nonzero(defect))),
        false_alarm_rate=float(np.count_nonzero(calls & ~defect) / max(1, np.count_nonzero(~defect))),
    )


def _checked(scores, targets, need_both: bool = False) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    targets = np.asarray(targets).ravel().astype(np.int8)
    if len(scores) != len(targets) or len(scores) == 0:
        raise ValueError(f"need equal, non-zero numbers of scores and targets, got "
                         f"{len(scores)} and {len(targets)}")
    if need_both and not (np.any(targets == 1) and np.any(targets == 0)):
        raise ValueError("this metric needs both PASS and defect pairs")
    return scores, targets
