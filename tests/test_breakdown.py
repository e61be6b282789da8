"""Errors at the threshold per value of a CSV column, on hand-made pairs."""

import numpy as np
import pytest

from oi_ray.breakdown import GroupCounts, counts_by_value

# 9 pairs on 4 components; the decision threshold is 0.5 (R2's PASS pair at 0.5 is not flagged)
OBJECT_NAMES = ["C1", "C1", "C1", "R2", "R2", "U3", "U3", "U3", "D4"]
LABELS = ["PASS", "PASS", "bridge", "PASS", "tombstone", "bridge", "bridge", "PASS", "PASS"]
TARGETS = np.array([0, 0, 1, 0, 1, 1, 1, 0, 0])
SCORES = np.array([0.9, 0.8, 0.2, 0.5, 0.7, 0.9, 0.3, 0.2, 0.1])


def test_counts_per_object_name_most_errors_then_most_listed_first():
    listed = {"weakest_defects": np.array([2, 6]), "top_false_alarms": np.array([0, 1, 8])}
    groups = counts_by_value(OBJECT_NAMES, SCORES, TARGETS, 0.5, listed)
    assert groups == [
        GroupCounts("C1", pass_pairs=2, false_alarm_pairs=2, defect_pairs=1, caught_defect_pairs=0,
                    listed={"weakest_defects": 1, "top_false_alarms": 2}),
        GroupCounts("U3", 1, 0, 2, 1, listed={"weakest_defects": 1, "top_false_alarms": 0}),
        GroupCounts("D4", 1, 0, 0, 0, listed={"weakest_defects": 0, "top_false_alarms": 1}),  # listed: before R2
        GroupCounts("R2", 1, 0, 1, 1, listed={"weakest_defects": 0, "top_false_alarms": 0}),
    ]
    c1, u3, d4, r2 = groups
    assert (c1.errors, c1.missed_defect_pairs, c1.false_alarm_rate, c1.defect_recall) == (3, 1, 1.0, 0.0)
    assert (u3.errors, u3.defect_recall, u3.false_alarm_rate) == (1, 0.5, 0.0)
    assert (d4.errors, d4.defect_recall) == (0, None)
    assert (r2.errors, r2.false_alarm_rate, r2.defect_recall) == (0, 0.0, 1.0)


def test_recall_per_label_leaves_undefined_rates_none():
    groups = {group.value: group for group in counts_by_value(LABELS, SCORES, TARGETS, 0.5)}
    assert list(groups) == ["PASS", "bridge", "tombstone"]  # 2, 2 and 0 errors; then by value
    bridge, tombstone, passes = groups["bridge"], groups["tombstone"], groups["PASS"]
    assert (bridge.defect_pairs, bridge.caught_defect_pairs, bridge.defect_recall) == (3, 1, pytest.approx(1 / 3))
    assert (bridge.pass_pairs, bridge.false_alarm_rate, bridge.listed) == (0, None, {})
    assert (tombstone.defect_pairs, tombstone.defect_recall) == (1, 1.0)
    assert (passes.pass_pairs, passes.false_alarm_pairs, passes.false_alarm_rate) == (5, 2, pytest.approx(2 / 5))
    assert passes.defect_recall is None


def test_a_column_of_numbers_and_empty_cells_groups_by_its_text():
    groups = counts_by_value(np.array(["", "1", "", "1"], dtype=object), np.array([0.9, 0.1, 0.1, 0.9]),
                             np.array([0, 0, 1, 1]), 0.5)
    assert [(g.value, g.false_alarm_pairs, g.missed_defect_pairs) for g in groups] == [("", 1, 1), ("1", 0, 0)]


def test_counts_need_one_value_per_pair():
    with pytest.raises(ValueError, match="one value, score and target per pair, got 2, 3 and 3"):
        counts_by_value(["a", "b"], np.zeros(3), np.zeros(3), 0.5)
