# syntax=docker/dockerfile:1
# The cliplora gateway image: `cliplora serve --triton-url HOST:PORT`, nothing else.
# No torch, no open_clip, no Triton: the gateway decodes images and talks gRPC to an
# existing Triton (the official image, see README.md beside this file).
#
# Build from the repository root (the context is filtered by gateway.Dockerfile.dockerignore):
#   docker build -f deploy/docker/gateway.Dockerfile -t cliplora-gateway:0.1.0 .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with the gateway's pinned runtime dependencies ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
COPY deploy/docker/requirements-gateway.txt /tmp/requirements-gateway.txt
RUN /opt/venv/bin/pip install --only-binary=:all: -r /tmp/requirements-gateway.txt
# The project itself without its dependencies: its core dependencies include torch and
# open_clip, which only `cliplora export` needs. The tokenizer's CLIP BPE vocabulary ships
# inside cliplora (checked by its sha256 when loaded), and the build tokenizes with it.
COPY . /src
RUN /opt/venv/bin/pip install --no-deps /src \
    && /opt/venv/bin/cliplora serve --help > /dev/null \
    && /opt/venv/bin/python -c "import cliplora.serve.gateway.server, cliplora.serve.stack.run" \
    && /opt/venv/bin/python -c "from cliplora.core.tokenizer import get_tokenizer; get_tokenizer()(['a photo'])" \
    && /opt/venv/bin/python -m pip uninstall --yes pip

# ---- runtime: the slim Python image, the environment, an unprivileged user ----
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="cliplora-gateway" \
      org.opencontainers.image.description="gRPC and HTTP gateway in front of Triton for CLIP-LoRA classifiers"
RUN useradd --system --uid 10001 --gid 0 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin gateway
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/grpc_health_check.py /opt/cliplora/grpc_health_check.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CLIPLORA_HOST=0.0.0.0
WORKDIR /tmp
USER 10001:0
# gRPC, the HTTP door (REST, /v1/embeddings, the playground), metrics.
EXPOSE 50051 8080 9400
# grpc.health.v1 on the gateway's own port: SERVING only while Triton is ready.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "/opt/cliplora/grpc_health_check.py", "127.0.0.1:50051"]
ENTRYPOINT ["cliplora", "serve"]
CMD ["--triton-url", "triton:8001"]
