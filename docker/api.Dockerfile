# syntax=docker/dockerfile:1
# The API image: the FastAPI app under uvicorn, started by smoothcert.service.api.server (deadlines
# for slow clients, keep-alive and concurrency from the SMOOTHCERT_HTTP_* settings), as
# `smoothcert up` starts it. No torch, no onnxruntime, no CUDA (design §1): the API only enqueues
# tasks by name and reads job records from Redis.
# Build from the repository root: docker build -f docker/api.Dockerfile -t smoothcert-api .
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The `api` extra is the whole dependency list: the base (the shared contract) and the web
# server, none of the engine's packages. pyproject.toml says so and tests/deploy checks it.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service service
COPY worker worker
COPY models models
RUN pip install ".[api]" && rm -rf /src

# One uid for every image, so the API and the workers can all write the shared data volume
# (a new named volume takes the owner and mode of the directory it is mounted over: 0700, for
# it holds every key's datasets, models and inputs). The API process sets umask 077 as it starts
# (smoothcert.service.core.store.private_data_dir), so what it writes there is 0600.
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent smoothcert \
    && mkdir -p /data && chown smoothcert:smoothcert /data && chmod 0700 /data
USER smoothcert
WORKDIR /data
ENV SMOOTHCERT_DATA_DIR=/data

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["python", "-m", "smoothcert.service.api.server", "--host", "0.0.0.0", "--port", "8000"]
