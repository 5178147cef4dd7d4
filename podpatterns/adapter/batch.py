"""The batching stage: lines into batches, batches into a queue bounded in bytes.

A batch carries, per file, the checkpoint mark its lines reach once the sink acknowledged
them (and, for records read back from the spool, per spool segment the offset they
reach). The queue is bounded in bytes: when the sink is slow or down it fills, reading
pauses, and the files (and the spool) are the buffer.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate, repeat
from operator import add, attrgetter
from typing import Any, Protocol

from podpatterns.adapter.checkpoint import Entry, MarkKey
from podpatterns.adapter.lines import Line
from podpatterns.adapter.tail import FileKey

# Per-line overhead counted against the bounds besides the line's bytes (the tuple, the
# Line, the record it becomes), so a batch of empty lines is bounded too.
LINE_OVERHEAD = 64


@dataclass(slots=True)
class Batch:
    """Lines read, with the checkpoint each file reaches once they are acknowledged.

    Attributes:
        lines: ``(path, file_id, line)`` in the order read.
        marks: per file and epoch, the entry its checkpoint moves to on acknowledgement.
        nbytes: what the batch counts against the queue's bound.
        records: records that need no parsing (pushed, read back from the spool).
        spool: per spool segment, the offset its checkpoint entry moves to on
            acknowledgement.
        data_bytes: the bytes of the lines (what was read).
    """

    lines: list[tuple[str, str, Line]] = field(default_factory=list)
    marks: dict[MarkKey, Entry] = field(default_factory=dict)
    nbytes: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    spool: dict[int, int] = field(default_factory=dict)
    data_bytes: int = 0


class ByteQueue:
    """A FIFO bounded by the bytes it holds (an item larger than the bound still fits alone).

    ``producers`` producers (the file reader, the spool reader) and one consumer (the
    sender): the stream ends once every producer called :meth:`end`. Bytes are released
    by :meth:`release` once an item was fully handled, so the bound covers what is being
    shipped too.

    Args:
        max_bytes: the bound.
        while_full: called every ``every`` seconds while :meth:`put` waits for room: the
            reader keeps following its files (renames, new generations) while paused.
        every: seconds between two calls of ``while_full``.
        producers: how many producers call :meth:`end` (0: the stream is empty).
    """

    def __init__(
        self,
        max_bytes: int,
        while_full: Callable[[], object] | None = None,
        every: float = 1.0,
        producers: int = 1,
    ) -> None:
        self.max_bytes = max_bytes
        self.while_full = while_full
        self.every = every
        self._producers = producers
        self.bytes = 0
        self._items: deque[Batch | None] = deque()
        self._not_empty = asyncio.Event()
        self._room = asyncio.Event()
        if producers <= 0:  # nothing will ever be put (a metrics-only adapter): ended
            self._items.append(None)
            self._not_empty.set()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: Batch) -> None:
        """Wait for room, then add ``item``."""
        while self.bytes and self.bytes + item.nbytes > self.max_bytes:
            self._room.clear()
            if self.while_full is None:
                await self._room.wait()
                continue
            try:
                async with asyncio.timeout(self.every):
                    await self._room.wait()
            except TimeoutError:
                self.while_full()
        self._items.append(item)
        self.bytes += item.nbytes
        self._not_empty.set()

    def end(self) -> None:
        """A producer ended; after the last one the consumer gets ``None``."""
        self._producers -= 1
        if self._producers <= 0:
            self._items.append(None)
            self._not_empty.set()

    async def get(self) -> Batch | None:
        """The next item (waits for one)."""
        while not self._items:
            self._not_empty.clear()
            await self._not_empty.wait()
        return self._items.popleft()

    def release(self, size: int) -> None:
        """Give back the room of a handled item."""
        self.bytes -= size
        self._room.set()


_data = attrgetter("data")


class Source(Protocol):
    """The file lines come from, as the batcher sees it."""

    @property
    def key(self) -> FileKey:
        """The file's identity."""
        ...

    @property
    def path(self) -> str:
        """The ``file`` field of its records."""
        ...

    @property
    def file_id(self) -> str:
        """The ``file_id`` field of its records."""
        ...

    @property
    def epoch(self) -> int:
        """The checkpoint epoch the lines were read in."""
        ...

    def entry(self, offset: int) -> Entry:
        """The checkpoint entry for ``offset``."""
        ...


class Batcher:
    """Gather lines into batches of bounded size and queue them.

    Args:
        queue: where full batches go (waiting for room pauses the caller: backpressure).
        max_records: a batch is queued at this many lines.
        max_bytes: ... or at this many bytes.
    """

    def __init__(self, queue: ByteQueue, max_records: int, max_bytes: int) -> None:
        self.queue = queue
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._batch = Batch()

    async def add(self, src: Source, lines: list[Line], committed: int) -> None:
        """Add lines of ``src``; once acknowledged its checkpoint moves to ``committed``.

        A batch is queued as soon as it reaches ``max_records`` lines or ``max_bytes``
        (the line that reaches it included). The lines are taken in slices, found from
        their cumulative sizes, rather than one at a time (a read brings thousands).
        """
        batch = self._batch
        path, file_id = src.path, src.file_id
        sizes = map(add, map(len, map(_data, lines)), repeat(LINE_OVERHEAD))
        cumulative = list(accumulate(sizes))
        i, n = 0, len(lines)
        while i < n:
            before = cumulative[i - 1] if i else 0
            room = self.max_records - len(batch.lines)
            stop = min(n, i + room)
            # The first line that brings the batch to max_bytes, if one does before stop.
            over = bisect_left(cumulative, self.max_bytes - batch.nbytes + before, i, stop)
            end = over + 1 if over < stop else stop
            batch.lines.extend(zip(repeat(path), repeat(file_id), lines[i:end]))
            batch.nbytes += cumulative[end - 1] - before
            batch.data_bytes += cumulative[end - 1] - before - LINE_OVERHEAD * (end - i)
            i = end
            if len(batch.lines) >= self.max_records or batch.nbytes >= self.max_bytes:
                batch.marks[(src.key, src.epoch)] = src.entry(lines[end - 1].end)
                full, batch = batch, Batch()
                self._batch = batch
                await self.queue.put(full)
        batch.marks[(src.key, src.epoch)] = src.entry(committed)

    async def flush(self) -> None:
        """Queue the batch being gathered, if it holds anything."""
        batch = self._batch
        if batch.lines or batch.marks:
            self._batch = Batch()
            await self.queue.put(batch)
