#!/usr/bin/env bash
# The fuzz targets in tests/fuzz (cargo-fuzz: libFuzzer with AddressSanitizer, nightly).
#   fuzz.sh smoke [SECONDS]        every target for SECONDS each (default 20), starting from the
#                                  committed corpus; new inputs go to a scratch folder, the
#                                  committed corpus is not touched. Fails on any crash, printing
#                                  the crashing input and how to reproduce it.
#   fuzz.sh run TARGET [SECONDS]   one target (default 600 s), growing the committed corpus;
#                                  crashes land in tests/fuzz/artifacts/TARGET (not committed)
#   fuzz.sh cmin TARGET            shrinks the committed corpus to the inputs that add coverage,
#                                  keeping every regression-* input (past crashes)
#   fuzz.sh list                   the targets
# Builds into $CARGO_TARGET_DIR/fuzz (default ~/.cache/primespark-target/fuzz); installs
# cargo-fuzz through stack.sh when missing.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
FUZZ_DIR="$REPO_ROOT/tests/fuzz"
TOOLS="${PRIMESPARK_TOOLS_DIR:-$HOME/.cache/primespark-tools}"
TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/primespark-target}/fuzz"

die() { echo "fuzz: error: $*" >&2; exit 1; }

"$SCRIPT_DIR/stack.sh" fuzz-tools
export PATH="$TOOLS/cargo-fuzz/bin:$PATH"
# Every cargo and rustc below is nightly; variables a calling cargo (`cargo test`) set for its
# own toolchain and target dir must not leak into this build.
export RUSTUP_TOOLCHAIN=nightly
unset CARGO RUSTC RUSTDOC RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS CARGO_TARGET_DIR

fuzz() {
    local sub="$1"
    shift
    cargo fuzz "$sub" --fuzz-dir "$FUZZ_DIR" --target-dir "$TARGET_DIR" "$@"
}

targets() {
    local list
    list="$(cargo fuzz list --fuzz-dir "$FUZZ_DIR")" || die "cargo fuzz list failed"
    [ -n "$list" ] || die "no fuzz targets in $FUZZ_DIR"
    echo "$list"
}

cmd_smoke() {
    local secs="${1:-20}"
    fuzz build >&2 || die "building the fuzz targets failed"
    local scratch t log list
    list="$(targets)"
    scratch="$(mktemp -d)"
    # shellcheck disable=SC2064  # expand now: the folder is fixed
    trap "rm -rf '$scratch'" EXIT
    for t in $list; do
        mkdir -p "$scratch/$t/corpus" "$scratch/$t/artifacts"
        log="$scratch/$t/log"
        if ! fuzz run "$t" "$scratch/$t/corpus" "$FUZZ_DIR/corpus/$t" -- \
            -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
            -artifact_prefix="$scratch/$t/artifacts/" >"$log" 2>&1; then
            tail -n 60 "$log" >&2
            local a
            for a in "$scratch/$t/artifacts/"*; do
                [ -f "$a" ] || continue
                echo "fuzz: $t crashed on (base64): $(base64 -w0 "$a")" >&2
                echo "fuzz: reproduce: save it as a file F, then cargo +nightly fuzz run $t --fuzz-dir tests/fuzz F" >&2
            done
            die "$t: crash (see above)"
        fi
        local done_line
        done_line="$(grep -E '^Done [0-9]+ runs' "$log" | tail -n 1)" || die "$t: libFuzzer printed no 'Done' line"
        echo "fuzz: $t: $done_line; corpus $(find "$FUZZ_DIR/corpus/$t" -type f | wc -l) committed + $(find "$scratch/$t/corpus" -type f | wc -l) new inputs, no crash"
    done
}

cmd_run() {
    local t="${1:-}" secs="${2:-600}"
    local list
    list="$(targets)"
    [ -n "$t" ] || die "usage: fuzz.sh run TARGET [SECONDS]; targets: $(echo $list)"
    grep -qx "$t" <<<"$list" || die "no fuzz target '$t'; targets: $(echo $list)"
    mkdir -p "$FUZZ_DIR/artifacts/$t"
    fuzz run "$t" "$FUZZ_DIR/corpus/$t" -- -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix="$FUZZ_DIR/artifacts/$t/"
}

cmd_cmin() {
    local t="${1:-}"
    local list
    list="$(targets)"
    grep -qx "$t" <<<"$list" || die "usage: fuzz.sh cmin TARGET; targets: $(echo $list)"
    local keep
    keep="$(mktemp -d)"
    # shellcheck disable=SC2064  # expand now: the folder is fixed
    trap "rm -rf '$keep'" EXIT
    find "$FUZZ_DIR/corpus/$t" -maxdepth 1 -name 'regression-*' -exec mv -t "$keep" {} +
    fuzz cmin "$t" "$FUZZ_DIR/corpus/$t" || { mv -t "$FUZZ_DIR/corpus/$t" "$keep"/*; die "cmin failed"; }
    find "$keep" -maxdepth 1 -type f -exec mv -t "$FUZZ_DIR/corpus/$t" {} +
    echo "fuzz: $t: $(find "$FUZZ_DIR/corpus/$t" -type f | wc -l) inputs"
}

case "${1:-}" in
    smoke) shift; cmd_smoke "$@" ;;
    run) shift; cmd_run "$@" ;;
    cmin) shift; cmd_cmin "$@" ;;
    list) targets ;;
    *) echo "usage: $0 smoke [SECONDS] | run TARGET [SECONDS] | cmin TARGET | list" >&2; exit 2 ;;
esac
