# cxr-triage: one image for the watcher, the workers, Flower and the one-shot migration.
# docker build -t cxr-triage .                      CPU (TensorFlow finds no GPU, runs on CPU)
# docker build --build-arg EXTRAS=gpu -t cxr-triage-gpu .   adds the CUDA libraries from pip
FROM python:3.11-slim

ARG EXTRAS=""
ARG CXR_UID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CXR_DATA_DIR=/data \
    KERAS_HOME=/data/keras \
    TF_CPP_MIN_LOG_LEVEL=2

# The uid is a build argument so it can match the owner of a bind-mounted inbox on the host.
RUN groupadd --gid "${CXR_UID}" cxr \
    && useradd --uid "${CXR_UID}" --gid cxr --create-home --shell /usr/sbin/nologin cxr

WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY trainer ./trainer
COPY db ./db
RUN pip install ".${EXTRAS:+[$EXTRAS]}"

# Mount points exist and belong to cxr before the volumes are mounted, so new named volumes
# start with that owner; archive and rejected hold patient images and stay private.
RUN mkdir -p /data/inbox /data/archive /data/rejected /data/models /data/keras \
    && chown -R cxr:cxr /data \
    && chmod 700 /data/archive /data/rejected

USER cxr
WORKDIR /data
ENTRYPOINT ["cxr"]
CMD ["--help"]
