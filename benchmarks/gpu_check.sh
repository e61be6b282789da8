#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU, one command runs what the CPU-only CI cannot.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root
#   WHEELS=/path/to/wheels bash benchmarks/gpu_check.sh   # a machine without a package index
#
# It runs, each bounded in time: the GPU- and TensorRT-marked tests, the seeded
# reproducibility test (two seeded one-worker runs must give the same weights bit for bit),
# and the inference-backends benchmark (TensorRT and ONNX Runtime's CUDA provider beside torch
# when they are installed). At the end it prints what it could not run and why.
#
# Environment: an existing .venv is used as it is. Otherwise a venv is made that sees the
# machine's own packages (--system-site-packages: its CUDA torch is kept, never replaced by a
# CPU wheel), and oi-ray is installed into it with its dev and gpu extras; without a package
# index (no network) they come from $WHEELS (pip --no-index --find-links). Bring them from a
# machine that has one, with the same Python version:
#   pip download -d wheels '.[dev,gpu]'   (the torch wheel it brings can stay behind: the
#                                         machine's own CUDA torch satisfies it)
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
STEP_TIMEOUT="${STEP_TIMEOUT:-300}"  # seconds per step
not_run=()
failed=()

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU is visible (nvidia-smi -L failed): nothing to check here" >&2
  exit 2
fi
nvidia-smi -L

if [ ! -x .venv/bin/python ]; then
  python3 -m venv --system-site-packages .venv || exit 2
  if [ -n "${WHEELS:-}" ]; then
    install=(--no-index --find-links "$WHEELS")
  else
    install=()
  fi
  if ! .venv/bin/pip install -q "${install[@]}" -e '.[dev,gpu]'; then
    echo "gpu_check: installing oi-ray with the gpu extra failed; retrying without it" \
         "(TensorRT and onnxruntime-gpu will be reported as not run)" >&2
    .venv/bin/pip install -q "${install[@]}" -e '.[dev]' || {
      echo "gpu_check: cannot install oi-ray; without a package index set WHEELS to a folder of" \
           "the wheels 'pip download -d wheels .[dev,gpu]' brings on a connected machine" >&2
      exit 2
    }
  fi
fi
py=.venv/bin/python

gpus="$($py -c 'import torch; print(torch.cuda.device_count())')"
echo "torch $($py -c 'import torch; print(torch.__version__)') sees $gpus GPU(s)"
if [ "$gpus" -lt 1 ]; then
  echo "gpu_check: the venv's torch sees no GPU (a CPU build?); install a CUDA torch first" >&2
  exit 2
fi
if ! $py -c 'import tensorrt' 2>/dev/null; then
  not_run+=("TensorRT tests and the TensorRT benchmark: tensorrt is not installed (the gpu extra)")
fi
if ! $py -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'; then
  not_run+=("ONNX Runtime on the GPU: no CUDAExecutionProvider (onnxruntime-gpu is not installed)")
fi
if [ "$gpus" -lt 2 ]; then
  not_run+=("the two-GPU NCCL training test: $gpus GPU on this machine")
fi

step() {  # step NAME COMMAND...: run a bounded step, record a failure
  local name="$1"
  shift
  echo "== $name"
  timeout "$STEP_TIMEOUT" "$@"
  local rc=$?
  if [ $rc -eq 124 ]; then
    failed+=("$name: timed out after ${STEP_TIMEOUT} s")
  elif [ $rc -ne 0 ]; then
    failed+=("$name: exit status $rc")
  fi
}

step "GPU-marked tests" $py -m pytest -q -m "gpu or trt" -p no:cacheprovider tests
step "seeded reproducibility" $py -m pytest -q -p no:cacheprovider \
  "tests/test_train.py::test_one_worker_run_is_reproducible_with_a_seed"
step "inference backends" $py benchmarks/inference_backends.py --lights 4 --size 100

echo "== summary"
for line in "${not_run[@]}"; do echo "not run: $line"; done
for line in "${failed[@]}"; do echo "FAILED: $line"; done
[ ${#failed[@]} -eq 0 ]
