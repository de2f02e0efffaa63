#!/usr/bin/env bash
# Try sshshim end to end on this machine, nothing to set up: starts a
# throwaway sshd on 127.0.0.1 as the "remote" server, runs `sshshim up`
# against it, and shows ssh, scp, sftp and rsync going through the shim.
# Everything lives in a temporary directory that is removed at the end.
#
#   scripts/try.sh            run the demo and exit
#   scripts/try.sh --keep     leave the shim running until Enter is pressed
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

keep=false
[[ "${1:-}" == "--keep" ]] && keep=true

need=(/usr/sbin/sshd ssh scp sftp rsync ssh-keygen)
missing=()
for t in "${need[@]}"; do command -v "$t" >/dev/null 2>&1 || missing+=("$t"); done
if ((${#missing[@]})); then
    pkgs=(openssh-server openssh-client rsync)
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
        echo "try.sh: installing ${pkgs[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
    else
        echo "try.sh: please install ${pkgs[*]} (missing: ${missing[*]})" >&2
        exit 1
    fi
fi

echo "== building sshshim (release)"
cargo build --release --locked --quiet
bin=$PWD/target/release/sshshim

dir=$(mktemp -d /tmp/sshshim-try.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sshd_port=$(free_port)
shim_port=$(free_port)
user=$(id -un)

ssh-keygen -q -t ed25519 -N '' -f "$dir/server_host_key"
ssh-keygen -q -t ed25519 -N '' -C "sshshim-try" -f "$dir/id_ed25519"
cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
[[ $(id -u) -eq 0 ]] && mkdir -p /run/sshd
cat >"$dir/sshd_config" <<EOF
ListenAddress 127.0.0.1:$sshd_port
HostKey $dir/server_host_key
AuthorizedKeysFile $dir/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PidFile none
Subsystem sftp internal-sftp
LogLevel ERROR
EOF
/usr/sbin/sshd -D -e -f "$dir/sshd_config" 2>"$dir/sshd.log" &
pids+=($!)
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$sshd_port") 2>/dev/null && break
    sleep 0.05
done
echo "== throwaway sshd listening on 127.0.0.1:$sshd_port (the 'remote' server)"

# The server's key goes into a known_hosts of our own: sshshim verifies it.
echo "[127.0.0.1]:$sshd_port $(cut -d' ' -f1,2 "$dir/server_host_key.pub")" >"$dir/known_hosts"

echo "== sshshim up $user@127.0.0.1:$sshd_port"
XDG_STATE_HOME="$dir/state" SSH_AUTH_SOCK='' "$bin" up \
    --known-hosts "$dir/known_hosts" -i "$dir/id_ed25519" \
    --authorized-keys "$dir/authorized_keys" \
    --listen "127.0.0.1:$shim_port" "$user@127.0.0.1:$sshd_port" \
    >"$dir/shim.out" 2>"$dir/shim.err" &
pids+=($!)
for _ in $(seq 200); do
    grep -q "^sshshim: listening on" "$dir/shim.out" 2>/dev/null && break
    if ! kill -0 "${pids[-1]}" 2>/dev/null; then cat "$dir/shim.err" >&2; exit 1; fi
    sleep 0.05
done
sed 's/^/   | /' "$dir/shim.out"

opts=(-F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=accept-new
      -o "UserKnownHostsFile=$dir/client_known_hosts" -o IdentitiesOnly=yes
      -i "$dir/id_ed25519")
show() { echo; echo "\$ $*"; "$@"; }

show ssh "${opts[@]}" -p "$shim_port" localhost 'echo "hello from $(hostname) via sshshim"; exit 3' || echo "(exit status $?, as the remote command said)"
head -c 5000000 /dev/urandom >"$dir/file.bin"
show scp "${opts[@]}" -P "$shim_port" "$dir/file.bin" "localhost:$dir/copied.bin"
cmp "$dir/file.bin" "$dir/copied.bin" && echo "   scp: 5 MB copied, identical"
printf 'ls -l %s/copied.bin\n' "$dir" >"$dir/batch"
show sftp "${opts[@]}" -P "$shim_port" -b "$dir/batch" localhost
show rsync -a -e "ssh ${opts[*]} -p $shim_port" "$dir/file.bin" "localhost:$dir/rsynced.bin"
cmp "$dir/file.bin" "$dir/rsynced.bin" && echo "   rsync: identical"
echo
echo "== all of the above used ONE upstream connection:"
grep -c "connected to" "$dir/shim.err" | sed 's/^/   upstream connections made: /'

if $keep; then
    echo
    echo "The shim is still running. Try, in another terminal:"
    echo "  ssh -o UserKnownHostsFile=$dir/client_known_hosts -i $dir/id_ed25519 -p $shim_port localhost"
    read -r -p "Press Enter to stop. " _ || true
fi
echo "== done; cleaning up"
