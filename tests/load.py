"""Run a command while N processes keep CPU cores busy, to find tests that assume an idle machine.

    python -m tests.load --busy 1 -- python -m pytest -m "faults or slow"

Each busy worker is a pure-Python spin loop in its own process (one core each, no threads, no
memory). They are stopped when the command ends, however it ends (exit, failure, Ctrl-C, SIGTERM),
and each one also ends itself after ``--max-seconds`` or when this process disappears (it checks its
parent), so a killed runner never leaves them behind. The exit code is the command's.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time


def spin(deadline: float, parent: int) -> None:
    """Burn one core until ``deadline`` (monotonic) or until the parent process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the runner, which stops us.
    x = 0
    while True:
        for _ in range(200_000):  # ~10 ms of work between checks
            x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        if time.monotonic() > deadline or os.getppid() != parent:
            return


def _status(returncode: int) -> int:
    """The exit status a shell would report: 128 + N for a command killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=int, default=1, help="number of busy processes (default 1)")
    parser.add_argument(
        "--max-seconds", type=float, default=3600, help="busy workers end themselves after this (default 3600)"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")

    deadline = time.monotonic() + args.max_seconds
    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=spin, args=(deadline, os.getpid()), daemon=True) for _ in range(args.busy)]
    for worker in workers:
        worker.start()
    print(
        f"[load] {args.busy} busy process(es) (pids {[w.pid for w in workers]}, max {args.max_seconds:.0f} s) "
        f"while running: {' '.join(command)}",
        file=sys.stderr,
        flush=True,
    )
    # SIGTERM to the runner becomes a normal exit so the finally block below runs. Ctrl-C reaches the
    # command too (same process group): the runner lets the command handle it and cleans up when it
    # has exited (a Python-level handler, so the command itself starts with the default one).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, lambda *_: None)
    started = time.monotonic()
    child = None
    try:
        child = subprocess.Popen(command)
        return _status(child.wait())
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join(timeout=5)
        print(f"[load] command ended after {time.monotonic() - started:.0f} s; busy processes stopped", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
