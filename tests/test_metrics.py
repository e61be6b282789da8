"""Metrics against sklearn and hand computation; threshold calibration."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from oi_ray import metrics
from oi_ray.config.schema import CalibrationRuleConfig


def _data(seed=0, n=400, ties=False):
    rng = np.random.default_rng(seed)
    targets = (rng.random(n) < 0.2).astype(np.int8)
    scores = rng.normal(1.0 + 1.5 * targets, 1.0)
    return (np.round(scores, 1) if ties else scores), targets


def test_tao_metrics_by_hand():
    scores = np.array([0.5, 2.5, 3.0, 1.0, 2.1, 0.1])
    targets = np.array([0, 0, 1, 1, 1, 0])
    # flagged (> 2.0): 2.5 (PASS: false alarm), 3.0 and 2.1 (caught); 1.0 missed
    result = metrics.tao_metrics(scores, targets, threshold=2.0)
    assert result["total_accuracy"] == pytest.approx(100 * 4 / 6)
    assert result["defect_accuracy"] == pytest.approx(100 * 2 / 3)
    assert result["false_alarm"] == pytest.approx(100 * 1 / 6), "over all pairs, as TAO"
    assert result["false_negative"] == pytest.approx(100 * 1 / 6)
    assert {type(value) for value in result.values()} == {float}, "plain floats (weights_only checkpoints)"
    assert metrics.confusion_matrix(scores, targets, 2.0) == {
        "true_pass": 2, "false_alarm": 1, "missed_defect": 1, "caught_defect": 2}
    assert metrics.tao_metrics(scores, np.zeros(6), 2.0)["defect_accuracy"] == 0.0


def test_tao_decision_is_strictly_greater():
    assert metrics.tao_metrics(np.array([2.0]), np.array([1]), 2.0)["defect_accuracy"] == 0.0


@pytest.mark.parametrize("ties", [False, True])
def test_auroc_and_aupr_match_sklearn(ties):
    scores, targets = _data(ties=ties)
    assert metrics.auroc(scores, targets) == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)
    assert metrics.aupr(scores, targets) == pytest.approx(average_precision_score(targets, scores), abs=1e-12)


def test_roc_curve_matches_sklearn():
    scores, targets = _data(ties=True)
    false_alarm, recall, thresholds = metrics.roc_curve(scores, targets)
    sk_fpr, sk_tpr, sk_thresholds = roc_curve(targets, scores, drop_intermediate=False)
    np.testing.assert_allclose(false_alarm, sk_fpr)
    np.testing.assert_allclose(recall, sk_tpr)
    np.testing.assert_allclose(thresholds[1:], sk_thresholds[1:])


def test_operating_point_at_full_and_99_percent_recall():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.9, 0.5, 0.6, 0.8])
    targets = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    point = metrics.at_defect_recall(scores, targets, 1.0)
    assert point.defect_recall == 1.0
    assert point.threshold == pytest.approx(0.45)
    assert point.false_alarm_rate == pytest.approx(1 / 5)
    assert metrics.at_defect_recall(scores, targets, 0.99) == point, "3 defects: 99 % needs all 3"
    two_thirds = metrics.at_defect_recall(scores, targets, 0.6)
    assert two_thirds.defect_recall == pytest.approx(2 / 3) and two_thirds.threshold == pytest.approx(0.55)


def test_defect_recall_rule_keeps_a_safety_margin_below_the_weakest_defect():
    # 200 defects: at 100 % recall the weakest (0.50) decides, at 99 % the two weakest may be missed
    defects = np.r_[0.50, 0.52, np.linspace(0.6, 2.0, 198)]
    passes = np.r_[0.10, 0.40, 0.46, 0.49, 0.51, np.linspace(0.0, 0.3, 195)]
    scores, targets = np.r_[passes, defects], np.r_[np.zeros(200), np.ones(200)]
    full = metrics.calibrate(scores, targets, CalibrationRuleConfig("defect_recall", 1.0, 0.05))
    assert full.threshold == pytest.approx(0.475)  # min(halfway to 0.49 = 0.495, 0.95 x 0.50)
    assert (full.defect_recall, full.false_alarm_rate) == (1.0, pytest.approx(2 / 200))  # 0.49, 0.51
    no_margin = metrics.calibrate(scores, targets, CalibrationRuleConfig("defect_recall", 1.0, 0.0))
    assert no_margin.threshold == pytest.approx(0.495) and no_margin.false_alarm_rate == pytest.approx(1 / 200)
    at_99 = metrics.calibrate(scores, targets, CalibrationRuleConfig("defect_recall", 0.99, 0.05))
    # weakest caught 0.60: min(halfway to the next score 0.52 = 0.56, 0.95 x 0.60 = 0.57)
    assert at_99.threshold == pytest.approx(0.56) and at_99.defect_recall == pytest.approx(198 / 200)
    assert at_99.false_alarm_rate == 0.0
    balanced = metrics.calibrate(scores, targets, CalibrationRuleConfig("balanced_accuracy"))
    assert balanced == metrics.calibrate_threshold(scores, targets)


def test_calibration_maximises_balanced_accuracy():
    scores, targets = _data(seed=3)
    point = metrics.calibrate_threshold(scores, targets)
    best = max(
        (np.mean(scores[targets == 1] > t) + np.mean(scores[targets == 0] <= t)) / 2
        for t in np.r_[scores - 1e-9, scores + 1e-9]
    )
    achieved = (point.defect_recall + 1 - point.false_alarm_rate) / 2
    assert achieved == pytest.approx(best)


def test_calibration_on_separable_scores_lies_between_classes():
    point = metrics.calibrate_threshold(np.array([0.1, 0.3, 1.1, 1.5]), np.array([0, 0, 1, 1]))
    assert point.threshold == pytest.approx(0.7)
    assert (point.defect_recall, point.false_alarm_rate) == (1.0, 0.0)


def test_metrics_need_both_classes_and_matching_lengths():
    with pytest.raises(ValueError, match="both PASS and defect"):
        metrics.auroc(np.array([0.1, 0.2]), np.array([0, 0]))
    with pytest.raises(ValueError, match="equal, non-zero"):
        metrics.tao_metrics(np.array([0.1]), np.array([0, 1]), 1.0)


def _ten_defects_hundred_pass():
    """100 PASS pairs at 0.00, 0.01, ..., 0.99 and 10 defects, 4 of them above every PASS pair."""
    defects = np.array([0.055, 0.205, 0.305, 0.405, 0.505, 0.605, 0.985, 1.5, 1.6, 1.7])
    return np.r_[np.arange(100) / 100, defects], np.r_[np.zeros(100), np.ones(10)]


@pytest.mark.parametrize(("left_out", "threshold", "false_alarms"), [
    (0, 0.0525, 94),  # the weakest defect 0.055 decides: PASS 0.06 ... 0.99 are flagged
    (1, 0.2025, 79),  # 0.205: PASS 0.21 ... 0.99
    (2, 0.3025, 69),
    (3, 0.4025, 59),
    (5, 0.6025, 39),  # 0.605: PASS 0.61 ... 0.99
])
def test_full_recall_of_the_rest_leaves_the_weakest_defects_out(left_out, threshold, false_alarms):
    scores, targets = _ten_defects_hundred_pass()
    point = metrics.without_weakest_defects(scores, targets, left_out)
    assert point.threshold == pytest.approx(threshold)
    assert point.false_alarm_rate == pytest.approx(false_alarms / 100)
    assert point.defect_recall == pytest.approx((10 - left_out) / 10)


def test_leaving_out_weakest_defects_with_ties_and_too_few_defects():
    # two defects tie at 0.2 and a PASS pair ties with them: it is flagged wherever they are caught
    scores = np.array([0.1, 0.2, 0.3, 0.2, 0.2, 0.5, 0.9])
    targets = np.array([0, 0, 0, 1, 1, 1, 1])
    one_out = metrics.without_weakest_defects(scores, targets, 1)
    assert one_out == metrics.without_weakest_defects(scores, targets, 0)
    assert (one_out.threshold, one_out.defect_recall, one_out.false_alarm_rate) == (
        pytest.approx(0.15), 1.0, pytest.approx(2 / 3))
    two_out = metrics.without_weakest_defects(scores, targets, 2)
    assert (two_out.threshold, two_out.defect_recall, two_out.false_alarm_rate) == (
        pytest.approx(0.4), 0.5, 0.0)
    assert metrics.without_weakest_defects(scores, targets, 3).defect_recall == 0.25
    assert metrics.without_weakest_defects(scores, targets, 4) is None


@pytest.mark.parametrize(("max_rate", "threshold", "recall", "false_alarms"), [
    (0.001, 1.245, 0.3, 0.0),  # no PASS pair may be flagged: the 3 defects above 0.99
    (0.01, 0.9825, 0.4, 0.01),  # one may: PASS 0.99, and the defect at 0.985 is caught
    (0.02, 0.9825, 0.4, 0.01),  # two add no defect (the next is at 0.605): the stricter threshold
    (0.39, 0.6025, 0.5, 0.39),  # 39 may: PASS 0.61 ... 0.99, and the defect at 0.605
])
def test_recall_at_a_false_alarm_limit(max_rate, threshold, recall, false_alarms):
    scores, targets = _ten_defects_hundred_pass()
    point = metrics.at_false_alarm_rate(scores, targets, max_rate)
    assert point.threshold == pytest.approx(threshold)
    assert point.defect_recall == pytest.approx(recall)
    assert point.false_alarm_rate == pytest.approx(false_alarms)


def test_recall_at_a_false_alarm_limit_with_ties():
    # the defect tied with a PASS pair at 2.0 costs that false alarm
    scores, targets = np.array([0.1, 0.2, 2.0, 2.0, 3.0]), np.array([0, 0, 0, 1, 1])
    strict = metrics.at_false_alarm_rate(scores, targets, 0.0)
    assert (strict.threshold, strict.defect_recall, strict.false_alarm_rate) == (2.5, 0.5, 0.0)
    lax = metrics.at_false_alarm_rate(scores, targets, 1 / 3)
    assert (lax.threshold, lax.defect_recall, lax.false_alarm_rate) == (pytest.approx(1.1), 1.0, pytest.approx(1 / 3))
    # the highest score is a PASS pair: at no false alarm nothing is flagged
    none = metrics.at_false_alarm_rate(np.array([0.5, 1.0, 3.0]), np.array([1, 1, 0]), 0.001)
    assert (none.threshold, none.defect_recall, none.false_alarm_rate) == (3.0, 0.0, 0.0)
