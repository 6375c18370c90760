#!/usr/bin/env bash
# Dropline's tests, in two tiers.
#
# The fast tier needs no service: every crate's unit tests and the
# in-process tests that reach nothing outside the process (FAST_TESTS). It
# runs first, so a broken build or a failed check stops the run before any
# service is touched. `scripts/test.sh --fast` runs it alone (and passes the
# rest of its arguments to cargo).
#
# The integration tier then brings up Redis, a local Redis Cluster, MariaDB
# and the broker if they are not running (and installs Prometheus for its
# tools, and Chromium with chromedriver for the waiting-room page's test),
# checks the alert rules, renders and validates the Kubernetes overlays and
# lints the Dockerfile (scripts/k8s.sh check), builds the binaries (the
# monitoring test runs them as processes), runs a short k6 drop with its
# invariant check, then runs every test in the workspace against the real
# services (the fast ones again, in seconds), and last the Redis suites
# again on the Redis Cluster.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$DROPLINE_ROOT"

# Test targets outside the crates' libraries that need no service.
FAST_TESTS=(--test refusals --test server --test captures)

if [ "${1:-}" = --fast ]; then
  shift
  exec cargo test --workspace --locked --lib "${FAST_TESTS[@]}" "$@"
fi
cargo test --workspace --locked --lib "${FAST_TESTS[@]}"

ensure_infra
ensure_redis_cluster
ensure_promtool
ensure_chromium
promtool check rules monitoring/prometheus/rules.yml
promtool check config monitoring/prometheus/prometheus.yml
(cd monitoring/prometheus && promtool test rules rules_test.yml)
scripts/k8s.sh check
cargo build --workspace --bins --locked

# A short k6 drop against the debug build: its outcome thresholds (no
# failed request, every accepted purchase decided) and the invariant check
# after it (loadtest/drop.js; the full scenarios, with their latency SLOs,
# run on demand against the release build).
trap 'DROPLINE_PROFILE=debug scripts/stack.sh stop-services' EXIT
DROPLINE_PROFILE=debug scripts/loadtest.sh drop -e TICKETS=200 -e PEAK_RATE=60 -e RAMP=3s -e HOLD=7s -e HOLD_TTL_SECS=3 \
  -e LATENCY_SLOS=off
DROPLINE_PROFILE=debug scripts/stack.sh stop-services
trap - EXIT

# A failing test's panic message (which names its file and line) stays
# near the end of the output, above the list of failures, where a short
# excerpt of a CI log still shows it; a backtrace would push it out. DROPLINE_TEST_BACKTRACE=1 brings them back.
RUST_BACKTRACE=${DROPLINE_TEST_BACKTRACE:-0} cargo test --workspace --locked "$@"

# The suites that use Redis, on the local Redis Cluster: the ledger's
# scripts, the ingress's rooms and API, and whole drops through every stage.
# A script or transaction whose keys span two hash slots fails here.
DROPLINE_REDIS_CLUSTER=true DROPLINE_REDIS_URL=redis://127.0.0.1:$REDIS_CLUSTER_PORT \
  RUST_BACKTRACE=${DROPLINE_TEST_BACKTRACE:-0} cargo test --locked -p dropline -p dropline-ingress -p dropctl \
  --test ledger --test rooms --test api --test pipeline "$@"
