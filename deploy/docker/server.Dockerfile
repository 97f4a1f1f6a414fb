# Concord consortium server image: `consortium server`, `consortium db upgrade` and the
# Flower SuperLink (`flower-superlink`, whose ServerApps report to the API). Built from the
# server extra (`concord[server]`): no torch, MONAI or Opacus. Build from the repository root:
#   docker build -f deploy/docker/server.Dockerfile -t concord-server:0.1.0 .
# BASE_IMAGE: scripts/build-images.sh builds on a local Debian bookworm base where Docker Hub
# is unreachable; the default is the public image.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/concord
ENV PATH=/opt/concord/bin:$PATH
# PIP_CERT (a TLS-inspecting proxy's CA) and PIP_INDEX_URL (a mirror) are unset unless given.
ARG PIP_CERT
ARG PIP_INDEX_URL
# The dependencies (pyproject.toml's shared list and the server extra) get their own layer,
# kept while only the code changes.
COPY pyproject.toml README.md /src/
RUN python -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; print(*p['dependencies'], *p['optional-dependencies']['server'], sep='\n')" >/tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY concord_protocol /src/concord_protocol
COPY consortium_server /src/consortium_server
COPY policies /src/policies
# The policies install as data files to /opt/concord/share/policies.
RUN pip install --no-deps /src

FROM ${BASE_IMAGE}

# WeasyPrint (PDF reports) needs pango; nothing else from apt.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz0b fonts-dejavu-core \
    && rm -rf /var/lib/apt/lists/* \
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
EXPOSE 8600 9092
# The chart sets the command of every container; this default serves the API.
CMD ["consortium", "server"]
