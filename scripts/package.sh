#!/usr/bin/env bash
# Builds the Debian package target/debian/sshshim_VERSION-1_ARCH.deb with
# cargo-deb (installed with `cargo install cargo-deb --locked` if missing):
# the release binary, its man pages, bash/zsh/fish completion, the systemd
# user unit template sshshim@.service, README and LICENSE (see
# [package.metadata.deb] in Cargo.toml for where each goes).
#
# The man pages, completion scripts and unit are written by the freshly
# built binary itself, so they describe exactly the binary they ship with.
# Arguments are passed to `cargo deb` (e.g. --deb-revision 2).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "package.sh: installing cargo-deb (cargo install cargo-deb --locked)" >&2
    cargo install cargo-deb --locked
fi

cargo build --release --locked

assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
bin="$PWD/target/release"
# Reproducible page dates: the last commit's, when there is one.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}
export SOURCE_DATE_EPOCH
# Run as plain `sshshim` (first on $PATH), so the completion scripts call
# whichever `sshshim` is on the user's $PATH, not this build directory.
sshshim() { PATH="$bin:$PATH" command sshshim "$@"; }
sshshim man --dir "$assets/man" >/dev/null
sshshim completions bash >"$assets/completions/sshshim"
sshshim completions zsh >"$assets/completions/_sshshim"
sshshim completions fish >"$assets/completions/sshshim.fish"
sshshim service template --exe /usr/bin/sshshim >"$assets/sshshim@.service"

cargo deb --no-build --locked "$@"
ls -l target/debian/*.deb
