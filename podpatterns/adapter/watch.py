"""Discovery's wake-ups: file events wake the reader, an added file asks for a re-glob.

This is the adapter's own loop over ``watchfiles.awatch`` rather than
:class:`podpatterns.dirwatch.DirWatcher`, kept apart from the pipeline: moving to
``DirWatcher`` would change what the adapter does and logs (its ``watch_fallback_polling``
carries ``path``/``paths`` where the adapter's carries ``roots``, it logs ``watch_mode``,
it goes back from polling to watching after a while where the adapter polls until it
exits, and it cannot be stopped by an event), and this refactoring changes no behaviour.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from typing import Any

import watchfiles

from podpatterns import logs
from podpatterns.adapter.tail import watch_roots

WatcherFactory = Callable[..., Any]
"""``watchfiles.awatch`` or a stand-in with its signature (tests inject failures)."""


class FileEvents:
    """Turns file events under the globs' directories into wake-ups for the reader.

    Args:
        patterns: the globs (their deepest fixed directories are watched, recursively).
        own_paths: files and directories the adapter writes itself (checkpoint, file sink,
            dead letters): their events are ignored.
        poll: start in polling mode (``--watch poll``): no watcher runs.
        watcher: the ``watchfiles.awatch``-compatible factory.
    """

    def __init__(
        self,
        patterns: tuple[str, ...],
        own_paths: Sequence[str | os.PathLike[str]],
        *,
        poll: bool,
        watcher: WatcherFactory = watchfiles.awatch,
    ) -> None:
        self.patterns = patterns
        self.own_paths = [os.path.abspath(p) for p in own_paths]
        self.mode = "poll" if poll else "watch"
        """``watch`` while events wake the reader, ``poll`` otherwise."""
        self.wake = asyncio.Event()
        """Set by an event batch (and on falling back to polling); the reader clears it."""
        self.discover_requested = False
        """A file was added: the reader should glob again now; the reader resets it."""
        self._stop = asyncio.Event()
        self._watcher_factory = watcher
        self._log = logs.get("adapter")

    def stop(self) -> None:
        """End the watch (at the next event or within a second) and wake the reader."""
        self.wake.set()
        self._stop.set()

    async def run(self) -> None:
        """Watch until :meth:`stop`; if the watcher cannot run, fall back to polling."""
        roots = watch_roots(self.patterns)
        if not roots:
            self.mode = "poll"
            self._log.warning("watch_fallback_polling", error="no directory to watch", roots=[])
            return
        own = self.own_paths

        def wanted(change: watchfiles.Change, path: str) -> bool:
            return not any(path == o or path.startswith(o + os.sep) for o in own)

        try:
            async for changes in self._watcher_factory(
                *roots,
                watch_filter=wanted,
                debounce=50,
                step=20,
                stop_event=self._stop,
                rust_timeout=1000,
                recursive=True,
            ):
                if any(c[0] == watchfiles.Change.added for c in changes):
                    self.discover_requested = True
                self.wake.set()
        except (OSError, RuntimeError) as exc:
            self.mode = "poll"
            self._log.warning(
                "watch_fallback_polling", error=str(exc), roots=[str(r) for r in roots]
            )
            self.wake.set()
