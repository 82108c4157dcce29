# Stand-in for python:3.11-slim: Debian bookworm's Python 3.11 with pip, in a venv first on PATH
# (the upstream image has its own build in /usr/local with pip on PATH).
FROM cxr-standin/debian:bookworm
RUN apt-get update \
    && apt-get install -y python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/python \
    && printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > /etc/pip.conf
ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8
CMD ["python3"]
