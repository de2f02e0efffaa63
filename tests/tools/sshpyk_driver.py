"""Drives one sshpyk kernel for tests/sshpyk.rs.

Usage: python sshpyk_driver.py KERNEL_NAME

KERNEL_NAME is a local kernelspec made by `sshpyk add` (JUPYTER_DATA_DIR and
friends come from the environment). Starts the kernel, runs `print(6*7)`,
sends 2 MiB of code and gets 2 MiB of output back, then shuts the kernel
down. Prints `REMOTE_PIDS <launcher> <kernel>` once started and `OK` at the
end; exits non-zero with the reason on any failure. Every wait is bounded.
"""

import hashlib
import random
import string
import sys
import time

from jupyter_client.manager import KernelManager

# Bounds for each step, in seconds.
READY = 60
EXECUTE = 60


def execute(kc, code):
    """Runs `code`; returns what it printed on stdout. Fails on an error."""
    out = []

    def hook(msg):
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append("ERROR: " + "\n".join(msg["content"]["traceback"]))

    reply = kc.execute_interactive(code, output_hook=hook, timeout=EXECUTE)
    status = reply["content"]["status"]
    if status != "ok":
        raise SystemExit(f"execute failed ({status}): {''.join(out)}")
    return "".join(out)


def main():
    name = sys.argv[1]
    km = KernelManager(kernel_name=name)
    started = time.monotonic()
    km.start_kernel()
    prov = km.provisioner
    print(f"REMOTE_PIDS {prov.rem_pid_ka} {prov.rem_pid_k}", flush=True)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=READY)
        print(f"ready after {time.monotonic() - started:.1f}s", flush=True)

        got = execute(kc, "print(6*7)")
        if got != "42\n":
            raise SystemExit(f"print(6*7) gave {got!r}")

        # 2 MiB up (inside the code) and its length and hash back...
        rng = random.Random(17)
        big = "".join(rng.choices(string.ascii_letters + string.digits, k=2 << 20))
        want = f"{len(big)} {hashlib.sha256(big.encode()).hexdigest()}\n"
        got = execute(
            kc,
            f"import hashlib\n_s = {big!r}\n"
            "print(len(_s), hashlib.sha256(_s.encode()).hexdigest())",
        )
        if got != want:
            raise SystemExit(f"2 MiB up: got {got[:200]!r}, want {want!r}")
        # ... and 2 MiB down.
        got = execute(kc, "print(_s)")
        if got != big + "\n":
            raise SystemExit(
                f"2 MiB down: got {len(got)} chars, "
                f"sha256 {hashlib.sha256(got.encode()).hexdigest()}"
            )
        print("round trips ok", flush=True)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    if km.is_alive():
        raise SystemExit("kernel still alive after shutdown")
    print("OK", flush=True)


if __name__ == "__main__":
    main()
