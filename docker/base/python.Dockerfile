# The Python base image where no registry can be reached: Debian bookworm's Python 3.11 in a
# virtual environment on PATH, so `python` and `pip` are there as in python:*-slim. FROM the
# image `debootstrap --variant=minbase bookworm` makes (service/devstack/deploy.py builds both).
ARG DEBIAN_IMAGE=localhost/smoothcert-debian:bookworm
FROM ${DEBIAN_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/python/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/python
