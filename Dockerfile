# syntax=docker/dockerfile:1
# Two images from one file: `api` (gateway, scaler, webhook sender: no torch) and `worker` (GPU).

FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN useradd --create-home --uid 10001 dq
COPY pyproject.toml README.md ./
COPY api api
COPY core core
COPY scaler scaler
COPY worker worker
COPY bench bench

FROM base AS api
# The gateway never imports torch; install the project without its model dependencies.
RUN pip install -e ".[scale,otel]"
USER dq
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["python", "-m", "api", "--host", "0.0.0.0", "--port", "8000"]

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS worker
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
WORKDIR /app
# CUDA torch first, from PyTorch's own index, so the project's range does not pull another build.
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128
COPY --from=base /app /app
RUN pip install -e ".[model,otel]"
RUN useradd --create-home --uid 10001 dq && mkdir -p /models && chown dq /models
USER dq
ENV DQ_MODEL_CACHE=/models
CMD ["python", "-m", "worker"]
