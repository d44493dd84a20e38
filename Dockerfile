# syntax=docker/dockerfile:1
#
# kubevram images, two targets from one file:
#
#   docker build --target operator -t ghcr.io/kubevram/operator:0.1.0 .
#   docker build --target worker   -t ghcr.io/kubevram/worker:0.1.0 .
#
# operator: slim Python, the `operator` extra only (kopf, kubernetes client): no torch, ~200 MB.
# worker:   CUDA torch, transformers, accelerate, nvidia-ml-py (the `worker` extra). The CUDA runtime,
#           cuBLAS and cuDNN come as the nvidia-* wheels torch's Linux build depends on, so the base
#           is the same slim Python 3.11 as the operator's (Ubuntu 24.04, the newest nvidia/cuda
#           runtime base, has no Python 3.11 package); the host's driver and libnvidia-ml are mounted
#           by the NVIDIA container toolkit, which the NVIDIA_* variables below ask for.
#
# Both install with the same commands as the README: `pip install ".[operator]"` and
# `pip install torch==2.13.0 && pip install ".[worker]"`, into a virtual environment that the final
# stage copies, so no compiler, pip cache or source tree ends up in the image.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------- base
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The unprivileged user both images run as (numeric, so runAsNonRoot can verify it).
RUN groupadd --system --gid 65532 kubevram \
    && useradd --system --uid 65532 --gid 65532 --home-dir /home/kubevram --create-home \
       --shell /usr/sbin/nologin kubevram

# -------------------------------------------------------------------------------------- source
FROM base AS source
WORKDIR /src
# Only what the wheel is built from (pyproject's hatch targets): no tests, charts or examples.
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY worker/ worker/

# ------------------------------------------------------------------------------ operator build
FROM source AS operator-build
RUN python -m venv /opt/kubevram
ENV PATH=/opt/kubevram/bin:$PATH
# DL3013 asks for pinned versions: "." is this project, its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[operator]"

# ------------------------------------------------------------------------------------ operator
FROM base AS operator
COPY --from=operator-build /opt/kubevram /opt/kubevram
ENV PATH=/opt/kubevram/bin:$PATH
USER 65532:65532
WORKDIR /home/kubevram
# kopf's liveness endpoint (`--liveness http://0.0.0.0:8080/healthz`, as the chart passes it).
EXPOSE 8080
ENTRYPOINT ["kubevram"]
CMD ["operator", "--all-namespaces", "--liveness", "http://0.0.0.0:8080/healthz"]

# -------------------------------------------------------------------------------- worker build
FROM source AS worker-build
RUN python -m venv /opt/kubevram
ENV PATH=/opt/kubevram/bin:$PATH
# torch first, pinned: the Linux x86_64 wheel on PyPI is the CUDA 12 build. (DL3013: as above.)
# hadolint ignore=DL3013
RUN pip install torch==2.13.0 && pip install ".[worker]"

# -------------------------------------------------------------------------------------- worker
FROM base AS worker
COPY --from=worker-build /opt/kubevram /opt/kubevram
ENV PATH=/opt/kubevram/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HOME=/home/kubevram/.cache/huggingface
USER 65532:65532
WORKDIR /home/kubevram
# 8000: OpenAI-compatible API, /healthz, /readyz, /metrics. 8001: admin routes (bearer token).
EXPOSE 8000 8001
ENTRYPOINT ["kubevram"]
CMD ["worker", "--model", "/models", "--host", "0.0.0.0", "--port", "8000", "--admin-port", "8001"]
