#!/usr/bin/env python3
"""Benchmark helper for scripts/bench.sh (python3 stdlib only).

Subcommands:
  run    ...               the whole benchmark (normally started by bench.sh)
  sink   DIR ZEROFILE      sink/source server for -L throughput (prints "PORT n")
  echo   DIR               asyncio echo server (prints "PORT n")
  delay  DIR TARGET MS     delay proxy in front of 127.0.0.1:TARGET, MS per
                           direction, order preserved, no bandwidth cap
                           (prints "PORT n")
  relay  DIR TARGET        relay to 127.0.0.1:TARGET that resets every
                           connection on SIGUSR1 (prints "PORT n")
DIR is only there so that every process we start names the run directory on
its command line (bench.sh's fallback cleanup relies on that).
"""
import argparse
import asyncio
import collections
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time

MiB = 1 << 20
GiB = 1 << 30


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def announce_port(port):
    sys.stdout.write("PORT %d\n" % port)
    sys.stdout.flush()


# --------------------------------------------------------------------------
# sink / source server
#   client sends "U <n>\n": server reads n bytes, then answers "OK\n"
#   client sends "D <n>\n": server sends n bytes (sendfile from a zero file),
#                           then closes
# --------------------------------------------------------------------------
def read_line(sock):
    buf = b""
    while not buf.endswith(b"\n"):
        c = sock.recv(1)
        if not c:
            return None
        buf += c
        if len(buf) > 64:
            return None
    return buf.decode().strip()


def send_zeros(sock, fd, fsize, n):
    sent = 0
    while sent < n:
        off = sent % fsize
        cnt = min(n - sent, fsize - off)
        k = os.sendfile(sock.fileno(), fd, off, cnt)
        if k == 0:
            raise IOError("sendfile returned 0")
        sent += k
    return sent


def recv_count(sock, n, buf):
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view, min(len(buf), n - got))
        if k == 0:
            break
        got += k
    return got


def cmd_sink(args):
    fd = os.open(args.zerofile, os.O_RDONLY)
    fsize = os.fstat(fd).st_size

    class H(socketserver.BaseRequestHandler):
        def handle(self):
            s = self.request
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            line = read_line(s)
            if not line:
                return
            mode, n = line.split()
            n = int(n)
            if mode == "U":
                buf = bytearray(4 * MiB)
                got = recv_count(s, n, buf)
                s.sendall(b"OK\n" if got == n else b"SHORT\n")
            elif mode == "D":
                try:
                    send_zeros(s, fd, fsize, n)
                    s.shutdown(socket.SHUT_WR)
                    s.recv(1)  # wait for the client to close
                except OSError:
                    pass

    class S(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 128

    srv = S(("127.0.0.1", 0), H)
    announce_port(srv.server_address[1])
    srv.serve_forever()


# --------------------------------------------------------------------------
# echo server
# --------------------------------------------------------------------------
def cmd_echo(args):
    raise_nofile()

    async def handle(reader, writer):
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except Exception:
            pass
        finally:
            writer.close()

    async def main():
        srv = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=2048)
        announce_port(srv.sockets[0].getsockname()[1])
        await srv.serve_forever()

    asyncio.run(main())


# --------------------------------------------------------------------------
# delay proxy: every chunk is delivered `delay` seconds after it arrived,
# in order; half-close is forwarded; reading pauses when much is queued.
# --------------------------------------------------------------------------
def cmd_delay(args):
    raise_nofile()
    delay = args.ms / 1000.0
    HIGH, LOW = 64 * MiB, 16 * MiB

    class Dir:
        def __init__(self, loop):
            self.loop = loop
            self.q = collections.deque()
            self.timer = None
            self.src = None  # transport we read from
            self.dst = None  # transport we write to
            self.queued = 0
            self.src_paused = False
            self.dst_blocked = False
            self.closed = False

        def push(self, item):
            if self.closed:
                return
            self.q.append((self.loop.time() + delay, item))
            if isinstance(item, bytes):
                self.queued += len(item)
                if self.queued > HIGH:
                    self.pause_src()
            if self.timer is None:
                self.timer = self.loop.call_at(self.q[0][0], self.flush)

        def pause_src(self):
            if not self.src_paused and self.src is not None:
                self.src_paused = True
                try:
                    self.src.pause_reading()
                except Exception:
                    pass

        def maybe_resume(self):
            if self.src_paused and self.queued < LOW and not self.dst_blocked:
                self.src_paused = False
                try:
                    self.src.resume_reading()
                except Exception:
                    pass

        def flush(self):
            self.timer = None
            now = self.loop.time()
            while self.q and self.q[0][0] <= now:
                _, item = self.q.popleft()
                if self.closed:
                    continue
                if isinstance(item, bytes):
                    self.queued -= len(item)
                    self.dst.write(item)
                elif item == "EOF":
                    try:
                        if self.dst.can_write_eof():
                            self.dst.write_eof()
                    except Exception:
                        pass
                elif item == "CLOSE":
                    self.closed = True
                    self.dst.close()
            if self.q and not self.closed:
                self.timer = self.loop.call_at(self.q[0][0], self.flush)
            self.maybe_resume()

    class Side(asyncio.Protocol):
        # out: the Dir this side feeds; inn: the Dir writing to this side
        def __init__(self, out, inn):
            self.out, self.inn = out, inn

        def connection_made(self, transport):
            self.transport = transport
            self.out.src = transport
            self.inn.dst = transport

        def data_received(self, data):
            self.out.push(data)

        def eof_received(self):
            self.out.push("EOF")
            return True

        def connection_lost(self, exc):
            self.out.push("CLOSE")

        def pause_writing(self):
            self.inn.dst_blocked = True
            self.inn.pause_src()

        def resume_writing(self):
            self.inn.dst_blocked = False
            self.inn.maybe_resume()

    async def main():
        loop = asyncio.get_running_loop()

        class Front(Side):
            def connection_made(self, transport):
                super().connection_made(transport)
                transport.pause_reading()
                self.out.src_paused = True
                loop.create_task(self.connect())

            async def connect(self):
                try:
                    await loop.create_connection(
                        lambda: Side(self.inn, self.out), "127.0.0.1", args.target)
                    self.out.src_paused = False
                    self.transport.resume_reading()
                except OSError:
                    self.transport.close()

        def factory():
            up, down = Dir(loop), Dir(loop)
            return Front(up, down)

        srv = await loop.create_server(factory, "127.0.0.1", 0, backlog=512)
        announce_port(srv.sockets[0].getsockname()[1])
        await srv.serve_forever()

    asyncio.run(main())


# --------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------
def cmd_relay(args):
    """TCP relay to 127.0.0.1:TARGET that resets every connection it carries
    (both sides, RST) on SIGUSR1: an upstream drop on demand."""
    import struct

    async def main():
        loop = asyncio.get_running_loop()
        live = set()  # writers of both sides of every connection

        def cut():
            for w in list(live):
                sock = w.get_extra_info("socket")
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
                w.transport.abort()
            live.clear()

        loop.add_signal_handler(signal.SIGUSR1, cut)

        async def pipe(r, w):
            try:
                while True:
                    b = await r.read(1 << 16)
                    if not b:
                        break
                    w.write(b)
                    await w.drain()
            except Exception:
                pass
            finally:
                if w in live:
                    live.discard(w)
                    w.close()

        async def handle(r1, w1):
            try:
                r2, w2 = await asyncio.open_connection("127.0.0.1", args.target)
            except OSError:
                w1.close()
                return
            live.update((w1, w2))
            await asyncio.gather(pipe(r1, w2), pipe(r2, w1))

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        announce_port(srv.sockets[0].getsockname()[1])
        async with srv:
            await srv.serve_forever()

    asyncio.run(main())


def listening_inodes(ports):
    """{port: socket inode} of the TCP sockets listening on 127.0.0.1 at any
    of `ports` (from /proc/net/tcp; loopback forwards bind 127.0.0.1)."""
    out = {}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            p = line.split()
            if p[3] != "0A":  # LISTEN
                continue
            addr, port = p[1].split(":")
            port = int(port, 16)
            if addr == "0100007F" and port in ports:
                out[port] = p[9]
    return out


def log(msg):
    sys.stderr.write("[%s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_port(port, timeout=20.0, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("process exited (rc %s) before port %d opened" % (proc.returncode, port))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("port %d did not open" % port)


def proc_cpu(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime = field 14, stime = field 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_mem(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) / 1024.0  # MiB
    return out


def reset_hwm(pid):
    try:
        with open("/proc/%d/clear_refs" % pid, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None



def stop_all(procs):
    """Stops the processes a phase started, newest first: SIGTERM, then
    SIGKILL after 10 s."""
    for q in reversed(procs):
        if q.poll() is None:
            q.terminate()
            try:
                q.wait(timeout=10)
            except subprocess.TimeoutExpired:
                q.kill()
                q.wait()

class Bench:
    # every contender; each test names the ones it runs (see tests())
    CONTENDERS = ("direct", "ControlMaster", "sshshim", "sshshim-cfg", "mux", "resume")
    NAMES = {"direct": "direct", "ControlMaster": "ControlMaster", "sshshim": "sshshim endpoint",
             "sshshim-cfg": "sshshim endpoint, ssh-config block", "mux": "sshshim mux socket",
             "resume": "sshshim endpoint, --resume"}

    def __init__(self, a):
        self.a = a
        self.dir = a.dir
        self.procs = []  # (name, Popen)
        self.masters = []  # control sockets to "ssh -O exit"
        self.pidfile = open(os.path.join(self.dir, "pids"), "a")
        self.results = collections.defaultdict(lambda: collections.defaultdict(list))
        self.errors = collections.defaultdict(list)
        self.shim_cpu = collections.defaultdict(lambda: [0.0, 0])  # (test, contender) -> [cpu s, bytes]
        self.fwd_cpu = collections.defaultdict(lambda: [0.0, 0])  # (test, process) -> [cpu s, bytes]
        self.fwd_proc = {}
        self.notes = []
        self.mem = {}
        self.conc = {}
        self.par = {}  # parallel -L downloads: via -> result
        self.tun = {}  # -R tunnels in one supervise: start/drop seconds, RSS
        self.baselines = {}
        self.loads = []
        self.env = dict(os.environ, SSH_AUTH_SOCK="")
        self.env.pop("SSH_AGENT_PID", None)

    # ---- process management ------------------------------------------
    def spawn(self, name, argv, stdout=None, env=None, stdin=subprocess.DEVNULL):
        errf = open(os.path.join(self.dir, "%s.err" % name), "ab")
        if stdout is None:
            stdout = open(os.path.join(self.dir, "%s.out" % name), "ab")
        p = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=errf, env=env or self.env)
        self.procs.append((name, p))
        self.pidfile.write("%d\n" % p.pid)
        self.pidfile.flush()
        return p

    def spawn_helper(self, name, args):
        p = self.spawn(name, [sys.executable, os.path.abspath(__file__)] + args, stdout=subprocess.PIPE)
        line = p.stdout.readline().decode()
        if not line.startswith("PORT "):
            raise RuntimeError("%s did not start: %s" % (name, self.tail(name)))
        return p, int(line.split()[1])

    def tail(self, name, n=5):
        try:
            with open(os.path.join(self.dir, "%s.err" % name), "rb") as f:
                return b" | ".join(f.read().splitlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""

    def cleanup(self):
        for sock in self.masters:
            try:
                subprocess.run(self.ssh_base() + ["-o", "ControlPath=" + sock, "-O", "exit", "127.0.0.1"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=10, env=self.env)
            except Exception:
                pass
        for name, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    p.terminate()
                except OSError:
                    pass
        end = time.time() + 5
        for name, p in self.procs:
            try:
                p.wait(timeout=max(0.1, end - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    # ---- command builders --------------------------------------------
    def ssh_base(self, prog="ssh"):
        return [prog, "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", "UserKnownHostsFile=" + getattr(self, "client_kh", "/dev/null"), "-o", "LogLevel=ERROR",
                "-o", "IdentitiesOnly=yes", "-i", self.key]

    def target(self, contender, rtt=False, prog="ssh"):
        """argv prefix reaching the server via contender (ending in the host)."""
        pflag = "-P" if prog in ("sftp", "scp") else "-p"
        base = self.ssh_base(prog)
        if contender == "direct":
            return base + [pflag, str(self.proxy_port if rtt else self.sshd_port), "127.0.0.1"]
        if contender == "ControlMaster":
            sock = self.cm_rtt_sock if rtt else self.cm_sock
            return base + ["-o", "ControlPath=" + sock, "-o", "ControlMaster=no",
                           pflag, str(self.proxy_port if rtt else self.sshd_port), "127.0.0.1"]
        if contender == "sshshim":
            return base + [pflag, str(self.shim_rtt_port if rtt else self.shim_port), "127.0.0.1"]
        if contender == "resume":
            # a second shim with --resume: every session under the remote helper
            return base + [pflag, str(self.shim_res_rtt_port if rtt else self.shim_res_port), "127.0.0.1"]
        if contender == "mux":
            # any host name works through the socket; an unresolvable one
            # makes a failed socket an error instead of a silent direct connect.
            # The port is passed as for ControlMaster (the socket ignores it):
            # without one, ssh looks up the "ssh" service through NSS
            # (getservbyname: about 140 more syscalls, /etc/services), work
            # the ControlMaster row's client never did (a few tenths of a ms).
            sock = self.shim_rtt_mux if rtt else self.shim_mux
            return base + ["-o", "ControlPath=" + sock, "-o", "ControlMaster=no",
                           pflag, str(self.proxy_port if rtt else self.sshd_port), "sshshim-mux.invalid"]
        if contender == "sshshim-cfg":
            if rtt or prog != "ssh":
                raise ValueError("the ssh-config block is measured for exec only")
            # the Host block as `sshshim ssh-config` prints it (its own
            # known_hosts, HostKeyAlias, Ciphers, KexAlgorithms), without the
            # ControlPath lines, so this reaches the TCP endpoint
            return [prog, "-F", self.cfg_file, "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                    "-o", "IdentitiesOnly=yes", "-i", self.key, self.cfg_host]
        raise ValueError(contender)

    # ---- setup ----------------------------------------------------------
    def keygen(self, path, comment="bench"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
                       check=True, stdin=subprocess.DEVNULL)

    def setup(self):
        d = self.dir
        a = self.a
        user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        self.key = os.path.join(d, "id_ed25519")
        self.keygen(self.key)
        self.keygen(os.path.join(d, "sshd_host_key"))
        self.keygen(os.path.join(d, "shim_host_key"))
        shutil.copy(self.key + ".pub", os.path.join(d, "authorized_keys"))
        os.makedirs(os.path.join(d, "remote"), exist_ok=True)
        os.makedirs(os.path.join(d, "local"), exist_ok=True)
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)

        # data files
        self.zero = os.path.join(d, "zeros.bin")
        with open(self.zero, "wb") as f:
            f.truncate(0)
            blk = bytes(MiB)
            for _ in range(64):
                f.write(blk)
        self.sftp_src = os.path.join(d, "sftp_src.bin")
        with open(self.sftp_src, "wb") as f:
            blk = os.urandom(MiB)  # incompressible (no compression is on anyway)
            for _ in range(a.sftp_mib):
                f.write(blk)

        # sshd
        self.sshd_port = free_port()
        cfg = os.path.join(d, "sshd_config")
        with open(cfg, "w") as f:
            f.write("""ListenAddress 127.0.0.1:%d
HostKey %s/sshd_host_key
AuthorizedKeysFile %s/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin yes
PidFile none
Subsystem sftp internal-sftp
LogLevel ERROR
# An empty HOME for the remote shell: bash run by sshd reads ~/.bashrc, and a
# heavy one (pyenv, conda: 150+ ms) would hide the contenders' own latency.
SetEnv HOME=%s/home
""" % (self.sshd_port, d, d, d))
        os.makedirs(os.path.join(d, "home"), exist_ok=True)
        p = self.spawn("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", cfg])
        wait_port(self.sshd_port, proc=p)
        hostkey = " ".join(open(os.path.join(d, "sshd_host_key.pub")).read().split()[:2])

        # helpers
        self.sink_p, self.sink_port = self.spawn_helper("sink", ["sink", d, self.zero])
        self.echo_p, self.echo_port = self.spawn_helper("echo", ["echo", d])
        self.proxy_p, self.proxy_port = self.spawn_helper(
            "delay", ["delay", d, str(self.sshd_port), str(a.delay_ms)])

        with open(os.path.join(d, "known_hosts"), "w") as f:
            f.write("[127.0.0.1]:%d %s\n" % (self.sshd_port, hostkey))
            f.write("[127.0.0.1]:%d %s\n" % (self.proxy_port, hostkey))

        # sshshim: one with a fast upstream, one through the delay proxy;
        # each serves its multiplexing socket at a path we choose
        self.shim_name = "%s@127.0.0.1" % user
        self.shim_port = free_port()
        self.shim_owned_echo = free_port()
        self.shim_owned_sink = free_port()
        self.shim_mux = os.path.join(d, "shim.mux")
        self.shim = self.start_shim("shim", self.shim_port, self.sshd_port,
                                    ["-L", "127.0.0.1:%d:127.0.0.1:%d" % (self.shim_owned_echo, self.echo_port),
                                     "-L", "127.0.0.1:%d:127.0.0.1:%d" % (self.shim_owned_sink, self.sink_port),
                                     "--mux", self.shim_mux], self.shim_name)
        self.shim_rtt_port = free_port()
        self.shim_rtt_mux = os.path.join(d, "shim_rtt.mux")
        self.shim_rtt = self.start_shim("shim_rtt", self.shim_rtt_port, self.proxy_port,
                                        ["--mux", self.shim_rtt_mux], self.shim_name)
        # and the same two with --resume (issue 20: the cost of a resumable session)
        self.shim_res_port = free_port()
        self.shim_res = self.start_shim("shim_res", self.shim_res_port, self.sshd_port,
                                        ["--resume", "--mux", "none"], self.shim_name)
        self.shim_res_rtt_port = free_port()
        self.shim_res_rtt = self.start_shim("shim_res_rtt", self.shim_res_rtt_port, self.proxy_port,
                                            ["--resume", "--mux", "none"], self.shim_name)
        self.write_cfg_block()

        # Clients verify host keys as a real user's would (keys known in
        # advance): a fresh "Permanently added" write on every run would
        # cost each new connection ~5 ms that ControlMaster never pays.
        shimkey = " ".join(open(os.path.join(d, "shim_host_key.pub")).read().split()[:2])
        self.client_kh = os.path.join(d, "client_known_hosts")
        with open(self.client_kh, "w") as f:
            for port in (self.sshd_port, self.proxy_port):
                f.write("[127.0.0.1]:%d %s\n" % (port, hostkey))
            for port in (self.shim_port, self.shim_rtt_port, self.shim_res_port, self.shim_res_rtt_port):
                f.write("[127.0.0.1]:%d %s\n" % (port, shimkey))

        # ControlMasters
        self.cm_sock = os.path.join(d, "cm.sock")
        self.cm_rtt_sock = os.path.join(d, "cm_rtt.sock")
        self.cm_pid = self.start_master(self.cm_sock, self.sshd_port)
        self.cm_rtt_pid = self.start_master(self.cm_rtt_sock, self.proxy_port)

        # forwards: sink and echo for each contender, sink again through the delay
        self.fwd = {}
        for c in ("direct", "ControlMaster", "sshshim"):
            self.fwd[c] = self.open_forwards(c, False, {"sink": self.sink_port, "echo": self.echo_port})
            self.fwd[c + "@rtt"] = self.open_forwards(c, True, {"sink": self.sink_port})
        # a client -L through the --resume shim: the helper carries it (issue 24)
        self.fwd["resume"] = self.open_forwards("resume", False, {"sink": self.sink_port, "echo": self.echo_port})

    def shim_env(self, name):
        """Private state, runtime (control socket) and config directories per
        shim: the two shims serve the same destination name, and nothing of
        the user running the bench is read or written."""
        d = self.dir
        return dict(self.env, XDG_STATE_HOME=os.path.join(d, name + "_state"),
                    XDG_RUNTIME_DIR=os.path.join(d, name + "_run"),
                    XDG_CONFIG_HOME=os.path.join(d, name + "_config"))

    def start_shim(self, name, listen_port, up_port, extra, dest):
        d = self.dir
        env = self.shim_env(name)
        os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700, exist_ok=True)
        argv = [self.a.bin, "up", "--listen", "127.0.0.1:%d" % listen_port,
                "--known-hosts", os.path.join(d, "known_hosts"), "-i", self.key,
                "--authorized-keys", os.path.join(d, "authorized_keys"),
                "--host-key", os.path.join(d, "shim_host_key"), "-p", str(up_port)] + extra + [dest]
        p = self.spawn(name, argv, env=env)
        out = os.path.join(d, name + ".out")
        end = time.time() + 30
        while time.time() < end:
            if p.poll() is not None:
                raise RuntimeError("%s exited (rc %s): %s" % (name, p.returncode, self.tail(name)))
            with open(out) as f:
                text = f.read()
            mux = extra[extra.index("--mux") + 1] if "--mux" in extra else None
            mux = None if mux == "none" else mux
            if "sshshim: listening on" in text and (mux is None or "\n  mux:" in text):
                if mux and not os.path.exists(mux):
                    raise RuntimeError("%s: banner printed, but no mux socket at %s" % (name, mux))
                return p
            time.sleep(0.05)
        raise RuntimeError("%s: no 'listening' (and 'mux:') line within 30 s: %s" % (name, self.tail(name)))

    def write_cfg_block(self):
        """`sshshim ssh-config NAME` against the running fast shim, minus the
        ControlPath/ControlMaster lines (that row measures the endpoint)."""
        r = subprocess.run([self.a.bin, "ssh-config", self.shim_name], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=30, env=self.shim_env("shim"))
        if r.returncode != 0:
            raise RuntimeError("sshshim ssh-config: rc %d: %s" % (r.returncode, r.stderr.strip()[-300:]))
        self.cfg_block_full = r.stdout
        kept = [l for l in r.stdout.splitlines()
                if l.split()[:1] not in (["ControlPath"], ["ControlMaster"])]
        self.cfg_block = "\n".join(kept).strip("\n") + "\n"
        hosts = [l.split()[1] for l in kept if l.startswith("Host ")]
        ports = [l.split()[1] for l in kept if l.strip().startswith("Port ")]
        if len(hosts) != 1 or ports != [str(self.shim_port)]:
            raise RuntimeError("unexpected ssh-config output (want one Host block for port %d): %r"
                               % (self.shim_port, r.stdout))
        self.cfg_host = hosts[0]
        self.cfg_file = os.path.join(self.dir, "ssh_config_block")
        with open(self.cfg_file, "w") as f:
            f.write(self.cfg_block)

    def start_master(self, sock, port):
        argv = self.ssh_base() + ["-o", "ControlMaster=yes", "-o", "ControlPath=" + sock,
                                  "-o", "ControlPersist=yes", "-N", "-f", "-p", str(port), "127.0.0.1"]
        # -f: the master stays in the background; give it files, not pipes
        errname = os.path.join(self.dir, "cm_%s.err" % os.path.basename(sock))
        with open(errname, "ab") as errf:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf, timeout=60, env=self.env)
        if r.returncode != 0:
            raise RuntimeError("ControlMaster failed: %s" % open(errname).read()[-300:])
        self.masters.append(sock)
        r = subprocess.run(self.ssh_base() + ["-o", "ControlPath=" + sock, "-O", "check", "127.0.0.1"],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, env=self.env)
        pid = None
        for tok in (r.stdout + r.stderr).replace(")", " ").split():
            if tok.startswith("(pid="):
                pid = int(tok[5:])
        if pid:
            self.pidfile.write("%d\n" % pid)
            self.pidfile.flush()
        return pid

    def open_forwards(self, contender, rtt, targets):
        ports = {k: free_port() for k in targets}
        specs = []
        for k, tp in targets.items():
            specs += ["-L", "127.0.0.1:%d:127.0.0.1:%d" % (ports[k], tp)]
        t = self.target(contender, rtt)
        if contender == "ControlMaster":
            r = subprocess.run(t[:-1] + ["-O", "forward"] + specs + [t[-1]], stdin=subprocess.DEVNULL,
                               capture_output=True, timeout=30, env=self.env)
            if r.returncode != 0:
                raise RuntimeError("ssh -O forward: %s" % r.stderr.decode(errors="replace"))
            proc = None
        else:
            name = "fwd_%s%s" % (contender, "_rtt" if rtt else "")
            proc = self.spawn(name, t[:-1] + ["-N", "-o", "ExitOnForwardFailure=yes"] + specs + [t[-1]])
        self.fwd_proc[contender + ("@rtt" if rtt else "")] = proc.pid if proc else \
            (self.cm_rtt_pid if rtt else self.cm_pid)
        for k in ports:
            wait_port(ports[k], timeout=30, proc=proc)
        return ports

    # ---- primitive measurements --------------------------------------
    def run_cmd(self, argv, timeout, **kw):
        r = subprocess.run(argv, stdin=kw.pop("stdin", subprocess.DEVNULL), stdout=kw.pop("stdout", subprocess.DEVNULL),
                           stderr=subprocess.PIPE, timeout=timeout, env=self.env, **kw)
        if r.returncode != 0:
            raise RuntimeError("rc %d: %s" % (r.returncode, r.stderr.decode(errors="replace").strip()[-300:]))
        return r

    def m_exec(self, contender, rtt=False):
        argv = self.target(contender, rtt) + ["true"]
        t0 = time.perf_counter()
        self.run_cmd(argv, 60)
        return time.perf_counter() - t0

    def m_fwd_conn(self, contender):
        """a new connection through the contender's -L to the echo service,
        and one line echoed back: what a client waits for before its first
        answer (with --resume the helper opens the target)"""
        port = self.fwd[contender]["echo"]
        t0 = time.perf_counter()
        s = socket.create_connection(("127.0.0.1", port), timeout=self.a.timeout)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(b"ping\n")
            got = b""
            while not got.endswith(b"\n"):
                b = s.recv(64)
                if not b:
                    raise RuntimeError("the echo closed after %r" % got)
                got += b
            return time.perf_counter() - t0
        finally:
            s.close()

    def m_fwd(self, contender, direction, n, rtt=False):
        port = self.fwd[contender + ("@rtt" if rtt else "")]["sink"]
        s = socket.create_connection(("127.0.0.1", port), timeout=self.a.timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            t0 = time.perf_counter()
            if direction == "up":
                s.sendall(b"U %d\n" % n)
                with open(self.zero, "rb") as f:
                    fsize = os.fstat(f.fileno()).st_size
                    sent = 0
                    while sent < n:  # socket.sendfile: os.sendfile, honouring the timeout
                        off = sent % fsize
                        k = s.sendfile(f, off, min(n - sent, fsize - off))
                        if k <= 0:
                            raise IOError("sendfile sent nothing")
                        sent += k
                ans = read_line(s)
                dt = time.perf_counter() - t0
                if ans != "OK":
                    raise RuntimeError("sink answered %r" % ans)
            else:
                s.sendall(b"D %d\n" % n)
                got = recv_count(s, n, bytearray(4 * MiB))
                dt = time.perf_counter() - t0
                if got != n:
                    raise RuntimeError("short download: %d of %d bytes" % (got, n))
            return dt
        finally:
            s.close()

    def m_cat(self, contender, direction, n, rtt=False):
        t = self.target(contender, rtt)
        if direction == "up":
            cmd = "set -o pipefail; head -c %d /dev/zero | %s" % (n, shlex.join(t + ["cat > /dev/null"]))
            t0 = time.perf_counter()
            self.run_cmd(["bash", "-c", cmd], self.a.timeout)
            return time.perf_counter() - t0
        argv = t + ["head -c %d /dev/zero" % n]
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=self.env)
        got = 0
        buf = bytearray(MiB)
        fd = p.stdout.fileno()
        deadline = time.time() + self.a.timeout
        while True:
            k = os.readv(fd, [buf])
            if k == 0:
                break
            got += k
            if time.time() > deadline:
                p.kill()
                break
        err = p.stderr.read()
        rc = p.wait()
        dt = time.perf_counter() - t0
        if rc != 0 or got != n:
            raise RuntimeError("rc %d, %d of %d bytes: %s" % (rc, got, n, err.decode(errors="replace")[-300:]))
        return dt

    def m_sftp(self, contender, direction, n):
        batch = os.path.join(self.dir, "sftp_%s.batch" % direction)
        remote = os.path.join(self.dir, "remote", "put.bin")
        local = os.path.join(self.dir, "local", "get.bin")
        for f in (remote, local):
            if os.path.exists(f):
                os.unlink(f)
        with open(batch, "w") as f:
            if direction == "up":
                f.write("put %s %s\n" % (self.sftp_src, remote))
            else:
                f.write("get %s %s\n" % (self.sftp_src, local))
        argv = self.target(contender, prog="sftp")
        argv = argv[:1] + ["-q", "-b", batch] + argv[1:]
        t0 = time.perf_counter()
        self.run_cmd(argv, self.a.timeout)
        dt = time.perf_counter() - t0
        dst = remote if direction == "up" else local
        size = os.path.getsize(dst)
        os.unlink(dst)
        if size != n:
            raise RuntimeError("sftp %s: %d of %d bytes" % (direction, size, n))
        return dt

    # ---- test list -----------------------------------------------------
    def tests(self):
        a = self.a
        T = []

        short = {"exec": "exec latency", "exec_cfg": "exec, ssh-config block", "fwd_up": "-L upload",
                 "fwd_down": "-L download", "cat_up": "cat upload", "cat_down": "cat download",
                 "sftp_put": "sftp put", "sftp_get": "sftp get", "rtt_exec": "RTT: exec latency",
                 "rtt_fwd_down": "RTT: -L download", "rtt_cat_down": "RTT: cat download",
                 "fwd_conn": "-L connection set-up"}
        three = ("direct", "ControlMaster", "sshshim")
        four = three + ("mux",)
        five = four + ("resume",)
        three_res = three + ("resume",)

        # cs: the contenders of the test, interleaved in each round
        def add(key, label, kind, n, fn, cs, runs=1):
            T.append(dict(key=key, label=label, kind=kind, n=n, fn=fn, runs=runs, short=short[key], cs=cs,
                          shim="sshshim-cfg" if "sshshim-cfg" in cs else "sshshim"))

        add("exec", "exec `ssh … true` (ms)", "latency", 0, lambda c: self.m_exec(c), five, a.exec_runs)
        add("exec_cfg", "exec `ssh … true`, endpoint through the `sshshim ssh-config` Host block (ms)",
            "latency", 0, lambda c: self.m_exec(c), ("ControlMaster", "sshshim-cfg"), a.exec_runs)
        add("fwd_conn", "-L connection set-up: connect, one echo round trip (ms)", "latency", 0,
            lambda c: self.m_fwd_conn(c), three_res, a.exec_runs)
        add("fwd_up", "-L upload %s (MiB/s)" % sz(a.fwd_mib), "tput", a.fwd_mib * MiB,
            lambda c: self.m_fwd(c, "up", a.fwd_mib * MiB), three_res)
        add("fwd_down", "-L download %s (MiB/s)" % sz(a.fwd_mib), "tput", a.fwd_mib * MiB,
            lambda c: self.m_fwd(c, "down", a.fwd_mib * MiB), three_res)
        add("cat_up", "exec cat upload %s (MiB/s)" % sz(a.cat_mib), "tput", a.cat_mib * MiB,
            lambda c: self.m_cat(c, "up", a.cat_mib * MiB), five)
        add("cat_down", "exec cat download %s (MiB/s)" % sz(a.cat_mib), "tput", a.cat_mib * MiB,
            lambda c: self.m_cat(c, "down", a.cat_mib * MiB), five)
        add("sftp_put", "sftp put %s (MiB/s)" % sz(a.sftp_mib), "tput", a.sftp_mib * MiB,
            lambda c: self.m_sftp(c, "up", a.sftp_mib * MiB), four)
        add("sftp_get", "sftp get %s (MiB/s)" % sz(a.sftp_mib), "tput", a.sftp_mib * MiB,
            lambda c: self.m_sftp(c, "down", a.sftp_mib * MiB), four)
        rtt = "%g ms RTT" % (2 * a.delay_ms)
        add("rtt_exec", "%s: exec `ssh … true` (ms)" % rtt, "latency", 0,
            lambda c: self.m_exec(c, rtt=True), five, a.rtt_exec_runs)
        add("rtt_fwd_down", "%s: -L download %s (MiB/s)" % (rtt, sz(a.rtt_fwd_mib)), "tput",
            a.rtt_fwd_mib * MiB, lambda c: self.m_fwd(c, "down", a.rtt_fwd_mib * MiB, rtt=True), three)
        add("rtt_cat_down", "%s: exec cat download %s (MiB/s)" % (rtt, sz(a.rtt_cat_mib)), "tput",
            a.rtt_cat_mib * MiB, lambda c: self.m_cat(c, "down", a.rtt_cat_mib * MiB, rtt=True), three)
        if a.only:
            keep = set(a.only.split(","))
            T = [t for t in T if t["key"] in keep]
        return T

    def shim_pid_for(self, key):
        return self.shim_rtt.pid if key.startswith("rtt_") else self.shim.pid

    def fwd_pids(self, key, c):
        """processes whose CPU is charged on the -L tests: (label, pid)"""
        if "fwd" not in key:
            return []
        rtt = key.startswith("rtt_")
        client = self.fwd_proc.get(c + ("@rtt" if rtt else ""))
        names = {"direct": "ssh -L client", "ControlMaster": "ControlMaster process",
                 "sshshim": "sshshim's ssh -L client", "resume": "sshshim --resume's ssh -L client"}
        out = [("%s: %s" % (c, names[c]), client)] if client else []
        if c == "sshshim":
            out.append(("sshshim: sshshim", self.shim_pid_for(key)))
        return out

    def run_rounds(self):
        tests = self.tests()
        self.test_defs = tests
        for r in range(self.a.rounds):
            load = open("/proc/loadavg").read().split()[0]
            self.loads.append(load)
            log("round %d/%d (contender order rotated by %d; load average %s)" % (r + 1, self.a.rounds, r, load))
            for t in tests:
                cs = list(t["cs"])
                for c in cs[r % len(cs):] + cs[:r % len(cs)]:
                    samples = []
                    err = None
                    for _ in range(t["runs"]):
                        pid = self.shim_pid_for(t["key"]) if c in ("sshshim", "mux") else None
                        cpu0 = proc_cpu(pid) if pid else 0
                        side = []
                        for label, sp in self.fwd_pids(t["key"], c):
                            try:
                                side.append((label, sp, proc_cpu(sp)))
                            except OSError:
                                pass
                        try:
                            samples.append(t["fn"](c))
                        except Exception as e:  # record and continue
                            err = "%s: %s" % (type(e).__name__, e)
                            break
                        if pid and t["kind"] == "tput":
                            acc = self.shim_cpu[(t["key"], c)]
                            acc[0] += proc_cpu(pid) - cpu0
                            acc[1] += t["n"]
                        for label, sp, c0 in side:
                            try:
                                acc = self.fwd_cpu[(t["key"], label)]
                                acc[0] += proc_cpu(sp) - c0
                                acc[1] += t["n"]
                            except OSError:
                                pass
                    if err:
                        self.errors[(t["key"], c)].append("round %d: %s" % (r + 1, err))
                        log("  %-14s %-13s ERROR %s" % (t["key"], c, err))
                        self.results[t["key"]][c].append(None)
                        continue
                    if t["kind"] == "latency":
                        v = statistics.median(samples) * 1000.0
                        log("  %-14s %-13s %8.1f ms (median of %d)" % (t["key"], c, v, len(samples)))
                    else:
                        v = t["n"] / samples[0] / MiB
                        log("  %-14s %-13s %8.1f MiB/s (%.2f s)" % (t["key"], c, v, samples[0]))
                    self.results[t["key"]][c].append(v)

    # ---- concurrency + memory ------------------------------------------
    def many_connections(self, port, n, shim_pid=None):
        async def one(i, sem, held):
            async with sem:
                try:
                    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
                    msg = b"hello %d\n" % i
                    w.write(msg)
                    await w.drain()
                    got = await asyncio.wait_for(r.readexactly(len(msg)), 30)
                    if got != msg:
                        w.close()
                        return "bad echo"
                    held.append(w)
                    return None
                except Exception as e:
                    return type(e).__name__ or "error"

        async def main():
            sem = asyncio.Semaphore(self.a.conc_parallel)
            held = []
            t0 = time.perf_counter()
            errs = await asyncio.gather(*[one(i, sem, held) for i in range(n)])
            dt = time.perf_counter() - t0
            await asyncio.sleep(1.0)  # all open: let things settle
            snap = {"open": len(held), "seconds": dt,
                    "errors": sum(1 for e in errs if e),
                    "kinds": sorted(set(e for e in errs if e))}
            snap["shim_mem"] = proc_mem(shim_pid or self.shim.pid)
            # still alive? exchange once more on every held connection
            for w in held:
                w.close()
            await asyncio.sleep(0.5)
            return snap

        return asyncio.run(main())

    def run_concurrency(self):
        """1,000 held connections through each contender's client -L and an
        sshshim-owned -L; the shim's VmHWM is reset before each of its phases
        (the direct and ControlMaster phases do not touch it)."""
        n = self.a.conns
        self.hwm_reset_ok = reset_hwm(self.shim.pid) and getattr(self, "hwm_reset_ok", True)
        for c in ("direct", "ControlMaster", "sshshim", "sshshim-owned -L", "resume"):
            port = self.shim_owned_echo if c == "sshshim-owned -L" else self.fwd[c]["echo"]
            log("%d concurrent forwarded connections via %s" % (n, c if c.endswith("-L") else c + " (client -L)"))
            # --resume: its own shim, every connection carried by the helper
            shim_pid = self.shim_res.pid if c == "resume" else self.shim.pid
            measured = c.startswith("sshshim") or c == "resume"
            if measured:
                self.hwm_reset_ok = reset_hwm(shim_pid) and self.hwm_reset_ok
                before = proc_mem(shim_pid)["VmRSS"]
            try:
                self.conc[c] = self.many_connections(port, n, shim_pid)
                if measured:
                    self.conc[c]["rss_before"] = before
                    self.conc[c]["hwm"] = proc_mem(shim_pid)["VmHWM"]
                log("  %s: %d errors, %.2f s, shim RSS %.1f MiB%s" %
                    (c, self.conc[c]["errors"], self.conc[c]["seconds"], self.conc[c]["shim_mem"]["VmRSS"],
                     ", peak %.1f MiB" % self.conc[c]["hwm"] if "hwm" in self.conc[c] else ""))
            except Exception as e:
                self.errors[("conns", c)].append("%s: %s" % (type(e).__name__, e))
                log("  ERROR %s" % e)
            time.sleep(1)
        time.sleep(1)
        self.mem["after"] = proc_mem(self.shim.pid)

    def parallel_downloads(self, port, k, size):
        """k downloads of size bytes each at once through one forward port."""
        async def one():
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
            except Exception as e:
                return "connect: %s" % (type(e).__name__ or "error")
            try:
                w.write(b"D %d\n" % size)
                await w.drain()
                got = 0
                while True:
                    b = await asyncio.wait_for(r.read(MiB), 60)
                    if not b:
                        break
                    got += len(b)
                return None if got == size else "short"
            except Exception as e:
                return type(e).__name__ or "error"
            finally:
                w.close()

        async def main():
            t0 = time.perf_counter()
            errs = await asyncio.gather(*[one() for _ in range(k)])
            dt = time.perf_counter() - t0
            return {"seconds": dt, "errors": sum(1 for e in errs if e),
                    "kinds": sorted(set(e for e in errs if e)), "mib_s": k * size / MiB / dt}

        return asyncio.run(main())

    def run_parallel_downloads(self):
        """Peak RSS of an sshshim while many -L downloads run at once, once
        through a client -L to its endpoint and once through an
        sshshim-owned -L. Each phase gets a fresh sshshim (same options, same
        sshd), so neither inherits the memory of the bulk tests or of the
        other phase; its RSS before the phase is reported."""
        k, mib = self.a.par_downloads, self.a.par_mib
        shimkey = " ".join(open(os.path.join(self.dir, "shim_host_key.pub")).read().split()[:2])
        for via in ("sshshim (client -L)", "sshshim-owned -L"):
            owned = via.endswith("owned -L")
            name = "shim_par_%s" % ("owned" if owned else "client")
            port, fwd_port = free_port(), free_port()
            extra = ["--mux", os.path.join(self.dir, name + ".mux")]
            spec = "127.0.0.1:%d:127.0.0.1:%d" % (fwd_port, self.sink_port)
            if owned:
                extra += ["-L", spec]
            started = []
            log("%d concurrent %d MiB downloads via %s (a fresh sshshim)" % (k, mib, via))
            try:
                p = self.start_shim(name, port, self.sshd_port, extra, self.shim_name)
                started.append(p)
                if owned:
                    wait_port(fwd_port, timeout=30, proc=p)
                else:
                    with open(self.client_kh, "a") as f:
                        f.write("[127.0.0.1]:%d %s\n" % (port, shimkey))
                    c = self.spawn("fwd_" + name, self.ssh_base() + ["-N", "-o", "ExitOnForwardFailure=yes", "-L", spec,
                                                                   "-p", str(port), "127.0.0.1"])
                    started.append(c)
                    wait_port(fwd_port, timeout=30, proc=c)
                time.sleep(1)  # let start-up settle, as for the idle figure
                before = proc_mem(p.pid)["VmRSS"]
                self.hwm_reset_ok = reset_hwm(p.pid) and getattr(self, "hwm_reset_ok", True)
                x = self.parallel_downloads(fwd_port, k, mib * MiB)
                x["hwm"] = proc_mem(p.pid)["VmHWM"]
                x["rss_before"] = before
                self.par[via] = x
                log("  %d errors, %.2f s (%.0f MiB/s in all), shim RSS before %.1f MiB, peak %.1f MiB"
                    % (x["errors"], x["seconds"], x["mib_s"], before, x["hwm"]))
                if p.poll() is not None:
                    self.notes.append("%s exited during the downloads (rc %s): %s" % (name, p.returncode, self.tail(name)))
            except Exception as e:
                self.errors[("par_down", via)].append("%s: %s" % (type(e).__name__, e))
                log("  ERROR %s" % e)
            stop_all(started)

    def run_tunnels(self):
        """N sshshim-owned -R tunnels in one `sshshim supervise` (its own
        profiles file), upstream through a relay that can cut the
        connection: seconds from start until sshd listens on all N ports,
        RSS then, and seconds from a cut (RST both ways) until all N listen
        again on the new connection (new listening sockets, by inode)."""
        n = self.a.tunnels
        d = self.dir
        x = {"n": n}
        self.tun = x
        # N distinct free loopback ports, held at once so none repeats
        held = []
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            held.append(s)
        ports = sorted(s.getsockname()[1] for s in held)
        for s in held:
            s.close()
        wanted = set(ports)
        started = []
        try:
            relay_p, relay_port = self.spawn_helper("relay", ["relay", d, str(self.sshd_port)])
            started.append(relay_p)
            hostkey = " ".join(open(os.path.join(d, "sshd_host_key.pub")).read().split()[:2])
            with open(os.path.join(d, "known_hosts"), "a") as f:
                f.write("[127.0.0.1]:%d %s\n" % (relay_port, hostkey))
            cfg = os.path.join(d, "tunnels.toml")
            with open(cfg, "w") as f:
                f.write("[profile.tunnels]\ndestination = %s\nport = %d\nidentity = [%s]\n"
                        "known_hosts = %s\nmux = %s\nremote_forwards = [\n"
                        % (json.dumps(self.shim_name), relay_port, json.dumps(self.key),
                           json.dumps(os.path.join(d, "known_hosts")), json.dumps(os.path.join(d, "tunnels.mux"))))
                for p in ports:
                    f.write('  "127.0.0.1:%d:127.0.0.1:%d",\n' % (p, self.echo_port))
                f.write("]\n")
            env = self.shim_env("shim_tunnels")
            os.makedirs(env["XDG_RUNTIME_DIR"], mode=0o700, exist_ok=True)
            log("%d sshshim-owned -R tunnels in one `sshshim supervise`" % n)
            t0 = time.perf_counter()
            sup = self.spawn("shim_tunnels", [self.a.bin, "supervise", "-c", cfg], env=env)
            started.append(sup)
            end = t0 + 60
            while True:
                up = listening_inodes(wanted)
                if len(up) == n:
                    x["start_s"] = time.perf_counter() - t0
                    break
                if time.perf_counter() > end or sup.poll() is not None:
                    raise RuntimeError("%d of %d listening after %.0f s%s" % (
                        len(up), n, time.perf_counter() - t0,
                        "" if sup.poll() is None else "; supervise exited: " + self.tail("shim_tunnels")))
                time.sleep(0.01)
            x["rss_up"] = proc_mem(sup.pid)["VmRSS"]
            # the tunnels carry traffic: one round trip through a few of them
            for p in ports[:: max(1, n // 5)]:
                with socket.create_connection(("127.0.0.1", p), timeout=10) as c:
                    c.sendall(b"ping\n")
                    if c.recv(5) != b"ping\n":
                        raise RuntimeError("no echo through tunnel port %d" % p)
            time.sleep(1)
            x["rss_idle"] = proc_mem(sup.pid)["VmRSS"]
            old = set(up.values())
            t1 = time.perf_counter()
            os.kill(relay_p.pid, signal.SIGUSR1)
            end = t1 + 60
            while True:
                now = listening_inodes(wanted)
                fresh = [p for p, ino in now.items() if ino not in old]
                if len(fresh) == n:
                    x["drop_s"] = time.perf_counter() - t1
                    break
                if time.perf_counter() > end or sup.poll() is not None:
                    raise RuntimeError("after the cut, %d of %d listening again after %.0f s" % (
                        len(fresh), n, time.perf_counter() - t1))
                time.sleep(0.01)
            x["hwm"] = proc_mem(sup.pid)["VmHWM"]
            log("  all listening %.2f s after start (RSS %.1f MiB, %.1f MiB a second later); "
                "all again %.2f s after the cut; peak RSS %.1f MiB"
                % (x["start_s"], x["rss_up"], x["rss_idle"], x["drop_s"], x["hwm"]))
        except Exception as e:
            self.errors[("tunnels", "sshshim")].append("%s: %s" % (type(e).__name__, e))
            log("  ERROR %s" % e)
        stop_all(started)

    def baseline(self):
        """The harness itself must not be the bottleneck: raw loopback numbers."""
        n = min(self.a.fwd_mib, 512) * MiB
        for name, port in (("sink", self.sink_port),):
            for d in ("up", "down"):
                try:
                    self.fwd["raw"] = {"sink": port}
                    t = self.m_fwd("raw", d, n)
                    self.baselines["python sink/source, no ssh, %s" % d] = n / t / MiB
                except Exception as e:
                    self.baselines["python sink/source, no ssh, %s" % d] = "error: %s" % e
        # through the delay proxy, straight to the sink (no ssh): its own capacity
        try:
            p, port = self.spawn_helper("delay_raw", ["delay", self.dir, str(self.sink_port), str(self.a.delay_ms)])
            self.fwd["raw"] = {"sink": port}
            nn = min(n, 256 * MiB)
            t = self.m_fwd("raw", "down", nn)
            self.baselines["delay proxy alone (%d ms each way), down" % self.a.delay_ms] = nn / t / MiB
            p.terminate()
        except Exception as e:
            self.baselines["delay proxy alone, down"] = "error: %s" % e
        try:
            t0 = time.perf_counter()
            socket.create_connection(("127.0.0.1", self.proxy_port)).close()
            s = socket.create_connection(("127.0.0.1", self.proxy_port))
            t0 = time.perf_counter()
            s.recv(100)  # sshd's banner: arrives after one delayed hop
            self.baselines["delay proxy: sshd banner after (ms, expect ~%d)" % self.a.delay_ms] = \
                (time.perf_counter() - t0) * 1000
            s.close()
        except Exception as e:
            self.baselines["delay proxy: banner"] = "error: %s" % e

    def run(self):
        t_start = time.time()
        log("setting up in %s" % self.dir)
        self.setup()
        time.sleep(1)
        self.mem["idle"] = proc_mem(self.shim.pid)
        self.mem["idle_rtt"] = proc_mem(self.shim_rtt.pid)
        self.baseline()
        self.hwm_reset_ok = reset_hwm(self.shim.pid)
        cpu0 = proc_cpu(self.shim.pid)
        self.run_rounds()
        self.mem["bulk_hwm"] = proc_mem(self.shim.pid)["VmHWM"]
        self.mem["rtt_hwm"] = proc_mem(self.shim_rtt.pid)["VmHWM"]
        self.mem["cpu_total"] = proc_cpu(self.shim.pid) - cpu0
        if self.a.conns:
            self.run_concurrency()
        if self.a.par_downloads:
            self.run_parallel_downloads()
        if self.a.tunnels:
            self.run_tunnels()
        for name, p in self.procs:
            # (the shim_par_* shims are stopped on purpose after their phase)
            if name.startswith(("shim", "sshd")) and not name.startswith(("shim_par_", "shim_tunnels")) \
                    and p.poll() is not None:
                self.notes.append("%s exited early (rc %s): %s" % (name, p.returncode, self.tail(name)))
        self.elapsed = time.time() - t_start
        self.report()

    # ---- reporting -----------------------------------------------------
    def rows(self):
        out = []
        ratio = lambda x, y: x / y if x and y else None
        for t in self.test_defs:
            vals = {c: med(self.results[t["key"]][c]) for c in t["cs"]}
            errs = {c: any(v is None for v in self.results[t["key"]][c]) for c in t["cs"]}
            s, d, m, x = (vals.get(t["shim"]), vals.get("direct"), vals.get("ControlMaster"), vals.get("mux"))
            out.append(dict(t=t, vals=vals, errs=errs, r_direct=ratio(s, d), r_cm=ratio(s, m),
                            r_mux_cm=ratio(x, m), r_direct_cm=ratio(d, m),
                            r_res=ratio(vals.get("resume"), s)))
        return out

    def fmt(self, v, errs=False, prec=1):
        if v is None:
            return "error"
        s = ("%%.%df" % prec) % v
        return s + ("*" if errs else "")

    def cell(self, r, c):
        """value of contender c in row r; "–" when the test does not run c"""
        if c == "sshshim":
            c = r["t"]["shim"]
        if c not in r["t"]["cs"]:
            return "–"
        return self.fmt(r["vals"][c], r["errs"][c])

    def rcell(self, r, field, a, b):
        cs = [r["t"]["shim"] if c == "sshshim" else c for c in (a, b)]
        if not all(c in r["t"]["cs"] for c in cs):
            return "–"
        return self.fmt(r[field], prec=2)

    def cpu_cell(self, key):
        out = []
        for c in ("sshshim", "mux"):
            acc = self.shim_cpu.get((key, c))
            out.append("%.2f" % (acc[0] / (acc[1] / GiB)) if acc and acc[1] else None)
        if not any(out):
            return "–"
        return " / ".join(x or "–" for x in out)

    def main_lines(self, rows):
        hdr = ["test", "direct", "ControlMaster", "sshshim endpoint", "sshshim mux", "endpoint/direct",
               "endpoint/CM", "mux/CM", "sshshim CPU s/GiB (endpoint / mux)"]
        lines = []
        for r in rows:
            lines.append([r["t"]["label"]] + [self.cell(r, c) for c in ("direct", "ControlMaster", "sshshim", "mux")] +
                         [self.rcell(r, "r_direct", "sshshim", "direct"), self.rcell(r, "r_cm", "sshshim", "ControlMaster"),
                          self.rcell(r, "r_mux_cm", "mux", "ControlMaster"), self.cpu_cell(r["t"]["key"])])
        return hdr, lines

    def targets(self, rows):
        """[issue, target, measured, verdict] for every target whose test ran."""
        a = self.a
        R = {r["t"]["key"]: r for r in rows}
        out = []
        unit = lambda r: "ms" if r["t"]["kind"] == "latency" else "MiB/s"
        verdict = lambda ok: "PASS" if ok else "MISS"

        def ratio(issue, desc, key, field, who, base, le, limit):
            r = R.get(key)
            if r is None:
                return
            v = r[field]
            if v is None:
                out.append([issue, desc, "no result (%s failed)" % self.NAMES[who], "error"])
                return
            who = r["t"]["shim"] if who == "sshshim" else who
            measured = "%.2f× (%s vs %s %s)" % (v, self.fmt(r["vals"][who]), self.fmt(r["vals"][base]), unit(r))
            if r["errs"].get(who) or r["errs"].get(base):
                measured += ", some rounds failed"
            out.append([issue, desc, measured, verdict(v <= limit if le else v >= limit)])

        def mem(issue, desc, x, limit, errs_of=None):
            if x is None:
                out.append([issue, desc, "no result", "error"])
                return
            v = x["hwm"] if isinstance(x, dict) else x
            measured = "%.1f MiB" % v
            if isinstance(x, dict) and "rss_before" in x:
                measured += " (%.1f MiB before)" % x["rss_before"]
            if isinstance(x, dict) and x.get("errors"):
                measured += "; %d transfers failed (%s)" % (x["errors"], ", ".join(x["kinds"]))
                out.append([issue, desc, measured, "error"])
                return
            out.append([issue, desc, measured, verdict(v <= limit)])

        lab = lambda key: R[key]["t"]["label"].replace(" (MiB/s)", "").replace(" (ms)", "") if key in R else key
        i13 = "#13 mux"
        ratio(i13, "exec via mux ≤ 1.1× ControlMaster", "exec", "r_mux_cm", "mux", "ControlMaster", True, 1.1)
        for k in ("cat_down", "cat_up", "sftp_put", "sftp_get"):
            ratio(i13, "%s via mux ≥ 0.95× ControlMaster" % lab(k), k, "r_mux_cm", "mux", "ControlMaster", False, 0.95)
        i12 = "#12 endpoint exec"
        ratio(i12, "exec via endpoint, OpenSSH's default algorithms ≤ 2× ControlMaster (standing target)",
              "exec", "r_cm", "sshshim", "ControlMaster", True, 2.0)
        ratio(i12, "exec via endpoint, `sshshim ssh-config` Host block ≤ 2× ControlMaster (standing target)",
              "exec_cfg", "r_cm", "sshshim", "ControlMaster", True, 2.0)
        if "exec" in R and "exec_cfg" in R and R["exec"]["r_cm"] and R["exec_cfg"]["r_cm"]:
            out.append([i12, "Host block vs default options (each against ControlMaster in the same rounds)",
                        "%.2f× (%.2f / %.2f)" % (R["exec_cfg"]["r_cm"] / R["exec"]["r_cm"], R["exec_cfg"]["r_cm"],
                                                 R["exec"]["r_cm"]), "(no target)"])
        i14 = "#14 latency, memory"
        rtt = "%g ms RTT" % (2 * a.delay_ms)
        ratio(i14, "%s exec via endpoint ≤ 0.75× ControlMaster" % rtt, "rtt_exec", "r_cm", "sshshim",
              "ControlMaster", True, 0.75)
        ratio(i14, "%s exec via mux ≤ 0.75× ControlMaster" % rtt, "rtt_exec", "r_mux_cm", "mux",
              "ControlMaster", True, 0.75)
        if a.par_downloads:
            for via in ("sshshim (client -L)", "sshshim-owned -L"):
                mem(i14, "peak RSS, %d concurrent %d MiB downloads via %s ≤ 24 MiB" % (a.par_downloads, a.par_mib, via),
                    self.par.get(via), 24)
        if a.conns:
            for via in ("sshshim", "sshshim-owned -L"):
                mem(i14, "peak RSS, %d concurrent forwarded connections via %s ≤ 64 MiB"
                    % (a.conns, "sshshim (client -L)" if via == "sshshim" else via), self.conc.get(via), 64)
        idle = self.mem.get("idle", {}).get("VmRSS")
        if idle is not None:
            out.append([i14, "idle RSS < 10 MiB", "%.1f MiB" % idle, verdict(idle < 10)])
        i22 = "#22 stock client, tunnels"
        ratio(i22, "exec via endpoint, OpenSSH's default options ≤ 1.6× ControlMaster", "exec", "r_cm", "sshshim",
              "ControlMaster", True, 1.6)
        for k in ("cat_down", "cat_up", "sftp_put", "sftp_get", "fwd_up", "fwd_down"):
            ratio(i22, "%s via endpoint, default options ≥ 0.9× ControlMaster" % lab(k), k, "r_cm", "sshshim",
                  "ControlMaster", False, 0.9)
        ratio(i22, "exec via mux ≤ 1.0× ControlMaster", "exec", "r_mux_cm", "mux", "ControlMaster", True, 1.0)
        i20 = "#20 resumable sessions"
        ratio(i20, "exec via endpoint with --resume ≤ 1.3× without", "exec", "r_res", "resume", "sshshim", True, 1.3)
        ratio(i20, "%s exec via endpoint with --resume ≤ 1.3× without" % rtt, "rtt_exec", "r_res", "resume",
              "sshshim", True, 1.3)
        for k in ("cat_down", "cat_up"):
            ratio(i20, "%s with --resume ≥ 0.8× without" % lab(k), k, "r_res", "resume", "sshshim", False, 0.8)
        i24 = "#24 resumable forwards"
        ratio(i24, "-L connection set-up with --resume ≤ 1.3× without", "fwd_conn", "r_res", "resume", "sshshim",
              True, 1.3)
        for k in ("fwd_up", "fwd_down"):
            ratio(i24, "%s with --resume ≥ 0.8× without" % lab(k), k, "r_res", "resume", "sshshim", False, 0.8)
        if a.conns:
            mem(i24, "peak RSS, %d concurrent resumable forwarded connections (client -L) ≤ 64 MiB" % a.conns,
                self.conc.get("resume"), 64)
        if a.tunnels:
            t = self.tun
            desc = "%d sshshim-owned -R tunnels in one supervise: " % a.tunnels
            if "drop_s" not in t:
                out.append([i22, desc + "start, RSS, drop", "no result (see errors)", "error"])
            else:
                out.append([i22, desc + "all listening ≤ 1 s after start", "%.2f s" % t["start_s"],
                            verdict(t["start_s"] <= 1.0)])
                out.append([i22, desc + "peak RSS < 24 MiB", "%.1f MiB (%.1f MiB once all listened)"
                            % (t["hwm"], t["rss_up"]), verdict(t["hwm"] < 24)])
                out.append([i22, desc + "all listening again ≤ 2 s after an upstream drop", "%.2f s" % t["drop_s"],
                            verdict(t["drop_s"] <= 2.0)])
        st = "standing"
        for k in ("fwd_up", "fwd_down", "cat_up", "cat_down", "sftp_put", "sftp_get"):
            ratio(st, "%s via endpoint ≥ 0.7× ControlMaster" % lab(k), k, "r_cm", "sshshim", "ControlMaster", False, 0.7)
        for k in ("rtt_fwd_down", "rtt_cat_down"):
            ratio(st, "%s via endpoint ≥ 2× direct" % lab(k), k, "r_direct", "sshshim", "direct", False, 2.0)
        return out

    def report(self):
        a = self.a
        rows = self.rows()
        hdr, lines = self.main_lines(rows)
        tgt = self.targets(rows)
        tgt_hdr = ["issue", "target", "measured", "result"]
        conc_lines = []
        for c in ("direct", "ControlMaster", "sshshim", "sshshim-owned -L", "resume"):
            x = self.conc.get(c)
            name = c if c.endswith("-L") else (self.NAMES[c] if c == "resume" else c) + " (client -L)"
            if x is None:
                if a.conns:
                    conc_lines.append([name, "error", "", "", "", ""])
                continue
            conc_lines.append([name, "%d/%d" % (x["open"], a.conns),
                               str(x["errors"]) + (" (%s)" % ", ".join(x["kinds"]) if x["kinds"] else ""),
                               "%.2f" % x["seconds"], "%.1f" % x["shim_mem"]["VmRSS"],
                               "%.1f" % x["hwm"] if "hwm" in x else "–"])
        par_lines = []
        for via in ("sshshim (client -L)", "sshshim-owned -L"):
            x = self.par.get(via)
            if x is None:
                if a.par_downloads:
                    par_lines.append([via, "error", "", "", "", ""])
                continue
            par_lines.append([via, str(x["errors"]) + (" (%s)" % ", ".join(x["kinds"]) if x["kinds"] else ""),
                              "%.2f" % x["seconds"], "%.0f" % x["mib_s"], "%.1f" % x["rss_before"], "%.1f" % x["hwm"]])
        mem = self.mem
        res_lines = [
            ["RSS idle (after start-up)", "%.1f MiB" % mem["idle"]["VmRSS"]],
            ["RSS idle of the shim with the %g ms upstream" % (2 * a.delay_ms), "%.1f MiB" % mem["idle_rtt"]["VmRSS"]],
            ["peak RSS (VmHWM) during the bulk tests", "%.1f MiB" % mem.get("bulk_hwm", 0)],
            ["peak RSS (VmHWM) of the shim with the %g ms upstream" % (2 * a.delay_ms), "%.1f MiB" % mem.get("rtt_hwm", 0)],
        ]
        for via, x in self.par.items():
            res_lines.append(["peak RSS during %d concurrent %d MiB downloads via %s" % (a.par_downloads, a.par_mib, via),
                              "%.1f MiB" % x["hwm"]])
        for c, via in (("sshshim", "client -L"), ("sshshim-owned -L", "sshshim-owned -L")):
            if c in self.conc:
                res_lines.append(["RSS with %d forwarded connections open (%s)" % (a.conns, via),
                                  "%.1f MiB" % self.conc[c]["shim_mem"]["VmRSS"]])
                res_lines.append(["peak RSS (VmHWM) during the %d connections (%s)" % (a.conns, via),
                                  "%.1f MiB" % self.conc[c]["hwm"]])
        if "after" in mem:
            res_lines.append(["RSS at the end (all closed)", "%.1f MiB" % mem["after"]["VmRSS"]])
        for c, name in (("sshshim", "endpoint"), ("mux", "mux socket")):
            items = [v for (k, cc), v in self.shim_cpu.items() if cc == c and not k.startswith("rtt_")]
            tb, tc = sum(v[1] for v in items), sum(v[0] for v in items)
            if tb:
                res_lines.append(["CPU s per GiB moved via the %s, fast bulk tests (user+sys)" % name,
                                  "%.2f" % (tc / (tb / GiB))])
        if not getattr(self, "hwm_reset_ok", True):
            self.notes.append("resetting VmHWM through /proc/PID/clear_refs failed: peak RSS figures are "
                              "peaks since the shim started")
        labels = {t["key"]: t["label"].replace(" (MiB/s)", "") for t in self.test_defs}
        korder = [t["key"] for t in self.test_defs]
        corder = lambda who: [who.startswith(c) for c in self.CONTENDERS].index(True)
        fwd_lines = [[labels.get(k, k), who, "%.2f" % (v[0] / (v[1] / GiB))]
                     for (k, who), v in sorted(self.fwd_cpu.items(), key=lambda kv: (korder.index(kv[0][0]), corder(kv[0][1]), kv[0][1]))
                     if v[1]]
        loads_end = open("/proc/loadavg").read().split()[0]

        # stdout
        print()
        print(text_table(hdr, lines))
        print()
        print("* = at least one round failed; throughput in MiB/s (higher is better), latency in ms (lower is better)")
        print()
        print(text_table(tgt_hdr, tgt, left=4))
        if conc_lines:
            print()
            print(text_table(["%d concurrent forwarded connections via" % a.conns, "open", "errors", "seconds",
                              "shim RSS MiB", "shim peak MiB"], conc_lines))
        if par_lines:
            print()
            print(text_table(["%d concurrent %d MiB downloads via" % (a.par_downloads, a.par_mib), "errors", "seconds",
                              "MiB/s in all", "shim RSS before", "shim peak MiB"], par_lines))
        print()
        print(text_table(["sshshim resources", "value"], res_lines))
        if fwd_lines:
            print()
            print(text_table(["-L test", "process", "CPU s/GiB"], fwd_lines))
        if self.errors:
            print("\nErrors:")
            for (k, c), es in self.errors.items():
                for e in es:
                    print("  %s / %s: %s" % (k, c, e))
        for n in self.notes:
            print("NOTE:", n)
        print("\nrun took %.0f s; load average (1 min) per round: %s; at the end: %s"
              % (self.elapsed, ", ".join(self.loads), loads_end))
        if other_busy_note(self.loads):
            print("WARNING:", other_busy_note(self.loads))

        # markdown
        os.makedirs(a.out, exist_ok=True)
        md = []
        md.append("# sshshim benchmark%s\n" % (" (--quick)" if a.quick else ""))
        md.append("Generated by `scripts/bench.sh%s` on %s; the run took %.0f s.\n" %
                  (" --quick" if a.quick else "", datetime.datetime.now().strftime("%Y-%m-%d %H:%M %Z").strip(), self.elapsed))
        md.append("## Machine\n")
        for k, v in machine_info(a):
            md.append("- %s: %s" % (k, v))
        md.append("")
        md.append("- load average (1 min) at the start of each round: %s; at the end: %s" %
                  (", ".join(self.loads) or "–", loads_end))
        busy = other_busy_note(self.loads)
        if busy:
            md.append("- **%s**" % busy)
        md.append("")
        md.append("## Setup\n")
        md.append("All contenders talk to the same private sshd on 127.0.0.1 (loopback only); "
                  "the contenders of a test are interleaved in every round (order rotated per round); "
                  "each number is the median over %d round(s) (exec latency: median of %d runs per round, "
                  "%d runs at %g ms RTT). sshd gives the remote shell an empty HOME (`SetEnv`), so a "
                  "heavy ~/.bashrc on the bench machine does not hide the contenders' latency. Clients "
                  "know all host keys in advance (StrictHostKeyChecking=yes), as a user's would." %
                  (a.rounds, a.exec_runs, a.rtt_exec_runs, 2 * a.delay_ms))
        md.append("")
        md.append("- **direct**: a fresh `ssh` to sshd for every exec/sftp; one `ssh -N -L` client for the forwards.")
        md.append("- **ControlMaster**: `ssh -o ControlMaster=yes -o ControlPersist=yes -N -f` once, clients with "
                  "`-o ControlMaster=no -o ControlPath=…`; forwards with `ssh -O forward -L`.")
        md.append("- **sshshim endpoint**: `sshshim up --mux PATH` to sshd; clients connect to its local TCP "
                  "endpoint with OpenSSH's default algorithm order (`-F /dev/null`, no Ciphers/KexAlgorithms); "
                  "forwards with a client `ssh -N -L` to the endpoint.")
        md.append("- **sshshim endpoint, ssh-config block** (exec only): `ssh -F FILE NAME-shim true`, FILE being "
                  "the Host block that `sshshim ssh-config NAME` printed for the running instance (its "
                  "Ciphers and KexAlgorithms, fastest first) with the ControlPath/ControlMaster lines removed, "
                  "so it reaches the TCP endpoint; interleaved with ControlMaster in its own row.")
        md.append("- **sshshim mux socket**: the same sshshim's OpenSSH multiplexing socket, clients with "
                  "`-o ControlPath=SOCK -o ControlMaster=no`, the same `-p PORT` as the ControlMaster clients "
                  "(so neither client looks up the ssh service's port) and a host name that does not resolve "
                  "(a failing socket is an error, never a silent direct connection).")
        md.append("- **sshshim endpoint, --resume** (exec, cat, 50 ms RTT exec; issue 20; -L set-up, -L bulk and "
                  "the 1,000 connections, issue 24): a second sshshim "
                  "(and a second one behind the delay proxy) with `--resume --mux none`, clients as for the "
                  "endpoint (a client `ssh -L` for the forwards); every session runs under the remote helper, "
                  "which is uploaded before the first round, and every forwarded connection goes through its "
                  "forwards helper. Its ratios are against the plain endpoint.")
        md.append("- -L tests: a Python sink/source behind the forward (recv_into 4 MiB buffers / os.sendfile); "
                  "time from request to last byte (upload: until the sink acknowledges all bytes).")
        md.append("- exec cat: `head -c N /dev/zero | ssh … 'cat > /dev/null'` and `ssh … 'head -c N /dev/zero'` "
                  "(byte count checked); these include the connection set-up of each contender.")
        md.append("- sftp: `sftp -b` with `put`/`get` of a %d MiB file (in the page cache), size checked." % a.sftp_mib)
        md.append("- %g ms RTT: a userspace delay proxy (Python asyncio, %g ms per chunk each way, order kept, "
                  "no bandwidth cap) in front of sshd; direct and ControlMaster connect through it, "
                  "a second sshshim's upstream goes through it (its endpoint and mux socket stay local)." %
                  (2 * a.delay_ms, a.delay_ms))
        md.append("- sshshim CPU: utime+stime of the sshshim process (from /proc/PID/stat) around each of its "
                  "bulk transfers, divided by the bytes moved; RSS from /proc/PID/status; VmHWM is reset via "
                  "clear_refs before the bulk tests and before each memory phase, so a peak includes the RSS "
                  "the shim already had (shown as \"before\").")
        if a.par_downloads:
            md.append("- concurrent downloads: %d downloads of %d MiB each started at once through one forward "
                      "to the sink, byte counts checked; once through a client `ssh -N -L` to the endpoint and "
                      "once through an sshshim-owned -L, each on a fresh sshshim started for it (so neither "
                      "inherits the memory of the bulk tests or of the other phase). The %d connections "
                      "run on the sshshim of the bulk tests, after them, as in earlier runs."
                      % (a.par_downloads, a.par_mib, a.conns))
        md.append("")
        if getattr(self, "cfg_block", None):
            md.append("The Host block used for the ssh-config row (ControlPath lines removed):\n")
            md.append("```\n%s```\n" % self.cfg_block)
        md.append("## Results\n")
        md.append("Throughput in MiB/s (higher is better), latency in ms (lower is better). "
                  "Ratios are the sshshim contender's number divided by the other contender's "
                  "(for latency < 1 means sshshim is faster, for throughput > 1 means sshshim is faster); "
                  "– means the test does not run that contender. "
                  "`*` marks a value where at least one round failed.\n")
        md.append(md_table(hdr, lines))
        md.append("")
        md.append("## Targets\n")
        md.append("Issues #12-#14 and the standing targets, each against the median ratio above "
                  "(exec latency: lower is better; throughput: higher is better).\n")
        md.append(md_table(tgt_hdr, [r[:3] + ["**%s**" % r[3] if r[3] in ("MISS", "error") else r[3]] for r in tgt],
                           left=4))
        md.append("")
        if par_lines:
            md.append("## %d concurrent %d MiB -L downloads\n" % (a.par_downloads, a.par_mib))
            md.append(md_table(["via", "errors", "seconds", "MiB/s in all", "shim RSS before (MiB)",
                                "shim peak RSS (MiB)"], par_lines))
            md.append("")
        if conc_lines:
            md.append("## %d concurrent forwarded connections\n" % a.conns)
            md.append("Each connection goes through the forward to a local echo server, exchanges a line "
                      "and stays open until all are open (at most %d being opened at a time).\n" % a.conc_parallel)
            md.append(md_table(["via", "open", "errors", "seconds to open all", "sshshim RSS (MiB)",
                                "sshshim peak RSS (MiB)"], conc_lines))
            md.append("")
        md.append("## sshshim resources\n")
        md.append(md_table(["measure", "value"], res_lines))
        md.append("")
        if fwd_lines:
            md.append("CPU seconds (user+sys) per GiB on the -L tests, per process on the client side "
                      "(sshshim carries both the local and the upstream SSH leg, so about twice one ssh "
                      "client is what a two-leg proxy costs):\n")
            md.append(md_table(["-L test", "process", "CPU s/GiB"], fwd_lines))
            md.append("")
        md.append("## Harness sanity checks\n")
        bl = [[k, ("%.1f" % v) if isinstance(v, float) else str(v)] for k, v in self.baselines.items()]
        md.append(md_table(["check", "MiB/s (or ms)"], bl))
        md.append("")
        md.append("## Per-round values\n")
        raw = []
        for t in self.test_defs:
            for c in t["cs"]:
                raw.append([t["label"], self.NAMES[c], ", ".join(self.fmt(v) for v in self.results[t["key"]][c])])
        md.append(md_table(["test", "contender", "rounds"], raw, left=2))
        md.append("")
        if self.errors or self.notes:
            md.append("## Errors\n")
            for (k, c), es in self.errors.items():
                for e in es:
                    md.append("- %s / %s: `%s`" % (k, c, e.replace("`", "'")))
            for n in self.notes:
                md.append("- %s" % n)
            md.append("")
        with open(os.path.join(a.out, "results.md"), "w") as f:
            f.write("\n".join(md))
        with open(os.path.join(a.out, "results.svg"), "w") as f:
            f.write(svg_chart(rows, a))
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump({"results": {k: dict(v) for k, v in self.results.items()},
                       "shim_cpu": {"%s/%s" % k: v for k, v in self.shim_cpu.items()}, "mem": self.mem,
                       "conc": self.conc, "parallel_downloads": self.par, "targets": tgt,
                       "loads": self.loads, "load_end": loads_end,
                       "baselines": self.baselines, "elapsed": self.elapsed,
                       "errors": {"%s/%s" % k: v for k, v in self.errors.items()}}, f, indent=1)
        log("wrote %s/results.md, results.svg, results.json" % a.out)


def other_busy_note(loads):
    try:
        hi = max(float(x) for x in loads)
    except ValueError:
        return ""
    if hi > 3.0:
        return ("the machine was busy with other work during the run (load average up to %.1f on %d cores, "
                "of which the benchmark itself accounts for about 2-3): absolute numbers are depressed and noisy; "
                "compare the interleaved ratios" % (hi, os.cpu_count()))
    return ""


def sz(mib):
    return "%d GiB" % (mib // 1024) if mib % 1024 == 0 else "%d MiB" % mib


def text_table(hdr, rows, left=1):
    """left: how many leading columns are left-aligned (the rest are numbers)"""
    w = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)] if rows else [len(h) for h in hdr]
    fmt = lambda r: "  ".join(str(x).ljust(w[i]) if i < left else str(x).rjust(w[i]) for i, x in enumerate(r))
    return "\n".join([fmt(hdr), "  ".join("-" * x for x in w)] + [fmt(r) for r in rows])


def md_table(hdr, rows, left=1):
    """left: how many leading columns are left-aligned (the rest are numbers)"""
    esc = lambda s: str(s).replace("|", "\\|")
    out = ["| " + " | ".join(esc(h) for h in hdr) + " |",
           "|" + "|".join(["---"] * left + ["---:"] * (len(hdr) - left)) + "|"]
    for r in rows:
        out.append("| " + " | ".join(esc(x) for x in r) + " |")
    return "\n".join(out)


def machine_info(a):
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ssh_v = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    mem = "?"
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = "%.1f GiB" % (int(line.split()[1]) / 1024 / 1024)
    except OSError:
        pass
    os_name = "?"
    try:
        for line in open("/etc/os-release"):
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return [("nproc", str(os.cpu_count())), ("CPU", cpu), ("memory", mem), ("OS", os_name),
            ("kernel", platform.release()), ("OpenSSH", ssh_v), ("python", platform.python_version()),
            ("sshshim", a.shim_version), ("date", datetime.datetime.now().astimezone().isoformat(timespec="seconds")),
            ("sizes", "-L %s, cat %s, sftp %s, %g ms RTT: -L %s / cat %s; %d round(s); %d exec runs per round "
             "(%d at %g ms RTT); %d connections; %d concurrent downloads of %d MiB"
             % (sz(a.fwd_mib), sz(a.cat_mib), sz(a.sftp_mib), 2 * a.delay_ms, sz(a.rtt_fwd_mib), sz(a.rtt_cat_mib),
                a.rounds, a.exec_runs, a.rtt_exec_runs, 2 * a.delay_ms, a.conns, a.par_downloads, a.par_mib))]


def svg_chart(rows, a):
    data = [(r["t"]["short"], r["t"]["kind"], (r["r_direct_cm"], r["r_cm"], r["r_mux_cm"]),
             tuple(all(x in r["t"]["cs"] for x in (c, "ControlMaster"))
                   for c in ("direct", r["t"]["shim"], "mux"))) for r in rows]
    series = [("direct / ControlMaster", "#9aa5b1"), ("sshshim endpoint / ControlMaster", "#d9622b"),
              ("sshshim mux / ControlMaster", "#2b8a5e")]
    W, H = 980, 460
    left, right, top, bottom = 60, 20, 70, 110
    pw, ph = W - left - right, H - top - bottom
    vals = [v for _, _, vs, _ in data for v in vs if v is not None]
    vmax = max([1.5] + vals)
    cap = 4.0
    ymax = min(cap, vmax * 1.1)
    ymax = max(ymax, 1.2)
    step = 0.25 if ymax <= 2 else 0.5
    y = lambda v: top + ph - min(v, ymax) / ymax * ph
    out = ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" '
           'font-family="Helvetica, Arial, sans-serif" font-size="12">' % (W, H, W, H),
           '<rect width="100%" height="100%" fill="white"/>',
           '<text x="%d" y="22" font-size="16" font-weight="bold">sshshim benchmark: ratio to ControlMaster per test%s</text>'
           % (left, " (--quick)" if a.quick else ""),
           '<text x="%d" y="40" fill="#555">throughput tests: higher is better; latency tests (marked ↓): '
           'lower is better. RTT = %g ms round trip added in front of sshd.%s</text>'
           % (left, 2 * a.delay_ms, (" Bars above %.1f are cut." % ymax) if vmax > ymax else "")]
    g = 0.0
    while g <= ymax + 1e-9:
        out.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#e3e3e3"/>' % (left, y(g), left + pw, y(g)))
        out.append('<text x="%d" y="%.1f" text-anchor="end" fill="#555">%.2g</text>' % (left - 6, y(g) + 4, g))
        g += step
    n = max(1, len(data))
    gw = pw / n
    bw = gw * 0.27
    for i, (label, kind, vs, ran) in enumerate(data):
        x0 = left + i * gw + gw * 0.5 - 1.5 * bw
        for j, v in enumerate(vs):
            x = x0 + j * bw
            if not ran[j]:
                continue
            if v is None:
                out.append('<text x="%.1f" y="%.1f" text-anchor="middle" fill="#c00" font-size="10">error</text>'
                           % (x + bw / 2, y(0) - 4))
                continue
            yy = y(v)
            out.append('<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"/>'
                       % (x + 1, yy, bw - 2, y(0) - yy, series[j][1]))
            out.append('<text x="%.1f" y="%.1f" text-anchor="middle" font-size="10">%.2f%s</text>'
                       % (x + bw / 2, yy - 3, v, "↑" if v > ymax else ""))
        lab = label + (" ↓" if kind == "latency" else "")
        cx = left + i * gw + gw / 2
        out.append('<text transform="translate(%.1f,%.1f) rotate(-35)" text-anchor="end" font-size="11">%s</text>'
                   % (cx + 4, top + ph + 14, xml_escape(lab)))
    out.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#333"/>' % (left, y(0), left + pw, y(0)))
    out.append('<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#1f5fbf" stroke-width="2" stroke-dasharray="6,4"/>'
               % (left, y(1), left + pw, y(1)))
    lx = left
    out.append('<line x1="%d" y1="56" x2="%d" y2="56" stroke="#1f5fbf" stroke-width="2" stroke-dasharray="6,4"/>'
               % (lx, lx + 24))
    out.append('<text x="%d" y="60">ControlMaster = 1.0</text>' % (lx + 30))
    lx += 170
    for j, (name, col) in enumerate(series):
        out.append('<rect x="%d" y="%d" width="12" height="12" fill="%s"/>' % (lx + j * 230, 50, col))
        out.append('<text x="%d" y="%d">%s</text>' % (lx + j * 230 + 16, 60, name))
    out.append("</svg>\n")
    return "\n".join(out)


def xml_escape(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def cmd_run(a):
    raise_nofile()
    if a.quick:
        dflt = dict(rounds=1, exec_runs=5, rtt_exec_runs=3, fwd_mib=128, cat_mib=64, sftp_mib=64,
                    rtt_fwd_mib=64, rtt_cat_mib=32, conns=1000)
    else:
        # the 50 ms RTT downloads are window-bound (~20-40 MiB/s): 256 MiB gives a steady
        # figure and keeps the run near 15 min (--rtt-fwd-mib 1024 --rtt-cat-mib 512 for full sizes)
        dflt = dict(rounds=3, exec_runs=30, rtt_exec_runs=10, fwd_mib=1024, cat_mib=512, sftp_mib=512,
                    rtt_fwd_mib=256, rtt_cat_mib=256, conns=1000)
    for k, v in dflt.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    b = Bench(a)

    def on_signal(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    try:
        b.run()
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    finally:
        b.cleanup()
    return 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("sink")
    p.add_argument("dir")
    p.add_argument("zerofile")
    p = sub.add_parser("echo")
    p.add_argument("dir")
    p = sub.add_parser("delay")
    p.add_argument("dir")
    p.add_argument("target", type=int)
    p.add_argument("ms", type=float)
    p = sub.add_parser("relay")
    p.add_argument("dir")
    p.add_argument("target", type=int)
    p = sub.add_parser("run")
    p.add_argument("--dir", required=True)
    p.add_argument("--bin", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--shim-version", default="?")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int)
    p.add_argument("--exec-runs", type=int)
    p.add_argument("--rtt-exec-runs", type=int)
    p.add_argument("--fwd-mib", type=int)
    p.add_argument("--cat-mib", type=int)
    p.add_argument("--sftp-mib", type=int)
    p.add_argument("--rtt-fwd-mib", type=int)
    p.add_argument("--rtt-cat-mib", type=int)
    p.add_argument("--conns", type=int)
    p.add_argument("--conc-parallel", type=int, default=100)
    p.add_argument("--par-downloads", type=int, default=50,
                   help="concurrent -L downloads for the peak-RSS test (0: skip)")
    p.add_argument("--par-mib", type=int, default=16, help="MiB per concurrent download")
    p.add_argument("--tunnels", type=int, default=1000,
                   help="sshshim-owned -R tunnels in one `supervise` for the start/drop test (0: skip)")
    p.add_argument("--delay-ms", type=float, default=25.0)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--only", help="comma-separated test keys (exec,exec_cfg,fwd_conn,fwd_up,fwd_down,cat_up,cat_down,"
                                  "sftp_put,sftp_get,rtt_exec,rtt_fwd_down,rtt_cat_down)")
    a = ap.parse_args()
    if a.cmd == "run":
        sys.exit(cmd_run(a))
    {"sink": cmd_sink, "echo": cmd_echo, "delay": cmd_delay, "relay": cmd_relay}[a.cmd](a)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
