# syntax=docker/dockerfile:1
# One image for every function; ONNXFN_FUNCTION picks the function (set by knative/service-<fn>.yaml).
#   docker build --target gpu -t <registry>/onnxfn:gpu .    # onnxruntime-gpu + CUDA/cuDNN pip wheels
#   docker build --target cpu -t <registry>/onnxfn:cpu .    # onnxruntime (CPU); also the default target
# Models are built here at build time by `onnxfn build-models` (the command `make models` runs) and
# baked into the image: nothing is downloaded at run time.
ARG PYTHON_VERSION=3.11
ARG ORT_GPU_VERSION=1.31.1

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY functions ./functions

# Build stage only: torch and friends never reach a runtime image.
FROM base AS models
RUN pip install '.[models]' \
    && ONNXFN_MODEL_DIR=/models onnxfn build-models

FROM base AS venv-cpu
RUN python -m venv /opt/venv && /opt/venv/bin/pip install .

FROM base AS venv-gpu
ARG ORT_GPU_VERSION
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install . \
    && /opt/venv/bin/pip uninstall -y onnxruntime \
    && /opt/venv/bin/pip install "onnxruntime-gpu[cuda,cudnn]==${ORT_GPU_VERSION}"

FROM python:${PYTHON_VERSION}-slim AS runtime
# A numeric UID, so Kubernetes can check `runAsNonRoot: true` against the image.
RUN useradd --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin onnxfn
COPY --from=models /models /opt/onnxfn/models
# PORT is set by Knative (runtime contract); 8080 is its default and ours when run by hand.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PORT=8080 \
    ONNXFN_MODEL_DIR=/opt/onnxfn/models \
    PROMETHEUS_MULTIPROC_DIR=/tmp/onnxfn-metrics
EXPOSE 8080

FROM runtime AS gpu
COPY --from=venv-gpu /opt/venv /opt/venv
# Let the dynamic loader find the CUDA/cuDNN libraries that the nvidia-* wheels put in site-packages.
RUN find /opt/venv/lib -path '*/site-packages/nvidia/*' -name 'lib*.so*' -printf '%h\n' \
        | sort -u > /etc/ld.so.conf.d/onnxfn-nvidia.conf \
    && ldconfig
ENV ONNXFN_PROVIDERS=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001
CMD ["onnxfn", "serve"]

FROM runtime AS cpu
COPY --from=venv-cpu /opt/venv /opt/venv
ENV ONNXFN_PROVIDERS=cpu
USER 10001
CMD ["onnxfn", "serve"]
