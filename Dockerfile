# vident streaming service on an NVIDIA GPU: CUDA + TensorRT runtime, the project with its [gpu] and [queue] extras.
#   docker build -t vident .
#   docker run --gpus all -p 8000:8000 -v vident-cache:/var/lib/vident/cache vident
# The same image runs batch-job workers: `vident worker` (command override; docker-compose.yml, profile scaleout).
# TensorRT engines are built on first start (minutes) and cached in the /var/lib/vident/cache volume,
# keyed by model, TensorRT version, GPU and precision; later starts only deserialize them.
# The NGC image brings CUDA, cuDNN, TensorRT and its Python bindings (tensorrt 10.x, Python 3.12).
FROM nvcr.io/nvidia/tensorrt:24.12-py3

ARG TORCH_VERSION=2.7.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    VIDENT_HOST=0.0.0.0 \
    VIDENT_PORT=8000 \
    VIDENT_MODEL=most-nss \
    VIDENT_BACKEND=auto \
    VIDENT_DEVICE=cuda \
    VIDENT_PRECISION=auto \
    VIDENT_CACHE_DIR=/var/lib/vident/cache \
    VIDENT_JOBS_DATA_DIR=/var/lib/vident/jobs

WORKDIR /opt/vident
# The CUDA build of torch first, so the project's "torch" requirement is already satisfied.
RUN python3 -m pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY models ./models
COPY service ./service
COPY export ./export
COPY benchmarks ./benchmarks
# onnxruntime (CPU, a base dependency) and onnxruntime-gpu install the same module: keep only the GPU one.
# [queue]: Redis client and Dramatiq, used only with VIDENT_JOBS_BROKER (API replicas) and by `vident worker`.
RUN python3 -m pip install ".[gpu,queue]" \
    && python3 -m pip uninstall -y onnxruntime \
    && python3 -m pip install --force-reinstall --no-deps "onnxruntime-gpu>=1.18,<2" \
    && python3 -c "import torch, tensorrt, onnxruntime, service.app, service.jobs_queue; print('torch', torch.__version__, 'tensorrt', tensorrt.__version__)"

RUN useradd --system --create-home --home-dir /home/vident vident \
    && mkdir -p /var/lib/vident/cache /var/lib/vident/jobs \
    && chown -R vident:vident /var/lib/vident
USER vident
VOLUME ["/var/lib/vident/cache", "/var/lib/vident/jobs"]
EXPOSE 8000

# /healthz answers while the model (or its engine) is still loading; /readyz says when it can serve.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"VIDENT_PORT\"]}/healthz', timeout=4)"

CMD ["vident", "serve"]
