#!/usr/bin/env bash
# Dropline's tests: brings up Redis, MariaDB and the broker if they are not
# running (and installs Prometheus for its tools), checks the alert rules,
# builds the binaries the monitoring test runs as processes, then runs every
# test in the workspace against the real services.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ensure_infra
ensure_promtool
cd "$DROPLINE_ROOT"
promtool check rules monitoring/prometheus/rules.yml
promtool check config monitoring/prometheus/prometheus.yml
(cd monitoring/prometheus && promtool test rules rules_test.yml)
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
