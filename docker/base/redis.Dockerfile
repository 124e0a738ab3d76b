# The Redis image where no registry can be reached: Debian bookworm's Redis 7, run as its
# unprivileged `redis` user from /data, as the redis:7 image runs it. The compose file gives the
# command (append-only file, password).
ARG DEBIAN_IMAGE=localhost/smoothcert-debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server"]
