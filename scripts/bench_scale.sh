#!/usr/bin/env bash
# How the allocator's and the settler's rates grow from one instance to
# three on this machine: part of scripts/bench.sh, which runs it on its own
# stack (broker in memory, memory-lossy) and puts the result in
# docs/PERFORMANCE.md and the sizing guide's inputs. It runs on whichever
# broker DROPLINE_KAFKA_BROKERS names, with the Redis on REDIS_PORT and the
# MariaDB on MYSQL_PORT, so it can also be run alone:
#
#   scripts/bench_scale.sh OUT_DIR [COUNTS]     (COUNTS default "1 3")
#
# SCALE_STAGES="settler" (or "allocator") measures one stage alone.
#
# Each run: N instances of the stage join one consumer group on fresh topics
# of DROPLINE_TOPIC_PARTITIONS partitions (6 by default) and wait until each
# holds partitions; then they are stopped (SIGSTOP), a backlog spread over
# 60 events (so over every partition) is loaded, and they are resumed
# (SIGCONT) together. The rate is the backlog over the time from the resume
# to its last effect: the instances' own rate, not the loader's, nor a
# rebalance's. Next to it, the batches the instances had to apply again
# (a deadlock, a lock wait timeout: from their logs). Writes
# OUT_DIR/scale.json.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$DROPLINE_ROOT"

OUT=${1:?usage: scripts/bench_scale.sh OUT_DIR [COUNTS]}
COUNTS=${2:-1 3}
STAGES=${SCALE_STAGES:-allocator settler}
BIN=$TARGET_DIR/release
EVENTS=60
INTENTS=${SCALE_INTENTS:-150000}
DECISIONS=${SCALE_DECISIONS:-60000}
MYSQL_SERVER=mysql://root@127.0.0.1:$MYSQL_PORT
OPS_BASE=${SCALE_OPS_PORT_BASE:-9250}
RUN=scale-$(date +%s)
mkdir -p "$OUT"

now_s() { python3 -c 'import time; print(time.time())'; }
ready() { curl -fsS --max-time 2 "http://127.0.0.1:$1/readyz" >/dev/null 2>&1; }
decisions() { # the decisions recorded under prefix $1, over every event
  for e in $(seq 1 "$EVENTS"); do echo "HLEN $1:{$e}:decisions"; done | redis-cli -p "$REDIS_PORT" \
    | awk '{ n += $1 } END { print n + 0 }'
}
orders() { mysql_tcp -N -e "SELECT COUNT(*) FROM \`$1\`.orders"; }
# warm_ledgers PREFIX: a ledger in Redis for each event, as a drop's
# pre-warm leaves it (without one, the settlers' reconcilers would rebuild
# every ledger from MySQL in the middle of the drain).
warm_ledgers() {
  for e in $(seq 1 "$EVENTS"); do
    redis-cli -p "$REDIS_PORT" HSET "$1:{$e}:stock" capacity 1000000000 available 1000000000 held 0 sold 0 \
      next_unit 1 limit 1000 ttl_ms 3600000 opens_ms 0 closes_ms 9999999999999 price 4500 retain_ms 9999999999999 >/dev/null
  done
}
measures() { case " $STAGES " in *" $1 "*) return 0 ;; esac; return 1; }

PIDS=()
stop_instances() {
  [ "${#PIDS[@]}" -gt 0 ] || return 0
  kill -CONT "${PIDS[@]}" 2>/dev/null || true
  kill -TERM "${PIDS[@]}" 2>/dev/null || true
  wait "${PIDS[@]}" 2>/dev/null || true
  PIDS=()
}
trap stop_instances EXIT

# timed STAGE NAME N TARGET COUNT-COMMAND LOAD-COMMAND BINARY [ENV...]: starts N
# instances of BINARY with ENV, each with its own ops port, as dynamic
# members of their group (tansu cannot keep several static ones apart) whose
# session outlasts the stop, waits until each is ready, stops them, loads,
# resumes them and times the drain to TARGET effects; appends {"stage",
# "instances", "count", "secs", "per_sec"} to $OUT/scale.jsonl. Not run in a
# subshell: the trap must see the instances it started.
timed() {
  local stage=$1 name=$2 n=$3 target=$4 count=$5 load=$6 binary=$7 i t0 done_at=
  shift 7
  for i in $(seq 1 "$n"); do
    env "$@" DROPLINE_OPS_ADDR="127.0.0.1:$((OPS_BASE + i))" DROPLINE_KAFKA_GROUP_INSTANCE_ID= \
      DROPLINE_KAFKA_SESSION_TIMEOUT_MS=60000 DROPLINE_LOG=warn "$BIN/$binary" >>"$OUT/$name.log" 2>&1 &
    PIDS+=($!)
  done
  for i in $(seq 1 "$n"); do wait_for "$name instance $i holding partitions" 120 ready "$((OPS_BASE + i))"; done
  kill -STOP "${PIDS[@]}"
  eval "$load" >/dev/null
  [ "$(eval "$count")" = 0 ] || die "$name: effects before the instances resumed"
  kill -CONT "${PIDS[@]}"
  t0=$(now_s)
  local deadline=$((SECONDS + 300))
  while [ "$(eval "$count")" -lt "$target" ]; do
    [ "$SECONDS" -lt "$deadline" ] || die "$name did not drain its backlog in 300 s (see ${OUT#"$DROPLINE_ROOT"/}/$name.log)"
    sleep 0.1
  done
  done_at=$(now_s)
  stop_instances
  local retries
  retries=$(grep -c 'applying a batch failed' "$OUT/$name.log" || true)
  python3 -c 'import json,sys; s,n,c,t0,t1=sys.argv[1],int(sys.argv[2]),int(sys.argv[3]),float(sys.argv[4]),float(sys.argv[5]);
r=int(sys.argv[6]);
print(json.dumps({"stage": s, "instances": n, "count": c, "secs": t1 - t0, "per_sec": c / (t1 - t0),
  "retried_batches": r}))' "$stage" "$n" "$target" "$t0" "$done_at" "$retries" >>"$OUT/scale.jsonl"
}

rm -f "$OUT/scale.jsonl"
for n in $COUNTS; do
  # The allocator: intents for 60 pre-warmed events.
  if measures allocator; then
    p=$RUN-alloc-$n
    warm_ledgers "$p"
    DROPLINE_TOPIC_PREFIX=$p "$BIN/dropctl" topics 2>/dev/null
    log "scale-out: $n allocator(s), $INTENTS intents over $EVENTS events"
    timed allocator "$p" "$n" "$INTENTS" "decisions $p" \
      "'$BIN/dropctl' ceiling produce --payload intent --event 1 --events $EVENTS --topic $p.intents --messages $INTENTS" \
      dropline-allocator DROPLINE_TOPIC_PREFIX="$p" DROPLINE_REDIS_KEY_PREFIX="$p" DROPLINE_ALLOCATOR_GROUP="$p"
    redis-cli -p "$REDIS_PORT" --scan --pattern "$p:*" | xargs -r -n 500 redis-cli -p "$REDIS_PORT" DEL >/dev/null
  fi

  # The settler: held decisions for 60 events on record.
  if measures settler; then
    p=$RUN-settle-$n
    db=dropline_${p//-/_}
    "$BIN/dropctl" migrate --mysql-url "$MYSQL_SERVER/$db" 2>/dev/null
    mysql_tcp "$db" -e "INSERT INTO events (id, name, venue, starts_at, sale_opens_at, sale_closes_at, capacity,
      price_cents, currency, per_user_limit, hold_ttl_secs) SELECT seq, 'bench', 'bench', UTC_TIMESTAMP() + INTERVAL 1 DAY,
      UTC_TIMESTAMP(), UTC_TIMESTAMP() + INTERVAL 1 DAY, 100000000, 4500, 'EUR', 1000, 600 FROM seq_1_to_$EVENTS"
    warm_ledgers "$p"
    DROPLINE_TOPIC_PREFIX=$p "$BIN/dropctl" topics 2>/dev/null
    log "scale-out: $n settler(s), $DECISIONS decisions over $EVENTS events"
    timed settler "$p" "$n" "$DECISIONS" "orders $db" \
      "'$BIN/dropctl' ceiling produce --payload decision --event 1 --events $EVENTS --topic $p.decisions --messages $DECISIONS" \
      dropline-settler DROPLINE_TOPIC_PREFIX="$p" DROPLINE_REDIS_KEY_PREFIX="$p" DROPLINE_SETTLER_GROUP="$p" \
      DROPLINE_MYSQL_URL="$MYSQL_SERVER/$db"
    mysql_tcp -e "DROP DATABASE \`$db\`"
    redis-cli -p "$REDIS_PORT" --scan --pattern "$p:*" | xargs -r -n 500 redis-cli -p "$REDIS_PORT" DEL >/dev/null
  fi
done
python3 -c 'import json,sys; print(json.dumps([json.loads(l) for l in open(sys.argv[1])], indent=1))' \
  "$OUT/scale.jsonl" >"$OUT/scale.json"
log "scale-out: ${OUT#"$DROPLINE_ROOT"/}/scale.json"
