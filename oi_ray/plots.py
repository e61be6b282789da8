"""PNG plots of an evaluation: ROC, precision-recall, the distance histogram per class, false
alarms against defect recall near full recall (with its operating points marked), and a
montage of chosen pairs.

Each title names the split and the model file; the ROC and PR curves carry their area, the
operating point of the decision threshold and the score of a guess (the ROC diagonal; on the
PR plot, the share of defects).
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure  # object API: no pyplot state, no display backend

from oi_ray import storage
from oi_ray.metrics import OperatingPoint, aupr, auroc, confusion_matrix, pr_curve, roc_curve

CURVE_COLOUR = "tab:blue"
POINT_COLOUR = "tab:red"


def write_evaluation_plots(distances: np.ndarray, targets: np.ndarray, threshold: float, margin: float,
                           folder: str, *, split: str, model_file: str) -> list[str]:
    """Write ``roc.png``, ``pr.png`` and ``distance_histogram.png`` into ``folder`` (a path or URI)."""
    source = f"{split}, {storage.name(model_file)}"
    pairs = confusion_matrix(distances, targets, threshold)
    defects = pairs["caught_defect"] + pairs["missed_defect"]
    recall = pairs["caught_defect"] / defects
    false_alarms = pairs["false_alarm"] / (pairs["false_alarm"] + pairs["true_pass"])
    flagged = pairs["caught_defect"] + pairs["false_alarm"]
    point_label = f"threshold {threshold:.3g}"
    written = []

    figure, axes = _figure(5.5, 5.5)
    roc_false_alarm, roc_recall, _ = roc_curve(distances, targets)
    # straight segments: tied scores move diagonally, as the trapezoidal AUROC counts them
    axes.plot(roc_false_alarm, roc_recall, color=CURVE_COLOUR,
              label=f"model (AUROC {auroc(distances, targets):.3f})")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance (AUROC 0.5)")
    axes.plot(false_alarms, recall, "o", color=POINT_COLOUR,
              label=f"{point_label}: recall {recall:.0%}, false alarms {false_alarms:.0%}")
    axes.set(xlabel="false-alarm rate (share of PASS pairs flagged)",
             ylabel="defect recall (share of defects flagged)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
             title=f"ROC: {source}")
    axes.legend(loc="lower right", fontsize="small")
    written.append(_save(figure, storage.join(folder, "roc.png")))

    figure, axes = _figure(5.5, 5.5)
    pr_recall, precision = pr_curve(distances, targets)
    prevalence = defects / len(targets)
    # each precision holds from the previous recall up to its own: the area drawn is the AUPR
    axes.plot(np.r_[0.0, pr_recall], np.r_[precision[0], precision], drawstyle="steps-pre",
              color=CURVE_COLOUR, label=f"model (AUPR {aupr(distances, targets):.3f})")
    axes.axhline(prevalence, linestyle=":", color="grey",
                 label=f"chance: share of defects ({prevalence:.0%})")
    if flagged:  # precision is undefined when nothing is flagged
        precision_at = pairs["caught_defect"] / flagged
        axes.plot(recall, precision_at, "o", color=POINT_COLOUR,
                  label=f"{point_label}: recall {recall:.0%}, precision {precision_at:.0%}")
    axes.set(xlabel="defect recall (share of defects flagged)",
             ylabel="precision (share of flagged pairs that are defects)",
             xlim=(-0.02, 1.02), ylim=(0, 1.02), title=f"Precision-recall: {source}")
    axes.legend(loc="lower left", fontsize="small")
    written.append(_save(figure, storage.join(folder, "pr.png")))

    figure, axes = _figure(7, 4)
    bins = np.histogram_bin_edges(distances, bins=40)
    for label, name in ((0, "PASS"), (1, "defect")):
        axes.hist(distances[targets == label], bins=bins, alpha=0.6, label=name)
    axes.axvline(threshold, color="black", label=f"decision threshold {threshold:.3g}")
    axes.axvline(margin, color="black", linestyle="--", label=f"margin {margin:.3g} (TAO's threshold)")
    axes.set(xlabel="pair distance", ylabel="pairs", title=f"Distance per class: {source}")
    axes.legend(fontsize="small")
    written.append(_save(figure, storage.join(folder, "distance_histogram.png")))
    return written


def write_false_alarm_curve(distances: np.ndarray, targets: np.ndarray, threshold: float, path: str, *,
                            split: str, model_file: str, recalls: tuple[float, ...],
                            left_out: Mapping[int, OperatingPoint],
                            at_false_alarms: Mapping[float, OperatingPoint]) -> str:
    """False-alarm rate (share of PASS pairs flagged) against defect recall, from the lowest of
    90 %, the decision threshold's recall and the points near full recall up to 100 %; marked: the
    decision threshold's point, the strictest thresholds reaching ``recalls``, full recall of the
    rest with ``left_out`` weakest defects left out, and the most recall at ``at_false_alarms``
    (at the left edge, labelled with its recall, when it lies further left); write ``path``."""
    false_alarm, recall, _ = roc_curve(distances, targets)
    pairs = confusion_matrix(distances, targets, threshold)
    point_recall = pairs["caught_defect"] / (pairs["caught_defect"] + pairs["missed_defect"])
    point_alarms = pairs["false_alarm"] / (pairs["false_alarm"] + pairs["true_pass"])
    figure, axes = _figure(7, 4.5)
    # each recall is first reached at the lowest false-alarm rate listed for it
    axes.plot(recall, false_alarm, drawstyle="steps-post", color=CURVE_COLOUR, label="model")
    first_reaching = [int(np.argmax(recall >= target - 1e-12)) for target in recalls]
    low = min(0.9, point_recall, *(recall[index] for index in first_reaching),
              *(point.defect_recall for point in left_out.values())) - 0.005
    marks = [
        _Marks("s", "grey", (-6, 6), "strictest threshold reaching a recall",
               [(f"{target * 100:g}%", recall[index], false_alarm[index])
                for target, index in zip(recalls, first_reaching, strict=True)],
               lambda names, _, alarms: f"{names}: {alarms:.2%}"),
        _Marks("v", "tab:orange", (6, -10), "100% recall of the rest, N weakest defects left out",
               [(str(count), point.defect_recall, point.false_alarm_rate)
                for count, point in left_out.items()],
               lambda names, _, alarms: f"N={names}: {alarms:.2%}"),
        _Marks("D", "tab:green", (6, -10), "most recall at a false-alarm limit",
               [(f"{limit * 100:g}% false alarms: recall {point.defect_recall:.2%}",
                 max(point.defect_recall, low + 0.001), point.false_alarm_rate)
                for limit, point in at_false_alarms.items()],
               lambda names, _, __: f"\u2264 {names}"),
    ]
    for group in marks:
        group.draw(axes)
    axes.plot(point_recall, point_alarms, "o", color=POINT_COLOUR,
              label=f"decision threshold {threshold:.3g}: recall {point_recall:.2%}, "
                    f"false alarms {point_alarms:.2%}")
    # up to the strictest full-recall point: beyond it the curve only climbs to flagging every pair
    full_recall = float(false_alarm[int(np.argmax(recall >= 1.0 - 1e-12))])
    marked = [alarms for group in marks for _, _, alarms in group.points]
    top = max(0.05, full_recall, point_alarms, *marked) * 1.15
    axes.set(xlabel="defect recall (share of defects flagged)",
             ylabel="false-alarm rate (share of PASS pairs flagged)", xlim=(low, 1.002),
             ylim=(-0.08 * top, top),  # room below the curve for the labels of points near 0
             title=f"False alarms near full recall: {split}, {storage.name(model_file)}")
    axes.legend(loc="upper left", fontsize="small")
    return _save(figure, path)


@dataclass(frozen=True)
class _Marks:
    """Points of one kind on the false-alarm curve; points at the same place share one annotation."""

    marker: str
    colour: str
    offset: tuple[int, int]  # of the annotation, in points; right of the point when positive
    legend: str
    points: list[tuple[str, float, float]]  # (name, recall, false-alarm rate)
    text: Callable[[str, float, float], str]  # (joined names, recall, false-alarm rate) -> annotation

    def draw(self, axes: Axes) -> None:
        places: dict[tuple[float, float], list[str]] = {}
        for name, caught, alarms in self.points:
            places.setdefault((caught, alarms), []).append(name)
        for number, ((caught, alarms), names) in enumerate(places.items()):
            axes.plot(caught, alarms, self.marker, markersize=4, color=self.colour,
                      label=self.legend if number == 0 else None)
            axes.annotate(self.text(", ".join(names), caught, alarms), (caught, alarms), fontsize=7,
                          textcoords="offset points", xytext=self.offset, color=self.colour,
                          ha="left" if self.offset[0] > 0 else "right")


@dataclass(frozen=True)
class MontagePair:
    """One pair to show: its caption and both sides' pictures ``(H', W', 3)`` uint8."""

    caption: str
    test: np.ndarray
    golden: np.ndarray


def write_pair_montage(pairs: list[MontagePair], path: str, *, title: str) -> str:
    """One row per pair: the test side beside its golden side, captioned; write ``path``."""
    height, width = pairs[0].test.shape[:2]
    scale = 2.4 / max(height, width)  # inches per pixel: the longer side of a picture is 2.4 in
    row_height = height * scale + 0.5  # the picture and its caption
    figure = Figure(figsize=(max(6.0, 2 * width * scale + 1.0), len(pairs) * row_height + 0.4),
                    layout="constrained")
    figure.suptitle(title, fontsize=9)
    for row, pair in zip(figure.subfigures(len(pairs), 1, squeeze=False)[:, 0], pairs, strict=True):
        row.suptitle(pair.caption, fontsize=8)
        for axes, picture, side in zip(row.subplots(1, 2), (pair.test, pair.golden), ("test", "golden"),
                                       strict=True):
            axes.imshow(picture, interpolation="nearest")
            axes.set_xticks([])
            axes.set_yticks([])
            axes.set_title(side, fontsize=7)
    return _save(figure, path)


def write_sweep_plot(curves: dict[str, list[tuple[int, float]]], metric: str, path: str | Path, *,
                     best: str | None) -> str:
    """``metric`` over epochs, one line per trial (the best one drawn thicker); write ``path``."""
    figure, axes = _figure(7, 4.5)
    for name, points in curves.items():
        if points:
            epochs, values = zip(*points, strict=True)
            axes.plot(epochs, values, marker="o", markersize=3, linewidth=2.5 if name == best else 1,
                      label=f"{name} (best)" if name == best else name)
    axes.set_xlabel("epoch")
    axes.set_ylabel(metric)
    axes.set_title(f"{metric} per trial")
    if curves:
        axes.legend(fontsize=7, loc="best")
    return _save(figure, path)


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    figure = Figure(figsize=(width, height))
    return figure, figure.subplots()


def _save(figure: Figure, path: str | Path) -> str:
    buffer = BytesIO()
    if figure.get_layout_engine() is None:
        figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    storage.write_atomically(str(path), buffer.getvalue())
    return str(path)
