# The serving image: convstack's embedded TF-Serving-compatible server (`convstack serve
# --backend=embedded`) on TensorFlow's own image, as non-root user 1000. For clusters that want
# it instead of tensorflow/serving: add the component k8s/components/embedded-serving to an
# overlay (it swaps the Deployment's image and command and keeps every flag and probe).
#
#   DOCKER_BUILDKIT=1 docker build -f k8s/serving.Dockerfile -t convstack-serving:0.1.0 .
#
# The build context is the repository root; serving.Dockerfile.dockerignore (read by BuildKit
# next to this file) keeps virtualenvs, models and run directories out of it.

# As in trainer.Dockerfile: an exact release tag whose minor matches pyproject's TensorFlow
# pin, so pip keeps the base image's TensorFlow; BASE_IMAGE for any image with Python and that
# release (the container tests build one offline).
ARG TF_IMAGE_TAG=2.21.0
ARG BASE_IMAGE=tensorflow/tensorflow:${TF_IMAGE_TAG}

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer ./trainer
COPY serving ./serving
COPY client ./client
COPY convstack ./convstack
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# The requirements alone (pyproject's, for [serving]): the next stage installs them in a layer of
# its own, which a code change does not touch.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml k8s/requirements.py /src/
RUN python /src/requirements.py /src/pyproject.toml serving > /requirements.txt

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="convstack-serving" \
      org.opencontainers.image.description="convstack serve: TF-Serving-compatible gRPC and REST server for versioned SavedModels" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_CPP_MIN_LOG_LEVEL=1

# As in trainer.Dockerfile: the requirements in a layer of their own, then the wheel.
# `[serving]`: the server, its TF Serving messages, metrics and health service.
COPY --from=requirements /requirements.txt /usr/local/share/convstack/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install -r /usr/local/share/convstack/requirements.txt
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install "$(echo /wheels/*.whl)[serving]" \
    && python -c "import tensorflow as tf, convstack.serving; print(tf.__version__)"

# uid/gid 1000, as the serving pods' runAsUser/runAsGroup.
RUN (getent group 1000 || groupadd --gid 1000 convstack) \
    && (getent passwd 1000 || useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin convstack)
USER 1000:1000
WORKDIR /home/convstack

# TF Serving's ports: gRPC and REST.
EXPOSE 8500 8501
ENTRYPOINT ["convstack", "serve", "--backend=embedded"]
CMD ["--port=8500", "--rest_api_port=8501", "--model_config_file=/config/models.config"]
