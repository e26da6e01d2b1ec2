# syntax=docker/dockerfile:1
# advguard: the guard service (default command) and the bundle builder (`build ...`), one image.
#
#   docker build -t advguard:0.1.0 .
#   docker run --gpus all -p 8000:8000 advguard:0.1.0                 # the api, demo bundle
#   docker run --gpus all -v ...:/data advguard:0.1.0 build --source /data/ilsvrc --split train ...
#
# The base is NVIDIA's CUDA runtime image (driver integration through the NVIDIA container
# toolkit); torch's wheel brings its own CUDA 13 libraries and faiss-gpu its CUDA 12 ones.
# Any Debian-family base with python3 >= 3.11 works (--build-arg CUDA_IMAGE=...):
# deploy/verify-image.sh builds and runs this file with podman on a local Debian 12 base.
# Pinned: the base image tag, torch/torchvision/faiss-gpu (deploy/docker/requirements-gpu.txt),
# the project's other runtime dependencies (deploy/docker/constraints.txt: the versions tested).

ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS runtime

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The base's python3 (Ubuntu 24.04: 3.12; Debian 12: 3.11) in a virtualenv. Apt packages are
# left at the release's current security level rather than pinned to versions it stops serving.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && groupadd --system --gid 10001 advguard \
    && useradd --system --uid 10001 --gid advguard --home-dir /opt/advguard \
        --shell /usr/sbin/nologin advguard

WORKDIR /opt/advguard

# The multi-GB layer first, so that code changes do not re-download it.
COPY deploy/docker/requirements-gpu.txt /tmp/requirements-gpu.txt
RUN pip install --no-cache-dir -r /tmp/requirements-gpu.txt

# The project (not editable) with the gpu extra; the pins above satisfy its torch/faiss needs,
# and its other runtime dependencies are held at the versions its tests ran with (constraints.txt).
COPY deploy/docker/constraints.txt /tmp/constraints.txt
COPY pyproject.toml README.md /tmp/src/
COPY app /tmp/src/app
COPY index_builder /tmp/src/index_builder
# the `advguard` command registers the evaluate and bench subcommands too (code only)
COPY evaluation /tmp/src/evaluation
COPY bench /tmp/src/bench
RUN pip install --no-cache-dir -c /tmp/requirements-gpu.txt -c /tmp/constraints.txt "/tmp/src[gpu]" \
    && rm -rf /tmp/src \
    && advguard --help > /dev/null

# The demo bundle, the healthcheck and the traffic generator; /bundles is where the builder
# writes and where a named volume mounted there starts out owned by the non-root user.
COPY --chown=advguard:advguard bundles/cifar10-resnet20 /opt/advguard/bundles/cifar10-resnet20
COPY deploy/docker/healthcheck.py deploy/traffic.py /opt/advguard/bin/
RUN mkdir -p /bundles && chown advguard:advguard /bundles

USER 10001:10001

# 8000: the public API and demo page; 9000: the admin listener (/metrics, /clients), which only
# Prometheus and operators should reach (compose publishes it on the host's loopback only).
ENV ADVGUARD_BUNDLE=/opt/advguard/bundles/cifar10-resnet20 \
    ADVGUARD_PORT=8000 \
    ADVGUARD_ADMIN_PORT=9000
EXPOSE 8000 9000

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/advguard/bin/healthcheck.py"]

ENTRYPOINT ["advguard"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
