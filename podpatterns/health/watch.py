"""Waiting on peers' records: level-triggered reads woken by :mod:`podpatterns.dirwatch`.

The file events are the wake-up signal, not the truth: every wake-up re-reads the
records on disk (see :class:`~podpatterns.dirwatch.DirWatcher`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path

from podpatterns.dirwatch import RESYNC_SECONDS, DirWatcher, WatchFactory
from podpatterns.health.reader import Status, Tracker
from podpatterns.health.records import is_record_file


def record_watcher(
    health_dir: Path,
    *,
    resync: float = RESYNC_SECONDS,
    watch: WatchFactory | None = None,
    component: str = "health",
) -> DirWatcher:
    """A :class:`~podpatterns.dirwatch.DirWatcher` on a health directory that wakes up
    for record files only (not for the temporary files of atomic writes)."""
    return DirWatcher(
        health_dir,
        resync=resync,
        watch_filter=lambda _change, path: is_record_file(path),
        watch=watch,
        component=component,
    )


async def wait_status(
    tracker: Tracker,
    name: str,
    done: Callable[[Status], bool],
    *,
    watcher: DirWatcher | None = None,
    on_change: Callable[[Status], None] | None = None,
) -> Status:
    """Return ``name``'s status once ``done(status)`` holds; re-read at every wake-up.

    Each read runs on a worker thread (:meth:`Tracker.astatus`), so a slow or hostile
    file in the directory never blocks the event loop.

    Args:
        tracker: the reader state (staleness is judged on its clock).
        name: the container to wait for.
        done: the condition, e.g. ``lambda s: s.ready or s.exited``.
        watcher: the wake-up source (default: :func:`record_watcher` on the directory).
        on_change: called with each status whose state differs from the previous one.
    """
    watcher = watcher or record_watcher(tracker.health_dir)
    last = None
    async with aclosing(watcher.wakeups()) as wakeups:
        async for _ in wakeups:
            status = await tracker.astatus(name)  # read on a thread: never blocks the loop
            if on_change is not None and status.state is not last:
                on_change(status)
            last = status.state
            if done(status):
                return status
    raise AssertionError("unreachable: wakeups() never ends")  # pragma: no cover


async def wait_ready(health_dir: Path, name: str) -> Status:
    """Wait until ``name`` is ready (fresh heartbeat) or has exited; return its status.

    The caller checks :attr:`Status.exited`: a tombstone ends the wait too, because a
    container that exited will not become ready in this instance.
    """
    return await wait_status(Tracker(health_dir), name, lambda s: s.ready or s.exited)


async def wait_exited(health_dir: Path, name: str) -> Status:
    """Wait until ``name``'s tombstone is on disk: one this reader saw coming, or one
    written at most :data:`~podpatterns.health.records.TOMBSTONE_GRACE` before it
    started (an older one is from an earlier run and is ignored)."""
    return await wait_status(Tracker(health_dir), name, lambda s: s.exited)
