"""Wake-ups for level-triggered readers of directories: file events, with polling behind.

watchfiles is the wake-up signal, not the truth: inotify drops events on overflow and
misses symlink retargets (a Kubernetes ``..data`` swap), so a reader re-reads the state
on disk at start, after every event batch and on a periodic resync. When no watcher can be
created (inotify limits, no such directory yet) or the watch ends (the directory went
away), :class:`DirWatcher` polls instead, says so in :attr:`DirWatcher.mode` (its users
export it as a metric) and tries to watch again later.

This is the package's one watch-with-polling-fallback: health records, ``--exit-with``,
``reload``, TLS files and the adapter's file discovery all wake up through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

from podpatterns import logs

RESYNC_SECONDS = 1.0
STEP_MS = 50
"""How often watchfiles' thread looks for events, in milliseconds. Each look takes the
GIL: at 5 ms an idle ``health`` used 11 ms of CPU per second and ``reload`` 9, at 50 ms
4 and 3 (20 s windows, ``/proc/PID/stat``), for at most 50 ms more before a change is
seen: nothing next to a probe period or a container's start."""
TICK_SECONDS = 0.2
"""How often a watch wakes up without events (see :meth:`DirWatcher.wakeups`)."""

Changes = frozenset[tuple[Any, str]]
"""One batch of ``(watchfiles.Change, path)``; empty for a tick, a resync or a poll."""

WatchFilter = Callable[[Any, str], bool]
"""``(change, path) -> bool``: which events count (watchfiles' ``watch_filter``)."""

WatchFactory = Callable[[tuple[Path, ...], float], AsyncGenerator[Any, None]]
"""Makes the event iterator for the paths and a tick in seconds. It yields a non-empty
batch per event batch and an empty one per tick; raising ``OSError`` or ``RuntimeError``
(from the call or the iteration) means "cannot watch"."""

NO_CHANGES: Changes = frozenset()


def watchfiles_factory(
    *,
    watch_filter: WatchFilter | None = None,
    recursive: bool = True,
    debounce_ms: int = 20,
    step_ms: int = STEP_MS,
) -> WatchFactory:
    """The default event source: ``watchfiles.awatch`` on the paths.

    ``step_ms`` is how often watchfiles' thread wakes up to look for events; each wake-up
    takes the GIL (see :data:`STEP_MS`).
    """

    def factory(paths: tuple[Path, ...], tick: float) -> AsyncGenerator[Any, None]:
        import watchfiles  # on first use: most processes never watch a directory

        return watchfiles.awatch(
            *paths,
            rust_timeout=max(1, int(tick * 1000)),
            yield_on_timeout=True,
            debounce=debounce_ms,
            step=step_ms,
            watch_filter=watch_filter,
            recursive=recursive,
        )

    return factory


class DirWatcher:
    """Yield at start, after every relevant event batch and at least every ``resync`` s.

    Args:
        paths: the directories (or files) to watch; they may not exist yet (then polled).
        resync: the longest time between two wake-ups.
        watch_filter: which events wake the reader (default: all of them).
        recursive: watch subdirectories too.
        debounce_ms: how long watchfiles gathers events into one batch.
        step_ms: how often watchfiles' thread looks for events (it takes the GIL each
            time; :data:`STEP_MS`).
        tick: the longest wait of the event source without events (default
            :data:`TICK_SECONDS`); each one is a thread hop, so a watch whose ``resync``
            is long may tick less often, at the price of a later first wake-up.
        watch: the event source (default: :func:`watchfiles_factory` with the three
            settings above); tests force polling by passing one that raises ``OSError``.
        retry_watch: seconds between attempts to go back from polling to watching.
        component: the ``component`` of its log events (the user's name).
    """

    def __init__(
        self,
        paths: Path | Sequence[Path],
        *,
        resync: float = RESYNC_SECONDS,
        watch_filter: WatchFilter | None = None,
        recursive: bool = True,
        debounce_ms: int = 20,
        step_ms: int = STEP_MS,
        tick: float = TICK_SECONDS,
        watch: WatchFactory | None = None,
        retry_watch: float = 30.0,
        component: str = "dirwatch",
    ) -> None:
        self.paths: tuple[Path, ...] = (paths,) if isinstance(paths, Path) else tuple(paths)
        self.path = self.paths[0] if self.paths else Path(".")
        self.resync = resync
        self.mode = "starting"
        """``starting``, ``inotify`` or ``polling``."""
        self.fallbacks = 0
        """How many times the watch fell back to polling."""
        self.tick = tick
        self._watch = watch or watchfiles_factory(
            watch_filter=watch_filter, recursive=recursive, debounce_ms=debounce_ms, step_ms=step_ms
        )
        self._retry_watch = retry_watch
        self._log = logs.get(component)

    async def wakeups(self) -> AsyncGenerator[Changes, None]:
        """The wake-ups, each with the batch of changes behind it (often empty).

        The caller re-reads the state on disk at each one. Events between the first read
        and the moment the watch is in place would be lost, so the first tick of a new
        watch is a wake-up too: the watcher ticks every ``tick`` seconds (at most)
        and only every ``resync`` seconds is a tick passed on, besides event batches and
        that first tick.
        """
        yield NO_CHANGES
        loop = asyncio.get_running_loop()
        tick = min(self.resync, self.tick)
        while True:
            try:
                if not self.paths:
                    raise OSError("nothing to watch")
                async with aclosing(self._watch(self.paths, tick)) as events:
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
                            yield frozenset(changes or ())
                # The iterator ended (the directory went away): poll until it is back.
                raise OSError(f"watch of {self.path} ended")
            except (OSError, RuntimeError) as exc:
                if self.mode != "polling":
                    self.fallbacks += 1
                    self.mode = "polling"
                    self._log.warning(
                        "watch_fallback_polling",
                        path=str(self.path),
                        paths=[str(p) for p in self.paths],
                        error=str(exc),
                    )
            until = loop.time() + self._retry_watch
            while loop.time() < until:
                await asyncio.sleep(self.resync)
                yield NO_CHANGES
