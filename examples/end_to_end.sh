#!/usr/bin/env bash
# The whole oi-ray workflow on synthetic data, one CLI call per TAO task, as a user runs it.
#   bash examples/end_to_end.sh [WORKDIR]        (about 6 minutes on a 2-core laptop)
set -euo pipefail
work="${1:-oi-ray-example}"
# oi-ray from PATH (an activated venv), else this checkout's .venv; OI_RAY=... overrides.
oi="${OI_RAY:-$(command -v oi-ray || echo .venv/bin/oi-ray)}"

# 1. A 2-lighting dataset in TAO's layout (images/, train/val/test.csv) and a spec pointing at it.
$oi synthesize --output "$work/data" --num-pairs 800 --size 48 48 --lights SolderLight,WhiteLight --overwrite
spec="$work/data/spec.yaml"
# The two lightings side by side (grid 2x1) instead of stacked; more defects per epoch than TAO's 0.1.
common=("results_dir=$work/results" "dataset.fpratio_sampling=0.5"
        "dataset.concat_type=grid" "dataset.grid_map.x=2" "dataset.grid_map.y=1")

# 2. Validate every split and preview the Ray Data pipeline.
$oi check_dataset -e "$spec" "${common[@]}"

# 3. Train 5 epochs on 2 DDP workers (gloo on CPU), then 1 more: the rerun resumes. Two workers
#    take half the optimiser steps per epoch of one worker with the same dataset.batch_size.
#    A checkpoint every 5 epochs (and after the last): each holds weights + Adam state (~220 MB).
$oi train -e "$spec" "${common[@]}" ray.num_workers=2 train.num_epochs=5 train.checkpoint_interval=5
$oi train -e "$spec" "${common[@]}" ray.num_workers=2 train.num_epochs=6 train.checkpoint_interval=5

# 4. Evaluate the checkpoint, export to ONNX, evaluate the ONNX model (same metrics).
$oi evaluate -e "$spec" "${common[@]}"
$oi export -e "$spec" "${common[@]}"
$oi evaluate -e "$spec" "${common[@]}" evaluate.checkpoint="$work/results/export/oi_model.onnx" \
    evaluate.results_dir="$work/results/evaluate_onnx"

# 5. Score the inference split with TAO's margin rule instead of the calibrated threshold.
$oi inference -e "$spec" "${common[@]}" inference.threshold=2.0
head -5 "$work/results/inference/inference.csv"

# Each task saved the resolved spec it ran with: rerunning from it repeats the run exactly.
$oi evaluate -e "$work/results/evaluate_onnx/spec.yaml"
