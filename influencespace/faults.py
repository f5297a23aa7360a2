"""Named fault points for the reliability tests (``tests/faults``); inert unless a test arms them.

A stage calls :func:`fault_point` at a few places where a crash is interesting: after an embed actor's
n-th batch, after a k-means iteration's checkpoint, in the middle of influence's gradient accumulation,
after a training epoch's checkpoint. Nothing happens unless the environment variable
``INFLUENCESPACE_FAULTS`` arms the point; a test sets it on the CLI subprocess it starts, and local Ray
passes the variable on to every worker process (actors, Ray Train workers)::

    INFLUENCESPACE_FAULTS="embed.batch@2=kill,cluster.iteration@3=hang"
    INFLUENCESPACE_FAULTS_DIR=/tmp/markers          # where fired faults are recorded

``point@n=action``: when ``point`` is reached for the ``n``-th time (``n`` as the caller counts; no
``@n``: the first time), the first process to get there records ``<point>.<action>.json`` (pid, step,
time) in the markers directory and then

- ``kill``: SIGKILLs itself: a worker process lost without any clean-up (Ray must restart it);
  ``kill:S`` waits S seconds first (e.g. until Ray Train's controller has registered a checkpoint);
- ``raise``: raises :class:`InjectedFault` (a plain bug, not a user error): how a stage that fails
  looks from the command line;
- ``hang``: sleeps until somebody kills it: the test waits for the marker and SIGKILLs the driver,
  so the kill lands at exactly this point instead of whenever a poll happens to notice progress.
  Nobody killing it within ``INFLUENCESPACE_FAULTS_HANG_S`` (default 1800 s) means the test died:
  it then SIGKILLs itself.

Each armed fault fires once per markers directory (the marker is created with ``O_EXCL``), so a
restarted worker goes on past the point it died at.
"""

from __future__ import annotations

import json
import os
import signal
import time

ENV = "INFLUENCESPACE_FAULTS"
DIR_ENV = "INFLUENCESPACE_FAULTS_DIR"
HANG_LIMIT_ENV = "INFLUENCESPACE_FAULTS_HANG_S"
HANG_LIMIT_S = 1800.0  # no test waits this long for a marker
ACTIONS = ("kill", "hang", "raise")


class InjectedFault(RuntimeError):
    """What a ``raise`` fault point raises."""


def fault_point(point: str, step: int | str | None = None) -> None:
    """Fire the fault armed for ``point`` (at ``step``), if any; return at once otherwise."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for item in spec.split(","):
        target, _, action = item.strip().partition("=")
        action, _, delay = action.partition(":")
        name, _, at = target.partition("@")
        if name != point or action not in ACTIONS or (at and str(step) != at):
            continue
        directory = os.environ.get(DIR_ENV) or "."
        os.makedirs(directory, exist_ok=True)
        try:
            fd = os.open(os.path.join(directory, f"{point}.{action}.json"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue  # fired already (by this or another process)
        with os.fdopen(fd, "w") as f:
            json.dump({"point": point, "action": action, "step": step, "pid": os.getpid(), "time": time.time()}, f)
        if action == "raise":
            raise InjectedFault(f"injected fault at {point}" + (f"@{step}" if step is not None else ""))
        if action == "kill":
            time.sleep(float(delay or 0))
            os.kill(os.getpid(), signal.SIGKILL)
        # hang: until the test kills us — or, if the test itself died, until the limit, so that an
        # aborted test never leaves a sleeping driver (and its Ray) behind for good.
        deadline = time.monotonic() + float(os.environ.get(HANG_LIMIT_ENV) or HANG_LIMIT_S)
        while time.monotonic() < deadline:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)
