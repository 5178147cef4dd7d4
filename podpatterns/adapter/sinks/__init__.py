"""Sinks: where records go. A sink's :meth:`Sink.send` returns once the batch is accepted.

"Accepted" is what the checkpoint relies on: stdout and TCP, written to the kernel; the
file sink, written (and fsync'ed with ``--sink-fsync``); HTTP, a 2xx answer. A batch a
sink rejects for good (HTTP 4xx other than 429) goes to the dead-letter file and counts
as handled. Everything else is retried inside :meth:`Sink.send`, without limit by default.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Protocol

Record = dict[str, Any]


# One encoder for every record: json.dumps() with options builds a new encoder per call,
# which was the largest single cost of shipping a record (measured with cProfile).
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)
# A lone surrogate (only a user transform can make one) becomes a JSON \\udXXX escape.
_ERRORS = "backslashreplace"


def encode_text(record: Record) -> str:
    """One record as compact JSON text."""
    return _ENCODER.encode(record)


def encode(record: Record) -> bytes:
    """One record as compact JSON (UTF-8, no ASCII escaping)."""
    return _ENCODER.encode(record).encode("utf-8", _ERRORS)


def ndjson(records: list[Record]) -> bytes:
    """Records as newline-delimited JSON, encoded once per batch."""
    texts = [_ENCODER.encode(r) for r in records]
    texts.append("")
    return "\n".join(texts).encode("utf-8", _ERRORS)


def json_array(records: list[Record]) -> bytes:
    """Records as one JSON array."""
    return ("[" + ",".join(_ENCODER.encode(r) for r in records) + "]").encode("utf-8", _ERRORS)


class Sink(Protocol):
    """What the pipeline needs from a sink."""

    name: str

    async def start(self) -> None:
        """Open what the sink needs (it may still be unreachable: send retries)."""

    async def send(self, records: list[Record]) -> None:
        """Return once every record is accepted, or dead-lettered for good."""

    async def close(self) -> None:
        """Release resources."""

    def collect(self) -> dict[str, float]:
        """Counters for the metrics collector (name -> value)."""


class DeadLetter:
    """A size-capped NDJSON file of records no sink will take: record, status, reason.

    Args:
        path: the file (appended), or ``None`` to count only.
        max_bytes: beyond this size records are counted (``dropped``) but not written.
    """

    def __init__(self, path: Path | None, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.written = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def write(self, items: list[tuple[Record, int | None, str]]) -> None:
        """Append ``(record, status, reason)`` items (blocking: call it in a thread)."""
        if not items:
            return
        with self._lock:
            if self.path is None:
                self.dropped += len(items)
                return
            size = self.path.stat().st_size if self.path.exists() else 0
            lines = []
            for record, status, reason in items:
                line = encode({"record": record, "status": status, "reason": reason}) + b"\n"
                if size + len(line) > self.max_bytes:
                    self.dropped += 1
                    continue
                size += len(line)
                lines.append(line)
            if lines:
                fd = os.open(
                    self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
                )
                try:
                    write_all(fd, b"".join(lines))
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self.written += len(lines)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (blocking)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
