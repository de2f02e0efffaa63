#!/usr/bin/env bash
# Long fuzzing run: the parsers' property tests (`fuzz_*` and their
# hand-picked `nasty_*` seeds) with many more cases than CI's 256, in an
# optimised build that keeps overflow checks and debug assertions, bounded
# in time.
#
#   scripts/fuzz.sh [CASES]       # default 100000 cases per property
#
# Environment: FUZZ_SECONDS (time bound for the run, default 1800),
# FUZZ_PROFILE (cargo profile, default "fuzz"; "release" reuses the build of
# scripts/test.sh, "dev" the debug build). A failure prints the smallest
# failing input proptest found: keep it as a regular test next to the fix.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cases=${1:-${SSHSHIM_FUZZ_CASES:-100000}}
seconds=${FUZZ_SECONDS:-1800}
profile=${FUZZ_PROFILE:-fuzz}
if ! [[ $cases =~ ^[1-9][0-9]*$ && $seconds =~ ^[1-9][0-9]*$ ]]; then
    echo "fuzz.sh: CASES and FUZZ_SECONDS must be positive integers" >&2
    exit 2
fi
targets=(--lib --test fuzz_parsers)
# Only the property tests and their seeds; the filters match test paths.
filters=(fuzz nasty)

# Build outside the time bound, so that it bounds the fuzzing only.
cargo test --locked --profile "$profile" "${targets[@]}" --no-run

log=$(mktemp "${TMPDIR:-/tmp}/sshshim-fuzz.XXXXXX")
trap 'rm -f "$log"' EXIT
echo "fuzz.sh: $cases cases per property, at most ${seconds}s, profile $profile"
start=$SECONDS
set +e
SSHSHIM_FUZZ_CASES=$cases timeout --kill-after=30 "$seconds" \
    cargo test --locked --profile "$profile" "${targets[@]}" -- "${filters[@]}" 2>&1 |
    tee "$log"
rc=${PIPESTATUS[0]}
set -e
elapsed=$((SECONDS - start))
if grep -q -- '\.\.\. FAILED' "$log"; then
    echo "fuzz.sh: FAILED after ${elapsed}s (see above)" >&2
    exit 1
fi
if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    echo "fuzz.sh: time bound of ${seconds}s reached; no failure in the tests that finished"
    exit 0
fi
if [[ $rc -ne 0 ]]; then
    echo "fuzz.sh: cargo test exited $rc after ${elapsed}s" >&2
    exit "$rc"
fi
echo "fuzz.sh: all properties held for $cases cases each (${elapsed}s)"
