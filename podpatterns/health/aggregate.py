"""The Pod's health in memory, for kubelet probes: ``/livez``, ``/readyz``, ``/startupz``.

:class:`Aggregate` keeps every record of the health directory in memory, re-read after
every file-event batch and on a short resync (staleness needs time to pass, not an
event), so a probe is answered from memory, far inside the kubelet's 1 s timeout.

- ``readyz``: one container (``/readyz/NAME``) is ready when its record is ``ready``
  with a fresh heartbeat this reader has seen advance (a record found ready at start
  waits for its next heartbeat); the Pod when every container is (503 with no record).
  Containers named in ``expected`` (``podpatterns health --expect NAME``) count as not
  ready and not started until their first record appears: without them, a Pod whose
  slow container has not written anything yet would look ready.
- ``startupz``: a container has started once it has been ready in its current instance;
  the Pod once every container has.
- ``livez``: a container is live when it has a record that is neither stale nor exited;
  the Pod when no container is stale.

The Pod's ``livez`` ignores exited containers: a Job's finished main container must not
get its sidecar restarted by the kubelet.

The loop that follows the directory belongs to a :class:`~podpatterns.tasks.TaskSet`. If
it dies (a bug, logged as ``task_died``), the view is frozen: every verdict is then False
(``livez`` too, so the kubelet restarts the container that serves them) rather than an
answer from a past that no longer moves; :meth:`Aggregate.is_live` tells why.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import aclosing
from pathlib import Path
from typing import Any

from podpatterns import logs
from podpatterns.dirwatch import WatchFactory
from podpatterns.health.reader import State, Status, Tracker
from podpatterns.health.watch import record_watcher
from podpatterns.tasks import TaskSet

CHECKS = ("livez", "readyz", "startupz")
RESYNC_SECONDS = 0.5


class Aggregate:
    """An in-memory view of every record in a directory, with probe verdicts.

    Args:
        health_dir: the shared directory.
        resync: longest time between two re-reads.
        watch: the watcher's event source (tests).
        expected: containers the Pod's ``readyz`` and ``startupz`` wait for even before
            they have written a record.
    """

    def __init__(
        self,
        health_dir: Path,
        *,
        resync: float = RESYNC_SECONDS,
        watch: WatchFactory | None = None,
        expected: Iterable[str] = (),
    ) -> None:
        self.tracker = Tracker(health_dir)
        self.expected = frozenset(expected)
        self.watcher = record_watcher(health_dir, resync=resync, watch=watch)
        self.statuses: dict[str, Status] = {}
        self.refreshed_at = 0.0
        self._started: dict[str, str] = {}  # name -> instance seen ready
        self._tasks = TaskSet("health")
        self._log = logs.get("health")

    def refresh(self, statuses: dict[str, Status] | None = None) -> None:
        """Take in every record's status: ``statuses`` read elsewhere (the follow loop
        reads them on a worker thread), or, without it, read now on this thread."""
        if statuses is None:
            statuses = self.tracker.statuses()
        for name, status in statuses.items():
            before = self.statuses.get(name)
            if before is None or before.state is not status.state:
                self._log.info(
                    "container_state", container=name, state=status.state.value,
                    reason=status.describe(),
                )  # fmt: skip
            if status.ready and status.record is not None:
                self._started[name] = status.record.instance
        for gone in set(self.statuses) - set(statuses):
            self._log.info("container_state", container=gone, state="missing", reason="removed")
            self._started.pop(gone, None)
        self.statuses = statuses
        self.refreshed_at = time.monotonic()

    async def start(self) -> None:
        """Read once, then keep the view fresh in a task (stopped by :meth:`close`)."""
        self.refresh(await self.tracker.astatuses())
        self._tasks.spawn(self._follow(), "health_follow")

    async def _follow(self) -> None:
        async with aclosing(self.watcher.wakeups()) as wakeups:
            async for _ in wakeups:
                # The directory is read on a worker thread: a FIFO or a hung volume
                # must not freeze the admin server that answers from this view.
                self.refresh(await self.tracker.astatuses())

    async def close(self) -> None:
        """Stop following the directory."""
        await self._tasks.aclose()

    @property
    def healthy(self) -> bool:
        """The loop following the directory has not died."""
        return self._tasks.healthy

    def is_live(self) -> bool:
        """True while the view keeps following the directory (see :attr:`healthy`)."""
        return self._tasks.healthy

    def started(self, status: Status) -> bool:
        """True when the container has been ready in its current instance."""
        rec = status.record
        return rec is not None and self._started.get(status.name) == rec.instance

    def container_ok(self, check: str, name: str) -> bool:
        """The verdict of ``check`` for one container (False when it has no record, or
        when the view stopped following the directory)."""
        status = self.statuses.get(name)
        if status is None or not self._tasks.healthy:
            return False
        if check == "readyz":
            return status.ready
        if check == "startupz":
            return self.started(status)
        return status.state not in (State.STALE, State.EXITED, State.MISSING, State.EARLIER_RUN)

    def pod_ok(self, check: str) -> bool:
        """The verdict of ``check`` for the whole Pod (False for every check once the view
        stopped following the directory)."""
        if not self._tasks.healthy:
            return False
        if check == "livez":  # a container that has not started yet is not dead
            return all(s.state is not State.STALE for s in self.statuses.values())
        names = self.expected | self.statuses.keys()
        if not names:
            return False
        return all(self.container_ok(check, name) for name in names)

    def body(self, check: str, ok: bool, name: str | None = None) -> dict[str, Any]:
        """The JSON body of a probe answer: the verdict and every container's state."""
        if name is None:
            missing = dict.fromkeys(self.expected - self.statuses.keys())
            shown: dict[str, Status | None] = {**self.statuses, **missing}
        else:
            shown = {name: self.statuses.get(name)}
        containers: dict[str, Any] = {}
        for cname, status in shown.items():
            if status is None:
                containers[cname] = {"state": State.MISSING.value}
                continue
            entry = status.as_dict()
            entry["age"] = entry.pop("quiet")
            entry["started"] = self.started(status)
            containers[cname] = entry
        return {
            "status": "ok" if ok else "unavailable",
            "check": check if name is None else f"{check}/{name}",
            "containers": containers,
            "refreshed": round(time.monotonic() - self.refreshed_at, 3),
        }
