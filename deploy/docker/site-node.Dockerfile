# Concord site-node image: the site agent (`site-node run`) and the Flower SuperNode
# (`site-node supernode`, the guarded ClientApp runner in front of `flower-supernode`).
# Built from the site extra (`concord[site]`, locked in requirements/site.lock, torch as the
# CPU build): no consortium-server code. Build from the repository root:
#   docker build -f deploy/docker/site-node.Dockerfile -t concord-site-node:0.1.0 .
# BASE_IMAGE: pin it by digest for a release build (docs/images.md), e.g.
#   --build-arg BASE_IMAGE=python:3.11.11-slim-bookworm@sha256:<digest>
# scripts/build-images.sh builds on a local Debian bookworm base where Docker Hub is
# unreachable; the default is the public image.
ARG BASE_IMAGE=python:3.11.11-slim-bookworm
FROM ${BASE_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/concord
ENV PATH=/opt/concord/bin:$PATH
# The lock pins torch==2.13.0+cpu with the CPU wheel's hash; PyPI has no +cpu build, so
# TORCH_PIP_ARGS says where it is (default: the PyTorch CPU index; scripts/build-images.sh: a
# local wheel directory). The hash stops any other torch (e.g. a multi-GB CUDA build).
# PIP_CERT (a TLS-inspecting proxy's CA) and PIP_INDEX_URL (a mirror) are unset unless given.
ARG TORCH_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
ARG PIP_CERT
ARG PIP_INDEX_URL
# Every dependency, pinned and hash-checked, from the lock (scripts/lock-images.sh: pyproject's
# shared list, the site extra and the build backend); wheels only, nothing resolved here.
# Its own layer, kept while only the code changes.
COPY requirements/site.lock /src/requirements/site.lock
RUN pip install --require-hashes --no-deps --only-binary :all: -r /src/requirements/site.lock ${TORCH_PIP_ARGS}
COPY pyproject.toml README.md /src/
COPY concord_protocol /src/concord_protocol
COPY site_node /src/site_node
COPY policies /src/policies
# The project itself, with the locked setuptools (no build isolation: nothing unhashed is
# fetched); `pip check`: the lock holds every dependency. The policies install as data files
# to /opt/concord/share/policies.
RUN pip install --no-deps --no-build-isolation /src && pip check

FROM ${BASE_IMAGE}

# tini is PID 1: `site-node supernode` starts the executor and the warm ClientApp runner,
# then execs flower-supernode, which starts ClientApp processes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
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
# tini reaps orphaned children and, with -g, forwards SIGTERM to the whole process group.
# A Kubernetes `command:` replaces the ENTRYPOINT: the chart must start with tini -g -- too.
ENTRYPOINT ["/usr/bin/tini", "-g", "--"]
# The chart sets the command of every container; this default runs the agent.
CMD ["site-node", "run"]
