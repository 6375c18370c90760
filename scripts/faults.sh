#!/usr/bin/env bash
# The fault-injection harness, full version: for each scenario (kill -9 of
# each service mid-drop, a Redis flush, a Redis restart on its append-only
# file, a Redis failover that loses its recent writes, a broker restart on
# durable storage, a MariaDB crash and restart) it
# runs a drop with its own Redis and broker (and, for the MariaDB crash, its
# own MariaDB server), injects the fault, waits for quiescence and prints the
# table of invariants. CI runs the same scenarios with a smaller drop.
#
#   scripts/faults.sh [scale]      (default 8: 200 tickets, 600 buyers)
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ensure_infra
cd "$DROPLINE_ROOT"
cargo build --workspace --bins --locked
DROPLINE_FAULTS_SCALE=${1:-8} cargo test -p dropctl --test faults --locked -- --nocapture --test-threads=1 2>&1 \
  | grep -E '^(test |  \[|[a-z0-9-]+: invariants|test result|thread .* panicked)'
