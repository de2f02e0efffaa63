#!/usr/bin/env bash
# Soak test: many cycles of upstream faults (drop, refuse, blackhole, sshd
# restart) with live traffic in every cycle, against a private sshd on
# loopback (tests/soak.rs). Prints one line per cycle, then the series of the
# shim's descriptors, threads and memory as a table and the count of every
# outcome; fails on a leak, a silently short or hung transfer, or a lost -R.
#
# Usage: scripts/soak.sh [--debug] [CYCLES]
#   CYCLES    cycles to run (default 1000)
#   --debug   debug build instead of the optimised `ci` profile
# Environment:
#   SOAK_MINUTES   bound on the run in minutes (default 30). The driver
#                  starts no new cycle after SOAK_MINUTES - 2, and the run is
#                  killed at SOAK_MINUTES; the build is not counted.
# The full output is kept in target/soak-DATE.log.
set -euo pipefail

# Work from the repository root regardless of the caller's cwd.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

profile=(--profile ci)   # optimised, no LTO (as scripts/test.sh)
cycles=1000
for arg in "$@"; do
    case $arg in
        --debug) profile=() ;;
        -h | --help) usage; exit 0 ;;
        '' | *[!0-9]*) echo "soak.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
        *) cycles=$arg ;;
    esac
done
minutes=${SOAK_MINUTES:-30}
if [[ ! $minutes =~ ^[0-9]+$ ]] || ((minutes < 3)); then
    echo "soak.sh: SOAK_MINUTES must be a whole number of at least 3 (got '$minutes')" >&2
    exit 2
fi

for tool in /usr/sbin/sshd ssh ssh-keygen; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "soak.sh: $tool is missing; install openssh-server and openssh-client" \
            "(or run scripts/test.sh once, which installs them)" >&2
        exit 1
    fi
done

# Build first, so the time bound covers the soak itself.
cargo test --locked "${profile[@]}" --test soak --no-run

mkdir -p target
log=target/soak-$(date +%Y%m%d-%H%M%S).log
echo "soak.sh: $cycles cycles, at most $minutes minutes; log: $log"
status=0
SSHSHIM_SOAK_CYCLES=$cycles SSHSHIM_SOAK_SECS=$(((minutes - 2) * 60)) \
    timeout --kill-after=30s "${minutes}m" \
    cargo test --locked "${profile[@]}" --test soak -- --nocapture 2>&1 |
    tee "$log" || status=$?
if ((status == 124 || status == 137)); then
    echo "soak.sh: killed after $minutes minutes (a cycle hung?); see $log" >&2
elif ((status != 0)); then
    echo "soak.sh: FAILED (exit $status); see $log" >&2
else
    echo "soak.sh: passed; see $log"
fi
exit "$status"
