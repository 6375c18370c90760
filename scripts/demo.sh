#!/usr/bin/env bash
# The flash-sale demo: brings up the local stack, starts Dropline, opens a
# sale, floods it with more buyers than tickets, lets some pay, some cancel
# and some walk away, waits for the expiries, and checks the books against
# MySQL and Redis. Extra arguments go to `dropctl demo` (see --help).
#
# The services are stopped at the end (set DROPLINE_KEEP=1 to keep them);
# the stores and the broker stay up for the next run.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

"$DROPLINE_ROOT/scripts/stack.sh" up
if [ "${DROPLINE_KEEP:-0}" != 1 ]; then
  trap '"$DROPLINE_ROOT/scripts/stack.sh" stop-services' EXIT
fi
load_secrets
stack_addresses
# The check compares the refunds made with the provider's own.
"$TARGET_DIR/release/dropctl" demo --payment-provider-url "http://$PAYSIM_ADDR" "$@"
