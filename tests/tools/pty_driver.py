#!/usr/bin/env python3
"""Drive a program through a real pseudo-terminal, as a person at a terminal would.

usage: pty_driver.py ROWS COLS STEP... -- COMMAND ARGS...

Steps run in order:
  send:TEXT        type TEXT (\\n and \\r escapes are honoured)
  expect:REGEX     wait (10 s at most) until the output so far matches REGEX
  resize:ROWS:COLS change the terminal size and send SIGWINCH, as a terminal does
  wait             wait (10 s at most) for the program to exit
  touch:PATH       create PATH (a signal to the test)
  gone:PATH        wait (30 s at most) until the test removed PATH
  print            print the output so far, between lines of ====

Prints "EXIT <code>" after `wait`. On a timeout prints the transcript to stderr
and exits 1. Used by the integration tests for pty behaviour.
"""
import fcntl
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time

TIMEOUT = 10.0


def set_size(fd, rows, cols):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def main():
    argv = sys.argv[1:]
    sep = argv.index("--")
    rows, cols, steps, cmd = int(argv[0]), int(argv[1]), argv[2:sep], argv[sep + 1:]
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(cmd[0], cmd)
    set_size(fd, rows, cols)
    out = b""

    def pump(deadline):
        nonlocal out
        r, _, _ = select.select([fd], [], [], max(0.0, min(0.1, deadline - time.time())))
        if r:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            out += data
            return bool(data)
        return True

    def fail(why):
        sys.stderr.write(f"pty_driver: {why}\n--- transcript ---\n{out.decode(errors='replace')}\n")
        os.kill(pid, signal.SIGKILL)
        sys.exit(1)

    for step in steps:
        kind, _, arg = step.partition(":")
        if kind == "send":
            os.write(fd, arg.replace("\\n", "\n").replace("\\r", "\r").encode())
        elif kind == "expect":
            deadline = time.time() + TIMEOUT
            while not re.search(arg.encode(), out):
                if time.time() > deadline:
                    fail(f"timed out waiting for {arg!r}")
                if not pump(deadline):
                    fail(f"output ended before {arg!r}")
        elif kind == "resize":
            r, c = arg.split(":")
            set_size(fd, int(r), int(c))
            os.kill(pid, signal.SIGWINCH)
        elif kind == "touch":
            open(arg, "w").close()
        elif kind == "gone":
            deadline = time.time() + 30
            while os.path.exists(arg):
                if time.time() > deadline:
                    fail(f"{arg} was not removed")
                pump(time.time() + 0.05)
        elif kind == "print":
            print("====")
            print(out.decode(errors="replace"))
            print("====")
        elif kind == "wait":
            deadline = time.time() + TIMEOUT
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.time() > deadline:
                    fail("timed out waiting for exit")
                pump(deadline)
            code = os.waitstatus_to_exitcode(status)
            print(f"EXIT {code}")
        else:
            fail(f"unknown step {step!r}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
