# syntax=docker/dockerfile:1
# The text-generation service. Build:   docker build -t wordrnn .
# Run with a trained run folder mounted: docker run -p 8000:8000 -v "$PWD/runs/default:/models/default:ro" wordrnn
#
# TORCH_SPEC picks the torch build; TORCH_INDEX_URL points pip at another wheel index, such as
# PyTorch's CPU-only or CUDA wheel index (empty: the default index).
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
RUN pip install ".[corpora]"

FROM python:${PYTHON_VERSION}-slim
RUN useradd --create-home --uid 10001 wordrnn
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    WORDRNN_MODEL_DIR=/models/default \
    WORDRNN_HOST=0.0.0.0 \
    WORDRNN_PORT=8000
VOLUME ["/models"]
USER 10001
WORKDIR /home/wordrnn
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app"]
