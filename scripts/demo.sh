#!/usr/bin/env bash
# Interim demo (until `consortium demo` runs the federated study): start the consortium
# server on the embedded defaults, enrol three hospitals with real keys, publish their
# datasets, submit a study as a researcher and approve it as each site's data steward,
# all through the CLIs. Starts from a clean state every run.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=.concord/demo
PORT=${CONCORD_DEMO_PORT:-8600}
export CONCORD_DATA_DIR="$STATE/server"
export CONCORD_API__PORT="$PORT"
export CONCORD_API_URL="http://127.0.0.1:$PORT"
export CONCORD_LOG_JSON=true
export CONCORD_POLICY__MEMBER_ORGANISATIONS='["University of Leiden"]'

rm -rf "$STATE" && mkdir -p "$STATE"
step() { printf '\n\033[1;36m== %s\033[0m\n' "$*"; }

step "1. Start the consortium server (SQLite, local issuer) on port $PORT"
consortium server >"$STATE/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do
  curl -fsS "$CONCORD_API_URL/readyz" >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { cat "$STATE/server.log"; echo "server failed to start"; exit 1; }
  sleep 0.5
done
curl -fsS "$CONCORD_API_URL/readyz"; echo

token() { consortium token --user "$1" --role "$2" --org "$3"; }
ADMIN=$(token olga-operator consortium_admin "Consortium office")
RESEARCHER=$(token rita-researcher researcher "University of Leiden")

step "2. Enrol three hospitals (keys made by site-node; only public keys leave)"
for s in a b c; do
  keys="$STATE/sites/hospital-$s/keys"
  site-node keys init --dir "$keys"
  site-node keys enrolment --dir "$keys" --site-id "hospital-$s" \
    --organisation "Hospital $s" --contact "it@hospital-$s.example.org" >"$STATE/enrol-$s.yaml"
  consortium --token "$ADMIN" site enrol "$STATE/enrol-$s.yaml"
done
consortium --token "$ADMIN" site list

step "3. Each hospital's data steward publishes its dataset to the catalogue"
for s in a b c; do
  sed -e "s/hospital-a/hospital-$s/g; s/Hospital A/Hospital $(echo $s | tr a-z A-Z)/" \
    docs/examples/dataset.yaml >"$STATE/dataset-$s.yaml"
  consortium --token "$(token steward-$s data_steward "Hospital $s")" \
    catalogue publish "$STATE/dataset-$s.yaml"
done
consortium --token "$RESEARCHER" catalogue list

step "4. A researcher dry-runs the study against the data-use policies, then submits it"
consortium --token "$RESEARCHER" policy check docs/examples/study.yaml
STUDY=$(consortium --json --token "$RESEARCHER" study submit docs/examples/study.yaml \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
consortium --token "$RESEARCHER" study status "$STUDY"

step "5. Each site's data steward approves the exact contract hash"
for s in a b c; do
  consortium --token "$(token steward-$s data_steward "Hospital $s")" \
    study approve "$STUDY" --site "hospital-$s" --yes --reason "Approved by the data access committee"
done

step "6. The study is approved: its epsilon is reserved on every dataset"
consortium --token "$RESEARCHER" study status "$STUDY"
state=$(consortium --json --token "$RESEARCHER" study status "$STUDY" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
[ "$state" = approved ] || { echo "expected approved, got $state"; exit 1; }
COMPLIANCE=$(token carla-compliance compliance_officer "Consortium office")
consortium --token "$COMPLIANCE" budget show bc-hospital-a

step "7. A compliance officer verifies the audit log end to end"
consortium --token "$COMPLIANCE" audit verify
echo
echo "Server log: $STATE/server.log   State: $STATE"
