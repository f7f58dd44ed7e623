# syntax=docker/dockerfile:1
# The text-generation service. Build:   docker build -t wordrnn .
# Run with a trained run folder mounted: docker run -p 8000:8000 -v "$PWD/runs/default:/models/default:ro" wordrnn
#
# Build arguments:
#   TORCH_SPEC       the torch requirement (default torch==2.13.0).
#   TORCH_INDEX_URL  the wheel index torch comes from: PyTorch's CPU-only index gives the small
#                    CPU image, one of its CUDA indexes (cu121, cu124, ...) a CUDA build, run
#                    with `docker run --gpus all`; empty: pip's default index (on Linux its
#                    torch is a CUDA build).
#   PYTHON_VERSION   the python:*-slim base (default 3.11).
#   MODEL_DIR        for `--target baked` only: the run folder copied into the image.
#
# Settings are WORDRNN_* variables (app/settings.py). Behind a reverse proxy set
# WORDRNN_FORWARDED_ALLOW_IPS to the proxy's address (X-Forwarded-For is believed from it
# alone) and WORDRNN_ROOT_PATH to its sub-path; deploy/ has an nginx site and a compose file.
# SIGTERM (docker stop) stops gracefully: no new connections, open requests get
# WORDRNN_SHUTDOWN_TIMEOUT_SECONDS (8) to finish, streams end with an error event.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# TORCH_SPEC is pinned (a build argument hadolint cannot read).
# hadolint ignore=DL3013
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"; \
    else \
        pip install "$TORCH_SPEC"; \
    fi
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model_store ./model_store
COPY training ./training
COPY app ./app
# The project itself, from this context; its dependencies' ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[corpora,redis]"

FROM python:${PYTHON_VERSION}-slim AS base
RUN useradd --create-home --uid 10001 wordrnn
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    WORDRNN_MODEL_DIR=/models/default \
    WORDRNN_HOST=0.0.0.0 \
    WORDRNN_PORT=8000 \
    WORDRNN_FORWARDED_ALLOW_IPS=127.0.0.1
USER 10001
WORKDIR /home/wordrnn
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app"]

# An image with its model inside, run without a volume:
#   docker build --target baked --build-arg MODEL_DIR=runs/default -t wordrnn:baked .
FROM base AS baked
ARG MODEL_DIR=runs/default
COPY ${MODEL_DIR} /models/default

# The default image: the model folder is a volume, mounted at run time.
FROM base AS runtime
VOLUME ["/models"]
