"""Health records: one JSON file per container in a shared directory (docs/health.md).

A record is written only by its owner, atomically: a temporary file in the same directory
(a name readers ignore), ``fsync``, ``os.replace``, then an ``fsync`` of the directory.
Readers therefore see a whole old record or a whole new one; anything else they meet
(a file from another tool, a disk error, a record of a newer schema) is reported as
*unknown*, which means "retry", never "dead".

Some states are derived by readers, never trusted from the writer alone (the reader
rules of docs/health.md):

- **missing** file: the container has not started (yet).
- **stale**: the writer promised heartbeats every ``interval`` seconds and the reader has
  seen no new ``(instance, seq)`` for ``STALE_AFTER`` intervals *on the reader's own
  monotonic clock* (writers' wall clocks may differ; monotonic clocks never jump).
- **unconfirmed**: the record says ``ready`` and promises heartbeats, but this reader has
  not yet seen one (a new seq or instance): the last ``ready`` of a dead container looks
  exactly like a live one until then (issue 10).
- **exited**: the tombstone, a record whose phase is ``exited``; final for that instance.
  It counts when this reader saw the instance alive, or when it was written at most
  :data:`TOMBSTONE_GRACE` before this reader started; an older one is from an
  **earlier run** of the container and is ignored.

Reading never blocks: the file is opened with ``O_NONBLOCK`` and anything but a regular
file is *unknown* (a FIFO would otherwise block ``open()`` forever). Async readers read on
a worker thread (:meth:`Tracker.astatus`), so a slow volume never freezes an event loop.
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from podpatterns import logs
from podpatterns.atomicfile import replace_atomically
from podpatterns.options import parse_container_name
from podpatterns.tasks import TaskSet

SCHEMA_VERSION = 1
"""The version writers write. Readers accept any record whose major version they know."""

SUFFIX = ".json"
TEMP_PREFIX = "."
"""Temporary files start with a dot; readers and watchers ignore them."""

MAX_RECORD_BYTES = 64 * 1024
"""A larger file is not a record (it is read as unknown, and never read whole)."""

CLOCK_SKEW = 5.0
"""Seconds a record's wall-clock timestamp may be ahead of the reader's before it is
rejected as from the future. Containers of a Pod share the node's clock, so a larger
gap means a corrupt or forged record."""

STALE_AFTER = 3.0
"""A record is stale after this many heartbeat intervals without a new heartbeat."""

TOMBSTONE_GRACE = 30.0
"""Seconds before a reader started within which a tombstone it never saw alive still
counts. The kubelet starts the containers of a Pod one after another, seconds apart (an
image pull each at most); a tombstone older than that when a reader starts is from an
earlier run of the container (the reader was restarted while that container waits for
its own restart), and the reader waits for the next instance's tombstone instead."""

RECORD_MODE = 0o644
"""Records are readable by every container of the Pod, whatever the writer's umask: the
containers may run as different uids."""


class Phase(enum.StrEnum):
    """Where a container is in its life, as its record says."""

    STARTING = "starting"
    READY = "ready"
    NOT_READY = "not_ready"
    DRAINING = "draining"
    EXITED = "exited"


class RecordError(ValueError):
    """A file is not a valid health record (the message says why)."""


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid container name (a DNS label), else raise.

    Raises:
        ValueError: the name is not 1-63 lowercase letters, digits and dashes.
    """
    if name != name.strip():
        raise ValueError("is not a container name (no spaces)")
    return parse_container_name(name)


def record_path(health_dir: Path, name: str) -> Path:
    """The record file of container ``name`` in ``health_dir``."""
    return health_dir / f"{check_name(name)}{SUFFIX}"


def is_record_file(path: str | Path) -> bool:
    """True for a record file name (``NAME.json``), False for temporary and other files."""
    base = os.path.basename(path)
    return base.endswith(SUFFIX) and not base.startswith(TEMP_PREFIX)


@dataclass(frozen=True)
class Check:
    """The result of one check (a probe) as reported in a record.

    Attributes:
        name: what was checked, e.g. ``http://127.0.0.1:8080/healthz`` or ``main``.
        ok: whether the last attempt passed.
        message: why it failed, or a short success note.
        at: wall-clock time of the last attempt (Unix seconds).
    """

    name: str
    ok: bool
    message: str = ""
    at: float = 0.0


@dataclass(frozen=True)
class Record:
    """One health record: the content of ``DIR/NAME.json``.

    Attributes:
        name: the container name (the file name without ``.json``).
        instance: random id, new for every start of the container.
        pid: the writer's process id (in its own PID namespace).
        phase: the container's phase.
        seq: heartbeat sequence; grows by one with every write of this instance.
        interval: seconds between heartbeats the writer promises, or ``None`` when it
            does not heartbeat (then a reader never judges it stale).
        started_at: wall-clock start of this instance (Unix seconds).
        updated_at: wall-clock time of this write (Unix seconds).
        checks: the latest result of each check.
        exit_code: on ``exited``: the exit status when the process exited normally.
        signal: on ``exited``: the signal number that killed the process.
        reason: on ``exited`` and ``not_ready``: a short human-readable reason.
        schema: the schema version.
    """

    name: str
    instance: str
    pid: int
    phase: Phase
    seq: int = 0
    interval: float | None = None
    started_at: float = 0.0
    updated_at: float = 0.0
    checks: tuple[Check, ...] = ()
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None
    schema: int = SCHEMA_VERSION

    @property
    def exited(self) -> bool:
        """True for a tombstone."""
        return self.phase is Phase.EXITED

    def to_json(self) -> bytes:
        """Serialize to the documented JSON form (keys in schema order)."""
        doc: dict[str, Any] = {
            "schema": self.schema,
            "name": self.name,
            "instance": self.instance,
            "pid": self.pid,
            "phase": self.phase.value,
            "seq": self.seq,
            "interval": self.interval,
            "started_at": self.started_at,
            "updated_at": self.updated_at,
            "checks": [
                {"name": c.name, "ok": c.ok, "message": c.message, "at": c.at} for c in self.checks
            ],
        }
        if self.phase is Phase.EXITED:
            doc["exit_code"] = self.exit_code
            doc["signal"] = self.signal
        if self.reason is not None:
            doc["reason"] = self.reason
        return json.dumps(doc, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes, *, now: float | None = None) -> Record:
        """Parse and validate a record.

        Args:
            data: the file content.
            now: the reader's wall clock (Unix seconds); timestamps more than
                :data:`CLOCK_SKEW` ahead of it are rejected. ``None`` reads the clock.

        Raises:
            RecordError: the bytes are not a whole, valid record of a known schema.
        """
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RecordError(f"not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise RecordError("not a JSON object")
        schema = _field(doc, "schema", int)
        if schema != SCHEMA_VERSION:
            raise RecordError(f"unknown schema version {schema}")
        try:
            phase = Phase(_field(doc, "phase", str))
        except ValueError:
            raise RecordError(f"unknown phase {doc['phase']!r}") from None
        raw_checks = _field(doc, "checks", list)
        checks = []
        for item in raw_checks:
            if not isinstance(item, dict):
                raise RecordError("checks: not a list of objects")
            checks.append(
                Check(
                    name=_field(item, "name", str),
                    ok=_field(item, "ok", bool),
                    message=_field(item, "message", str),
                    at=_number(item, "at"),
                )
            )
        interval = doc.get("interval")
        if interval is not None and (
            not isinstance(interval, int | float) or isinstance(interval, bool) or interval <= 0
        ):
            raise RecordError(f"interval: {interval!r} is not a positive number or null")
        record = cls(
            name=_field(doc, "name", str),
            instance=_field(doc, "instance", str),
            pid=_field(doc, "pid", int),
            phase=phase,
            seq=_field(doc, "seq", int),
            interval=float(interval) if interval is not None else None,
            started_at=_number(doc, "started_at"),
            updated_at=_number(doc, "updated_at"),
            checks=tuple(checks),
            exit_code=_optional(doc, "exit_code", int),
            signal=_optional(doc, "signal", int),
            reason=_optional(doc, "reason", str),
            schema=schema,
        )
        if not record.instance:
            raise RecordError("instance: empty")
        if record.seq < 0:
            raise RecordError(f"seq: {record.seq} is negative")
        if record.exited and (record.exit_code is None) == (record.signal is None):
            raise RecordError("exited: needs exactly one of exit_code and signal")
        limit = (time.time() if now is None else now) + CLOCK_SKEW
        for label, stamp in (("started_at", record.started_at), ("updated_at", record.updated_at)):
            if stamp > limit:
                raise RecordError(f"{label}: {stamp} is in the future")
        return record


def _field(doc: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in doc:
        raise RecordError(f"{key}: missing")
    value = doc[key]
    # bool is an int in Python; a JSON true is never a valid number here.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RecordError(f"{key}: {value!r} is not {kind.__name__}")
    return value


def _number(doc: Mapping[str, Any], key: str) -> float:
    value = doc.get(key)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise RecordError(f"{key}: {value!r} is not a timestamp")
    return float(value)


def _optional(doc: Mapping[str, Any], key: str, kind: type) -> Any:
    return None if doc.get(key) is None else _field(doc, key, kind)


# -- writing ------------------------------------------------------------------------------


def write_atomic(health_dir: Path, record: Record) -> None:
    """Write ``record`` to ``DIR/NAME.json`` so that readers see it whole or not at all.

    The temporary file starts with a dot (ignored by readers), is made mode
    :data:`RECORD_MODE` whatever the umask, fsynced, renamed over the record, and the
    directory is fsynced so the rename survives a node crash.

    Raises:
        OSError: the directory is missing or not writable, or the disk is full.
    """
    target = record_path(health_dir, record.name)
    tmp = health_dir / f"{TEMP_PREFIX}{record.name}{SUFFIX}.{secrets.token_hex(4)}.tmp"
    replace_atomically(target, record.to_json(), tmp, mode=RECORD_MODE)


def new_instance_id() -> str:
    """A fresh random instance id (128 bits, hex)."""
    return secrets.token_hex(16)


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
            await asyncio.to_thread(self._writer.heartbeat)

    async def __aexit__(self, *exc: object) -> None:
        await self._tasks.aclose()


# -- reading ------------------------------------------------------------------------------


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


def exit_summary(record: Record) -> str:
    """``code 3`` or ``signal 15 (SIGTERM)``, plus the reason when there is one."""
    import signal as _signal

    if record.signal is not None:
        try:
            text = f"signal {record.signal} ({_signal.Signals(record.signal).name})"
        except ValueError:
            text = f"signal {record.signal}"
    else:
        text = f"code {record.exit_code}"
    return text + (f": {record.reason}" if record.reason else "")


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
