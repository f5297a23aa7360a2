"""What a person sees while the pipeline runs, and where everything else goes.

The terminal gets, per stage, a start line, a live progress bar on long work (tqdm; plain periodic
lines when the output is not a terminal, e.g. CI or ``ray job submit`` logs), and one summary line.
Everything else the process and its Ray workers print — our own log records, library warnings,
Ray's driver and worker output (``log_to_driver``), DeepSpeed's configuration dumps, C-level
output of faiss or gloo — goes to ``<run_dir>/logs/<stage>.log`` (one file per stage, appended on a
rerun; ``pipeline.log`` for what happens between stages). ``--verbose`` shows that stream live too.

How: file descriptors 1 and 2 of the process are pointed at one pipe for the whole run, so every
writer (Python, C, child processes that Ray starts while it runs) is captured without cooperating.
One thread reads the pipe line by line and writes to the current stage's log. Switching to the
next stage's log is a marker line sent through the same pipe, so each line lands in the log of the
stage that was running when it was written. The terminal itself is reached through a copy of the
original descriptors made before the redirection. On S3 run directories the logs are written
locally first and uploaded when their stage ends (also when it fails).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

from influencespace import progress, storage
from influencespace.layout import LOGS_DIR
from influencespace.progress import RayCount, RaySink

log = logging.getLogger(__name__)

BETWEEN_STAGES = "pipeline"
PLAIN_INTERVAL_S = 30.0  # a non-interactive run prints one progress line per bar at most this often
_SWITCH = b"\x00influencespace-log-switch\x00"


class _LogPump:
    """Owns fds 1 and 2 while active: every byte written to them goes to the current log file."""

    def __init__(self, tee_fd: int | None):
        self.tee_fd = tee_fd
        self.current: Any = None
        self.switched = threading.Event()
        self._saved = (os.dup(1), os.dup(2))
        read_fd, write_fd = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(write_fd, 1)
        os.dup2(write_fd, 2)
        os.close(write_fd)
        self._reader = os.fdopen(read_fd, "rb")
        self._thread = threading.Thread(target=self._pump, name="influencespace-log-pump", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        for line in self._reader:  # ends when the last holder of the pipe's write end is gone
            if line.startswith(_SWITCH):
                path = line[len(_SWITCH):].rstrip(b"\n").decode()
                if self.current is not None:
                    self.current.close()
                self.current = open(path, "ab") if path else None  # noqa: SIM115 - kept open across lines
                self.switched.set()
                continue
            if self.current is not None:
                self.current.write(line)
                self.current.flush()
            if self.tee_fd is not None:
                os.write(self.tee_fd, line)

    def switch(self, path: str | None) -> None:
        """Send what was written so far to the old log, then everything after to ``path``."""
        sys.stdout.flush()
        sys.stderr.flush()
        self.switched.clear()
        os.write(1, _SWITCH + (path or "").encode() + b"\n")
        self.switched.wait(timeout=60)

    def stop(self) -> None:
        self.switch(None)
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        # The pump thread goes on until processes started during the run (Ray's) close the pipe;
        # what they still print goes nowhere, as after any run.


class _Bar:
    """One tracked piece of work: a tqdm bar on a terminal, periodic plain lines elsewhere."""

    def __init__(self, console: Console, desc: str, total: int | None, unit: str):
        self.console, self.desc, self.total, self.unit = console, desc, total, unit
        self.local = self.remote = 0
        self.started = self.last_line = time.monotonic()
        self._lock = threading.Lock()
        self._actor: Any = None
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._tqdm = None
        if console.bars:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, desc=desc, unit=f" {unit}", file=console.terminal, leave=False,
                              ncols=console.columns, mininterval=0.5)

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.local += n
            self._show()

    def sink(self) -> Any:
        """Local runner: this bar itself. On Ray: a sink backed by a tiny actor, polled once a second."""
        import ray

        if not ray.is_initialized():
            return self
        if self._actor is None:
            self._actor = RayCount.start()
            self._poller = threading.Thread(target=self._poll, name=f"progress-{self.desc}", daemon=True)
            self._poller.start()
        return RaySink(self._actor)

    def _poll(self) -> None:
        import ray

        while not self._stop.wait(1.0):
            self._refresh(ray)

    def _refresh(self, ray: Any) -> None:
        try:
            value = ray.get(self._actor.value.remote(), timeout=10)
        except Exception:  # a slow or restarting cluster: try again at the next poll
            return
        with self._lock:
            self.remote = value
            self._show()

    def _show(self) -> None:
        done = self.local + self.remote
        if self._tqdm is not None:
            self._tqdm.update(done - self._tqdm.n)
            return
        now = time.monotonic()
        if now - self.last_line < self.console.plain_interval:
            return
        self.last_line = now
        self.console.line(plain_progress(self.desc, done, self.total, self.unit, now - self.started))

    def close(self) -> None:
        if self._actor is not None:
            import ray

            self._stop.set()
            if self._poller is not None:
                self._poller.join(timeout=5)
            self._refresh(ray)
            ray.kill(self._actor)
            self._actor = None
        if self._tqdm is not None:
            self._tqdm.close()


def plain_progress(desc: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    """``[desc] 1,200/6,000 rows (20%), 0:30 elapsed, about 2:00 left``: a progress line for logs."""
    from tqdm import tqdm

    text = f"[{desc}] {done:,}" + (f"/{total:,}" if total else "") + f" {unit}"
    if total:
        text += f" ({100 * done / total:.0f}%)"
    text += f", {tqdm.format_interval(elapsed)} elapsed"
    if total and done:
        text += f", about {tqdm.format_interval(elapsed * (total - done) / done)} left"
    return text


def _terminal_columns(default: int = 100) -> int:
    """The terminal's width (a terminal that reports none, e.g. a fresh pseudo-terminal, gets ``default``)."""
    try:
        columns = os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        columns = 0
    return columns or int(os.environ.get("COLUMNS", 0) or default)


class Console:
    """The command line's view of a pipeline run; use as a context manager around the whole run.

    ``run_dir`` is where ``logs/`` goes (local or ``s3://``). ``verbose`` also shows the captured
    stream on the terminal (and then prints progress as plain lines, so the two do not fight).
    ``interactive`` defaults to whether stdout is a terminal; ``show_progress=False``
    (``runtime.progress``) keeps the start and summary lines but shows no progress.
    """

    def __init__(self, run_dir: str, verbose: bool = False, interactive: bool | None = None,
                 plain_interval: float = PLAIN_INTERVAL_S, show_progress: bool = True):
        self.run_dir = run_dir
        self.verbose = verbose
        self.show_progress = show_progress
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.bars = self.interactive and not verbose
        self.columns = _terminal_columns()
        self.plain_interval = plain_interval
        self.logs_uri = storage.join(run_dir, LOGS_DIR)
        self._remote_logs = storage.is_s3(run_dir)
        self._local_logs = self.logs_uri  # S3 run directories: a local folder, made on entering
        self.terminal: Any = None
        self.errors: Any = None
        self._pump: _LogPump | None = None
        self._lock = threading.Lock()
        self.failed_stage: str | None = None  # the stage whose failure was shown (and logged)

    # -- lifetime -----------------------------------------------------------------------------------

    def __enter__(self) -> Console:
        if self._remote_logs:
            self._local_logs = tempfile.mkdtemp(prefix="influencespace-logs-")
        os.makedirs(self._local_logs, exist_ok=True)
        self.terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        self.errors = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
        self._pump = _LogPump(self.terminal.fileno() if self.verbose else None)
        self._pump.switch(self._log_path(BETWEEN_STAGES))
        if self.show_progress:
            progress.install(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        progress.install(None)
        if self._pump is not None:
            self._pump.stop()
            self._pump = None
        self._upload(BETWEEN_STAGES)
        self.terminal.close()
        self.errors.close()

    # -- what the stages call -----------------------------------------------------------------------

    def line(self, text: str, error: bool = False) -> None:
        """One line on the terminal (stderr when ``error``), drawn around any live bar."""
        stream = self.errors if error else self.terminal
        with self._lock:
            if self.bars:
                from tqdm import tqdm

                tqdm.write(text, file=stream)
            else:
                stream.write(text + "\n")
                stream.flush()

    def summary(self, text: str) -> None:
        """A stage's summary: whole in the logs, cut to one screen line on a terminal."""
        if self._pump is not None:
            os.write(1, (text + "\n").encode())
        if self.interactive and len(text) > self.columns:
            text = text[: self.columns - 2] + " …"
        self.line(text)

    def track(self, desc: str, total: int | None, unit: str) -> _Bar:
        return _Bar(self, desc, total, unit)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Everything printed inside goes to ``logs/<name>.log``; a failure is shown with that path."""
        self.line(f"[{name}] starting")
        self._switch(name)
        try:
            yield
        except BaseException as exc:
            self.failed_stage = name
            if not isinstance(exc, KeyboardInterrupt):
                # The full story goes to the stage's log; the terminal gets the stage, the message, the path.
                log.error("stage %s failed:\n%s", name, "".join(traceback.format_exception(exc)))
            self._switch(BETWEEN_STAGES)
            self._upload(name)
            # The caller prints the message itself ("error: ..."), once, after the console has closed.
            what = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            self.line(f"[{name}] {what} (full output and traceback: {self.log_uri(name)})", error=True)
            raise
        self._switch(BETWEEN_STAGES)
        self._upload(name)

    def log_uri(self, name: str) -> str:
        return storage.join(self.logs_uri, f"{name}.log")

    # -- internals ----------------------------------------------------------------------------------

    def _log_path(self, name: str) -> str:
        return os.path.join(self._local_logs, f"{name}.log")

    def _switch(self, name: str) -> None:
        if self._pump is not None:
            self._pump.switch(self._log_path(name))
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            os.write(1, f"---- {stamp} influencespace: {name} ----\n".encode())

    def _upload(self, name: str) -> None:
        if not self._remote_logs or not os.path.exists(self._log_path(name)):
            return
        try:
            with open(self._log_path(name), "rb") as f:
                storage.write_bytes(self.log_uri(name), f.read())
        except Exception as exc:  # a log that cannot be uploaded must not hide the stage's own outcome
            self.line(f"warning: could not write {self.log_uri(name)} ({exc}); it is at {self._log_path(name)}", error=True)
