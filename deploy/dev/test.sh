#!/usr/bin/env bash
# The whole test suite in one command: start the private service stack, export
# its addresses, run `cargo test --workspace`, and tear the stack down again.
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
# cargo prints one "test result" line per test binary, the last often a doc-test run with no
# tests; close with one total so a reader (or CI) sees at once what ran.
out="$(mktemp)"
rc=0
cargo test --workspace --locked "$@" 2>&1 | tee "$out" || rc=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$out"
rm -f "$out"
exit "$rc"
