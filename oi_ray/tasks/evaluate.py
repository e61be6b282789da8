"""``oi-ray evaluate``: score ``dataset.test_dataset`` and write metrics.json and plots.

TAO's four metrics are reported at ``model.margin`` exactly as TAO computes them, and again
at the decision threshold (``evaluate.threshold``, else the checkpoint's calibrated one),
next to threshold-free AUROC/AUPR and the false-alarm rate at 99 % and 100 % defect recall.
"""

import json
import logging
from pathlib import Path
from typing import Any

from oi_ray.config.schema import ExperimentConfig
from oi_ray.errors import DataError
from oi_ray.fileio import write_atomically
from oi_ray.metrics import OperatingPoint, at_defect_recall, aupr, auroc, confusion_matrix, tao_metrics
from oi_ray.plots import write_evaluation_plots
from oi_ray.tasks.scoring_setup import ScoringRun, score_split

log = logging.getLogger(__name__)
SPLITS = ("test_dataset", "validation_dataset")
RECALL_TARGETS = (0.99, 1.0)


def run(config: ExperimentConfig) -> None:
    """Evaluate ``evaluate.checkpoint`` and write ``metrics.json`` + PNGs to ``evaluate.results_dir``."""
    scored = score_split(config, "evaluate", SPLITS, require_labels=True)
    distances, targets = scored.scores.distances, scored.scores.targets
    if targets.min() == targets.max():
        raise DataError(f"{scored.table.csv_path}: evaluation needs PASS and defect rows; "
                        f"all {len(targets)} rows are {'defects' if targets[0] == 1 else 'PASS'}")
    report = build_report(config, scored)
    results_dir = Path(config.evaluate.results_dir).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(results_dir / "metrics.json", (json.dumps(report, indent=2) + "\n").encode())
    plots = write_evaluation_plots(distances, targets, scored.threshold, config.model.margin, results_dir)
    print(render_report(report))
    log.info("wrote %s and %s", results_dir / "metrics.json", ", ".join(path.name for path in plots))


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
        "tao_metrics_at_margin": {"margin": margin, **tao_metrics(distances, targets, margin)},
        "threshold": {"value": scored.threshold, "source": scored.threshold_source},
        "tao_metrics_at_threshold": tao_metrics(distances, targets, scored.threshold),
        "confusion_matrix": confusion_matrix(distances, targets, scored.threshold),
        "auroc": auroc(distances, targets),
        "aupr": aupr(distances, targets),
        # the same pairs scored by mean absolute pixel difference: what a trained model must beat
        "baseline_pixel_difference_auroc": auroc(scored.scores.pixel_differences, targets),
        **{f"at_{round(recall * 100)}_defect_recall": _point(at_defect_recall(distances, targets, recall))
           for recall in RECALL_TARGETS},
    }


def render_report(report: dict[str, Any]) -> str:
    """TAO's one-line summary, then a readable table."""
    tao, margin = report["tao_metrics_at_margin"], report["tao_metrics_at_margin"]["margin"]
    at_threshold = report["tao_metrics_at_threshold"]
    threshold = report["threshold"]["value"]
    lines = [
        f"Tot Comp {report['pairs']} Total Accuracy {tao['total_accuracy']:.2f} "
        f"False Negative {tao['false_negative']:.2f} False Alarm {tao['false_alarm']:.2f} "
        f"Defect Correctly Captured {tao['defect_accuracy']:.2f} for Margin {margin}",
        "",
        f"{report['split']}: {report['pairs']} pairs, {report['defects']} defects ({report['dataset']})",
        f"{'metric (%)':<28}{f'at margin {margin:.4g}':>18}{f'at threshold {threshold:.4g}':>22}",
    ]
    for key, name in (("total_accuracy", "total accuracy"), ("defect_accuracy", "defects caught"),
                      ("false_alarm", "false alarms / all pairs"),
                      ("false_negative", "missed defects / all pairs")):
        lines.append(f"{name:<28}{tao[key]:>18.2f}{at_threshold[key]:>22.2f}")
    lines += [
        f"threshold source: {report['threshold']['source']}",
        f"AUROC {report['auroc']:.4f}   AUPR {report['aupr']:.4f}   "
        f"(pixel-difference baseline AUROC {report['baseline_pixel_difference_auroc']:.4f})",
    ]
    for key in ("at_99_defect_recall", "at_100_defect_recall"):
        point = report[key]
        lines.append(f"false-alarm rate at {key[3:-14]}% defect recall: {point['false_alarm_rate']:.2%} "
                     f"(threshold {point['threshold']:.4g})")
    matrix = report["confusion_matrix"]
    lines.append(f"confusion at threshold: {matrix['true_pass']} PASS ok, {matrix['false_alarm']} false "
                 f"alarms, {matrix['caught_defect']} defects caught, {matrix['missed_defect']} missed")
    return "\n".join(lines)


def _point(point: OperatingPoint) -> dict[str, float]:
    return {"threshold": point.threshold, "defect_recall": point.defect_recall,
            "false_alarm_rate": point.false_alarm_rate}
