"""The readers' side of health records: what a reader concludes, on its own clock.

Anything a reader meets that is not a whole, valid record (a file from another tool, a
disk error, a record of a newer schema) is *unknown*, which means "retry", never "dead".
Some states are derived by readers, never trusted from the writer alone (the reader
rules of docs/health.md):

- **missing** file: the container has not started (yet).
- **stale**: the writer promised heartbeats every ``interval`` seconds and the reader has
  seen no new ``(instance, seq)`` for ``STALE_AFTER`` intervals *on the reader's own
  monotonic clock* (writers' wall clocks may differ; monotonic clocks never jump).
- **unconfirmed**: the record says ``ready`` and promises heartbeats, but this reader has
  not yet seen one (a new seq or instance): the last ``ready`` of a dead container looks
  exactly like a live one until then.
- **exited**: the tombstone, a record whose phase is ``exited``; final for that instance.
  It counts when this reader saw the instance alive, or when it was written at most
  :data:`~podpatterns.health.records.TOMBSTONE_GRACE` before this reader started; an
  older one is from an **earlier run** of the container and is ignored.

Reading never blocks: the file is opened with ``O_NONBLOCK`` and anything but a regular
file is *unknown* (a FIFO would otherwise block ``open()`` forever). Async readers read on
a worker thread (:meth:`Tracker.astatus`), so a slow volume never freezes an event loop.
"""

from __future__ import annotations

import asyncio
import enum
import os
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from podpatterns import logs
from podpatterns.health.records import (
    MAX_RECORD_BYTES,
    STALE_AFTER,
    SUFFIX,
    TOMBSTONE_GRACE,
    Phase,
    Record,
    RecordError,
    check_name,
    exit_summary,
    is_record_file,
    record_path,
)


class State(enum.StrEnum):
    """What a reader concludes about one container."""

    MISSING = "missing"  # no record: not started
    UNKNOWN = "unknown"  # unreadable, partial or invalid: retry, never "dead"
    STALE = "stale"  # no new heartbeat for STALE_AFTER intervals on the reader's clock
    UNCONFIRMED = "unconfirmed"  # ready on disk, but no heartbeat seen by this reader yet
    EARLIER_RUN = "earlier_run"  # a tombstone of an earlier run: waiting for the next
    STARTING = "starting"
    READY = "ready"
    NOT_READY = "not_ready"
    DRAINING = "draining"
    EXITED = "exited"


@dataclass(frozen=True)
class ReadResult:
    """One read of a record file: a record, or why there is none.

    Attributes:
        record: the valid record read, or ``None``.
        missing: there is no file.
        error: why there is no record.
        unreadable: the file could not be read at all (a permission, an I/O error, not a
            regular file), as opposed to read and found invalid.
    """

    record: Record | None
    missing: bool = False
    error: str | None = None
    unreadable: bool = False


_KINDS = (
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _file_kind(mode: int) -> str:
    return next((what for test, what in _KINDS if test(mode)), "not a file")


def _open_error(path: Path, exc: OSError) -> str:
    """Why ``open()`` failed: what the file is when it is no regular file (a socket
    cannot be opened at all), else the error."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = stat.S_IFREG
    if not stat.S_ISREG(mode):
        return f"not a regular file ({_file_kind(mode)})"
    return f"cannot read: {exc.strerror or exc}"


def read_record(health_dir: Path, name: str, *, now: float | None = None) -> ReadResult:
    """Read ``DIR/NAME.json`` once; never raises for a bad or missing file, never blocks.

    The file is opened with ``O_NONBLOCK`` (opening a FIFO for reading would otherwise
    wait for a writer, forever) and read only if it is a regular file.
    """
    path = record_path(health_dir, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return ReadResult(None, missing=True)
    except OSError as exc:
        return ReadResult(None, error=_open_error(path, exc), unreadable=True)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _file_kind(mode)
            return ReadResult(None, error=f"not a regular file ({kind})", unreadable=True)
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_RECORD_BYTES:
            chunk = os.read(fd, MAX_RECORD_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        return ReadResult(None, error=f"cannot read: {exc.strerror or exc}", unreadable=True)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_RECORD_BYTES:
        return ReadResult(None, error=f"larger than {MAX_RECORD_BYTES} bytes")
    try:
        record = Record.from_json(data, now=now)
    except RecordError as exc:
        return ReadResult(None, error=str(exc))
    if record.name != name:
        return ReadResult(None, error=f"name: {record.name!r} in {path.name}")
    return ReadResult(record)


@dataclass(frozen=True)
class Status:
    """A reader's view of one container.

    Attributes:
        name: the container.
        state: the conclusion (see :class:`State`).
        record: the last valid record read, if any (also when the latest read failed).
        error: why the latest read gave no record, for ``unknown``.
        quiet: seconds, on the reader's monotonic clock, since a new heartbeat
            (a new instance or seq) was last seen.
    """

    name: str
    state: State
    record: Record | None = None
    error: str | None = None
    quiet: float = 0.0

    @property
    def ready(self) -> bool:
        """True when the container is ready and its heartbeat is fresh."""
        return self.state is State.READY

    @property
    def exited(self) -> bool:
        """True when the container's tombstone is on disk."""
        return self.state is State.EXITED

    def describe(self) -> str:
        """One short phrase for logs: why this container is not (yet) ready."""
        if self.state is State.MISSING:
            return "no record yet (not started)"
        if self.state is State.UNKNOWN:
            return f"record unreadable ({self.error}); retrying"
        if self.state is State.STALE:
            return f"no heartbeat for {self.quiet:.1f}s"
        if self.state is State.UNCONFIRMED and self.record is not None:
            return (
                "ready on disk, no heartbeat seen yet (the next is due within "
                f"{self.record.interval:g}s)"
            )
        if self.state is State.EARLIER_RUN and self.record is not None:
            return (
                f"tombstone of an earlier run (exited {exit_summary(self.record)}); "
                "waiting for the next instance"
            )
        if self.state is State.EXITED and self.record is not None:
            return "exited " + exit_summary(self.record)
        reason = self.record.reason if self.record is not None else None
        return self.state.value + (f" ({reason})" if reason else "")

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (for the aggregate endpoint and logs)."""
        rec = self.record
        return {
            "state": self.state.value,
            "phase": rec.phase.value if rec else None,
            "instance": rec.instance if rec else None,
            "seq": rec.seq if rec else None,
            "quiet": round(self.quiet, 3),
            "checks": [{"name": c.name, "ok": c.ok, "message": c.message} for c in rec.checks]
            if rec
            else [],
            "error": self.error,
        }


@dataclass
class _Seen:
    instance: str
    seq: int
    at: float  # reader's monotonic clock
    confirmed: bool  # this reader saw the heartbeat advance (or the record appear)
    alive: bool  # this reader saw this instance in a phase other than exited


@dataclass
class Tracker:
    """Reader-side state of several containers: turns reads into :class:`Status`.

    The reader rules (docs/health.md, "How records are read"):

    - staleness is measured on the reader's monotonic clock from the moment it last saw
      a new ``(instance, seq)``, whatever ``updated_at`` says;
    - a ``ready`` record that promises heartbeats is trusted once this reader has seen
      its heartbeat advance (a new seq of the same instance, a new instance, or the
      record appearing after a read that found no file); until then it is
      :attr:`State.UNCONFIRMED`. A record without an interval is taken as written;
    - a tombstone counts when this reader saw its instance alive, or when it was written
      at most ``tombstone_grace`` seconds before this reader was created; an older one is
      :attr:`State.EARLIER_RUN` (logged once as ``stale_tombstone_ignored``);
    - a file that cannot be read (a permission, not a regular file) is unknown, logged
      once per file and error as ``record_unreadable``.

    Sync readers call :meth:`status` (the read runs on the calling thread); async
    readers call :meth:`astatus` and :meth:`astatuses`, which read on a worker thread
    and take turns, so the state stays consistent and the event loop never blocks.
    Not thread-safe otherwise: one Tracker per reader.

    Args:
        health_dir: the shared directory.
        monotonic: the reader's clock (tests).
        wall: the wall clock used to reject future timestamps and date tombstones (tests).
        tombstone_grace: see :data:`TOMBSTONE_GRACE`.
        component: the ``component`` of its log events.
    """

    health_dir: Path
    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    tombstone_grace: float = TOMBSTONE_GRACE
    component: str = "health"
    since: float = field(init=False)
    """Wall-clock time this reader started (tombstones are dated against it)."""
    _seen: dict[str, _Seen] = field(default_factory=dict, init=False, repr=False)
    _last: dict[str, Record] = field(default_factory=dict, init=False, repr=False)
    _absent: set[str] = field(default_factory=set, init=False, repr=False)
    _reported: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _ignored: set[tuple[str, str]] = field(default_factory=set, init=False, repr=False)
    _turn: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.since = self.wall()
        self._log = logs.get(self.component)

    def status(self, name: str) -> Status:
        """Read ``name``'s record now (on this thread) and return the conclusion."""
        return self.judge(name, read_record(self.health_dir, name, now=self.wall()))

    async def astatus(self, name: str) -> Status:
        """:meth:`status`, with the file read on a worker thread."""
        async with self._turn:
            now = self.wall()
            result = await asyncio.to_thread(read_record, self.health_dir, name, now=now)
            # Judged here, on the loop, only if the read was not cancelled: a read
            # abandoned by a timeout never changes the state.
            return self.judge(name, result)

    def judge(self, name: str, result: ReadResult) -> Status:
        """Turn one read of ``name``'s record into a :class:`Status` (see the rules)."""
        now = self.monotonic()
        if result.missing:
            self._seen.pop(name, None)
            self._last.pop(name, None)
            self._reported.pop(name, None)
            self._absent.add(name)
            return Status(name, State.MISSING)
        seen = self._seen.get(name)
        if result.record is None:
            self._report(name, result)
            return Status(
                name,
                State.UNKNOWN,
                self._last.get(name),
                result.error,
                now - seen.at if seen else 0.0,
            )
        self._reported.pop(name, None)
        rec = result.record
        if seen is None:
            # First sight: trusted as fresh only if this reader saw the file appear.
            seen = _Seen(rec.instance, rec.seq, now, name in self._absent, False)
        elif seen.instance != rec.instance:
            seen = _Seen(rec.instance, rec.seq, now, True, False)
        elif rec.seq > seen.seq:
            seen = _Seen(rec.instance, rec.seq, now, True, seen.alive)
        if not rec.exited:
            seen.alive = True
        self._seen[name] = seen
        self._absent.discard(name)
        self._last[name] = rec
        quiet = now - seen.at
        if rec.exited:
            if seen.alive or rec.updated_at >= self.since - self.tombstone_grace:
                return Status(name, State.EXITED, rec, quiet=quiet)
            self._ignore_tombstone(name, rec)
            return Status(name, State.EARLIER_RUN, rec, quiet=quiet)
        if rec.interval is not None and quiet > STALE_AFTER * rec.interval:
            return Status(name, State.STALE, rec, quiet=quiet)
        if rec.phase is Phase.READY and rec.interval is not None and not seen.confirmed:
            return Status(name, State.UNCONFIRMED, rec, quiet=quiet)
        return Status(name, State(rec.phase.value), rec, quiet=quiet)

    def _report(self, name: str, result: ReadResult) -> None:
        """A file that cannot be read is said loudly, once per file and error."""
        if not result.unreadable or self._reported.get(name) == result.error:
            return
        self._reported[name] = result.error or ""
        self._log.warning(
            "record_unreadable",
            container=name,
            path=str(record_path(self.health_dir, name)),
            error=result.error,
        )

    def _ignore_tombstone(self, name: str, rec: Record) -> None:
        if (name, rec.instance) in self._ignored:
            return
        self._ignored.add((name, rec.instance))
        self._log.warning(
            "stale_tombstone_ignored",
            container=name,
            instance=rec.instance,
            exit=exit_summary(rec),
            age=round(self.wall() - rec.updated_at, 1),
            grace=self.tombstone_grace,
        )

    def names(self) -> list[str]:
        """The containers with a record file in the directory now (sorted)."""
        try:
            entries = os.listdir(self.health_dir)
        except OSError:
            return []
        out = []
        for entry in entries:
            if is_record_file(entry):
                stem = entry[: -len(SUFFIX)]
                try:
                    out.append(check_name(stem))
                except ValueError:
                    continue  # NAME.json that is no container's: not a record
        return sorted(out)

    def _read_all(self, names: Iterable[str] | None, now: float) -> dict[str, ReadResult]:
        listed = self.names() if names is None else names
        return {n: read_record(self.health_dir, n, now=now) for n in listed}

    def statuses(self, names: Iterable[str] | None = None) -> dict[str, Status]:
        """Read every record (or those of ``names``) now, on this thread."""
        reads = self._read_all(names, self.wall())
        return {n: self.judge(n, r) for n, r in reads.items()}

    async def astatuses(self, names: Iterable[str] | None = None) -> dict[str, Status]:
        """:meth:`statuses`, with the directory listed and read on a worker thread."""
        async with self._turn:
            reads = await asyncio.to_thread(self._read_all, names, self.wall())
            return {n: self.judge(n, r) for n, r in reads.items()}
