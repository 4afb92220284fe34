# The container tests' stand-in for tensorflow/tensorflow:TAG, which no registry can be pulled
# from here: the offline Debian base (debootstrap, Python 3.11) with the same TensorFlow release
# in a virtualenv first on PATH, so `python` and `pip` are the ones next to TensorFlow, as in
# TensorFlow's image. Built by tests/containers/conftest.py; not for users.
ARG DEBIAN_IMAGE
FROM ${DEBIAN_IMAGE}
ARG TENSORFLOW_VERSION
ENV PATH=/opt/tensorflow/bin:${PATH} \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The wheels land in a BuildKit cache mount (kept in the test engine's data root, in no layer)
# and install from there: a rebuild downloads nothing again. pip's own HTTP cache would not do:
# the package proxy here sends no cache headers (no Cache-Control, ETag or Last-Modified), so
# pip keeps nothing.
RUN --mount=type=cache,id=convstack-wheelhouse,target=/wheelhouse,sharing=locked \
    python3 -m venv /opt/tensorflow \
    && python -m pip download --dest /wheelhouse "tensorflow==${TENSORFLOW_VERSION}" \
    && python -m pip install --no-index --find-links /wheelhouse "tensorflow==${TENSORFLOW_VERSION}" \
    && python -c "import tensorflow as tf; assert tf.__version__ == '${TENSORFLOW_VERSION}', tf.__version__"
