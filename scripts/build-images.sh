#!/usr/bin/env bash
# Build the two Concord images (deploy/docker/*.Dockerfile) without a Docker engine, with
# buildah (chroot isolation, as root), and leave them in the local containers storage where
# `podman run` finds them; then write each image's SBOM (CycloneDX JSON). Idempotent:
# installs its Debian tools if missing, caches the base rootfs under .cache/images;
# buildah's layer cache keeps the dependency layers, so a re-run only reinstalls changed
# code (seconds when nothing changed).
#
# The Python dependencies come from the hash-checked locks in requirements/ (written by
# scripts/lock-images.sh); docs/images.md describes the images.
#
# Where a registry is reachable, CONCORD_BASE_IMAGE=python:3.11.11-slim-bookworm@sha256:...
# builds on the real public base, pinned by digest (docs/images.md says how to find it).
# Otherwise (the default here: no Docker Hub) the base is a Debian bookworm rootfs made with
# debootstrap, with Debian's python3.11.
#
# Environment:
#   CONCORD_BASE_IMAGE    base image to build on: NAME[:TAG]@sha256:DIGEST (pinned) or
#                         NAME:TAG (pulled, then pinned to the digest it resolved to, with a
#                         warning); empty: the local debootstrapped one.
#   CONCORD_REQUIRE_BASE_DIGEST  1: refuse a CONCORD_BASE_IMAGE without @sha256:DIGEST.
#   CONCORD_IMAGE_TAG     tag of the images (default: the version in pyproject.toml).
#   CONCORD_IMAGE_CACHE   where the base rootfs tarball, the SBOM tool and (by default) the
#                         SBOMs are kept (default .cache/images).
#   CONCORD_SBOM_DIR      where the SBOMs are written (default: CONCORD_IMAGE_CACHE), as
#                         concord-server.cdx.json and concord-site-node.cdx.json.
#   CONCORD_TORCH_WHEELS  directory holding the torch==2.13.0+cpu wheel, mounted into the
#                         build; "auto" (default): /opt/wheels when it holds one, otherwise
#                         pip uses the PyTorch CPU index (the Dockerfiles' default).
#   CONCORD_BUILD_CA      CA bundle pip inside the build must trust (a TLS-inspecting proxy);
#                         default: the host's pip `cert` setting (PIP_CERT or pip config), if any.
#   DEBIAN_MIRROR         mirror for debootstrap (default http://deb.debian.org/debian).
# Prints one line per image: name, id, size and sbom=<path of its SBOM>.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${CONCORD_IMAGE_CACHE:-$ROOT/.cache/images}
TAG=${CONCORD_IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml" | head -1)}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOCAL_BASE=localhost/concord-base:bookworm
BASE=${CONCORD_BASE_IMAGE:-}
BASE_DIGEST=""
SBOM_DIR=${CONCORD_SBOM_DIR:-$CACHE}
TORCH_WHEELS=${CONCORD_TORCH_WHEELS:-auto}
# python:3.11-slim-bookworm has `python` and venv; Debian's python3.11 needs these packages.
BASE_PACKAGES=python3,python3-venv,python-is-python3,ca-certificates

log() { echo "build-images: $*" >&2; }

# As the tests run the images: runc with lowered rlimits (without CAP_SYS_RESOURCE neither
# runtime can raise podman's default rlimits, and crun refuses hybrid cgroups).
PODMAN_RUN=(podman run --rm --runtime runc --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)

# CONCORD_BASE_IMAGE: NAME[:TAG]@sha256:<64 hex> is pinned; anything else with an @ is refused.
check_base() {
  [ -z "$BASE" ] && return 0
  if [[ $BASE == *@* ]]; then
    if [[ ! $BASE =~ @sha256:[0-9a-f]{64}$ ]]; then
      echo "build-images: CONCORD_BASE_IMAGE=$BASE: the digest must be @sha256:<64 hex digits>" >&2
      exit 2
    fi
    BASE_DIGEST=${BASE##*@}
  elif [ "${CONCORD_REQUIRE_BASE_DIGEST:-0}" = 1 ]; then
    echo "build-images: CONCORD_BASE_IMAGE=$BASE has no digest and" \
         "CONCORD_REQUIRE_BASE_DIGEST=1: use $BASE@sha256:<digest> (docs/images.md)" >&2
    exit 2
  fi
}

# A base given by tag only (the local one included): pull it once and build both images on
# the digest it resolved to (both stages of both images then start from the same bytes).
pin_base() {
  [ -n "$BASE_DIGEST" ] && return 0
  if [ "$BASE" = "$LOCAL_BASE" ]; then
    BASE_DIGEST=$(podman image inspect --format '{{.Digest}}' "$LOCAL_BASE")
    BASE=$LOCAL_BASE@$BASE_DIGEST
    return 0
  fi
  log "pulling $BASE (not pinned by digest)"
  buildah pull --quiet "$BASE" >/dev/null
  BASE_DIGEST=$(podman image inspect --format '{{.Digest}}' "$BASE")
  log "WARNING: $BASE is not pinned; building on $BASE_DIGEST." \
      "Pin it: CONCORD_BASE_IMAGE=${BASE%@*}@$BASE_DIGEST"
  BASE=$BASE@$BASE_DIGEST
}

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
  BUILD_CA=""
  if [ -n "$ca" ] && [ -s "$ca" ]; then
    BUILD_CA=$ca
    CA_BUILD_ARGS=(-v "$ca:$MOUNT/ca.crt:ro" --build-arg "PIP_CERT=$MOUNT/ca.crt")
  fi
}

build() {
  local name=$1
  log "building localhost/concord-$name:$TAG"
  buildah bud --isolation chroot --layers --network host \
    -f "$ROOT/deploy/docker/$name.Dockerfile" \
    --build-arg "BASE_IMAGE=$BASE" \
    --label "org.opencontainers.image.version=$TAG" \
    --label "org.opencontainers.image.base.name=$BASE" \
    --label "org.opencontainers.image.base.digest=$BASE_DIGEST" \
    "${TORCH_BUILD_ARGS[@]}" "${CA_BUILD_ARGS[@]}" \
    -t "localhost/concord-$name:$TAG" "$ROOT" >&2
}

# The SBOM tool (cyclonedx-bom, hash-checked from requirements/sbom-tool.lock) is installed by
# the server image's own pip and Python into a cache directory (keyed by the lock), which is
# mounted read-only when each image writes its SBOM: it is in no image.
ensure_sbom_tool() {
  local lock=$ROOT/requirements/sbom-tool.lock
  SBOM_TOOL=$CACHE/sbom-tool-$(sha256sum "$lock" | cut -c1-16)
  [ -f "$SBOM_TOOL/.complete" ] && return 0
  log "installing the SBOM tool (requirements/sbom-tool.lock) into $SBOM_TOOL"
  rm -rf "$SBOM_TOOL" "$SBOM_TOOL.tmp"
  mkdir -p "$SBOM_TOOL.tmp"
  local ca=() index=()
  if [ -n "$BUILD_CA" ]; then ca=(-v "$BUILD_CA:$MOUNT/ca.crt:ro" -e "PIP_CERT=$MOUNT/ca.crt"); fi
  if [ -n "${PIP_INDEX_URL:-}" ]; then index=(-e "PIP_INDEX_URL=$PIP_INDEX_URL"); fi
  "${PODMAN_RUN[@]}" --network host --user 0:0 "${ca[@]}" "${index[@]}" \
    -e PIP_DISABLE_PIP_VERSION_CHECK=1 -e PIP_NO_CACHE_DIR=1 \
    -v "$lock:/tmp/sbom-tool.lock:ro" -v "$SBOM_TOOL.tmp:/tmp/sbom-tool" \
    "localhost/concord-server:$TAG" python -m pip install --quiet --require-hashes --no-deps \
    --only-binary :all: --target /tmp/sbom-tool -r /tmp/sbom-tool.lock >&2
  touch "$SBOM_TOOL.tmp/.complete"
  mv "$SBOM_TOOL.tmp" "$SBOM_TOOL"
}

# sbom NAME: write $SBOM_DIR/concord-NAME.cdx.json from inside the image (deploy/docker/sbom.py).
sbom() {
  local name=concord-$1 image=localhost/concord-$1:$TAG
  local out=$SBOM_DIR/$name.cdx.json id created
  id=$(podman image inspect --format '{{.Id}}' "$image")
  created=$(podman image inspect --format '{{.Created.Unix}}' "$image")
  SBOMS[$1]=$out
  # Kept when neither the image nor the way it is described changed.
  local key
  key="$id $BASE $(cat "$ROOT/deploy/docker/sbom.py" "$ROOT/requirements/sbom-tool.lock" | sha256sum)"
  if [ -s "$out" ] && [ "$(cat "$out.key" 2>/dev/null)" = "$key" ]; then
    log "the SBOM of $image is up to date"
    return 0
  fi
  log "writing the SBOM of $image"
  mkdir -p "$SBOM_DIR"
  "${PODMAN_RUN[@]}" --network none --read-only -e "SOURCE_DATE_EPOCH=$created" \
    -v "$SBOM_TOOL:/tmp/sbom-tool:ro" -v "$ROOT/deploy/docker/sbom.py:/tmp/sbom.py:ro" \
    "$image" python /tmp/sbom.py /tmp/sbom-tool "$name" "$TAG" \
    "sha256:$id" "$BASE" "$BASE_DIGEST" >"$out.tmp"
  mv "$out.tmp" "$out"
  echo "$key" >"$out.key"
}

check_base
ensure_tools
if [ -z "$BASE" ]; then
  ensure_local_base
  BASE=$LOCAL_BASE
fi
pin_base
torch_args
ca_args
build server
build site-node
ensure_sbom_tool
declare -A SBOMS
for name in server site-node; do sbom "$name"; done
for name in server site-node; do
  podman image inspect --format "{{index .RepoTags 0}} {{.Id}} {{.Size}}" \
    "localhost/concord-$name:$TAG" |
    awk -v sbom="${SBOMS[$name]}" '{ printf "%s %s %.0f MB sbom=%s\n", $1, substr($2, 1, 12), $3 / 1e6, sbom }'
done
