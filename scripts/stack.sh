#!/usr/bin/env bash
# Dropline's local stack: Redis, MariaDB, the tansu broker, Dropline's five
# stages (ingress, allocator, settler, expirer, notifier), the payment
# simulator (paysim) and the host's webhook receiver (dropctl receive).
#
#   scripts/stack.sh up        stores + broker + Prometheus + schema + topics + services
#                              (DROPLINE_REDIS_CLUSTER=true: on a local Redis Cluster of
#                              six nodes, ports 7000-7005, instead of the one Redis;
#                              DROPLINE_STACK_SCALE="ingress=2 allocator=3 settler=2
#                              expirer=2": that many instances of those stages)
#   scripts/stack.sh infra     stores + broker only (what the tests need)
#   scripts/stack.sh status    what is running
#   scripts/stack.sh down      stop the services, Prometheus and the broker started here;
#                              every record is kept (broker log, MySQL, Redis)
#   scripts/stack.sh wipe      stop everything started here and delete what the
#                              local stack stored: the broker's log, the `dropline`
#                              database and the ledger's keys. Acknowledged
#                              purchases and payments are lost; it says so first.
#
# Every step reuses what already runs. Logs, pids and the broker's data go to
# .dropline/, and so do the signing secrets generated on the first `up`
# (secrets.env).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

stack_addresses
# tansu answers a waiting fetch at its deadline rather than when data
# arrives (measured: p99 intent-to-decision 500 ms at the 500 ms default,
# 100 ms at 10 ms), so the local stack polls the broker more often.
export DROPLINE_KAFKA_FETCH_WAIT_MAX_MS=${DROPLINE_KAFKA_FETCH_WAIT_MAX_MS:-10}
# DROPLINE_PROFILE=debug runs the debug binaries (CI's smoke load test
# reuses the test build instead of compiling again).
PROFILE=${DROPLINE_PROFILE:-release}
BIN=$TARGET_DIR/$PROFILE

# name, ops port: every service's /healthz, /readyz and /metrics.
OPS_PORT_BASE=${DROPLINE_OPS_PORT_BASE:-9100}
SERVICES="ingress:$OPS_PORT_BASE allocator:$((OPS_PORT_BASE + 1)) settler:$((OPS_PORT_BASE + 2)) expirer:$((OPS_PORT_BASE + 3)) notifier:$((OPS_PORT_BASE + 4))"

# Instances: DROPLINE_STACK_SCALE="ingress=2 allocator=3 settler=2 expirer=2
# notifier=1" runs that many of a stage (1 to 6 each; 1 when unnamed). The
# first is named after its stage (.dropline/allocator.pid, ops port as
# above); instance k after it is <stage>-k, with ops port base + 10 k + the
# stage's place (allocator-2: 9121), and an ingress-k listens on the
# ingress's port + k. The consumers of a stage share its group (as dynamic
# members, see below); the topics have 6 partitions
# (DROPLINE_TOPIC_PARTITIONS), enough for up to 6 consumers of a stage.
STAGES="ingress allocator settler expirer notifier"
scale_of() {
  local entry n=1
  for entry in ${DROPLINE_STACK_SCALE:-}; do [ "${entry%%=*}" != "$1" ] || n=${entry#*=}; done
  echo "$n"
}
# Checked before anything starts. A consumer beyond its topics' partitions
# would hold none and never be ready; six instances keep every ops port
# below the webhook receiver's (base + 80).
check_scale() {
  local entry most=6 partitions=${DROPLINE_TOPIC_PARTITIONS:-6}
  for entry in ${DROPLINE_STACK_SCALE:-}; do
    case " $STAGES " in *" ${entry%%=*} "*) ;; *) die "DROPLINE_STACK_SCALE: '$entry': no stage '${entry%%=*}' (stages: $STAGES)" ;; esac
    [[ ${entry#*=} =~ ^[1-6]$ ]] || die "DROPLINE_STACK_SCALE: '$entry': a stage runs 1 to $most instances"
    if [ "${entry%%=*}" != ingress ] && [ "${entry#*=}" -gt "$partitions" ]; then
      die "DROPLINE_STACK_SCALE: '$entry': more consumers than the topics' $partitions partitions (DROPLINE_TOPIC_PARTITIONS); the extra ones would hold none"
    fi
  done
}
# Whether a stage runs as several instances: by its scale, or by the
# instances of an earlier, larger `up` still on record (so a recovery from a
# shell without DROPLINE_STACK_SCALE keeps the group's membership as it is).
several() { [ "$(instances "$1" | wc -l)" -gt 1 ]; }
# The instance names of a stage: the configured ones, and any still running
# from an earlier `up` with a larger scale (so `down` stops them too).
instances() {
  local k n; n=$(scale_of "$1")
  echo "$1"
  for k in 1 2 3 4 5; do
    if [ "$k" -lt "$n" ] || [ -f "$STATE_DIR/$1-$k.pid" ]; then echo "$1-$k"; fi
  done
}
instance_index() { case $1 in *-[1-5]) echo "${1##*-}" ;; *) echo 0 ;; esac; }
stage_of() { echo "${1%-[1-5]}"; }
ops_port() {
  local s stage; stage=$(stage_of "$1")
  for s in $SERVICES; do
    if [ "${s%%:*}" = "$stage" ]; then echo $((${s##*:} + 10 * $(instance_index "$1"))); fi
  done
}
ingress_addr() { echo "${INGRESS_ADDR%:*}:$((${INGRESS_ADDR##*:} + $(instance_index "$1")))"; }
all_instances() { local stage; for stage in $STAGES; do instances "$stage"; done; }

build() {
  # Tests that drive this script build first and set DROPLINE_SKIP_BUILD=1
  # (a nested cargo would wait on the test's own build lock).
  [ -z "${DROPLINE_SKIP_BUILD:-}" ] || return 0
  log "building $PROFILE binaries"
  local flag=--release
  [ "$PROFILE" = release ] || flag=
  (cd "$DROPLINE_ROOT" && cargo build $flag --locked --bins >&2)
}

# A process killed with SIGKILL may linger as a zombie until it is reaped:
# that one is not running.
running() { [ -f "$STATE_DIR/$1.pid" ] && alive "$(cat "$STATE_DIR/$1.pid")"; }

start_one() {
  local name=$1; shift
  if running "$name"; then
    log "$name already running (pid $(cat "$STATE_DIR/$name.pid"))"
    return
  fi
  # shellcheck disable=SC2046 # the subcommand is one word or none
  env "$@" nohup "$BIN/$(binary "$name")" $(subcommand "$name") >>"$STATE_DIR/$name.log" 2>&1 &
  echo $! >"$STATE_DIR/$name.pid"
  log "$name started (pid $!, log .dropline/$name.log)"
}

binary() { case $1 in paysim) echo dropline-paysim ;; receiver) echo dropctl ;; *) echo "dropline-$(stage_of "$1")" ;; esac; }
subcommand() { [ "$1" != receiver ] || echo receive; }

ready() { curl -fsS --max-time 2 "http://127.0.0.1:$1/readyz" >/dev/null 2>&1; }

services_up() {
  build
  # The ingress refuses to start when its connection cap does not fit the
  # file-descriptor limit (DROPLINE_HTTP_MAX_CONNECTIONS + 1024); many shells
  # start with a soft limit of 1024, so lift it to the hard limit.
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  local fds; fds=$(ulimit -n)
  if [ -z "${DROPLINE_HTTP_MAX_CONNECTIONS:-}" ] && [ "$fds" != unlimited ] && [ "$fds" -lt 11024 ]; then
    [ "$fds" -gt 1088 ] || die "the file-descriptor limit is $fds; the ingress needs more than 1088 (raise the hard limit: ulimit -Hn)"
    export DROPLINE_HTTP_MAX_CONNECTIONS=$((fds - 1024))
    log "file-descriptor limit $fds: the ingress takes at most $DROPLINE_HTTP_MAX_CONNECTIONS connections"
  fi
  check_scale
  ports_free
  # Generated on the first `up` and kept in .dropline/secrets.env; the
  # ingress and paysim read them from the environment, dropctl from the file.
  load_secrets
  "$BIN/dropctl" migrate
  "$BIN/dropctl" topics
  # paysim keeps its record of captured payments in .dropline/ too: after
  # a restart it still knows what it charged, for an audit against MySQL.
  # The host's end of the notifier's webhooks: it checks their signatures
  # and shows what arrived at http://$RECEIVER_ADDR/deliveries, kept in
  # .dropline/ across restarts.
  start_one receiver DROPLINE_RECEIVER_ADDR="$RECEIVER_ADDR" \
    DROPLINE_RECEIVER_RECORD="${DROPLINE_RECEIVER_RECORD:-$STATE_DIR/receiver-deliveries.jsonl}"
  start_one paysim DROPLINE_PAYSIM_LISTEN_ADDR="$PAYSIM_ADDR" \
    DROPLINE_PAYSIM_CAPTURES_PATH="${DROPLINE_PAYSIM_CAPTURES_PATH:-$STATE_DIR/paysim-captures.jsonl}" \
    DROPLINE_PAYSIM_WEBHOOK_URL="http://$INGRESS_ADDR/v1/webhooks/payments"
  # Admission is sized to what this 2-core box sustains with the broker in
  # memory (about 1,100 purchases/s measured); the durable local broker
  # acknowledges far fewer (150 to 600 a second here), so purchases in
  # flight are capped too: 64 is about 0.4 s of waiting at 160 a second.
  # Past either, buyers get 429 with Retry-After. Every local buyer (the
  # demo's, k6's) comes from 127.0.0.1: the per-address budget is lifted.
  # The demo's holds last 10 s: a buyer who starts paying gets 5 s more
  # (120 s by default, against holds of minutes).
  local name
  for name in $(instances ingress); do
    start_one "$name" DROPLINE_LISTEN_ADDR="$(ingress_addr "$name")" DROPLINE_OPS_ADDR="127.0.0.1:$(ops_port "$name")" \
      DROPLINE_PAYMENT_PROVIDER_URL="http://$PAYSIM_ADDR" \
      DROPLINE_PAYMENT_HOLD_EXTENSION_SECS="${DROPLINE_PAYMENT_HOLD_EXTENSION_SECS:-5}" \
      DROPLINE_ADMIT_PER_SEC="${DROPLINE_ADMIT_PER_SEC:-1000}" DROPLINE_ADMIT_BURST="${DROPLINE_ADMIT_BURST:-200}" \
      DROPLINE_IP_PER_SEC="${DROPLINE_IP_PER_SEC:-1000000}" DROPLINE_IP_BURST="${DROPLINE_IP_BURST:-1000000}" \
      DROPLINE_PURCHASES_MAX_IN_FLIGHT="${DROPLINE_PURCHASES_MAX_IN_FLIGHT:-64}"
  done
  # Consumers join their groups as static members, so one restarted after
  # kill -9 takes its partitions straight back. The ids are fixed, not the
  # default <stage>-consumer@<host>: the broker's log outlives a change of
  # host name, and tansu never expires a static member whose id stops
  # coming back (it would keep its partitions). Each consumer reports ready
  # only once it holds partitions, which is what the wait below waits for.
  local stage previous
  settle_crashed_members
  # The demo's holds last 10 s: the local notifier reminds a buyer 5 s
  # before a hold's deadline (60 s by default).
  export DROPLINE_NOTIFIER_REMINDER_LEAD_SECS=${DROPLINE_NOTIFIER_REMINDER_LEAD_SECS:-5}
  for stage in allocator settler expirer notifier; do
    # A stage of several instances joins with dynamic membership (an empty
    # id): tansu never forgets a static id, and a group that has seen two
    # never settles again (README, known limits of the local broker). A
    # dead dynamic member's partitions move to the others once its session
    # times out (DROPLINE_KAFKA_SESSION_TIMEOUT_MS, 10 s).
    local member="local-$stage-0"
    ! several "$stage" || member=
    # And they join one at a time, each once the one before holds
    # partitions: two dynamic members joining tansu's group at once left one
    # of them without partitions for good (seen in CI, the scaled recovery
    # scenario's first `up`).
    for name in $(instances "$stage"); do
      running "$name" || ! several "$stage" || [ "$name" = "$stage" ] \
        || wait_for "$previous to hold partitions before $name joins" 60 ready "$(ops_port "$previous")"
      start_one "$name" DROPLINE_OPS_ADDR="127.0.0.1:$(ops_port "$name")" DROPLINE_KAFKA_GROUP_INSTANCE_ID="$member" \
        DROPLINE_NOTIFY_URL="http://$RECEIVER_ADDR/webhooks" DROPLINE_PAYMENT_PROVIDER_URL="http://$PAYSIM_ADDR"
      previous=$name
    done
  done
  scrape_targets
  for name in $(all_instances); do
    wait_for "$name (see .dropline/$name.log)" 60 ready "$(ops_port "$name")"
  done
  wait_for "paysim" 30 curl -fsS "http://$PAYSIM_ADDR/healthz"
  wait_for "the webhook receiver" 30 curl -fsS "http://$RECEIVER_ADDR/healthz"
  # What answered must be this stack's own processes, still running.
  for name in receiver paysim $(all_instances); do
    running "$name" || die "$name exited after it started; see .dropline/$name.log"
  done
  local apis=""
  for name in $(instances ingress); do apis="$apis http://$(ingress_addr "$name")"; done
  log "services ready: API$apis, metrics on :$OPS_PORT_BASE-$((OPS_PORT_BASE + 4)), Prometheus http://127.0.0.1:$PROMETHEUS_PORT, webhooks received http://$RECEIVER_ADDR/deliveries"
}

# A consumer of a stage of several instances that died without leaving its
# group (kill -9, a crash) stays a member until its session times out. If
# its replacement joins before that, tansu forms the group with nothing
# assigned to anyone, and it stays so (measured: every allocator of three
# held no partition after one was killed and started again at once). So
# the replacement starts only after the broker has dropped the dead member.
settle_crashed_members() {
  local stage name crashed=""
  for stage in allocator settler expirer notifier; do
    several "$stage" || continue
    for name in $(instances "$stage"); do
      if [ -f "$STATE_DIR/$name.pid" ] && ! running "$name"; then crashed="$crashed $name"; fi
    done
  done
  [ -n "$crashed" ] || return 0
  local secs=$((${DROPLINE_KAFKA_SESSION_TIMEOUT_MS:-10000} / 1000 + 2))
  log "waiting ${secs}s, until the broker has dropped$crashed from their groups (they died without leaving them)"
  sleep "$secs"
}

# Every port a service of this stack that is not running yet will listen
# on must be free: otherwise another local stack (another checkout) would
# answer the readiness checks, and its API the requests, in this one's
# place.
ports_free() {
  local name port
  for entry in "paysim:${PAYSIM_ADDR##*:}" "receiver:${RECEIVER_ADDR##*:}" \
    $(for name in $(instances ingress); do ingress_addr "$name" | sed "s/.*:/$name:/"; done) \
    $(for name in $(all_instances); do echo "$name:$(ops_port "$name")"; done); do
    name=${entry%%:*} port=${entry##*:}
    if ! running "$name" && port_open "$port"; then
      die "port $port, for $name, is taken by another process (another local stack?); stop it, or move this stack with INGRESS_ADDR, PAYSIM_ADDR, RECEIVER_ADDR and DROPLINE_OPS_PORT_BASE"
    fi
  done
}

stop_one() {
  local name=$1 pid
  running "$name" || { rm -f "$STATE_DIR/$name.pid"; return 0; }
  pid=$(cat "$STATE_DIR/$name.pid")
  kill -TERM "$pid" 2>/dev/null || true
  # SIGTERM drains: in-flight work finishes and offsets are committed.
  for _ in $(seq 1 60); do alive "$pid" || break; sleep 0.5; done
  if alive "$pid"; then
    log "$name did not stop in 30s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$STATE_DIR/$name.pid"
  log "$name stopped"
}

services_down() {
  for name in $(instances ingress) paysim; do stop_one "$name"; done
  for stage in allocator settler expirer notifier; do
    for name in $(instances "$stage"); do stop_one "$name"; done
  done
  stop_one receiver
}

# Every instance of each stage, for Prometheus: one file per job, in the
# state folder (the stack's Prometheus reads them; see ensure_prometheus).
scrape_targets() {
  local stage name targets
  mkdir -p "$STATE_DIR/scrape"
  for stage in $STAGES; do
    targets=""
    for name in $(instances "$stage"); do
      targets="$targets\"127.0.0.1:$(ops_port "$name")\","
    done
    printf '[{"targets": [%s]}]\n' "${targets%,}" >"$STATE_DIR/scrape/$stage.json"
  done
}

status() {
  for name in $(all_instances) paysim receiver prometheus tansu; do
    if running "$name"; then
      echo "$name: running (pid $(cat "$STATE_DIR/$name.pid"))"
    elif [ -f "$STATE_DIR/$name.pid" ]; then
      echo "$name: died (pid $(cat "$STATE_DIR/$name.pid")); \`scripts/stack.sh up\` starts it again"
    else
      echo "$name: not started here"
    fi
  done
  port_open "$REDIS_PORT" && echo "redis: listening on :$REDIS_PORT" || echo "redis: down"
  redis_cluster_ok && echo "redis cluster: ok on :$REDIS_CLUSTER_PORT and the five ports after it" || echo "redis cluster: not running"
  port_open "$MYSQL_PORT" && echo "mariadb: listening on :$MYSQL_PORT" || echo "mariadb: down"
  port_open "$KAFKA_PORT" && echo "broker: listening on :$KAFKA_PORT" || echo "broker: down"
}

wipe() {
  log "wiping the local stack: the broker's log ($STATE_DIR/tansu.db), paysim's captures, the webhooks the receiver got, the database in $DROPLINE_MYSQL_URL and the Redis keys ${DROPLINE_REDIS_KEY_PREFIX:-dl}:* are deleted; acknowledged purchases and payments in them are lost"
  services_down; stop_one prometheus; stop_one tansu
  rm -f "$STATE_DIR"/tansu.db "$STATE_DIR"/tansu.db-* "$STATE_DIR"/paysim-captures.jsonl "$STATE_DIR"/paysim-captures.jsonl.acked \
    "$STATE_DIR"/receiver-deliveries.jsonl
  local db=${DROPLINE_MYSQL_URL##*/}
  db=${db%%\?*}
  if port_open "$MYSQL_PORT"; then
    mysql_tcp -e "DROP DATABASE IF EXISTS \`$db\`"
  fi
  if port_open "$REDIS_PORT"; then
    redis-cli -p "$REDIS_PORT" --scan --pattern "${DROPLINE_REDIS_KEY_PREFIX:-dl}:*" | xargs -r -n 500 redis-cli -p "$REDIS_PORT" del >/dev/null
  fi
  wipe_redis_cluster
  log "wiped"
}

case "${1:-up}" in
  infra) ensure_infra ;;
  up)
    check_scale
    # Producers that outlive a broker restart send with ids the new broker
    # does not know, which panics tansu again: the services restart too.
    if broker_panicked; then
      log "the broker's storage panicked; stopping this stack's services before the broker restarts"
      services_down
    fi
    groups=("${DROPLINE_ALLOCATOR_GROUP:-dropline-allocator}" "${DROPLINE_SETTLER_GROUP:-dropline-settler}"
      "${DROPLINE_EXPIRER_GROUP:-dropline-expirer}" "${DROPLINE_NOTIFIER_GROUP:-dropline-notifier}")
    consumers_running=false
    for stage in allocator settler expirer notifier; do
      for name in $(instances "$stage"); do ! running "$name" || consumers_running=true; done
    done
    if [ "$consumers_running" = false ] \
      && [ "${DROPLINE_BROKER_STORAGE:-sqlite}" = sqlite ] && [ "$(group_members count "${groups[@]}")" != 0 ]; then
      # Mending restarts the broker, and a producer that outlives a broker
      # restart can panic it (the ingress's, after the consumers' kill -9,
      # in a recovery scenario): the ingress restarts too.
      running ingress && log "mending the consumer groups restarts the broker; stopping the ingress first"
      services_down
      forget_group_members "${groups[@]}"
    fi
    ensure_infra; ensure_prometheus; services_up ;;
  services) services_up ;;
  down)
    services_down; stop_one prometheus; stop_one tansu
    log "stopped; the broker's log, MySQL and Redis keep every record (scripts/stack.sh wipe deletes them)"
    ;;
  wipe) wipe ;;
  stop-services) services_down ;;
  status) status ;;
  *) die "usage: $0 {up|infra|services|status|down|wipe|stop-services}" ;;
esac
