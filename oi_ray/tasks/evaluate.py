"""``oi-ray evaluate``: score ``dataset.test_dataset`` and write metrics.json and plots.

TAO's four metrics are reported at ``model.margin`` exactly as TAO computes them, and again
at the decision threshold (``evaluate.threshold``, else the model's calibrated one), next to
threshold-free AUROC/AUPR and the false-alarm rate at 99 % and 100 % defect recall. Every
name in metrics.json says its unit: TAO's metrics are percentages (``*_percent_of_all_pairs``:
TAO divides false alarms and missed defects by all pairs), oi-ray's rates are fractions of
the pairs they are a share of (``false_alarm_fraction_of_pass_pairs``), counts are ``*_pairs``.
"""

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from oi_ray.config import save_resolved_spec
from oi_ray.config.schema import ExperimentConfig
from oi_ray.errors import DataError
from oi_ray.fileio import write_atomically
from oi_ray.metrics import OperatingPoint, at_defect_recall, aupr, auroc, confusion_matrix, tao_metrics
from oi_ray.plots import write_evaluation_plots
from oi_ray.tasks.scoring_setup import ScoringRun, score_split

log = logging.getLogger(__name__)
SPLITS = ("test_dataset", "validation_dataset")
RECALL_TARGETS = (0.99, 1.0)
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
    scored = score_split(config, "evaluate", SPLITS, require_labels=True)
    distances, targets = scored.scores.distances, scored.scores.targets
    if targets.min() == targets.max():
        raise DataError(f"{scored.table.csv_path}: evaluation needs PASS and defect rows; "
                        f"all {len(targets)} rows are {'defects' if targets[0] == 1 else 'PASS'}")
    report = build_report(config, scored)
    results_dir = Path(config.evaluate.results_dir).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(results_dir / "metrics.json", (json.dumps(report, indent=2) + "\n").encode())
    plots = write_evaluation_plots(distances, targets, scored.threshold, config.model.margin, results_dir,
                                   split=scored.split, model_file=scored.model_file)
    spec = save_resolved_spec(config, results_dir)
    print(render_report(report))
    log.info("wrote %s, %s and %s", results_dir / "metrics.json",
             ", ".join(path.name for path in plots), spec.name)


def build_report(config: ExperimentConfig, scored: ScoringRun) -> dict[str, Any]:
    """Everything metrics.json holds."""
    distances, targets = scored.scores.distances, scored.scores.targets
    margin = config.model.margin
    return {
        "checkpoint": str(scored.model_file.resolve()),
        "dataset": str(scored.table.csv_path),
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
    }


def render_report(report: dict[str, Any]) -> str:
    """TAO's one-line summary, then a readable table (each row says its denominator)."""
    tao, margin = report["tao_metrics_at_margin"], report["tao_metrics_at_margin"]["margin"]
    at_threshold = report["tao_metrics_at_threshold"]
    threshold = report["threshold"]["value"]
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
        lines.append(f"at {recall:.0%} defect recall: false alarms "
                     f"{point['false_alarm_fraction_of_pass_pairs']:.2%} of PASS pairs "
                     f"(threshold {point['threshold']:.4g})")
    pairs = report["confusion_at_threshold"]
    lines.append(f"pairs at threshold: {pairs['pass_ok_pairs']} PASS ok, {pairs['false_alarm_pairs']} "
                 f"false alarms, {pairs['caught_defect_pairs']} defects caught, "
                 f"{pairs['missed_defect_pairs']} missed")
    return "\n".join(lines)


def _tao(distances: np.ndarray, targets: np.ndarray, threshold: float) -> dict[str, float]:
    return {TAO_FIELDS[name]: value for name, value in tao_metrics(distances, targets, threshold).items()}


def _recall_key(recall: float) -> str:
    return f"at_{round(recall * 100)}_defect_recall"


def _point(point: OperatingPoint) -> dict[str, float]:
    return {"threshold": point.threshold, "defect_recall_fraction_of_defects": point.defect_recall,
            "false_alarm_fraction_of_pass_pairs": point.false_alarm_rate}
