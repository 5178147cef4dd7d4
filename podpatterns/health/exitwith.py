"""``--exit-with NAME``: a runtime trigger that fires on NAME's tombstone.

Level-triggered: the record is re-read at start, after every file-event batch in the
directory and on a periodic resync (events can be lost; see
:mod:`podpatterns.health.watch`), each time on a worker thread. Only a whole, valid record
with phase ``exited`` counts: a missing, partial or foreign file means "not yet". A
tombstone written before this process started counts within
:data:`~podpatterns.health.records.TOMBSTONE_GRACE`; an older one is from an earlier run
of that container (this process was restarted while it waits for its own restart), and
the trigger waits for the next instance's tombstone.

Before the runtime drains, the trigger may POST the loopback quit URLs of other
sidecars (``--exit-with-quit``), e.g. cloud-sql-proxy's or Envoy's ``/quitquitquit``,
so that the whole Pod finishes together. A failed POST is logged and counted; it never
keeps this process from exiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from podpatterns import logs, metrics
from podpatterns.dirwatch import RESYNC_SECONDS, WatchFactory
from podpatterns.health.reader import State, Status, Tracker
from podpatterns.health.records import exit_summary
from podpatterns.health.watch import record_watcher, wait_status
from podpatterns.options import parse_loopback_url
from podpatterns.runtime import Shutdown

QUIT_TIMEOUT = 2.0
"""Longest time one quit POST may take."""


parse_quit_url = parse_loopback_url
"""The ``--exit-with-quit`` URL rule (declared with the runtime options)."""


class ExitWith:
    """A runtime trigger: ``await exit_with()`` returns ``Shutdown("exit-with:NAME",
    exit_code)`` on the tombstone.

    Args:
        health_dir: the shared directory.
        name: the container whose tombstone ends this process.
        quit_urls: loopback URLs to POST before returning.
        exit_code: the process exit code after this shutdown (``--exit-with-code``).
        resync: seconds between re-reads when no event arrives.
        watch: the watcher's event source (tests force polling with it).
    """

    def __init__(
        self,
        health_dir: Path,
        name: str,
        *,
        quit_urls: Sequence[str] = (),
        exit_code: int = 0,
        resync: float = RESYNC_SECONDS,
        watch: WatchFactory | None = None,
    ) -> None:
        self.name = name
        self.quit_urls = tuple(quit_urls)
        self.exit_code = exit_code
        self.watcher = record_watcher(health_dir, resync=resync, watch=watch, component="runtime")
        self.tracker = Tracker(health_dir, component="runtime")
        self.tombstone: Status | None = None
        self.quit_results: dict[str, int] = {"ok": 0, "failed": 0}
        self._log = logs.get("runtime")

    def collector(self) -> metrics.CallbackCollector:
        """Metrics: how the directory is watched, and the quit POSTs."""
        return metrics.CallbackCollector(
            [
                metrics.Family(
                    "gauge",
                    "exit_with_watch_mode",
                    "1 for how --exit-with watches the health directory (inotify or polling)",
                    ("mode",),
                    lambda: [((m,), float(self.watcher.mode == m)) for m in ("inotify", "polling")],
                ),
                metrics.Family(
                    "counter",
                    "exit_with_watch_fallbacks",
                    "times the --exit-with watcher fell back to polling",
                    (),
                    lambda: [((), float(self.watcher.fallbacks))],
                ),
                metrics.Family(
                    "counter",
                    "exit_with_quit_posts",
                    "quit POSTs sent to other sidecars, by result",
                    ("result",),
                    lambda: [((k,), float(v)) for k, v in self.quit_results.items()],
                ),
            ]
        )

    def collectors(self) -> list[metrics.CallbackCollector]:
        """The trigger's collectors, as a component lists its own."""
        return [self.collector()]

    async def __call__(self) -> Shutdown:
        """Wait for the tombstone, POST the quit URLs, return the shutdown reason."""
        path = self.tracker.health_dir / f"{self.name}.json"
        self._log.info("exit_with_watching", record=str(path))
        started = time.monotonic()

        def on_change(status: Status) -> None:
            if status.state is not State.EXITED:
                self._log.debug("exit_with_peer", peer=self.name, state=status.describe())

        status = await wait_status(
            self.tracker, self.name, lambda s: s.exited, watcher=self.watcher, on_change=on_change
        )
        self.tombstone = status
        assert status.record is not None
        self._log.info(
            "exit_with_tombstone",
            peer=self.name,
            exit=exit_summary(status.record),
            after=round(time.monotonic() - started, 3),
            watch_mode=self.watcher.mode,
        )
        if self.quit_urls:
            await self._quit_others()
        return Shutdown(f"exit-with:{self.name}", self.exit_code)

    async def _quit_others(self) -> None:
        timeout = aiohttp.ClientTimeout(total=QUIT_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def post(url: str) -> None:
                try:
                    async with session.post(url) as resp:
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.quit_results["failed"] += 1
                    self._log.warning("exit_with_quit_failed", url=url, error=repr(exc))
                    return
                ok = status < 400
                self.quit_results["ok" if ok else "failed"] += 1
                self._log.info("exit_with_quit_sent", url=url, status=status)

            await asyncio.gather(*(post(u) for u in self.quit_urls))
