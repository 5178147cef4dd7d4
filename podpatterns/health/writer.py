"""The owner's side of a health record: every change is one atomic write."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from podpatterns.health.records import (
    Check,
    Phase,
    Record,
    check_name,
    new_instance_id,
    write_atomic,
)
from podpatterns.tasks import TaskSet


class Writer:
    """The owner's side of one record: every change is one atomic write.

    Thread-safe: the app may call it from any thread and from :meth:`heartbeating`'s
    task at once. Once :meth:`mark_exited` has written the tombstone, further writes
    raise ``RuntimeError``: the tombstone is final for this instance.

    Example::

        writer = Writer(Path("/health"), "app", interval=5.0)
        writer.set_starting()
        ...
        writer.set_ready()
        async with writer.heartbeating():
            await serve_forever()
        writer.mark_exited(0, reason="done")

    Args:
        health_dir: the shared directory (must exist).
        name: this container's name.
        interval: seconds between heartbeats this writer promises; readers judge the
            record stale after :data:`STALE_AFTER` intervals without one. ``None``: no
            promise, never stale.
        pid: the pid to record (default: this process).
        clock: the wall clock (tests).
    """

    def __init__(
        self,
        health_dir: Path,
        name: str,
        *,
        interval: float | None = None,
        pid: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        check_name(name)
        if interval is not None and interval <= 0:
            raise ValueError(f"interval: {interval!r} must be > 0")
        self.health_dir = health_dir
        self._clock = clock
        self._lock = threading.Lock()
        now = clock()
        self._record = Record(
            name=name,
            instance=new_instance_id(),
            pid=os.getpid() if pid is None else pid,
            phase=Phase.STARTING,
            seq=-1,  # the first write makes it 0
            interval=interval,
            started_at=now,
            updated_at=now,
        )
        self._checks: dict[str, Check] = {}

    @property
    def record(self) -> Record:
        """The last record written (seq -1 before the first write)."""
        return self._record

    @property
    def name(self) -> str:
        """This container's name."""
        return self._record.name

    def _write(self, **changes: Any) -> Record:
        with self._lock:
            if self._record.exited and self._record.seq >= 0:
                raise RuntimeError(f"{self.name}: tombstone already written")
            record = replace(
                self._record,
                seq=self._record.seq + 1,
                updated_at=self._clock(),
                checks=tuple(self._checks.values()),
                **changes,
            )
            write_atomic(self.health_dir, record)
            self._record = record
            return record

    def set_check(self, check: Check) -> None:
        """Remember a check result; it is written with the next write."""
        with self._lock:
            self._checks[check.name] = check

    def set_starting(self) -> Record:
        """Write phase ``starting`` (the first write of a new instance)."""
        return self._write(phase=Phase.STARTING, reason=None)

    def set_ready(self) -> Record:
        """Write phase ``ready``."""
        return self._write(phase=Phase.READY, reason=None)

    def set_not_ready(self, reason: str = "") -> Record:
        """Write phase ``not_ready`` with a reason."""
        return self._write(phase=Phase.NOT_READY, reason=reason or None)

    def set_draining(self, reason: str = "") -> Record:
        """Write phase ``draining`` (shutting down, not yet exited)."""
        return self._write(phase=Phase.DRAINING, reason=reason or None)

    def heartbeat(self) -> Record:
        """Rewrite the current phase with the next sequence number (a sync call)."""
        return self._write()

    def mark_exited(
        self, exit_code: int | None = None, *, signal: int | None = None, reason: str = ""
    ) -> Record:
        """Write the tombstone: exactly one of ``exit_code`` and ``signal``.

        Raises:
            ValueError: both or neither of ``exit_code`` and ``signal`` were given.
        """
        if (exit_code is None) == (signal is None):
            raise ValueError("mark_exited() needs exactly one of exit_code and signal")
        return self._write(
            phase=Phase.EXITED, exit_code=exit_code, signal=signal, reason=reason or None
        )

    def heartbeating(self, interval: float | None = None) -> Heartbeat:
        """An async context manager that heartbeats from the running loop.

        The heartbeat runs as a task on the app's own event loop, so a loop blocked by
        the app stops the heartbeats and readers see the record go stale.

        Args:
            interval: seconds between heartbeats (default: the writer's ``interval``).
        """
        every = interval or self._record.interval
        if every is None:
            raise ValueError("heartbeating() needs an interval (here or on the Writer)")
        return Heartbeat(self, every)


class Heartbeat:
    """``async with writer.heartbeating():`` — see :meth:`Writer.heartbeating`.

    The heartbeat task belongs to a :class:`~podpatterns.tasks.TaskSet`: if a write
    fails (the directory went away, the disk is full), the error is logged as
    ``task_died`` and :attr:`healthy` turns False, while readers see the record go stale.
    """

    def __init__(self, writer: Writer, interval: float) -> None:
        self._writer = writer
        self._interval = interval
        self._tasks = TaskSet("health")

    @property
    def healthy(self) -> bool:
        """The heartbeat task has not died."""
        return self._tasks.healthy

    async def __aenter__(self) -> Writer:
        self._writer.heartbeat()
        self._tasks.spawn(self._beat(), "heartbeat")
        return self._writer

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            # The write is small but fsyncs: keep it off the loop. The task itself is
            # scheduled by the loop, so a blocked loop still stops the heartbeats.
            write = asyncio.ensure_future(asyncio.to_thread(self._writer.heartbeat))
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                # A thread cannot be cancelled: let the write in flight finish before
                # the block ends, so no heartbeat lands after it (a tombstone written
                # right after the block must be the last write).
                await asyncio.wait([write])
                raise

    async def __aexit__(self, *exc: object) -> None:
        await self._tasks.aclose()
