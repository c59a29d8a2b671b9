# syntax=docker/dockerfile:1
# One image for the API (`fundus serve`, the default command) and the model worker (`fundus worker`).
#
#   docker build -t fundus-enhance:cpu .                                   # CPU torch (small)
#   docker build --build-arg TORCH_VARIANT=cu128 -t fundus-enhance:cu128 .  # CUDA 12.8 torch
#
# The CUDA wheels carry their own CUDA runtime, so both variants share the slim Python base; on a GPU
# host the NVIDIA container toolkit only has to provide the driver.
# Production builds may pin the base by digest: --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:...
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

# `cpu` or a CUDA wheel index of the PyTorch download site (cu126, cu128, ...).
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH

# torch first, from the index of the chosen variant: the project's own `torch==2.13.0` requirement is
# then already satisfied and pip never pulls the default (CUDA) build from PyPI.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
COPY training ./training

# A regular (non-editable) install: the bundled teacher weights travel as package data.
# The build fails here if the weights are missing or the entry point does not import.
RUN pip install --no-cache-dir . \
    && python -c "from model.artifact import BUNDLED_WEIGHTS as w; assert w.is_file(), w; print(w)" \
    && python -c "from model.quality import BUNDLED_QUALITY as q; assert q.is_file(), q; print(q)" \
    && fundus --help > /dev/null

FROM ${PYTHON_IMAGE} AS runtime

ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="fundus-enhance" \
      org.opencontainers.image.description="T-MAGE-Net fundus photograph enhancement: API and model worker" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.fundus.torch-variant="${TORCH_VARIANT}"

RUN groupadd --system --gid 10001 fundus \
    && useradd --system --uid 10001 --gid fundus --create-home --home-dir /home/fundus \
        --shell /usr/sbin/nologin fundus

COPY --from=builder /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/fundus/healthcheck.py

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FUNDUS_HOST=0.0.0.0 \
    FUNDUS_PORT=8000 \
    FUNDUS_WORKER_METRICS_PORT=9100

WORKDIR /home/fundus
USER 10001:10001
EXPOSE 8000 9100
STOPSIGNAL SIGTERM

# Ready = weights loaded and warmed, queue backend and a worker answering (GET /readyz).
# Worker containers override this with `healthcheck.py worker` (compose) or their own probes (k8s).
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/fundus/healthcheck.py", "api"]

ENTRYPOINT ["fundus"]
CMD ["serve"]
