"""Progress of long work, shown by whatever display the command line installed; silent otherwise.

Stage code says what it is doing and how far it got, without knowing who (if anyone) is watching::

    with progress.track("embed", total=rows, unit="rows") as bar:
        for batch in batches:
            ...
            bar.add(len(batch))

Work that runs in other processes (Ray actors, Ray Train workers) gets ``bar.sink()``: a small
picklable object whose ``add(n)`` reaches the driver's bar from any process of the cluster. Without
a display (tests, library use) every call is a no-op, so pure logic may call it freely: this module
imports nothing heavy and knows nothing of terminals (``influencespace.console`` does); Ray is
imported only when a :class:`RayCount` actor is started (what ``bar.sink()`` uses on a cluster, and
what work that must know an exact count across workers uses directly, e.g. export).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol


class Sink(Protocol):
    """Where counts go: ``add(n)`` may be called from any process the sink was shipped to."""

    def add(self, n: int = 1) -> None: ...


class Tracker(Sink, Protocol):
    def sink(self) -> Sink: ...

    def close(self) -> None: ...


class NullTracker:
    """The tracker when nobody watches: accepts everything, shows nothing, pickles anywhere."""

    def add(self, n: int = 1) -> None:
        pass

    def sink(self) -> NullTracker:
        return self

    def close(self) -> None:
        pass


NULL = NullTracker()

_display: Any = None  # an object with track(desc, total, unit) -> Tracker; see install()


def install(display: Any) -> None:
    """Show every later :func:`track` on ``display`` (``None`` switches progress off again)."""
    global _display
    _display = display


@contextlib.contextmanager
def track(desc: str, total: int | None, unit: str = "it") -> Iterator[Tracker]:
    """A tracker for ``total`` units of work called ``desc``; closed when the block ends."""
    tracker = _display.track(desc, total, unit) if _display is not None else NULL
    try:
        yield tracker
    finally:
        tracker.close()


class RayCount:
    """A Ray actor that adds up what remote workers report: progress bars, and counts that must be exact."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, n: int) -> None:
        self.n += n

    def value(self) -> int:
        return self.n

    @classmethod
    def start(cls) -> Any:
        """A fresh counter actor (no CPU reserved)."""
        import ray

        return ray.remote(num_cpus=0)(cls).remote()


class RaySink:
    """A :class:`Sink` that works from any process of the Ray cluster (backed by a :class:`RayCount`)."""

    def __init__(self, actor: Any):
        self.actor = actor

    def add(self, n: int = 1) -> Any:
        """Send ``n`` on (no waiting); the returned reference is for callers that must know it arrived."""
        return self.actor.add.remote(int(n))
