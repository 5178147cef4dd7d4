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


def encode(record: Record) -> bytes:
    """One record as compact JSON (UTF-8, no ASCII escaping)."""
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str).encode()


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
