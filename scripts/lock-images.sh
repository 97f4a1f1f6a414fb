#!/usr/bin/env bash
# Regenerate the images' lock files (requirements/*.lock) from pyproject.toml, with the
# sha256 of every distribution, for `pip install --require-hashes --no-deps` in
# deploy/docker/*.Dockerfile:
#   requirements/server.lock  pyproject's shared dependencies + the `server` extra (no torch)
#   requirements/site.lock    pyproject's shared dependencies + the `site` extra, with torch as
#                             the CPU build (torch==<pin>+cpu, the hash of the CPU wheel)
#   requirements/sbom-tool.lock  cyclonedx-bom, which scripts/build-images.sh runs in each
#                             built image to write its SBOM (not installed in any image)
# Both image locks also hold pyproject's [build-system] requires (setuptools): the project
# itself installs with --no-build-isolation, so the build backend is hash-checked as well.
#
# Resolved with uv (pinned below, installed into a throwaway venv under .cache/, never into
# .venv) for CPython 3.11 on x86_64 Linux (manylinux_2_28, the torch CPU wheel's platform),
# wheels only. Versions already in a lock are kept unless --upgrade is given (or a new
# pyproject specifier excludes them). Needs the package index (network).
#
# torch: PyPI's torch 2.13.0 for Linux is the CUDA build (it pulls the nvidia-* packages).
# The CPU build is `2.13.0+cpu` on the PyTorch CPU index; the lock pins that local version
# with the hash of that one wheel (from CONCORD_TORCH_WHEELS when it holds it, else from the
# PyTorch CPU index), so no PyPI hash conflicts with it and pip can only install the CPU wheel.
#
# Usage: scripts/lock-images.sh [--check] [--upgrade]
#   --check    write nothing; exit 1 when a lock differs from what would be written now
#   --upgrade  re-resolve every package to the newest version allowed (default: keep pins)
# Environment:
#   CONCORD_LOCK_INDEX_URL  package index (default https://pypi.org/simple: the hashes are
#                           PyPI's; a mirror serving the same files gives the same lock)
#   CONCORD_TORCH_WHEELS    directory holding torch-<pin>+cpu-cp311-*.whl (default /opt/wheels);
#                           without it, https://download.pytorch.org/whl/cpu is used
#   CONCORD_LOCK_TOOLS      the throwaway venv for uv (default .cache/lock-tools)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
UV_VERSION=0.12.24
SBOM_TOOL=cyclonedx-bom==7.5.0
INDEX_URL=${CONCORD_LOCK_INDEX_URL:-https://pypi.org/simple}
TORCH_WHEELS=${CONCORD_TORCH_WHEELS:-/opt/wheels}
TOOLS=${CONCORD_LOCK_TOOLS:-$ROOT/.cache/lock-tools}
PYTHON=${PYTHON:-python3}
CHECK=0
UPGRADE=()
for arg in "$@"; do
  case $arg in
    --check) CHECK=1 ;;
    --upgrade) UPGRADE=(--upgrade) ;;
    *) echo "usage: $0 [--check] [--upgrade]" >&2; exit 2 ;;
  esac
done

log() { echo "lock-images: $*" >&2; }

if [ ! -x "$TOOLS/bin/uv" ] || [ "$("$TOOLS/bin/uv" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  log "installing uv $UV_VERSION into $TOOLS"
  rm -rf "$TOOLS"
  "$PYTHON" -m venv "$TOOLS"
  "$TOOLS/bin/pip" install --quiet "uv==$UV_VERSION"
fi
UV=$TOOLS/bin/uv

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# The extra inputs, named so that the locks' "# via" notes say where a pin comes from.
"$PYTHON" - "$ROOT/pyproject.toml" "$WORK" <<'EOF'
import re
import sys
import tomllib
from pathlib import Path

pyproject = tomllib.loads(Path(sys.argv[1]).read_text())
work = Path(sys.argv[2])
(work / "build-system.in").write_text("\n".join(pyproject["build-system"]["requires"]) + "\n")
pins = [
    r for r in pyproject["project"]["optional-dependencies"]["site"] if re.match(r"torch\b", r)
]
match = re.fullmatch(r"torch\s*==\s*([0-9][0-9.]*)", pins[0]) if len(pins) == 1 else None
if match is None:
    sys.exit(f"lock-images: the site extra must pin torch exactly (torch==X.Y.Z), not {pins}")
(work / "torch-cpu.in").write_text(f"torch=={match[1]}+cpu\n")
EOF
TORCH_PIN=$(cat "$WORK/torch-cpu.in")
TORCH_SOURCE=(--find-links "$TORCH_WHEELS")
if ! compgen -G "$TORCH_WHEELS/torch-${TORCH_PIN#torch==}-cp311-*.whl" >/dev/null; then
  log "no ${TORCH_PIN#torch==} wheel in $TORCH_WHEELS: using the PyTorch CPU index"
  TORCH_SOURCE=(--extra-index-url https://download.pytorch.org/whl/cpu)
fi

mkdir -p "$ROOT/requirements"
header() {
  cat <<EOF
# $1
# Regenerate with scripts/lock-images.sh (checked against pyproject.toml by
# tests/deploy/test_images.py); install with
#   pip install --require-hashes --no-deps --only-binary :all: -r <this file>
# Resolved by uv for CPython 3.11, x86_64 manylinux_2_28, wheels only.
EOF
}

# compile NAME DESCRIPTION UV-ARGS...: requirements/NAME.lock
compile() {
  local name=$1 description=$2
  shift 2
  local target=$ROOT/requirements/$name.lock out=$WORK/$name.lock
  # The current pins are uv's preferences (kept unless --upgrade).
  if [ -f "$target" ]; then cp "$target" "$out"; fi
  (cd "$WORK" && "$UV" pip compile --no-config --quiet "$@" "${UPGRADE[@]}" \
    --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --only-binary :all: --index-url "$INDEX_URL" \
    --custom-compile-command scripts/lock-images.sh -o "$out.new")
  { header "$description"; cat "$out.new"; } >"$out"
  if [ "$CHECK" = 1 ]; then
    if ! cmp -s "$out" "$target"; then
      log "requirements/$name.lock is out of date (run scripts/lock-images.sh)"
      diff -u "$target" "$out" >&2 || true
      STALE=1
    fi
  else
    mv "$out" "$target"
    log "wrote requirements/$name.lock ($(grep -c '^[A-Za-z0-9]' "$target") packages)"
  fi
}

STALE=0
cp "$ROOT/pyproject.toml" "$WORK/pyproject.toml"
compile server "The consortium server image (deploy/docker/server.Dockerfile): concord[server]." \
  pyproject.toml build-system.in --extra server
compile site "The site-node image (deploy/docker/site-node.Dockerfile): concord[site], torch CPU." \
  pyproject.toml build-system.in torch-cpu.in --extra site "${TORCH_SOURCE[@]}"
echo "$SBOM_TOOL" >"$WORK/sbom-tool.in"
compile sbom-tool "The SBOM tool scripts/build-images.sh runs in each built image (in no image)." \
  sbom-tool.in
exit "$STALE"
