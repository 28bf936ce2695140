#!/usr/bin/env bash
# The whole test suite in one command: start the private service stack, export
# its addresses, run `cargo test --workspace --no-fail-fast` (every test binary, even after a
# failure), and tear the stack down again. Exits non-zero when any test or binary failed.
#   PRIMESPARK_KEEP_STACK=1  leave the stack running afterwards (for debugging)
#   extra arguments are passed to `cargo test`
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/../.." && pwd)"
STACK="$SCRIPT_DIR/stack.sh"

# Shared target dir outside the work tree so fresh clones reuse build artefacts.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/primespark-target}"

# shellcheck disable=SC2329  # invoked by the EXIT trap
cleanup() {
    if [ "${PRIMESPARK_KEEP_STACK:-0}" = 1 ]; then
        echo "test.sh: PRIMESPARK_KEEP_STACK=1, leaving the stack up ($STACK down to stop it)" >&2
    else
        "$STACK" down || true
    fi
}
trap cleanup EXIT
# Make Ctrl-C / kill still run the EXIT trap (and so stop the stack).
trap 'exit 130' INT
trap 'exit 143' TERM

"$STACK" up
eval "$("$STACK" env)"

cd "$REPO_ROOT"
# Every test binary runs (--no-fail-fast): a failure in one does not hide the results of the
# others. cargo prints one "test result" line per binary that ran (the last often a doc-test
# run with no tests); a binary that crashed, or could not be built, has none, but cargo names
# it in "error: test failed, to rerun pass `...`". Close with one total so a reader (or CI) sees
# at once what ran, and fail when anything failed.
out="$(mktemp)"
rc=0
cargo test --workspace --locked --no-fail-fast "$@" 2>&1 | tee "$out" || rc=$?
summary="$(awk '
    /^test result:/ {
        binaries++
        if ($3 != "ok.") failed_binaries++
        for (i = 1; i < NF; i++) {
            if ($(i+1) ~ /^passed/) p += $i
            if ($(i+1) ~ /^failed/) f += $i
            if ($(i+1) ~ /^ignored/) ig += $i
        }
    }
    /^error: test failed, to rerun pass / { sub(/^error: test failed, to rerun pass /, ""); crashed[$0] = 1 }
    END {
        printf "total: %d passed, %d failed, %d ignored in %d test binaries", p, f, ig, binaries
        n = 0
        for (t in crashed) n++
        if (n > 0) printf "; %d binaries failed:", n
        for (t in crashed) printf " %s", t
        printf "\n"
        exit (f > 0 || failed_binaries > 0 || n > 0) ? 1 : 0
    }' "$out")" || { [ "$rc" -ne 0 ] || rc=1; }
echo "$summary"
rm -f "$out"
exit "$rc"
