# The trainer image: `convstack` installed on TensorFlow's own image, running as a non-root user.
#
#   DOCKER_BUILDKIT=1 docker build -f k8s/trainer.Dockerfile -t convstack-trainer:0.1.0 .
#   DOCKER_BUILDKIT=1 docker build -f k8s/trainer.Dockerfile --build-arg TF_IMAGE_TAG=2.21.0-gpu \
#       -t convstack-trainer:0.1.0-gpu .
#
# The build context is the repository root; trainer.Dockerfile.dockerignore (read by BuildKit
# next to this file) keeps virtualenvs, models and run directories out of it. BuildKit's own
# Dockerfile syntax (Docker 20.10 or newer) does the cache and bind mounts; no `# syntax=` line,
# which would pull a frontend image from Docker Hub and fail offline.

# An exact release tag, never `latest`: the TensorFlow minor must match pyproject's pin
# (tensorflow>=2.21,<2.22), so pip keeps the base image's TensorFlow (with its CUDA libraries in
# the -gpu variant) instead of installing a second one.
ARG TF_IMAGE_TAG=2.21.0
# Any image with Python and that TensorFlow release in the `python` first on PATH (the
# container tests build one offline from Debian: tests/containers/tensorflow.Dockerfile).
ARG BASE_IMAGE=tensorflow/tensorflow:${TF_IMAGE_TAG}

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer ./trainer
COPY serving ./serving
COPY client ./client
COPY convstack ./convstack
# A wheel only: the runtime stage gets neither the sources nor the build tools.
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# The requirements alone (pyproject's, for [all]): the next stage installs them in a layer of
# its own, which a code change does not touch.
FROM ${BASE_IMAGE} AS requirements
COPY pyproject.toml k8s/requirements.py /src/
RUN python /src/requirements.py /src/pyproject.toml all > /requirements.txt

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="convstack-trainer" \
      org.opencontainers.image.description="convstack train: Conv2D classifier with tf.distribute, exporting versioned SavedModels" \
      org.opencontainers.image.licenses="Apache-2.0"

# The pods run with a read-only root file system and a writable /tmp: the caches Keras and
# matplotlib would put in $HOME go there.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    KERAS_HOME=/tmp/keras \
    MPLCONFIGDIR=/tmp/matplotlib

# Into the image's own Python, next to the TensorFlow it ships: that is the point of the base
# image (PIP_BREAK_SYSTEM_PACKAGES only matters if a base ever marks it externally managed).
# First the requirements, in a layer that only a change of them rebuilds; then the wheel,
# bind-mounted from the build stage so no layer keeps a copy, whose requirements are then all
# satisfied. pip's cache is BuildKit's cache mount, kept between builds but in no layer.
# `[all]`: the wheel's base install is the client only; the image trains, serves and runs
# rollouts.
COPY --from=requirements /requirements.txt /usr/local/share/convstack/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install -r /usr/local/share/convstack/requirements.txt
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install "$(echo /wheels/*.whl)[all]" \
    && python -c "import tensorflow as tf, convstack.trainer, convstack.serving, convstack.client; print(tf.__version__)"

# uid/gid 1000, matching the pods' runAsUser/runAsGroup/fsGroup. A numeric USER lets the kubelet
# verify runAsNonRoot. (Reuse the ids if the base image already has such a user.)
RUN (getent group 1000 || groupadd --gid 1000 convstack) \
    && (getent passwd 1000 || useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin convstack)
USER 1000:1000
WORKDIR /home/convstack

ENTRYPOINT ["convstack"]
CMD ["train", "--help"]
