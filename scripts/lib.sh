# Shared by Dropline's scripts: bring up the local stack, idempotently.
# Each ensure_* function reuses a service that already answers, installs what
# is missing (Debian packages, or cargo for tansu) and starts it otherwise.
# shellcheck shell=bash

DROPLINE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Where cargo puts the binaries: the checkout's target/ unless CARGO_TARGET_DIR
# says otherwise (the scripts build with cargo and run what it built).
TARGET_DIR=${CARGO_TARGET_DIR:-$DROPLINE_ROOT/target}
STATE_DIR=${DROPLINE_STATE_DIR:-$DROPLINE_ROOT/.dropline}
mkdir -p "$STATE_DIR"

REDIS_PORT=${REDIS_PORT:-6379}
MYSQL_PORT=${MYSQL_PORT:-3306}
KAFKA_PORT=${KAFKA_PORT:-9092}
TANSU_VERSION=0.6.0
export PATH="$HOME/.cargo/bin:$PATH"

# Where the local stack's services listen and what they connect to; the
# scripts that drive a running stack (stack.sh, loadtest.sh) agree on it,
# so a stack moved to other ports is moved for all of them.
stack_addresses() {
  INGRESS_ADDR=${INGRESS_ADDR:-127.0.0.1:8080}
  PAYSIM_ADDR=${PAYSIM_ADDR:-127.0.0.1:8090}
  # The host's webhook receiver (dropctl receive), where the notifier sends.
  RECEIVER_ADDR=${RECEIVER_ADDR:-127.0.0.1:9180}
  export DROPLINE_MYSQL_URL=${DROPLINE_MYSQL_URL:-mysql://root@127.0.0.1:$MYSQL_PORT/dropline}
  if [ "${DROPLINE_REDIS_CLUSTER:-false}" = true ]; then
    local p=$REDIS_CLUSTER_PORT
    export DROPLINE_REDIS_URL=${DROPLINE_REDIS_URL:-redis://127.0.0.1:$p,redis://127.0.0.1:$((p + 1)),redis://127.0.0.1:$((p + 2))}
  else
    export DROPLINE_REDIS_URL=${DROPLINE_REDIS_URL:-redis://127.0.0.1:$REDIS_PORT}
  fi
  export DROPLINE_KAFKA_BROKERS=${DROPLINE_KAFKA_BROKERS:-127.0.0.1:$KAFKA_PORT}
}

log() { printf '\033[1m[dropline]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port_closed() { ! port_open "$1"; }
# A process that runs (not a zombie nobody reaped yet).
alive() { kill -0 "$1" 2>/dev/null && ! grep -qE '^[0-9]+ \(.*\) [ZX] ' "/proc/$1/stat" 2>/dev/null; }

# wait_for DESCRIPTION SECONDS COMMAND...: polls until the command succeeds.
wait_for() {
  local what=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "$what did not come up within ${secs}s"
    sleep 0.5
  done
}

APT_UPDATED=
apt_install() {
  command -v apt-get >/dev/null || die "apt-get is not available to install $*"
  local sudo=; [ "$(id -u)" -eq 0 ] || sudo=sudo
  if [ -z "$APT_UPDATED" ]; then
    $sudo apt-get update -qq >&2; APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >&2
}

ensure_redis() {
  if command -v redis-cli >/dev/null && redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
    return
  fi
  if ! command -v redis-server >/dev/null; then
    log "installing redis"
    apt_install redis-server
    # Some images start the packaged service on install.
    redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && return
  fi
  log "starting redis on :$REDIS_PORT"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir "$STATE_DIR" --logfile "$STATE_DIR/redis.log"
  wait_for "redis" 30 redis-cli -p "$REDIS_PORT" ping
}

# A Redis Cluster on one machine: three primaries and three replicas, each
# a redis-server on its own port from REDIS_CLUSTER_PORT (7000 to 7005) with
# its folder under $STATE_DIR/redis-cluster, made a cluster by
# `redis-cli --cluster create`. Each keeps an append-only file (fsync every
# second, as a managed Redis Cluster with AOF does) and declares a primary
# failed after 2 s without an answer, so a fault scenario's failover is
# quick. `DROPLINE_REDIS_CLUSTER=true scripts/stack.sh up` runs the local
# stack on it.
REDIS_CLUSTER_PORT=${REDIS_CLUSTER_PORT:-7000}
REDIS_CLUSTER_DIR=$STATE_DIR/redis-cluster

redis_cluster_ok() { redis-cli -p "$REDIS_CLUSTER_PORT" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; }

ensure_redis_cluster() {
  redis_cluster_ok && return
  command -v redis-server >/dev/null || { log "installing redis"; apt_install redis-server; }
  local i port dir nodes=()
  for i in 0 1 2 3 4 5; do
    port=$((REDIS_CLUSTER_PORT + i))
    nodes+=("127.0.0.1:$port")
    port_open "$port" && continue
    dir=$REDIS_CLUSTER_DIR/$port
    mkdir -p "$dir"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --dir "$dir" --logfile "$dir/redis.log" \
      --pidfile "$dir/redis.pid" --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
      --appendonly yes --appendfsync everysec --save ""
  done
  for port in "${nodes[@]##*:}"; do wait_for "redis cluster node :$port" 30 redis-cli -p "$port" ping; done
  # Nodes that were a cluster before (their nodes.conf) form it again.
  if ! redis-cli -p "$REDIS_CLUSTER_PORT" cluster info | grep -q '^cluster_known_nodes:6'; then
    log "creating a Redis Cluster of ${nodes[*]}"
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >&2
  fi
  wait_for "the Redis Cluster" 60 redis_cluster_ok
}

# Stops the cluster's nodes this checkout started, and deletes their data.
wipe_redis_cluster() {
  local pidfile
  for pidfile in "$REDIS_CLUSTER_DIR"/*/redis.pid; do
    [ -f "$pidfile" ] || continue
    kill -TERM "$(cat "$pidfile")" 2>/dev/null || true
  done
  for pidfile in "$REDIS_CLUSTER_DIR"/*/redis.pid; do
    [ -f "$pidfile" ] || continue
    wait_for "redis cluster node $(dirname "$pidfile") to stop" 30 bash -c "! kill -0 $(cat "$pidfile") 2>/dev/null"
  done
  rm -rf "$REDIS_CLUSTER_DIR"
}

mysql_tcp() { mariadb -h127.0.0.1 -P"$MYSQL_PORT" -uroot --protocol=TCP "$@"; }

ensure_mariadb() {
  if command -v mariadb >/dev/null && mysql_tcp -e 'SELECT 1' >/dev/null 2>&1; then
    return
  fi
  if ! command -v mariadbd >/dev/null && [ ! -x /usr/sbin/mariadbd ]; then
    log "installing mariadb"
    apt_install mariadb-server mariadb-client
  fi
  if ! mariadb -uroot -e 'SELECT 1' >/dev/null 2>&1; then
    log "starting mariadb on :$MYSQL_PORT"
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld 2>/dev/null || true
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql \
      --port="$MYSQL_PORT" --bind-address=127.0.0.1
    wait_for "mariadb" 60 mariadb -uroot -e 'SELECT 1'
  fi
  # Debian's root logs in through the unix socket only; the local stack
  # connects over TCP as root with no password, as CI does.
  if ! mysql_tcp -e 'SELECT 1' >/dev/null 2>&1; then
    log "allowing root over TCP on the local database"
    mariadb -uroot -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD('')"
  fi
  wait_for "mariadb over TCP" 30 mysql_tcp -e 'SELECT 1'
}

tansu_bin() { command -v tansu || echo "$HOME/.cargo/bin/tansu"; }

# This stack's own broker runs but its storage died of a panic.
broker_panicked() {
  [ -f "$STATE_DIR/tansu.pid" ] && alive "$(cat "$STATE_DIR/tansu.pid")" \
    && grep -q panicked "$STATE_DIR/tansu.log" 2>/dev/null
}

ensure_tansu() {
  # tansu 0.6 can lose its storage task to a panic (its log says
  # "panicked") and go on accepting connections without answering any. The
  # records are on disk; this stack's own broker is restarted on them.
  if broker_panicked; then
    log "the broker's storage panicked (its log is kept as .dropline/tansu.log.panicked-*); restarting it on its records"
    kill "$(cat "$STATE_DIR/tansu.pid")" 2>/dev/null || true
    wait_for "the broker's port to close" 30 port_closed "$KAFKA_PORT"
  fi
  if port_open "$KAFKA_PORT"; then
    return
  fi
  if ! [ -x "$(tansu_bin)" ]; then
    log "installing tansu $TANSU_VERSION with cargo (about 15 minutes on 2 cores; once per machine)"
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql >&2
  fi
  # sqlite by default: what the broker acknowledged survives a restart of
  # the broker and `stack.sh down`. DROPLINE_BROKER_STORAGE=memory-lossy is
  # for benchmarks only: everything on the broker is gone when it stops.
  # tansu resolves a sqlite:// path against its working directory, so it
  # runs from the state folder.
  local storage
  case "${DROPLINE_BROKER_STORAGE:-sqlite}" in
    sqlite) storage="sqlite://tansu.db" ;;
    memory-lossy)
      storage="memory://tansu/"
      log "warning: the broker keeps everything in memory (DROPLINE_BROKER_STORAGE=memory-lossy); stopping it loses acknowledged purchases and payments"
      ;;
    *) die "DROPLINE_BROKER_STORAGE must be sqlite (the default) or memory-lossy" ;;
  esac
  # A log with a panic in it is kept, not overwritten.
  if grep -q panicked "$STATE_DIR/tansu.log" 2>/dev/null; then
    mv "$STATE_DIR/tansu.log" "$STATE_DIR/tansu.log.panicked-$(date +%s)"
  fi
  log "starting tansu on :$KAFKA_PORT ($storage)"
  (cd "$STATE_DIR" && exec nohup "$(tansu_bin)" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine "$storage" >"$STATE_DIR/tansu.log" 2>&1) &
  echo $! >"$STATE_DIR/tansu.pid"
  wait_for "tansu" 30 port_open "$KAFKA_PORT"
}

# tansu 0.6 can keep a consumer group waiting forever for a leader that is
# gone: a static member restarted under a new member id while it led, and
# the group stays "Forming" with the dead id as leader (seen after a
# graceful stop and start, and after a broker restart). With none of its
# consumers running, a group holds nobody alive, so its membership is
# forgotten (tansu's own consumer_group_detail row is deleted, as tansu does
# when a group empties); its committed offsets are kept, and the consumers
# form it afresh from them. The broker is stopped meanwhile. Only for this
# stack's own broker on sqlite.
forget_group_members() {
  [ "${DROPLINE_BROKER_STORAGE:-sqlite}" = sqlite ] && [ -f "$STATE_DIR/tansu.db" ] || return 0
  if port_open "$KAFKA_PORT"; then
    [ -f "$STATE_DIR/tansu.pid" ] && alive "$(cat "$STATE_DIR/tansu.pid")" || return 0
    kill -TERM "$(cat "$STATE_DIR/tansu.pid")"
    wait_for "the broker's port to close" 30 port_closed "$KAFKA_PORT"
  fi
  local forgot
  forgot=$(group_members delete "$@")
  [ "$forgot" = 0 ] || log "forgot the members of $forgot consumer group(s) none of whose consumers runs; their offsets are kept"
}

# group_members count|delete GROUP...: the membership rows the broker's log
# holds for these groups (count reads while the broker runs).
group_members() {
  [ -f "$STATE_DIR/tansu.db" ] || { echo 0; return; }
  python3 - "$STATE_DIR/tansu.db" "$@" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], timeout=30)
action, groups = sys.argv[2], sys.argv[3:]
where = ("consumer_group IN (SELECT id FROM consumer_group WHERE name IN (%s))"
         % ",".join("?" * len(groups)))
if action == "count":
    print(db.execute(f"SELECT COUNT(*) FROM consumer_group_detail WHERE {where}", groups).fetchone()[0])
else:
    print(db.execute(f"DELETE FROM consumer_group_detail WHERE {where}", groups).rowcount)
    db.commit()
PY
}

ensure_tools() {
  command -v curl >/dev/null || apt_install curl
}

# Debian's Chromium and its WebDriver, for the waiting-room page's test in
# a real headless browser.
ensure_chromium() {
  command -v chromium >/dev/null && command -v chromedriver >/dev/null && return
  log "installing chromium and chromedriver (for the waiting-room page's test)"
  apt_install --no-install-recommends chromium chromium-driver
}

PROMETHEUS_PORT=${PROMETHEUS_PORT:-9090}

ensure_promtool() {
  command -v promtool >/dev/null || { log "installing prometheus (for promtool)"; apt_install prometheus; }
}

# Prometheus scraping the local services, with Dropline's rules loaded.
ensure_prometheus() {
  ensure_promtool
  if port_open "$PROMETHEUS_PORT"; then
    if ! curl -fsS --max-time 5 "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/status/config" 2>/dev/null | grep -q dropline-ingress; then
      log "warning: the Prometheus on :$PROMETHEUS_PORT does not scrape Dropline; load monitoring/prometheus/prometheus.yml into it"
    fi
    return
  fi
  # monitoring/prometheus/prometheus.yml names the default ports; this
  # stack's Prometheus reads its targets from the files stack.sh writes in
  # its own state folder instead (every instance, on whatever ports this
  # stack was moved to), and the rules from the checkout.
  mkdir -p "$STATE_DIR/scrape"
  sed -e "s#\.\./\.\./\.dropline/scrape/#$STATE_DIR/scrape/#" \
    -e "s#^  - rules.yml\$#  - $DROPLINE_ROOT/monitoring/prometheus/rules.yml#" -e '/static_configs:/d' \
    "$DROPLINE_ROOT/monitoring/prometheus/prometheus.yml" >"$STATE_DIR/prometheus.yml"
  log "starting prometheus on :$PROMETHEUS_PORT"
  nohup prometheus --config.file="$STATE_DIR/prometheus.yml" \
    --storage.tsdb.path="$STATE_DIR/prometheus" --storage.tsdb.retention.time=2d \
    --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" --web.enable-lifecycle \
    >"$STATE_DIR/prometheus.log" 2>&1 &
  echo $! >"$STATE_DIR/prometheus.pid"
  wait_for "prometheus" 30 curl -fsS "http://127.0.0.1:$PROMETHEUS_PORT/-/ready"
}

# The local stack's signing secrets: generated once, on the first `up`, from
# /dev/urandom, and kept in $STATE_DIR/secrets.env (mode 600) so tokens
# minted later still verify. Never overwritten: delete the file to rotate
# them (then restart the services). Nothing here is a published default;
# the services refuse those.
SECRETS_FILE=$STATE_DIR/secrets.env
SECRET_NAMES="DROPLINE_JWT_SECRET DROPLINE_ADMIN_JWT_SECRET DROPLINE_WEBHOOK_SECRET DROPLINE_NOTIFY_SECRET"

random_hex32() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }

ensure_secrets() {
  [ -s "$SECRETS_FILE" ] && return
  local tmp name
  tmp=$(umask 077 && mktemp "$STATE_DIR/secrets.env.XXXXXX")
  {
    echo "# Dropline's local signing secrets, generated by scripts/lib.sh. Keep private."
    for name in $SECRET_NAMES; do echo "$name=$(random_hex32)"; done
  } >"$tmp"
  chmod 600 "$tmp"
  # A hard link publishes the file only if none exists yet: two first runs
  # at once cannot overwrite each other's secrets.
  if ln "$tmp" "$SECRETS_FILE" 2>/dev/null; then
    log "generated the local stack's secrets in $SECRETS_FILE"
  fi
  rm -f "$tmp"
}

# Exports each secret from the file, unless the environment already sets it.
# A secret the file lacks (it was generated before that secret existed) is
# generated and added; the others are never touched.
load_secrets() {
  ensure_secrets
  local name value
  for name in $SECRET_NAMES; do
    if [ -n "${!name:-}" ]; then export "${name?}"; continue; fi
    value=$(sed -n "s/^$name=//p" "$SECRETS_FILE" | tail -n 1)
    if [ -z "$value" ]; then
      value=$(random_hex32)
      echo "$name=$value" >>"$SECRETS_FILE"
      log "added $name to $SECRETS_FILE"
    fi
    export "$name=$value"
  done
}

# The stores and the broker; what both the tests and the demo need.
ensure_infra() {
  ensure_tools
  ensure_redis
  [ "${DROPLINE_REDIS_CLUSTER:-false}" != true ] || ensure_redis_cluster
  ensure_mariadb
  ensure_tansu
}
