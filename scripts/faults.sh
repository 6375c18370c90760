#!/usr/bin/env bash
# The fault-injection harness, full version: for each scenario (kill -9 of
# each stage mid-drop, a Redis flush, a Redis restart on its append-only
# file, a Redis failover that loses its recent writes, a Redis Cluster
# primary killed and its replica promoted, a broker restart on durable
# storage, a MariaDB crash and restart, and three drops at once through 2
# ingresses, 3 allocators, 2 settlers and 2 expirers while instances leave
# and join) it
# runs a drop with its own Redis and broker (and, for the MariaDB crash, its
# own MariaDB server), injects the fault, waits for quiescence and prints the
# table of invariants. Then the README's recovery steps, each on a local
# stack of its own (scripts/stack.sh) running the release binaries, as a
# drop would: kill -9 of the consumers and `up` (or `down` then `up`), and
# the default k6 drop (2,000 tickets, 800 purchases a second) through a
# settler's and an ingress's kill -9 and `up`. CI runs the same scenarios with a smaller
# drop on the test build.
#
#   scripts/faults.sh [scale]      (default 8: 200 tickets, 600 buyers)
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ensure_infra
cd "$DROPLINE_ROOT"
cargo build --workspace --bins --locked
cargo build --release --bins --locked
only_results() { grep -E '^(test |  \[|[a-z0-9-]+: invariants|scenario |verdict: |test result|thread .* panicked)'; }
DROPLINE_FAULTS_SCALE=${1:-8} cargo test -p dropctl --test faults --locked -- --nocapture --test-threads=1 2>&1 | only_results
DROPLINE_FAULTS_SCALE=${1:-8} DROPLINE_PROFILE=release cargo test -p dropctl --test recovery --locked -- --nocapture 2>&1 \
  | only_results
