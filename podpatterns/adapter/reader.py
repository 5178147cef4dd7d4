"""The reading stage: the next bytes of a file, split into lines.

One call reads at most ``--read-chunk`` bytes of one file, so every file gets its turn in a
round and none can starve the others. What a read finds besides lines (the file was
truncated, or cannot be read any more) is reported to the wiring, which hands it to
discovery (:mod:`podpatterns.adapter.tracking`).
"""

from __future__ import annotations

from typing import Literal

from podpatterns import logs
from podpatterns.adapter.counters import Counters
from podpatterns.adapter.lines import Line, LineSplitter
from podpatterns.adapter.tail import OpenFile

Outcome = list[Line] | Literal["truncated", "failed"] | None
"""What :meth:`Reader.read` found: the lines completed (possibly none, when the file grew
by part of a line), ``"truncated"`` (truncated or rewritten under us), ``"failed"`` (read
error, logged), or ``None`` (nothing new)."""


class Reader:
    """Read chunks of files and split them into lines.

    Args:
        chunk: most bytes read from one file per call.
        counters: ``bytes_read`` counts what was read.
    """

    def __init__(self, chunk: int, counters: Counters) -> None:
        self.chunk = chunk
        self._counters = counters
        self._log = logs.get("adapter")

    def read(self, f: OpenFile, splitter: LineSplitter) -> Outcome:
        """Read the next chunk of ``f`` and feed it to its ``splitter``."""
        try:
            data = f.read(self.chunk)
        except OSError as exc:
            self._log.warning("file_read_failed", path=f.path, error=str(exc))
            return "failed"
        if data is None:
            return "truncated"
        if not data:
            return None
        self._counters.bytes_read += len(data)
        return splitter.feed(data)
