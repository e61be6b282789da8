"""Score test/golden pairs from Python with an exported model, without Ray.

    python examples/score_pairs.py SPEC.yaml MODEL.onnx [MODEL.pth ...]

Reads the spec's inference split (else test, else validation), builds each pair's input the
way training did (oi_ray.data.assemble), and prints the distance and decision of the first
pairs with every model given, using the same predictor interface as evaluate and inference.
"""

import sys

from oi_ray.config import load_config
from oi_ray.data.assemble import InputGeometry, read_pictures
from oi_ray.data.pairs import first_configured_split, load_split
from oi_ray.decision import CarriedThreshold, choose_threshold, decisions
from oi_ray.model_card import ModelCard
from oi_ray.model_file import open_model_file

PAIRS_SHOWN = 8


def main(spec_path: str, *model_paths: str) -> None:
    config = load_config(spec_path)
    split = first_configured_split(config.dataset, ("infer_dataset", "test_dataset", "validation_dataset"))
    table = load_split(config.dataset, split, require_labels=False)
    geometry = InputGeometry.from_config(config.dataset)
    rows = range(min(PAIRS_SHOWN, len(table)))
    # (B, H', W', 3) uint8 pictures, exactly what the Ray Data pipeline hands to predictors
    test = read_pictures(table.test_paths[: len(rows)], geometry)
    golden = read_pictures(table.golden_paths[: len(rows)], geometry)
    expected = ModelCard.expected_by(config)  # the layout the spec's data has, checked against each model
    for model_path in model_paths:
        predictor = open_model_file(model_path, config.encryption_key, expected).load()
        # the decision rule evaluate, inference and serving use: the model's threshold, else margin
        threshold = choose_threshold(None, "", CarriedThreshold(predictor.threshold, model_path),
                                     config.model.margin).value
        print(f"{model_path} (threshold {threshold:.4g}):")
        distances = predictor.distances(test, golden)
        for row, distance, decision in zip(rows, distances, decisions(distances, threshold), strict=True):
            row_values = table.rows.iloc[row]
            print(f"  {row_values['object_name']:<10} {distance:8.4f}  {decision:<8} "
                  f"(label {row_values.get('label', '-')})")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
