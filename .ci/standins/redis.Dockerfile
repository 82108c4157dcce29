# Stand-in for redis:7-alpine: Debian bookworm's redis-server and redis-cli (7.0), data in /data.
FROM cxr-standin/debian:bookworm
RUN apt-get update \
    && apt-get install -y redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir /data && chown redis:redis /data
VOLUME /data
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]
