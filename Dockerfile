# cxr-triage: one image for the watcher, the workers, Flower and the one-shot migration.
# docker build -t cxr-triage .                      CPU (tensorflow-cpu: no CUDA kernels)
# docker build --build-arg EXTRAS=gpu -t cxr-triage-gpu .   TensorFlow with the CUDA libraries from pip
FROM python:3.11-slim

ARG EXTRAS=""
ARG CXR_UID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CXR_DATA_DIR=/data \
    KERAS_HOME=/data/keras

# The uid is a build argument so it can match the owner of a bind-mounted inbox on the host.
RUN groupadd --gid "${CXR_UID}" cxr \
    && useradd --uid "${CXR_UID}" --gid cxr --create-home --shell /usr/sbin/nologin cxr

# The dependencies from pyproject.toml first, in a layer of their own, so that a code change does
# not reinstall TensorFlow. Without EXTRAS the image takes tensorflow-cpu: the same TensorFlow
# without the CUDA kernels, a third of the download.
WORKDIR /app
COPY pyproject.toml ./
RUN python -c 'import sys, tomllib; \
        project = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
        extras = [e for e in sys.argv[1].split(",") if e]; \
        deps = project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]; \
        cpu = [d.replace("tensorflow", "tensorflow-cpu", 1) if d.startswith("tensorflow>") else d for d in deps]; \
        print("\n".join(deps if extras else cpu))' "${EXTRAS}" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY README.md ./
COPY worker ./worker
COPY trainer ./trainer
COPY db ./db
RUN pip install --no-deps "."

# Mount points exist and belong to cxr before the volumes are mounted, so new named volumes
# start with that owner and mode. archive and rejected hold patient images and stay private.
# The inbox is written by others (a modality export, a PACS script): group cxr may write there
# (setgid, so their files get group cxr and the watcher can read and move them); nobody else.
RUN mkdir -p /data/inbox /data/archive /data/rejected /data/models /data/keras \
    && chown -R cxr:cxr /data \
    && chmod 700 /data/archive /data/rejected \
    && chmod 2770 /data/inbox

USER cxr
WORKDIR /data
ENTRYPOINT ["cxr"]
CMD ["--help"]
