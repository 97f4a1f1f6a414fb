#!/usr/bin/env bash
# Build the two Concord images (deploy/docker/*.Dockerfile) without a Docker engine, with
# buildah (chroot isolation, as root), and leave them in the local containers storage where
# `podman run` finds them. Idempotent: installs its Debian tools if missing, caches the base
# rootfs under .cache/images; buildah's layer cache keeps the dependency layers, so a re-run
# only reinstalls changed code (seconds when nothing changed).
#
# Where a registry is reachable, CONCORD_BASE_IMAGE=python:3.11.11-slim-bookworm builds on
# the real public base (the Dockerfiles' default). Otherwise (the default here: no Docker
# Hub) the base is a Debian bookworm rootfs made with debootstrap, with Debian's python3.11.
#
# Environment:
#   CONCORD_BASE_IMAGE    base image to build on; empty: the local debootstrapped one.
#   CONCORD_IMAGE_TAG     tag of the images (default: the version in pyproject.toml).
#   CONCORD_IMAGE_CACHE   where the base rootfs tarball is cached (default .cache/images).
#   CONCORD_TORCH_WHEELS  directory holding the torch==2.13.0 CPU wheel, mounted into the
#                         build; "auto" (default): /opt/wheels when it holds one, otherwise
#                         pip uses the PyTorch CPU index (the Dockerfiles' default).
#   CONCORD_BUILD_CA      CA bundle pip inside the build must trust (a TLS-inspecting proxy);
#                         default: the host's pip `cert` setting (PIP_CERT or pip config), if any.
#   DEBIAN_MIRROR         mirror for debootstrap (default http://deb.debian.org/debian).
# Prints one line per image: name, id and size.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${CONCORD_IMAGE_CACHE:-$ROOT/.cache/images}
TAG=${CONCORD_IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -1)}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOCAL_BASE=localhost/concord-base:bookworm
BASE=${CONCORD_BASE_IMAGE:-}
TORCH_WHEELS=${CONCORD_TORCH_WHEELS:-auto}
# python:3.11-slim-bookworm has `python` and venv; Debian's python3.11 needs these packages.
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates

log() { echo "build-images: $*" >&2; }

ensure_tools() {
  local missing=()
  command -v buildah >/dev/null || missing+=(buildah)
  command -v podman >/dev/null || missing+=(podman)
  command -v runc >/dev/null || missing+=(runc)
  if [ -z "$BASE" ] && ! command -v debootstrap >/dev/null; then missing+=(debootstrap); fi
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "build-images: missing ${missing[*]}; install them (Debian/Ubuntu: apt-get install" \
         "${missing[*]}) or run this as root on Debian" >&2
    exit 1
  fi
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The local stand-in for python:3.11-slim-bookworm: debootstrap (minbase) + python3.11.
ensure_local_base() {
  if podman image exists "$LOCAL_BASE"; then
    return 0
  fi
  local tarball=$CACHE/bookworm-rootfs.tar
  if [ ! -s "$tarball" ]; then
    mkdir -p "$CACHE"
    local rootfs=$CACHE/rootfs.tmp
    rm -rf "$rootfs"
    log "debootstrap bookworm from $MIRROR (about a minute)"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$rootfs" "$MIRROR" \
      >"$CACHE/debootstrap.log" 2>&1 || {
      tail -n 20 "$CACHE/debootstrap.log" >&2
      exit 1
    }
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
      "$rootfs"/var/log/*.log
    tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$rootfs"
  fi
  log "importing $tarball as $LOCAL_BASE"
  podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$tarball" "$LOCAL_BASE" >/dev/null
}

# Build-only inputs are bind-mounted under /tmp/concord-build for the RUN steps; they are in no
# layer (only their empty mount points, under /tmp, which the charts cover with an emptyDir).
MOUNT=/tmp/concord-build

torch_args() {
  local dir=$TORCH_WHEELS
  if [ "$dir" = auto ]; then
    dir=""
    if compgen -G "/opt/wheels/torch-2.13.0*.whl" >/dev/null; then dir=/opt/wheels; fi
  fi
  TORCH_BUILD_ARGS=()
  if [ -n "$dir" ]; then
    # torch==2.13.0 then matches the local 2.13.0+cpu wheel; its dependencies come from PyPI.
    TORCH_BUILD_ARGS=(-v "$dir:$MOUNT/wheels:ro" --build-arg "TORCH_PIP_ARGS=--find-links $MOUNT/wheels")
  fi
}

# pip inside the build trusts what the host's pip trusts (a TLS-inspecting proxy's CA).
ca_args() {
  local ca=${CONCORD_BUILD_CA:-${PIP_CERT:-}}
  if [ -z "$ca" ] && command -v pip >/dev/null; then
    ca=$(pip config get global.cert 2>/dev/null || true)
  fi
  CA_BUILD_ARGS=()
  if [ -n "$ca" ] && [ -s "$ca" ]; then
    CA_BUILD_ARGS=(-v "$ca:$MOUNT/ca.crt:ro" --build-arg "PIP_CERT=$MOUNT/ca.crt")
  fi
}

build() {
  local name=$1
  log "building localhost/concord-$name:$TAG"
  buildah bud --isolation chroot --layers --network host \
    -f "$ROOT/deploy/docker/$name.Dockerfile" \
    --build-arg "BASE_IMAGE=$BASE" \
    "${TORCH_BUILD_ARGS[@]}" "${CA_BUILD_ARGS[@]}" \
    -t "localhost/concord-$name:$TAG" "$ROOT" >&2
}

ensure_tools
if [ -z "$BASE" ]; then
  ensure_local_base
  BASE=$LOCAL_BASE
fi
torch_args
ca_args
build server
build site-node
for name in server site-node; do
  podman image inspect --format "{{index .RepoTags 0}} {{.Id}} {{.Size}}" \
    "localhost/concord-$name:$TAG" |
    awk '{ printf "%s %s %.0f MB\n", $1, substr($2, 1, 12), $3 / 1e6 }'
done
