"""The file sink: NDJSON appended to a file, optionally fsync'ed before acknowledging."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from podpatterns.adapter.sinks import Record, ndjson, write_all


class FileSink:
    """Append records as JSON lines to ``path``.

    Args:
        path: the output file (created).
        fsync: fsync after every batch before it counts as accepted.
    """

    name = "file"

    def __init__(self, path: Path, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._fd: int | None = None
        self.fsyncs = 0

    async def start(self) -> None:
        """Open the file for appending; end a line torn by a crash first.

        A SIGKILL in the middle of a batch can leave the file ending in half a record.
        Appending the resent batch right after it would merge that half with the first
        record again, and a reader would lose both: the torn half is closed with a
        newline (one invalid line a reader skips), so every resent record is whole.
        """
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        await asyncio.to_thread(self._end_torn_line)

    def _end_torn_line(self) -> None:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            write_all(self._fd, b"\n")

    async def send(self, records: list[Record]) -> None:
        """Write the batch (and fsync it when asked)."""
        data = ndjson(records)
        await asyncio.to_thread(self._write, data)

    def _write(self, data: bytes) -> None:
        assert self._fd is not None, "start() first"
        write_all(self._fd, data)
        if self.fsync:
            os.fsync(self._fd)
            self.fsyncs += 1

    async def close(self) -> None:
        """Close the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def collect(self) -> dict[str, Any]:
        """Counters."""
        return {"fsyncs": self.fsyncs}
