"""Errors at the decision threshold broken down by the values of a CSV column (pure numpy).

Each distinct value of the column (an ``object_name``, a defect label, a defect type) is one
group holding every pair with that value: its PASS pairs and how many of them are flagged
(false alarms), its defect pairs and how many are caught. A rate is ``None`` where its
denominator is zero (a defect label has no PASS pairs, the ``PASS`` label no defects).
``listed`` counts, per named list of pair indices (the weakest defects, the top false alarms),
the group's pairs on it. Groups come most errors (false alarms + missed defects) first, then
most listed pairs, then by value.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from oi_ray.decision import flagged


@dataclass(frozen=True)
class GroupCounts:
    """What the decision threshold does on the pairs sharing one value of a column."""

    value: str
    pass_pairs: int
    false_alarm_pairs: int
    defect_pairs: int
    caught_defect_pairs: int
    listed: dict[str, int] = field(default_factory=dict)  # list name -> the group's pairs on it

    @property
    def missed_defect_pairs(self) -> int:
        return self.defect_pairs - self.caught_defect_pairs

    @property
    def errors(self) -> int:
        return self.false_alarm_pairs + self.missed_defect_pairs

    @property
    def defect_recall(self) -> float | None:
        return self.caught_defect_pairs / self.defect_pairs if self.defect_pairs else None

    @property
    def false_alarm_rate(self) -> float | None:
        return self.false_alarm_pairs / self.pass_pairs if self.pass_pairs else None


def counts_by_value(values: Sequence[str], scores: np.ndarray, targets: np.ndarray, threshold: float,
                    listed: Mapping[str, np.ndarray] | None = None) -> list[GroupCounts]:
    """One :class:`GroupCounts` per distinct value of ``values`` (one per pair), in the module's order."""
    values = np.asarray(values).astype(str)
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    if not len(values) == len(scores) == len(targets):
        raise ValueError(f"need one value, score and target per pair, got {len(values)}, {len(scores)} "
                         f"and {len(targets)}")
    names, group = np.unique(values, return_inverse=True)
    calls, defect = flagged(scores, threshold), targets == 1

    def per_group(selected: np.ndarray) -> np.ndarray:
        return np.bincount(group[selected], minlength=len(names))

    columns = [per_group(mask) for mask in (~defect, ~defect & calls, defect, defect & calls)]
    on_lists = {name: per_group(np.asarray(rows, dtype=np.int64)) for name, rows in (listed or {}).items()}
    groups = [GroupCounts(str(name), *(int(column[i]) for column in columns),
                          listed={list_name: int(counts[i]) for list_name, counts in on_lists.items()})
              for i, name in enumerate(names)]
    return sorted(groups, key=lambda g: (-g.errors, -sum(g.listed.values()), g.value))
