"""Health records: the schema of one JSON file per container in a shared directory.

A record is written only by its owner, atomically (:func:`write_atomic`: a temporary
file in the same directory, a name readers ignore, ``fsync``, ``os.replace``, an ``fsync``
of the directory), so readers see a whole old record or a whole new one. The owner's
side is :mod:`podpatterns.health.writer`; the readers' rules (staleness, first sight,
tombstones of an earlier run, files that are not records) are
:mod:`podpatterns.health.reader` (docs/health.md).
"""

from __future__ import annotations

import enum
import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from podpatterns.atomicfile import replace_atomically
from podpatterns.options import parse_container_name

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
