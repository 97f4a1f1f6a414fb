#!/usr/bin/env bash
# Make sure Debian's tini is installed: the images run it as PID 1 and the charts' long-running
# containers start with `tini -g --`, so the deployment tests (tests/deploy/test_deployment.py,
# test_wiring.py), which run the rendered commands as local processes, need it too.
set -euo pipefail

command -v tini >/dev/null && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "tini is missing and this is not root: install it with apt-get install tini" >&2
  exit 1
fi
echo "Installing tini (Debian package) for the deployment tests" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tini >/dev/null
command -v tini >/dev/null
