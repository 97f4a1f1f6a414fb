# Concord consortium server image: the API (`consortium server`), the migrations
# (`consortium db upgrade`) and the SuperLink (`python -m
# consortium_server.federation.superlink_launcher`: Concord's launcher, which runs Flower's
# `flower-superlink` and the ServerApp executor that reports to the API). Built from the
# server extra (`concord[server]`, locked in requirements/server.lock): no torch, MONAI or
# Opacus. Build from the repository root:
#   docker build -f deploy/docker/server.Dockerfile -t concord-server:0.1.0 .
# BASE_IMAGE: pin it by digest for a release build (docs/images.md), e.g.
#   --build-arg BASE_IMAGE=python:3.11.11-slim-bookworm@sha256:<digest>
# scripts/build-images.sh builds on a local Debian bookworm base where Docker Hub is
# unreachable; the default is the public image.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/concord
ENV PATH=/opt/concord/bin:$PATH
# PIP_CERT (a TLS-inspecting proxy's CA) and PIP_INDEX_URL (a mirror) are unset unless given.
ARG PIP_CERT
ARG PIP_INDEX_URL
# Every dependency, pinned and hash-checked, from the lock (scripts/lock-images.sh: pyproject's
# shared list, the server extra and the build backend); wheels only, nothing resolved here.
# Its own layer, kept while only the code changes.
COPY requirements/server.lock /src/requirements/server.lock
RUN pip install --require-hashes --no-deps --only-binary :all: -r /src/requirements/server.lock
COPY pyproject.toml README.md /src/
COPY concord_protocol /src/concord_protocol
COPY consortium_server /src/consortium_server
COPY policies /src/policies
# The project itself, with the locked setuptools (no build isolation: nothing unhashed is
# fetched); `pip check`: the lock holds every dependency. The policies install as data files
# to /opt/concord/share/policies.
RUN pip install --no-deps --no-build-isolation /src && pip check

FROM ${BASE_IMAGE}

# tini is PID 1 (the launcher and the SuperLink start children); WeasyPrint (PDF reports)
# needs pango. Nothing else from apt.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz0b fonts-dejavu-core \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && groupadd --gid 10001 concord \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin concord
COPY --from=build /opt/concord /opt/concord
ENV PATH=/opt/concord/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
USER 10001:10001
# The API (8600), the SuperLink's Fleet API (9092, public) and Control API (9093, mutual TLS).
EXPOSE 8600 9092 9093
# tini reaps orphaned children and, with -g, forwards SIGTERM to the whole process group.
# A Kubernetes `command:` replaces the ENTRYPOINT: the charts must start with tini -g -- too.
ENTRYPOINT ["/usr/bin/tini", "-g", "--"]
# The chart sets the command of every container; this default serves the API.
CMD ["consortium", "server"]
