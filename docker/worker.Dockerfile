# syntax=docker/dockerfile:1
# The worker image (certify workers and the trainer): CUDA runtime with cuDNN, CUDA torch and
# onnxruntime-gpu (the `gpu` extra). torch 2.13 and onnxruntime-gpu 1.31 are both CUDA 13 builds,
# so the base image is CUDA 13; the host needs an NVIDIA driver that supports CUDA 13 (580+).
# Build from the repository root: docker build -f docker/worker.Dockerfile -t smoothcert-worker .
# The CPU flavour (docker/compose.cpu.yml) is this file with four build arguments swapped: a plain
# Debian RUNTIME_IMAGE, the CPU torch index, onnxruntime and the `worker` extra.
ARG PYTHON_IMAGE=python:3.12-slim
ARG RUNTIME_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service service
COPY worker worker
COPY models models
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${RUNTIME_IMAGE}
# Same torch as the Makefile's TORCH_SPEC, CUDA build; tests/deploy checks the two agree.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG ONNXRUNTIME=onnxruntime-gpu
ARG ONNXRUNTIME_VERSION=1.31.1
ARG WORKER_EXTRA=gpu
# PYTORCH_NVML_BASED_CUDA_CHECK: torch.cuda.is_available() asks NVML instead of initialising
# CUDA, so a check in the prefork parent cannot poison the children it forks later.
# REMAP_SIGTERM: `docker stop` sends SIGTERM; make it Celery's cold shutdown, which requeues the
# running late-acked task at once. A warm shutdown would wait for the task until Docker's
# SIGKILL, and the message would then sit unacked until the Redis visibility timeout (hours).
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTORCH_NVML_BASED_CUDA_CHECK=1 \
    REMAP_SIGTERM=SIGQUIT

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
RUN pip install "${ONNXRUNTIME}==${ONNXRUNTIME_VERSION}"

COPY --from=wheel /wheels /wheels
RUN pip install "$(ls /wheels/*.whl)[${WORKER_EXTRA}]" && rm -rf /wheels

COPY docker/gpu-claim.sh /usr/local/bin/smoothcert-gpu-claim
RUN chmod 0755 /usr/local/bin/smoothcert-gpu-claim \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent smoothcert \
    && mkdir -p /data && chown smoothcert:smoothcert /data && chmod 0700 /data
USER smoothcert
WORKDIR /data
ENV SMOOTHCERT_DATA_DIR=/data

# Each container claims a GPU of its own, then runs one prefork worker with one child process
# (SMOOTHCERT_WORKER_CONCURRENCY=1): the parent never touches CUDA, the child loads the models.
ENTRYPOINT ["smoothcert-gpu-claim"]
CMD ["smoothcert", "worker", "--queues", "certify"]
