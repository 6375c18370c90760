#!/usr/bin/env bash
# Dropline's tests: brings up Redis, MariaDB and the broker if they are not
# running, then runs every test in the workspace against them.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ensure_infra
cd "$DROPLINE_ROOT"
cargo test --workspace --locked "$@"
