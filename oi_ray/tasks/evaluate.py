"""``oi-ray evaluate``: score ``dataset.test_dataset`` and write metrics.json and plots.

TAO's four metrics are reported at ``model.margin`` exactly as TAO computes them, and again
at the decision threshold (``evaluate.threshold``, else the model's calibrated one), next to
threshold-free AUROC/AUPR and the false-alarm rate at 99 %, 99.5 %, 99.9 % and 100 % defect
recall with their thresholds. How much one sample moves that: the false-alarm rate at 100 %
recall of the rest with the 1, 2, 3 and 5 weakest defects left out (while fewer than all;
of tied defects, the earlier CSV rows are named as left out), and the other way round, the
most defects a threshold catches while it flags at most 0.1 % and 1 % of the PASS pairs.
Every name in metrics.json says its unit: TAO's metrics are percentages
(``*_percent_of_all_pairs``: TAO divides false alarms and missed defects by all pairs),
oi-ray's rates are fractions of the pairs they are a share of
(``false_alarm_fraction_of_pass_pairs``), counts are ``*_pairs``.

What an engineer looks at next is listed and drawn: the weakest defects (the defect pairs that
scored lowest) and the top false alarms (the PASS pairs that scored highest), with their CSV
rows, in metrics.json and side by side with their golden shots in ``pairs.png``; and the
false-alarm rate against defect recall near full recall, with the decision threshold's point,
in ``false_alarms_vs_recall.png``, which marks the points above too.

Errors grouped by a CSV column (``oi_ray/breakdown.py``): per ``object_name`` (a component
flagged on every board points at its golden shot or placement, not at defects) and, with
``evaluate.group_by``, per value of that column (``label`` where labels name the defect, or an
extra column such as a defect type). Every value of the column is one group of all its rows,
with its PASS pairs and false alarms, its defect pairs, caught and missed ones at the decision
threshold, the rates (null without a denominator) and, per ``object_name``, how many of its
pairs are on the weakest-defects and top-false-alarms lists. Groups come most errors (false
alarms + missed defects) first; all are in metrics.json, the first few are printed.
"""

import json
import logging
from typing import Any

import numpy as np

from oi_ray import storage
from oi_ray.breakdown import GroupCounts, counts_by_value
from oi_ray.config import save_resolved_spec
from oi_ray.config.schema import ExperimentConfig
from oi_ray.data.assemble import InputGeometry, read_pictures
from oi_ray.data.pairs import LABEL_COLUMN
from oi_ray.errors import DataError
from oi_ray.metrics import (
    OperatingPoint,
    at_defect_recall,
    at_false_alarm_rate,
    aupr,
    auroc,
    confusion_matrix,
    tao_metrics,
    without_weakest_defects,
)
from oi_ray.plots import MontagePair, write_evaluation_plots, write_false_alarm_curve, write_pair_montage
from oi_ray.tasks.scoring_setup import ScoringRun, score_split

log = logging.getLogger(__name__)
SPLITS = ("test_dataset", "validation_dataset")
RECALL_TARGETS = (0.99, 0.995, 0.999, 1.0)
LEFT_OUT_DEFECTS = (1, 2, 3, 5)  # weakest defects left out of the 100 % recall point
FALSE_ALARM_LIMITS = (0.001, 0.01)  # shares of PASS pairs a threshold may flag
SHOWN_OBJECT_NAMES = 5  # groups of by_object_name in the printed summary
SHOWN_GROUP_BY_VALUES = 10  # of by_group (evaluate.group_by): often a few defect types
OBJECT_NAME = "object_name"
LISTED_PAIRS = 10  # weakest defects and top false alarms in metrics.json
SHOWN_PAIRS = 4  # of each in pairs.png
LISTED_COLUMNS = ("input_path", "golden_path", OBJECT_NAME, LABEL_COLUMN)  # of each listed pair
# tao_metrics() field -> metrics.json name (TAO's meaning, unit and denominator spelled out)
TAO_FIELDS = {
    "total_accuracy": "total_accuracy_percent",
    "defect_accuracy": "defect_accuracy_percent_of_defects",
    "false_alarm": "false_alarm_percent_of_all_pairs",
    "false_negative": "false_negative_percent_of_all_pairs",
}
# confusion_matrix() field -> metrics.json name (counts of pairs)
CONFUSION_FIELDS = {
    "true_pass": "pass_ok_pairs",
    "false_alarm": "false_alarm_pairs",
    "caught_defect": "caught_defect_pairs",
    "missed_defect": "missed_defect_pairs",
}


def run(config: ExperimentConfig) -> None:
    """Evaluate ``evaluate.checkpoint``; write ``metrics.json``, PNGs and the resolved spec to
    ``evaluate.results_dir``."""
    group_by = config.evaluate.group_by
    scored = score_split(config, "evaluate", SPLITS, require_labels=True,
                         columns={"evaluate.group_by": group_by} if group_by is not None else None)
    distances, targets = scored.scores.distances, scored.scores.targets
    if targets.min() == targets.max():
        raise DataError(f"{scored.table.source}: evaluation needs PASS and defect rows; "
                        f"all {len(targets)} rows are {'defects' if targets[0] == 1 else 'PASS'}")
    report = build_report(config, scored)
    results_dir = storage.output_folder(config.evaluate.results_dir)
    metrics = storage.join(results_dir, "metrics.json")
    storage.write_atomically(metrics, (json.dumps(report, indent=2) + "\n").encode())
    plots = write_evaluation_plots(distances, targets, scored.threshold, config.model.margin, results_dir,
                                   split=scored.split, model_file=scored.model_file)
    plots.append(write_false_alarm_curve(distances, targets, scored.threshold,
                                         storage.join(results_dir, "false_alarms_vs_recall.png"),
                                         split=scored.split,
                                         model_file=scored.model_file, recalls=RECALL_TARGETS,
                                         left_out=_left_out(distances, targets),
                                         at_false_alarms=_at_false_alarms(distances, targets)))
    plots.append(_write_montage(config, scored, report, storage.join(results_dir, "pairs.png")))
    spec = save_resolved_spec(config, results_dir)
    print(render_report(report))
    log.info("wrote %s, %s and %s", metrics, ", ".join(map(storage.name, plots)), storage.name(spec))


def build_report(config: ExperimentConfig, scored: ScoringRun) -> dict[str, Any]:
    """Everything metrics.json holds."""
    distances, targets = scored.scores.distances, scored.scores.targets
    margin = config.model.margin
    group_by = config.evaluate.group_by
    weakest = _listed(scored, np.flatnonzero(targets == 1), lowest=True, group_by=group_by)
    top_false_alarms = _listed(scored, np.flatnonzero(targets == 0), lowest=False, group_by=group_by)
    return {
        "checkpoint": scored.model_file,
        "dataset": str(scored.table.source),
        "split": scored.split,
        "pairs": int(len(targets)),
        "defects": int((targets == 1).sum()),
        "tao_metrics_at_margin": {"margin": margin, **_tao(distances, targets, margin)},
        "threshold": {"value": scored.threshold, "source": scored.threshold_source},
        "tao_metrics_at_threshold": _tao(distances, targets, scored.threshold),
        "confusion_at_threshold": {CONFUSION_FIELDS[name]: count for name, count in
                                   confusion_matrix(distances, targets, scored.threshold).items()},
        "auroc": auroc(distances, targets),
        "aupr": aupr(distances, targets),
        # the same pairs scored by mean absolute pixel difference: what a trained model must beat
        "baseline_pixel_difference_auroc": auroc(scored.scores.pixel_differences, targets),
        **{_recall_key(recall): _point(at_defect_recall(distances, targets, recall))
           for recall in RECALL_TARGETS},
        "at_100_defect_recall_without_weakest_defects": [
            {"weakest_defects_left_out": count, "left_out_rows": [pair["row"] for pair in weakest[:count]],
             **_point(point)} for count, point in _left_out(distances, targets).items()],
        "defect_recall_at_false_alarm_limits": [
            {"false_alarm_limit_fraction_of_pass_pairs": limit, **_point(point)}
            for limit, point in _at_false_alarms(distances, targets).items()],
        "weakest_defects": weakest,
        "top_false_alarms": top_false_alarms,
        "by_object_name": _breakdown(scored, OBJECT_NAME, {"weakest_defects": weakest,
                                                          "top_false_alarms": top_false_alarms}),
        "by_group": None if group_by is None else _breakdown(scored, group_by, {}),
    }


def render_report(report: dict[str, Any]) -> str:
    """TAO's one-line summary, then a readable table (each row says its denominator)."""
    tao, margin = report["tao_metrics_at_margin"], report["tao_metrics_at_margin"]["margin"]
    at_threshold = report["tao_metrics_at_threshold"]
    threshold = report["threshold"]["value"]
    group_by = report["by_group"]["column"] if report["by_group"] is not None else None
    lines = [
        f"Tot Comp {report['pairs']} Total Accuracy {tao['total_accuracy_percent']:.2f} "
        f"False Negative {tao['false_negative_percent_of_all_pairs']:.2f} "
        f"False Alarm {tao['false_alarm_percent_of_all_pairs']:.2f} "
        f"Defect Correctly Captured {tao['defect_accuracy_percent_of_defects']:.2f} for Margin {margin}",
        "",
        f"{report['split']}: {report['pairs']} pairs, {report['defects']} defects ({report['dataset']})",
        f"{'TAO metric':<32}{f'at margin {margin:.4g}':>16}{f'at threshold {threshold:.4g}':>22}",
    ]
    for key, name in (("total_accuracy_percent", "total accuracy, % of all pairs"),
                      ("defect_accuracy_percent_of_defects", "defects caught, % of defects"),
                      ("false_alarm_percent_of_all_pairs", "false alarms, % of all pairs"),
                      ("false_negative_percent_of_all_pairs", "missed defects, % of all pairs")):
        lines.append(f"{name:<32}{tao[key]:>16.2f}{at_threshold[key]:>22.2f}")
    lines += [
        f"threshold source: {report['threshold']['source']}",
        f"AUROC {report['auroc']:.4f}   AUPR {report['aupr']:.4f}   "
        f"(pixel-difference baseline AUROC {report['baseline_pixel_difference_auroc']:.4f})",
    ]
    for recall in RECALL_TARGETS:
        point = report[_recall_key(recall)]
        lines.append(f"at {recall * 100:g}% defect recall: false alarms "
                     f"{point['false_alarm_fraction_of_pass_pairs']:.2%} of PASS pairs "
                     f"(threshold {point['threshold']:.4g})")
    for entry in report["at_100_defect_recall_without_weakest_defects"]:
        count, plural = entry["weakest_defects_left_out"], "s" * (entry["weakest_defects_left_out"] > 1)
        lines.append(f"at 100% recall without the {count} weakest defect{plural} (row{plural} "
                     f"{', '.join(map(str, entry['left_out_rows']))}): false alarms "
                     f"{entry['false_alarm_fraction_of_pass_pairs']:.2%} of PASS pairs "
                     f"(threshold {entry['threshold']:.4g})")
    for entry in report["defect_recall_at_false_alarm_limits"]:
        lines.append(f"at most {entry['false_alarm_limit_fraction_of_pass_pairs'] * 100:g}% false alarms: "
                     f"defect recall {entry['defect_recall_fraction_of_defects']:.2%} of defects "
                     f"(false alarms {entry['false_alarm_fraction_of_pass_pairs']:.2%} of PASS pairs, "
                     f"threshold {entry['threshold']:.4g})")
    pairs = report["confusion_at_threshold"]
    lines.append(f"pairs at threshold: {pairs['pass_ok_pairs']} PASS ok, {pairs['false_alarm_pairs']} "
                 f"false alarms, {pairs['caught_defect_pairs']} defects caught, "
                 f"{pairs['missed_defect_pairs']} missed")
    for key, name, verdict in (("weakest_defects", "weakest defects (lowest distance first", "missed"),
                               ("top_false_alarms", "top false alarms (highest distance first", "flagged")):
        lines.append(f"{name}; * = {verdict} at the threshold):")
        lines += [f"  {'*' if pair['flagged'] == (verdict == 'flagged') else ' '} {pair['distance']:<10.4g} "
                  f"row {pair['row']} (line {pair['line']}) {pair['label']} {pair['object_name']}"
                  f"{f' {group_by}={pair[group_by]}' if _extra_column(group_by) else ''}: "
                  f"{pair['input_path']}" for pair in report[key][:SHOWN_PAIRS]]
    lines += _render_breakdown(report["by_object_name"], "", SHOWN_OBJECT_NAMES)
    if report["by_group"] is not None:
        lines += _render_breakdown(report["by_group"], " (evaluate.group_by)", SHOWN_GROUP_BY_VALUES)
    return "\n".join(lines)


def _render_breakdown(breakdown: dict[str, Any], origin: str, most: int) -> list[str]:
    """The first ``most`` groups of a breakdown as a table, with its list counts if any."""
    column, groups = breakdown["column"], breakdown["groups"]
    lists = [key[len("in_"):-len("_pairs")] for key in groups[0] if key.startswith("in_")]
    shown = f"the first {most}; all in metrics.json" if len(groups) > most else "all"
    lines = [f"by {column}{origin}: {len(groups)} value{'s' * (len(groups) > 1)}, most false alarms + "
             f"missed defects first ({shown}):",
             f"  {column:<24}{'false alarms / PASS':>24}{'caught / defects':>24}{'missed':>8}"
             + "".join(f"{'in ' + name.replace('_', ' '):>22}" for name in lists)]
    for group in groups[:most]:
        alarms = _share(group, "false_alarm_pairs", "pass_pairs", "false_alarm_fraction_of_pass_pairs")
        caught = _share(group, "caught_defect_pairs", "defect_pairs", "defect_recall_fraction_of_defects")
        lines.append(f"  {group['value'] or '(empty)':<24}{alarms:>24}{caught:>24}"
                     f"{group['missed_defect_pairs']:>8}"
                     + "".join(f"{group[f'in_{name}_pairs']:>22}" for name in lists))
    return lines


def _share(group: dict[str, Any], count: str, total: str, fraction: str) -> str:
    """``3 / 6 (50.00%)``, or ``-`` without a denominator."""
    return "-" if group[fraction] is None else f"{group[count]} / {group[total]} ({group[fraction]:.2%})"


def _tao(distances: np.ndarray, targets: np.ndarray, threshold: float) -> dict[str, float]:
    return {TAO_FIELDS[name]: value for name, value in tao_metrics(distances, targets, threshold).items()}


def _left_out(distances: np.ndarray, targets: np.ndarray) -> dict[int, OperatingPoint]:
    """The 100 % recall point of the rest per count of ``LEFT_OUT_DEFECTS`` below the number of defects."""
    points = {count: without_weakest_defects(distances, targets, count) for count in LEFT_OUT_DEFECTS}
    return {count: point for count, point in points.items() if point is not None}


def _at_false_alarms(distances: np.ndarray, targets: np.ndarray) -> dict[float, OperatingPoint]:
    return {limit: at_false_alarm_rate(distances, targets, limit) for limit in FALSE_ALARM_LIMITS}


def _breakdown(scored: ScoringRun, column: str, lists: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Errors at the threshold per value of ``column``, with the group's pairs on each of ``lists``."""
    listed = {name: [pair["row"] - 1 for pair in pairs] for name, pairs in lists.items()}
    groups = counts_by_value(scored.table.rows[column], scored.scores.distances, scored.scores.targets,
                             scored.threshold, listed)
    return {"column": column, "groups": [_group(group) for group in groups]}


def _group(group: GroupCounts) -> dict[str, Any]:
    return {"value": group.value,
            "pass_pairs": group.pass_pairs,
            "false_alarm_pairs": group.false_alarm_pairs,
            "false_alarm_fraction_of_pass_pairs": group.false_alarm_rate,
            "defect_pairs": group.defect_pairs,
            "caught_defect_pairs": group.caught_defect_pairs,
            "missed_defect_pairs": group.missed_defect_pairs,
            "defect_recall_fraction_of_defects": group.defect_recall,
            **{f"in_{name}_pairs": count for name, count in group.listed.items()}}


def _recall_key(recall: float) -> str:
    """``at_99_defect_recall``, ``at_99_5_defect_recall``, ``at_100_defect_recall``."""
    return f"at_{recall * 100:g}_defect_recall".replace(".", "_")


def _listed(scored: ScoringRun, indices: np.ndarray, *, lowest: bool,
            group_by: str | None) -> list[dict[str, Any]]:
    """The ``LISTED_PAIRS`` pairs among ``indices`` with the lowest (or highest) distance, with their
    CSV row (1-based, as error messages count), line, paths, label, the ``group_by`` column's
    value (``evaluate.group_by``) and whether they are flagged."""
    distances, rows = scored.scores.distances, scored.table.rows
    ranked = indices[np.argsort(distances[indices], kind="stable")]
    chosen = ranked[:LISTED_PAIRS] if lowest else ranked[::-1][:LISTED_PAIRS]
    columns = [*LISTED_COLUMNS, *([group_by] if _extra_column(group_by) else [])]
    return [{"row": int(index) + 1, "line": int(index) + 2,
             **{column: rows.iloc[index][column] for column in columns},
             "distance": float(distances[index]), "flagged": bool(distances[index] > scored.threshold)}
            for index in chosen]


def _extra_column(group_by: str | None) -> bool:
    """Whether ``evaluate.group_by`` names a column the listed pairs do not already carry."""
    return group_by is not None and group_by not in LISTED_COLUMNS


def _write_montage(config: ExperimentConfig, scored: ScoringRun, report: dict[str, Any], path: str) -> str:
    """``pairs.png``: the top false alarms and the weakest defects, test beside golden."""
    geometry = InputGeometry.from_config(config.dataset)
    shown = [("false alarm" if pair["flagged"] else "PASS", pair)
             for pair in report["top_false_alarms"][:SHOWN_PAIRS]]
    shown += [("missed defect" if not pair["flagged"] else "weak defect", pair)
              for pair in report["weakest_defects"][:SHOWN_PAIRS]]
    indices = [pair["row"] - 1 for _, pair in shown]
    test_sides, golden_sides = scored.table.sides(indices)
    tests, goldens = read_pictures(test_sides, geometry), read_pictures(golden_sides, geometry)
    pairs = [MontagePair(f"{kind}, row {pair['row']} {pair['label']} {pair['object_name']}, "
                         f"distance {pair['distance']:.4g}", test, golden)
             for (kind, pair), test, golden in zip(shown, tests, goldens, strict=True)]
    title = (f"top false alarms and weakest defects: {scored.split}, {storage.name(scored.model_file)}, "
             f"threshold {scored.threshold:.4g}")
    return write_pair_montage(pairs, path, title=title)


def _point(point: OperatingPoint) -> dict[str, float]:
    return {"threshold": point.threshold, "defect_recall_fraction_of_defects": point.defect_recall,
            "false_alarm_fraction_of_pass_pairs": point.false_alarm_rate}
