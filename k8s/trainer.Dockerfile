# syntax=docker/dockerfile:1
# The trainer image: `convstack` installed on TensorFlow's own image, running as a non-root user.
#
#   docker build -f k8s/trainer.Dockerfile -t convstack-trainer:0.1.0 .
#   docker build -f k8s/trainer.Dockerfile --build-arg TF_IMAGE_TAG=2.21.0-gpu \
#       -t convstack-trainer:0.1.0-gpu .
#
# The build context is the repository root; trainer.Dockerfile.dockerignore (read by BuildKit
# next to this file) keeps virtualenvs, models and run directories out of it.

# An exact release tag, never `latest`: the TensorFlow minor must match pyproject's pin
# (tensorflow>=2.21,<2.22), so pip keeps the base image's TensorFlow (with its CUDA libraries in
# the -gpu variant) instead of installing a second one.
ARG TF_IMAGE_TAG=2.21.0

FROM tensorflow/tensorflow:${TF_IMAGE_TAG} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer ./trainer
COPY serving ./serving
COPY client ./client
COPY convstack ./convstack
# A wheel only: the runtime stage gets neither the sources nor the build tools.
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM tensorflow/tensorflow:${TF_IMAGE_TAG}
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
# The wheel is bind-mounted from the build stage, so no layer keeps a copy of it. `[all]`: the
# wheel's base install is the client only; the image trains, serves and runs rollouts.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install --no-cache-dir "$(echo /wheels/*.whl)[all]" \
    && python -c "import tensorflow as tf, convstack.trainer, convstack.serving, convstack.client; print(tf.__version__)"

# uid/gid 1000, matching the pods' runAsUser/runAsGroup/fsGroup. A numeric USER lets the kubelet
# verify runAsNonRoot. (Reuse the ids if the base image already has such a user.)
RUN (getent group 1000 || groupadd --gid 1000 convstack) \
    && (getent passwd 1000 || useradd --uid 1000 --gid 1000 --create-home --shell /usr/sbin/nologin convstack)
USER 1000:1000
WORKDIR /home/convstack

ENTRYPOINT ["convstack"]
CMD ["train", "--help"]
