# syntax=docker/dockerfile:1
# robustgate proxy image: `robustgate serve` on 8001 (Open Inference Protocol over gRPC) and 8002
# (Prometheus metrics), with the shipped default bundle at /opt/robustgate/bundles/default.
#
#   docker build -t robustgate:0.1.0 .                                # CPU image (default)
#   docker build --build-arg VARIANT=gpu -t robustgate:0.1.0-gpu .    # onnxruntime-gpu (`gpu` extra)
#   docker run --rm -p 8001:8001 -p 8002:8002 robustgate:0.1.0
#
# One install recipe: the builder runs scripts/install.sh, exactly as README does, with every pip
# version pinned by deploy/docker/constraints.txt (PIP_CONSTRAINT, the versions the test suite ran
# with). The runtime stage copies only the resulting tree and virtualenv.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# scripts/install.sh switches: no system packages (the dataset, Prometheus and libb64 serve the
# tests, not the proxy) and the serve-only extras (`cpu` or `gpu`: no dev, red-team or fit tools).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/opt/robustgate/deploy/docker/constraints.txt \
    ROBUSTGATE_SKIP_APT=1 \
    ROBUSTGATE_EXTRAS=cpu
WORKDIR /opt/robustgate
# .dockerignore is an allow-list: package sources, pyproject/README, the install script, the
# constraints and bundles/default only.
COPY . .
# CPU: torch/torchvision from PyTorch's CPU index (2.14.1+cpu satisfies the ==2.14.1 pins and is
# ~10x smaller than the CUDA wheel) and the `cpu` extra (onnxruntime). GPU: torch's CUDA wheel from
# PyPI and the `gpu` extra (onnxruntime-gpu alone: the core declares no ONNX Runtime, so the two
# builds of the `onnxruntime` module never meet).
RUN case "${VARIANT}" in \
      cpu) export PIP_INDEX_URL=https://download.pytorch.org/whl/cpu PIP_EXTRA_INDEX_URL=https://pypi.org/simple ;; \
      gpu) export ROBUSTGATE_EXTRAS=gpu ;; \
      *) echo "VARIANT must be cpu or gpu, got '${VARIANT}'" >&2; exit 1 ;; \
    esac \
 && bash scripts/install.sh \
 && .venv/bin/robustgate --version \
 && .venv/bin/python -m compileall -q -x '/\.venv/' /opt/robustgate

FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="robustgate" \
      org.opencontainers.image.description="Inference-time defense proxy for image classifiers (Open Inference Protocol over gRPC)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.robustgate.variant="${VARIANT}"
RUN groupadd --system --gid 10001 robustgate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin robustgate
# Same path as in the builder: the virtualenv's scripts and the editable install point here.
COPY --from=build --chown=root:root /opt/robustgate /opt/robustgate
ENV PATH=/opt/robustgate/.venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    OMP_NUM_THREADS=1
WORKDIR /opt/robustgate
USER 10001:10001
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:8001')); sys.exit(0 if s.Check(h.HealthCheckRequest(), timeout=2).status == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["robustgate", "serve"]
CMD ["--bundle", "/opt/robustgate/bundles/default"]
