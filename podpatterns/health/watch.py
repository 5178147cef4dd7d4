"""Wake-ups for level-triggered readers of a directory, and waiting on peers' records.

watchfiles is the wake-up signal, not the truth: inotify drops events on overflow and
misses symlink retargets, so a reader re-reads the state on disk at start, after every
event batch and on a periodic resync. When no watcher can be created (inotify limits,
no such directory yet), :class:`DirWatcher` falls back to polling and says so in
:attr:`DirWatcher.mode` (exported as a metric by its users).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

from podpatterns import logs
from podpatterns.health.records import Status, Tracker, is_record_file

RESYNC_SECONDS = 1.0
TICK_SECONDS = 0.2
"""How often a watch wakes up without events (see :meth:`DirWatcher.wakeups`)."""


def _default_watch(path: Path, tick: float) -> AsyncGenerator[Any, None]:
    import watchfiles  # on first use: only --exit-with, wait and health watch a directory

    return watchfiles.awatch(
        path,
        rust_timeout=max(1, int(tick * 1000)),
        yield_on_timeout=True,
        debounce=20,
        step=5,
        watch_filter=lambda _change, p: is_record_file(p),
    )


class DirWatcher:
    """Yield once at start, after every relevant event batch and every ``resync`` seconds.

    Args:
        path: the directory to watch (it may not exist yet: then it is polled).
        resync: the longest time between two wake-ups.
        watch: factory of the event iterator, called with ``path`` and the tick in
            seconds (default: watchfiles on ``path``); it yields a non-empty batch per
            event batch and an empty one per tick without events. Raising ``OSError``
            or ``RuntimeError`` from it or its iteration means "cannot watch", and the
            watcher polls instead.
        retry_watch: seconds between attempts to go back from polling to watching.
        component: the ``component`` of its log events (the user's name).
    """

    def __init__(
        self,
        path: Path,
        *,
        resync: float = RESYNC_SECONDS,
        watch: Callable[[Path, float], AsyncGenerator[Any, None]] = _default_watch,
        retry_watch: float = 30.0,
        component: str = "health",
    ) -> None:
        self.path = path
        self.resync = resync
        self.mode = "starting"
        self.fallbacks = 0
        self._watch = watch
        self._retry_watch = retry_watch
        self._log = logs.get(component)

    async def wakeups(self) -> AsyncGenerator[None, None]:
        """The wake-ups; the caller re-reads the state on disk at each one.

        Events that happen between the first read and the moment the watch is in place
        would be lost, so the first tick of a new watch is a wake-up too: the watcher
        ticks every :data:`TICK_SECONDS` (at most) and only every ``resync`` seconds is
        a tick passed on, besides event batches and that first tick.
        """
        yield None
        loop = asyncio.get_running_loop()
        tick = min(self.resync, TICK_SECONDS)
        while True:
            try:
                async with aclosing(self._watch(self.path, tick)) as events:
                    established = False
                    last = loop.time()
                    async for changes in events:
                        if self.mode != "inotify":
                            self.mode = "inotify"
                            self._log.info("watch_mode", path=str(self.path), mode="inotify")
                        now = loop.time()
                        if changes or not established or now - last >= self.resync:
                            established = True
                            last = now
                            yield None
                # The iterator ended (the directory went away): poll until it is back.
                raise OSError(f"watch of {self.path} ended")
            except (OSError, RuntimeError) as exc:
                if self.mode != "polling":
                    self.fallbacks += 1
                    self.mode = "polling"
                    self._log.warning("watch_fallback_polling", path=str(self.path), error=str(exc))
            until = loop.time() + self._retry_watch
            while loop.time() < until:
                await asyncio.sleep(self.resync)
                yield None


async def wait_status(
    tracker: Tracker,
    name: str,
    done: Callable[[Status], bool],
    *,
    watcher: DirWatcher | None = None,
    on_change: Callable[[Status], None] | None = None,
) -> Status:
    """Return ``name``'s status once ``done(status)`` holds; re-read at every wake-up.

    Args:
        tracker: the reader state (staleness is judged on its clock).
        name: the container to wait for.
        done: the condition, e.g. ``lambda s: s.ready or s.exited``.
        watcher: the wake-up source (default: a :class:`DirWatcher` on the directory).
        on_change: called with each status whose state differs from the previous one.
    """
    watcher = watcher or DirWatcher(tracker.health_dir)
    last = None
    async with aclosing(watcher.wakeups()) as wakeups:
        async for _ in wakeups:
            status = tracker.status(name)
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
    """Wait until ``name``'s tombstone is on disk (one written earlier counts)."""
    return await wait_status(Tracker(health_dir), name, lambda s: s.exited)
