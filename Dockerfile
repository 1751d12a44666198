# syntax=docker/dockerfile:1
# One image for every function; ONNXFN_FUNCTION picks the function (set by knative/service-<fn>.yaml).
#   docker build --target gpu -t <registry>/onnxfn:gpu .    # onnxruntime-gpu + CUDA/cuDNN (requirements/gpu.txt)
#   docker build --target cpu -t <registry>/onnxfn:cpu .    # onnxruntime, CPU (requirements/cpu.txt); the default
# Models are built here at build time by `onnxfn build-models` (the command `make models` runs) and
# baked into the image: nothing is downloaded at run time.
ARG PYTHON_VERSION=3.11
# The models stage exports two small models on the CPU: PyTorch's CPU builds (no CUDA wheels).
# Where only PyPI is reachable pass --build-arg TORCH_INDEX_URL= (PyPI's torch, with CUDA wheels).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src

# Build stage only: torch and friends never reach a runtime image. Its pip cache persists between
# builds (a cache mount), so a code change does not download torch again.
FROM base AS models
ARG TORCH_INDEX_URL
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY functions ./functions
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} '.[cpu,models]' \
    && ONNXFN_MODEL_DIR=/models onnxfn build-models

# The runtime venvs install exactly the pinned set (requirements/*.txt, `make lock`), then the
# project without resolving again; `pip check` proves the set complete (one onnxruntime build).
# Then scripts/slim-venv.sh takes out what a function never loads (pip, the packages' test suites,
# onnxruntime's unused C API library, extension modules' debug information), each checked first.
# binutils (strip, readelf) stays in these build stages.
FROM base AS venv-build
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends binutils >/dev/null \
    && rm -rf /var/lib/apt/lists/*
COPY scripts/slim-venv.sh /usr/local/bin/slim-venv

FROM venv-build AS venv-cpu
COPY requirements/cpu.txt requirements/
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --no-deps -r requirements/cpu.txt
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY functions ./functions
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . && /opt/venv/bin/pip check && slim-venv /opt/venv

FROM venv-build AS venv-gpu
COPY requirements/gpu.txt requirements/
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir --no-deps -r requirements/gpu.txt
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY functions ./functions
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . && /opt/venv/bin/pip check && slim-venv /opt/venv

FROM python:${PYTHON_VERSION}-slim AS runtime
# A numeric UID, so Kubernetes can check `runAsNonRoot: true` against the image.
RUN useradd --uid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin onnxfn
COPY --from=models /models /opt/onnxfn/models
# PORT is set by Knative (runtime contract); 8080 is its default and ours when run by hand.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PORT=8080 \
    ORT_DISABLE_TELEMETRY=1 \
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
