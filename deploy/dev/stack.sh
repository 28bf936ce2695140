#!/usr/bin/env bash
# Private service stack for tests and local development:
#   kafka         -> Tansu (Kafka-compatible broker, in-memory storage)
#   postgres      -> PostgreSQL 15 (Debian packages), throwaway cluster
#   s3            -> moto server (S3-compatible, in-memory)
#   kafka_durable -> a second Tansu whose log lives in a bucket of the s3 service, so it
#                    keeps topics and records across its own restart (broker-restart tests)
#
# Usage: stack.sh up | down | status | env | stop-service NAME | start-service NAME
#        (NAME is one of: kafka postgres s3 kafka_durable)
#
# Everything runtime lives in the state folder (default <repo>/.stack), tools
# are cached in PRIMESPARK_TOOLS_DIR (default ~/.cache/primespark-tools) and
# installed on first use. Every service binds 127.0.0.1 only, on free ports
# picked at `up` and kept in $STATE/ports.env until `down`.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"

STATE="${PRIMESPARK_STACK_DIR:-$REPO_ROOT/.stack}"
case "$STATE" in /*) ;; *) STATE="$PWD/$STATE" ;; esac  # postgres needs absolute paths
TOOLS="${PRIMESPARK_TOOLS_DIR:-$HOME/.cache/primespark-tools}"
case "$TOOLS" in /*) ;; *) TOOLS="$PWD/$TOOLS" ;; esac

TANSU_VERSION=0.6.0
TANSU_ROOT="$TOOLS/tansu-$TANSU_VERSION"
TANSU_BIN="$TANSU_ROOT/bin/tansu"
VENV="$TOOLS/venv"
PY="$VENV/bin/python"
PY_PACKAGES=("moto[server]" confluent-kafka pyarrow duckdb requests check-jsonschema kubernetes-validate
  numpy==2.4.6 onnx==1.23.2)
PY_IMPORTS="moto, flask, boto3, confluent_kafka, pyarrow, duckdb, requests, numpy, onnx"
PG_BIN="${PRIMESPARK_PG_BIN:-/usr/lib/postgresql/15/bin}"

PORTS_FILE="$STATE/ports.env"
MARKER="$STATE/.primespark-stack"   # proves the folder is ours before `down` deletes it
SERVICES=(kafka postgres s3 kafka_durable)  # in start order: kafka_durable needs s3

# The dev credentials (only ever used for this throwaway local cluster).
PG_USER=primespark
PG_PASSWORD=primespark
PG_DB=primespark

log() { echo "stack: $*" >&2; }
die() { echo "stack: error: $*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# Run a command as root (apt-get); sudo only when we are not root already.
as_root() {
    if is_root; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root to run: $*"
    fi
}

# PostgreSQL refuses to run as root, so as root we run its tools as `postgres`.
as_pg() {
    if is_root; then runuser -u postgres -- "$@"; else "$@"; fi
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# ---------------------------------------------------------------- installing

ensure_postgres() {
    [ -x "$PG_BIN/initdb" ] && return 0
    log "installing postgresql-15 with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql-15 >&2
    [ -x "$PG_BIN/initdb" ] || die "initdb still missing in $PG_BIN"
    # The package may start its own default cluster on 5432; we never use it.
}

# promtool and the Prometheus server, for the alert-rule tests and the scrape test.
ensure_prometheus() {
    command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 && return 0
    log "installing prometheus (promtool) with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >&2
    command -v promtool >/dev/null 2>&1 || die "promtool still missing after installing prometheus"
}

# systemd-analyze, to verify the shipped unit file.
ensure_systemd_analyze() {
    command -v systemd-analyze >/dev/null 2>&1 && return 0
    log "installing systemd (systemd-analyze) with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends systemd >&2
}

ensure_venv() {
    if [ -x "$PY" ] && "$PY" -c "import $PY_IMPORTS" 2>/dev/null; then return 0; fi
    mkdir -p "$TOOLS"
    if [ ! -x "$PY" ]; then
        log "creating python virtualenv $VENV"
        if ! python3 -m venv "$VENV" >&2; then
            # Debian splits venv/ensurepip into a separate package.
            rm -rf "$VENV"
            as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >&2
            python3 -m venv "$VENV" >&2
        fi
    fi
    log "installing python packages into $VENV: ${PY_PACKAGES[*]}"
    "$PY" -m pip install -q --upgrade pip >&2
    "$PY" -m pip install -q "${PY_PACKAGES[@]}" >&2
    "$PY" -c "import $PY_IMPORTS" || die "python packages still not importable"
}

ensure_tansu() {
    [ -x "$TANSU_BIN" ] && return 0
    command -v cargo >/dev/null 2>&1 || die "cargo is needed to install tansu"
    mkdir -p "$TOOLS"
    # Serialise installs: two concurrent `up`s must not both build tansu.
    exec 8>"$TOOLS/tansu-$TANSU_VERSION.lock"
    flock 8
    if [ ! -x "$TANSU_BIN" ]; then
        local build="$TOOLS/tansu-$TANSU_VERSION-build" ilog="$TOOLS/tansu-$TANSU_VERSION-install.log"
        log "NOTE: building tansu $TANSU_VERSION with cargo install (takes ~20 minutes on 2 cores)"
        log "      progress: $ilog"
        # Own target dir (not the workspace's CARGO_TARGET_DIR) so an interrupted
        # build resumes next time and never fights with workspace builds.
        if ! CARGO_TARGET_DIR="$build" cargo install tansu --version "$TANSU_VERSION" --locked \
                --features dynostore --root "$TANSU_ROOT" >"$ilog" 2>&1; then
            tail -n 40 "$ilog" >&2
            die "cargo install tansu failed (full log: $ilog)"
        fi
        rm -rf "$build"
        log "tansu installed at $TANSU_BIN"
    fi
    exec 8>&-
}

# ------------------------------------------------------------------- state

# Picks four distinct free loopback ports (all held open until all are chosen).
pick_ports() {
    "$PY" - <<'EOF'
import socket
socks = []
for _ in range(4):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

load_ports() {
    [ -f "$PORTS_FILE" ] || return 1
    # shellcheck disable=SC1090
    . "$PORTS_FILE"
}

# Postgres runs as the `postgres` user, which must be able to reach its data
# dir. If the state folder sits under an unreachable parent (e.g. /root, 0700),
# keep the PG files in a private /tmp folder and symlink them into the state.
init_state() {
    mkdir -p "$STATE"
    touch "$MARKER"
    [ -f "$PORTS_FILE" ] && return 0
    local ports kafka_port pg_port s3_port durable_port pg_base
    ports="$(pick_ports)"
    read -r kafka_port pg_port s3_port durable_port <<<"$ports"
    pg_base="$STATE"
    if is_root && ! runuser -u postgres -- test -x "$STATE"; then
        pg_base="$(mktemp -d /tmp/primespark-pg.XXXXXX)"
        chmod 755 "$pg_base"
        ln -sfn "$pg_base/pg" "$STATE/pg"
        ln -sfn "$pg_base/postgres.log" "$STATE/postgres.log"
        log "postgres cannot reach $STATE; its files live in $pg_base (symlinked)"
    fi
    cat >"$PORTS_FILE" <<EOF
KAFKA_PORT=$kafka_port
PG_PORT=$pg_port
S3_PORT=$s3_port
KAFKA_DURABLE_PORT=$durable_port
PG_BASE=$pg_base
PG_DATA=$pg_base/pg
PG_SOCK=$pg_base/pg-run
PG_LOG=$pg_base/postgres.log
EOF
}

# KAFKA_PORT, PG_PORT, S3_PORT, PG_* come from ports.env (load_ports).
# shellcheck disable=SC2153
service_port() {
    case "$1" in
        kafka) echo "$KAFKA_PORT" ;;
        postgres) echo "$PG_PORT" ;;
        s3) echo "$S3_PORT" ;;
        kafka_durable) echo "${KAFKA_DURABLE_PORT:?ports.env predates kafka_durable; run: $0 down, then $0 up}" ;;
        *) die "unknown service '$1' (expected: ${SERVICES[*]})" ;;
    esac
}

service_pid() {
    case "$1" in
        postgres) [ -f "$PG_DATA/postmaster.pid" ] && head -n1 "$PG_DATA/postmaster.pid" || true ;;
        *) [ -f "$STATE/$1.pid" ] && cat "$STATE/$1.pid" || true ;;
    esac
}

service_up() {
    local pid
    pid="$(service_pid "$1")"
    pid_alive "$pid" && port_open "$(service_port "$1")"
}

wait_for() {  # wait_for SECONDS COMMAND...: retry COMMAND every 0.2s
    local secs=$1 i
    shift
    for ((i = 0; i < secs * 5; i++)); do
        "$@" && return 0
        sleep 0.2
    done
    return 1
}

# ---------------------------------------------------------------- services

# Starts a long-running process in its own session (so it outlives this script
# and its group can be signalled), detached from our stdio and lock fd.
spawn() {  # spawn NAME COMMAND...
    local name=$1
    shift
    setsid "$@" </dev/null >>"$STATE/$name.log" 2>&1 9>&- 8>&- &
    echo $! >"$STATE/$name.pid"
}

start_kafka() {
    ensure_tansu
    local url="tcp://127.0.0.1:$KAFKA_PORT"
    # memory:// storage: nothing on disk, topics vanish on restart (fine for tests).
    # Tansu also reads these env vars; keep a user's settings out of the stack.
    spawn kafka env -u CLUSTER_ID -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT \
        "$TANSU_BIN" broker \
        --listener-url "$url" \
        --advertised-listener-url "$url" \
        --storage-engine "memory://tansu/"
}

DURABLE_BUCKET=tansu-durable

start_kafka_durable() {
    ensure_tansu
    ensure_venv
    service_up s3 || die "kafka_durable keeps its log in the s3 service; start s3 first"
    # (Re)create the bucket: restarting moto empties it, and Tansu does not create it.
    "$PY" - "$S3_PORT" "$DURABLE_BUCKET" <<'EOF' >&2 || die "could not create bucket $DURABLE_BUCKET"
import sys, boto3
s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{sys.argv[1]}", region_name="us-east-1",
                  aws_access_key_id="testing", aws_secret_access_key="testing")
if sys.argv[2] not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
    s3.create_bucket(Bucket=sys.argv[2])
EOF
    local url="tcp://127.0.0.1:$KAFKA_DURABLE_PORT"
    spawn kafka_durable env -u CLUSTER_ID -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT \
        AWS_ENDPOINT="http://127.0.0.1:$S3_PORT" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1 \
        AWS_DEFAULT_REGION=us-east-1 AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing \
        "$TANSU_BIN" broker \
        --listener-url "$url" \
        --advertised-listener-url "$url" \
        --storage-engine "s3://$DURABLE_BUCKET/"
}

start_s3() {
    ensure_venv
    mkdir -p "$STATE/s3"
    # moto keeps buckets in memory; large uploads spool to TMPDIR, kept in state.
    (cd "$STATE/s3" && TMPDIR="$STATE/s3" spawn s3 "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT")
}

pg_init() {
    mkdir -p "$PG_DATA" "$PG_SOCK"
    touch "$PG_LOG"
    if is_root; then chown postgres: "$PG_DATA" "$PG_SOCK" "$PG_LOG"; fi
    chmod 700 "$PG_DATA" "$PG_SOCK"
    [ -f "$PG_DATA/PG_VERSION" ] && return 0
    log "initdb $PG_DATA"
    # Local socket (private dir) is trusted so we can bootstrap; TCP needs a password.
    as_pg "$PG_BIN/initdb" -D "$PG_DATA" -U postgres -E UTF8 --locale=C \
        --auth-local=trust --auth-host=scram-sha-256 >>"$PG_LOG" 2>&1 \
        || { tail -n 20 "$PG_LOG" >&2; die "initdb failed"; }
    # Port and paths live in the config so start-service reuses them.
    cat >>"$PG_DATA/postgresql.conf" <<EOF

# --- primespark dev stack ---
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_SOCK'
password_encryption = 'scram-sha-256'
max_connections = 200
# Throwaway test data: trade durability for speed.
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
    touch "$PG_DATA/.needs-bootstrap"  # role/db are created once the server runs
}

pg_bootstrap() {
    [ -f "$PG_DATA/.needs-bootstrap" ] || return 0
    local psql=(as_pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PG_SOCK" -p "$PG_PORT" -U postgres -d postgres)
    "${psql[@]}" -c "CREATE ROLE $PG_USER LOGIN SUPERUSER PASSWORD '$PG_PASSWORD'" >&2
    "${psql[@]}" -c "CREATE DATABASE $PG_DB OWNER $PG_USER" >&2
    rm -f "$PG_DATA/.needs-bootstrap"
}

start_postgres() {
    ensure_postgres
    pg_init
    as_pg "$PG_BIN/pg_ctl" start -D "$PG_DATA" -l "$PG_LOG" -w -t 60 >/dev/null 9>&- 8>&- \
        || { tail -n 20 "$PG_LOG" >&2; die "postgres did not start"; }
    wait_for 30 "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" \
        || die "pg_isready never reported ready (see $STATE/postgres.log)"
    pg_bootstrap
}

start_service() {
    local name=$1 port
    port="$(service_port "$name")"
    if service_up "$name"; then return 0; fi
    if port_open "$port"; then
        die "$name: port $port is taken by another process; run '$0 down' then '$0 up'"
    fi
    log "starting $name on 127.0.0.1:$port"
    "start_$name"
    wait_for 60 service_up "$name" \
        || { tail -n 20 "$STATE/$name.log" >&2; die "$name did not come up (log: $STATE/$name.log)"; }
}

# SIGTERM the process group, wait, then SIGKILL.
kill_pid() {
    local pid=$1 i
    pid_alive "$pid" || return 0
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        pid_alive "$pid" || return 0
        sleep 0.2
    done
    log "pid $pid ignored SIGTERM; sending SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
}

stop_service() {
    local name=$1 pid
    service_port "$name" >/dev/null  # validates the name
    pid="$(service_pid "$name")"
    if [ "$name" = postgres ]; then
        if [ -f "$PG_DATA/postmaster.pid" ]; then
            as_pg "$PG_BIN/pg_ctl" stop -D "$PG_DATA" -m fast -w -t 30 >/dev/null 2>&1 || kill_pid "$pid"
        fi
    else
        kill_pid "$pid"
        rm -f "$STATE/$name.pid"
    fi
}

# ----------------------------------------------------------------- commands

with_lock() {
    mkdir -p "$STATE"
    exec 9>"$STATE/.lock"
    flock 9
}

cmd_up() {
    # Install first (may take long), then allocate ports and start.
    ensure_postgres
    ensure_venv
    ensure_prometheus
    ensure_systemd_analyze
    ensure_tansu
    with_lock
    init_state
    load_ports
    local s
    for s in "${SERVICES[@]}"; do start_service "$s"; done
    log "stack is up (state: $STATE)"
}

cmd_down() {
    if [ -d "$STATE" ]; then
        with_lock
        if load_ports; then
            local i
            # Reverse start order: kafka_durable flushes to s3. (A stack from before
            # kafka_durable has no port for it, and nothing to stop.)
            for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
                [ "${SERVICES[i]}" = kafka_durable ] && [ -z "${KAFKA_DURABLE_PORT:-}" ] && continue
                stop_service "${SERVICES[i]}"
            done
            # Private /tmp folder used when postgres could not reach $STATE.
            if [ -n "${PG_BASE:-}" ] && [ "$PG_BASE" != "$STATE" ]; then
                case "$PG_BASE" in /tmp/primespark-pg.*) rm -rf "$PG_BASE" ;; esac
            fi
        fi
        if [ -f "$MARKER" ]; then
            rm -rf "$STATE"
        else
            log "$STATE has no stack marker; not deleting it"
        fi
    fi
    log "stack is down"
}

cmd_status() {
    if ! load_ports; then
        echo "stack is not up (no $PORTS_FILE)"
        return 1
    fi
    local s rc=0
    for s in "${SERVICES[@]}"; do
        if service_up "$s"; then
            printf '%-13s up    127.0.0.1:%s pid %s\n' "$s" "$(service_port "$s")" "$(service_pid "$s")"
        else
            printf '%-13s down  127.0.0.1:%s\n' "$s" "$(service_port "$s")"
            rc=1
        fi
    done
    return $rc
}

cmd_env() {
    load_ports || die "stack is not up; run: $0 up"
    # A deliberately stopped service keeps its port, so env stays printable.
    local s
    for s in "${SERVICES[@]}"; do
        service_up "$s" || log "warning: $s is down (port $(service_port "$s") kept)"
    done
    local v
    for v in \
        "PRIMESPARK_KAFKA__BROKERS=127.0.0.1:$KAFKA_PORT" \
        "PRIMESPARK_POSTGRES__URL=postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB" \
        "PRIMESPARK_STACK_S3_ENDPOINT=http://127.0.0.1:$S3_PORT" \
        "PRIMESPARK_STACK_DURABLE_BROKERS=127.0.0.1:$KAFKA_DURABLE_PORT" \
        "AWS_ACCESS_KEY_ID=testing" \
        "AWS_SECRET_ACCESS_KEY=testing" \
        "AWS_REGION=us-east-1" \
        "PRIMESPARK_STACK_PYTHON=$PY" \
        "PRIMESPARK_STACK_PSQL=$PG_BIN/psql" \
        "PRIMESPARK_STACK_PROMTOOL=$(command -v promtool || echo promtool)" \
        "PRIMESPARK_STACK_PROMETHEUS=$(command -v prometheus || echo prometheus)" \
        "PRIMESPARK_STACK_DIR=$STATE"; do
        printf 'export %s=%q\n' "${v%%=*}" "${v#*=}"
    done
}

usage() {
    echo "usage: $0 up | down | status | env | stop-service NAME | start-service NAME   (NAME: ${SERVICES[*]})" >&2
    exit 2
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    stop-service | start-service)
        [ $# -eq 2 ] || usage
        load_ports || die "stack is not up; run: $0 up"
        service_port "$2" >/dev/null
        with_lock
        if [ "$1" = stop-service ]; then stop_service "$2"; else start_service "$2"; fi
        ;;
    *) usage ;;
esac
