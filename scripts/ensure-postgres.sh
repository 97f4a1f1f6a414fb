#!/usr/bin/env bash
# Make sure the PostgreSQL server the tests use answers at 127.0.0.1:5432 (trust auth).
# Starts the local cluster if it is installed but down; installs and starts one if absent.
set -euo pipefail

ready() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }

if command -v pg_isready >/dev/null && ready; then
  exit 0
fi
echo "PostgreSQL does not answer at 127.0.0.1:5432; trying to start it" >&2
if ! command -v pg_ctlcluster >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "PostgreSQL is not installed and this is not root: install postgresql, or point" \
         "CONCORD_TEST_POSTGRES_URL at a server" >&2
    exit 1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
version=$(ls /etc/postgresql | sort -V | tail -1)
conf=/etc/postgresql/$version/main
# Trust auth on loopback for the test tier (this is a throwaway test server).
if ! grep -q "concord-test" "$conf/pg_hba.conf"; then
  sed -i '1i host all all 127.0.0.1/32 trust # concord-test' "$conf/pg_hba.conf"
fi
pg_ctlcluster --skip-systemctl-redirect "$version" main start || pg_ctlcluster "$version" main start
for _ in $(seq 1 30); do ready && exit 0; sleep 1; done
echo "PostgreSQL did not come up" >&2
exit 1
