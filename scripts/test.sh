#!/usr/bin/env bash
# Runs the sshshim test suite: ensures the OpenSSH/rsync tools the
# integration tests drive are installed, then runs `cargo test`.
# Extra arguments are passed to `cargo test` (before the `--`).
set -euo pipefail

# Work from the repository root regardless of the caller's cwd.
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Tools the integration tests execute.
required=(/usr/sbin/sshd ssh scp sftp rsync curl ssh-keygen)
missing=()
for tool in "${required[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done

if ((${#missing[@]} > 0)); then
    echo "test.sh: missing tools: ${missing[*]}" >&2
    pkgs=(openssh-server openssh-client rsync curl)
    if [[ $(id -u) -eq 0 ]]; then
        sudo=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "test.sh: please install: ${pkgs[*]} (e.g. apt-get install ${pkgs[*]})" >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: no apt-get; please install: ${pkgs[*]}" >&2
        exit 1
    fi
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${pkgs[@]}"
fi

# Two threads: each test spawns sshd, the shim and clients; more parallelism
# only adds timing noise on small CI machines.
# The `ci` profile: optimised like release, without its LTO (see Cargo.toml).
cargo test --locked --profile ci "$@" -- --test-threads=2
# Then the differential suites again, every session resumable (--resume):
# what a client sees must stay what sshd shows it (issue 20); forward too,
# its connections then carried by the helper (issue 24). Skipped when the
# caller chose tests.
if (($# == 0)); then
    SSHSHIM_TEST_RESUME=1 cargo test --locked --profile ci --test session --test mux \
        --test forward -- --test-threads=2
fi
