#!/usr/bin/env bash
# Benchmark sshshim (its TCP endpoint and its OpenSSH multiplexing socket)
# against plain ssh ("direct") and an OpenSSH ControlMaster, all against the
# same throwaway sshd on 127.0.0.1 (loopback only).
#
#   scripts/bench.sh              full run (~15-20 min on 2 cores)
#   scripts/bench.sh --quick      small sizes, one round (~2-3 min), to try it out
#   scripts/bench.sh --no-build   use target/release/sshshim as it is
#   scripts/bench.sh --keep       keep the temporary directory (logs) at the end
#   other options go to scripts/bench.py run (e.g. --rounds 5, --only exec,fwd_down,
#   --fwd-mib 256, --conns 2000, --par-downloads 0; see
#   `python3 scripts/bench.py run --help`)
#   SSHSHIM_BIN=/path/to/sshshim scripts/bench.sh   benchmark that binary (no build)
#
# Needs: Linux, bash, python3 >= 3.8 (stdlib only), OpenSSH client (ssh, sftp,
# ssh-keygen) and server (/usr/sbin/sshd; as root, /run/sshd is created), head,
# cargo (unless --no-build / SSHSHIM_BIN); ~1.5 GiB free in $TMPDIR (default
# /tmp) and a raisable open-file limit (1,000 forwarded connections).
# Runs sshd as the current user on a random loopback port with its own host key
# and authorized_keys; the shims get their own state, runtime and config
# directories and `--mux PATH`; nothing outside the temporary directory is touched.
#
# Measures (medians over rounds; the contenders of a test interleaved, order
# rotated per round; ratios against ControlMaster):
#   exec latency of `ssh … true` (also through the mux socket, and through the
#   Host block `sshshim ssh-config` prints, without its ControlPath lines);
#   -L forward throughput 1 GiB each way; `cat` through exec 512 MiB each way
#   and sftp put/get of 512 MiB (also through the mux socket); with 50 ms RTT
#   added by a delay proxy in front of sshd: exec latency (also through the mux
#   socket), the -L and cat downloads (256 MiB each: they are window-bound, so
#   1 GiB would only add minutes; --rtt-fwd-mib 1024 --rtt-cat-mib 512 for the
#   full sizes); sshshim's CPU s/GiB (and that of the ssh processes on the -L
#   tests); RSS: idle, peak during the bulk tests, during 50 concurrent 16 MiB
#   -L downloads and during 1,000 open forwarded connections (each through a
#   client -L and through an sshshim-owned -L); 1,000 sshshim-owned -R tunnels
#   in one `sshshim supervise` (seconds until sshd listens on all, RSS, seconds
#   until all listen again after the upstream connection is reset; --tunnels N,
#   0 to skip). The endpoint rows use a stock client: `ssh -F /dev/null`, no
#   Host block, OpenSSH's default algorithm order.
# Writes bench/results.md (with a table of the targets, PASS/MISS),
# bench/results.svg (ratios vs ControlMaster) and bench/results.json; prints
# the tables. A failing sub-benchmark is recorded as "error" and the run
# continues.
#
# Everything started here is stopped on exit (trap): bench.py stops what it
# started (ControlMasters with `ssh -O exit`, then its children by PID); as a
# fallback this script kills any PID bench.py recorded whose command line still
# names the run directory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

build=true
keep=false
pass=()
for arg in "$@"; do
    case "$arg" in
        --no-build) build=false ;;
        --keep) keep=true ;;
        -h|--help) sed -n '2,48p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) pass+=("$arg") ;;
    esac
done

missing=()
for t in python3 ssh sftp ssh-keygen head /usr/sbin/sshd; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
if ((${#missing[@]})); then
    echo "bench.sh: missing: ${missing[*]} (Debian: apt-get install openssh-client openssh-server python3)" >&2
    exit 1
fi

if [[ -n "${SSHSHIM_BIN:-}" ]]; then
    bin=$SSHSHIM_BIN
else
    bin=$root/target/release/sshshim
    if $build; then
        echo "== cargo build --release" >&2
        if ! cargo build --release --quiet; then
            if [[ -x "$bin" ]]; then
                echo "bench.sh: WARNING: build failed; benchmarking the existing $bin" >&2
            else
                exit 1
            fi
        fi
    fi
fi
[[ -x "$bin" ]] || { echo "bench.sh: no sshshim binary at $bin" >&2; exit 1; }

# raise the open-file limit (1,000 connections pass through several processes)
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [[ $(ulimit -n) != unlimited && $(ulimit -n) -lt 4096 ]]; then
    echo "bench.sh: WARNING: open-file limit is $(ulimit -n); the 1,000-connection test may fail" >&2
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/sshshim-bench.XXXXXX")
py_pid=
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    if [[ -n "$py_pid" ]] && kill -0 "$py_pid" 2>/dev/null; then
        kill -TERM "$py_pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$py_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$py_pid" 2>/dev/null || true
    fi
    # fallback: anything bench.py started that is still alive (checked by the
    # run directory on its command line, so a reused PID is never hit)
    if [[ -f "$dir/pids" ]]; then
        while read -r p; do
            [[ -r /proc/$p/cmdline ]] || continue
            if tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$dir"; then
                kill -TERM "$p" 2>/dev/null || true
            fi
        done <"$dir/pids"
    fi
    if $keep; then
        echo "bench.sh: logs kept in $dir" >&2
    else
        rm -rf "$dir"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# copy the binary: other people may rebuild target/ while we measure
cp "$bin" "$dir/sshshim"
# and the remote helper built beside it, which --resume uploads
if [[ -x "$(dirname "$bin")/sshshim-remote-helper" ]]; then
    cp "$(dirname "$bin")/sshshim-remote-helper" "$dir/"
fi
version="$("$dir/sshshim" --version 2>/dev/null || echo sshshim)"
rev="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo '?')"
if [[ -n "$(git -C "$root" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null)" ]]; then
    rev="$rev+uncommitted changes"
fi
bin_time="$(date -r "$bin" '+%Y-%m-%d %H:%M' 2>/dev/null || echo '?')"

mkdir -p "$root/bench"
python3 "$root/scripts/bench.py" run --dir "$dir" --bin "$dir/sshshim" --out "$root/bench" \
    --shim-version "$version (git $rev, binary built $bin_time)" ${pass[@]+"${pass[@]}"} &
py_pid=$!
wait "$py_pid"
