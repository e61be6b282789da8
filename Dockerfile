# The image that cluster/*.yaml and cluster/kuberay/*.yaml run: Ray 2.60 with CUDA, and oi-ray
# with its GPU extra, installed as the README says for GPU machines.
#   docker build -t ghcr.io/your-org/oi-ray:0.1.0-gpu .
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/oi-ray
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users oi_ray ./oi_ray

# torch first (on a GPU machine: the default CUDA wheel), then oi-ray with the gpu extra
# (onnxruntime-gpu, TensorRT). onnxruntime and onnxruntime-gpu provide the same module: the
# CPU one that the base dependencies bring is removed and the GPU one reinstalled over it.
RUN pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir '.[gpu]' \
 && pip uninstall -y onnxruntime \
 && pip install --no-cache-dir --force-reinstall --no-deps onnxruntime-gpu

# Jobs that oi-ray submits run `python -m oi_ray.launch.entry`; users can also run `oi-ray` here.
RUN python -c "import oi_ray.launch.entry, onnxruntime, torch" && oi-ray --version
