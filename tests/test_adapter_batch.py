"""The batching stage: batches cut where a line at a time would cut them."""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from podpatterns.adapter.batch import LINE_OVERHEAD, Batch, Batcher, ByteQueue
from podpatterns.adapter.checkpoint import Entry
from podpatterns.adapter.lines import Line


class FakeFile:
    """A file as the batcher sees it (its checkpoint entry records the offset)."""

    key = (1, 2)
    path = "/logs/app.log"
    file_id = "1:2"
    epoch = 0

    def entry(self, offset: int) -> Entry:
        return Entry(self.path, 1, 2, offset, 0, "", "")


def reference(reads: list[list[Line]], max_records: int, max_bytes: int) -> list[Any]:
    """The batches the batcher made a line at a time (before it took slices)."""
    out: list[Any] = []
    lines: list[Line] = []
    nbytes = 0
    mark = 0
    for read in reads:
        for line in read:
            lines.append(line)
            nbytes += len(line.data) + LINE_OVERHEAD
            if len(lines) >= max_records or nbytes >= max_bytes:
                out.append(([ln.offset for ln in lines], nbytes, line.end))
                lines, nbytes = [], 0
        mark = read[-1].end if read else mark
    if lines:
        out.append(([ln.offset for ln in lines], nbytes, mark))
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 300), max_size=40), min_size=1, max_size=6),
    st.integers(1, 12),
    st.integers(1, 2000),
)
def test_batches_are_cut_where_a_line_at_a_time_cuts_them(
    reads: list[list[int]], max_records: int, max_bytes: int
) -> None:
    """Whatever the line sizes and bounds, every batch holds the lines, bytes and
    checkpoint mark the line-at-a-time rule gives; data_bytes are the lines' bytes."""
    pos = 0
    lines: list[list[Line]] = []
    for sizes in reads:
        read = []
        for size in sizes:
            read.append(Line(b"x" * size, pos, pos + size + 1))
            pos += size + 1
        lines.append(read)

    async def run() -> list[Batch]:
        queue = ByteQueue(1 << 40)
        batcher = Batcher(queue, max_records, max_bytes)
        src = FakeFile()
        committed = 0  # where the file's complete lines end so far
        for read in lines:
            committed = read[-1].end if read else committed
            await batcher.add(src, read, committed)
        await batcher.flush()
        got = []
        while len(queue):
            batch = await queue.get()
            assert batch is not None
            got.append(batch)
        return got

    batches = [b for b in asyncio.run(run()) if b.lines]
    want = reference(lines, max_records, max_bytes)
    assert [
        ([ln.offset for _, _, ln in b.lines], b.nbytes, b.marks[((1, 2), 0)].offset)
        for b in batches
    ] == want
    for b in batches:
        assert b.data_bytes == sum(len(ln.data) for _, _, ln in b.lines)
        assert all(p == "/logs/app.log" and f == "1:2" for p, f, _ in b.lines)
