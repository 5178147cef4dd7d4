"""Idle-series expiry: which label sets of a metric were not updated for a while (issue 15).

Shared by the logs-to-metrics state (:mod:`podpatterns.adapter.l2m`) and the StatsD input
(:mod:`podpatterns.adapter.statsd`). It keeps only the time each series was last updated
and answers which ones are due; the caller removes those series and counts them. The
caller also chooses the clock: the wall clock where the times are saved with the
checkpoint (a restart must judge idleness by the clock the times were taken with), the
monotonic clock where nothing outlives the process.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class IdleSeries(Generic[K]):
    """When each series was last updated, and which are idle for ``after`` seconds.

    Finding the idle series is a walk over all of them; :meth:`due` does it only once
    the oldest update can have become idle, so calling it per batch or per scrape costs a
    comparison most of the time.

    Args:
        after: seconds without an update after which a series is due (> 0).
    """

    __slots__ = ("_next", "after", "touched")

    def __init__(self, after: float) -> None:
        self.after = after
        self.touched: dict[K, float] = {}
        """Per series, the time of its last update."""
        self._next = math.inf  # no series can be due before this time

    @property
    def next_due(self) -> float:
        """No series can be due before this time (``inf`` without series)."""
        return self._next

    def touch(self, key: K, now: float) -> None:
        """Series ``key`` was updated at ``now``."""
        self.touched[key] = now
        if now + self.after < self._next:
            self._next = now + self.after

    def restore(self, key: K, saved: float, now: float) -> None:
        """Series ``key`` was last updated at ``saved``, by the same clock as ``now``.

        A time after ``now`` (the clock was set back since) counts as ``now``: the series
        is idle from now on, never for longer than the clock says.
        """
        self.touch(key, min(saved, now))

    def due(self, now: float) -> list[K]:
        """Forget and return the series not updated for ``after`` seconds at ``now``."""
        if now < self._next:
            return []
        limit = now - self.after
        gone = [k for k, t in self.touched.items() if t <= limit]
        for k in gone:
            del self.touched[k]
        self._next = min(self.touched.values(), default=math.inf) + self.after
        return gone
