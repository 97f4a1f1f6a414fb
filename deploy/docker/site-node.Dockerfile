# Concord site-node image: the site agent (`site-node run`) and the Flower SuperNode
# (`site-node supernode`, the guarded ClientApp runner in front of `flower-supernode`).
# Built from the site extra (`concord[site]`): no consortium-server code. Build from the
# repository root:
#   docker build -f deploy/docker/site-node.Dockerfile -t concord-site-node:0.1.0 .
# BASE_IMAGE: scripts/build-images.sh builds on a local Debian bookworm base where Docker Hub
# is unreachable; the default is the public image.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/concord
ENV PATH=/opt/concord/bin:$PATH
# torch first and pinned, from the CPU index: any other spec pulls a multi-GB CUDA build.
# (For GPU sites build with the matching CUDA index instead, same version.)
# TORCH_PIP_ARGS says where from (scripts/build-images.sh: a local wheel directory).
# PIP_CERT (a TLS-inspecting proxy's CA) and PIP_INDEX_URL (a mirror) are unset unless given.
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
ARG PIP_CERT
ARG PIP_INDEX_URL
RUN pip install torch==2.13.0 ${TORCH_PIP_ARGS}
# The dependencies (pyproject.toml's shared list and the site extra) get their own layer,
# kept while only the code changes.
COPY pyproject.toml README.md /src/
RUN python -c "import tomllib; p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; print(*p['dependencies'], *p['optional-dependencies']['site'], sep='\n')" >/tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY concord_protocol /src/concord_protocol
COPY site_node /src/site_node
COPY policies /src/policies
# The policies install as data files to /opt/concord/share/policies.
RUN pip install --no-deps /src

FROM ${BASE_IMAGE}

RUN groupadd --gid 10001 concord \
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
# The chart sets the command of every container; this default runs the agent.
CMD ["site-node", "run"]
