"""Run a command in a real pseudo-terminal and read the screen a person would see (pyte renders it)."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import termios
import time
from dataclasses import dataclass

import pyte


@dataclass
class TerminalRun:
    returncode: int
    raw: str  # every byte the program wrote, escape sequences included
    screen: list[str]  # the final screen, one string per row, trailing blanks removed
    history: list[str]  # rows that scrolled off the top, oldest first


def run_in_terminal(argv: list[str], env: dict[str, str], columns: int = 160, rows: int = 60,
                    timeout: float = 900.0) -> TerminalRun:
    """Run ``argv`` with its stdin/stdout/stderr on a pty of ``columns`` × ``rows``; wait for it to end."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal of a known size, as a person's would have
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
        os.execve(argv[0], argv, env)
    screen = pyte.HistoryScreen(columns, rows, history=10_000)
    stream = pyte.ByteStream(screen)
    raw = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed its side
            break
        if not data:
            break
        raw += data
        stream.feed(data)
    else:
        os.kill(pid, 9)
        raise TimeoutError(f"{argv} did not finish within {timeout}s; its output so far:\n{raw.decode(errors='replace')}")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    history = ["".join(line[x].data for x in range(columns)).rstrip() for line in screen.history.top]
    return TerminalRun(os.waitstatus_to_exitcode(status), raw.decode(errors="replace"),
                       [line.rstrip() for line in screen.display], history)
