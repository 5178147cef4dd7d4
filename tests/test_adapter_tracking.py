"""The discovery stage alone (:class:`~podpatterns.adapter.tracking.Tracker`), on real files.

Each step that the running adapter leaves to timing (a reconcile while reading is paused,
a read round) is a call here, so a sequence of rotations is replayed exactly: discovery
runs while reading waits (a sink outage with a full queue), and reading resumes when the
test says so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from podpatterns.adapter.checkpoint import Checkpoint
from podpatterns.adapter.counters import Counters
from podpatterns.adapter.lines import Line
from podpatterns.adapter.reader import Reader
from podpatterns.adapter.tracking import Tracked, Tracker
from tests.adapter_harness import SeqWriter, check_delivery, config, seqs_of


class Tail:
    """A tracker and a reader over ``tmp/logs/access.log`` (found by ``pattern``), stepped
    by hand."""

    def __init__(self, tmp: Path, pattern: str = "access.log") -> None:
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.log = self.logs / "access.log"
        self.writer = SeqWriter(self.log)
        self.counters = Counters()
        self.lines: list[Line] = []
        self.now = 0.0
        self.tracker = Tracker(
            config(tmp, f"logs/{pattern}"),
            Checkpoint(None),
            self.counters,
            lambda: None,
            self._flush,
        )
        self.reader = Reader(64 * 1024, self.counters)

    async def _flush(self, t: Tracked) -> None:
        held = t.splitter.flush()
        if held is not None:
            self.lines.append(held)

    def discover(self) -> None:
        """A reconcile (it also runs while reading is paused)."""
        self.now += 1.0
        self.tracker.discover(self.now)

    async def read_all(self) -> None:
        """Read rounds until no file has anything new (what the reader does once the sink
        takes batches again)."""
        for _ in range(10_000):
            progressed = False
            for t in list(self.tracker.tracked.values()):
                got = self.reader.read(t.file, t.splitter)
                if got is None or got == "failed":
                    continue
                progressed = True
                if got == "truncated":
                    await self.tracker.truncated(t, self.now)
                else:
                    self.lines.extend(got)
            if not progressed:
                return
        raise AssertionError("the files never stopped growing")

    def copytruncate(self, generations: int, *, look_between: bool = False) -> None:
        """What logrotate's copytruncate does: shift the older copies up by one, copy the
        file to ``.1``, truncate it (``look_between``: discovery runs between the copy
        and the truncate, and sees the copy first)."""
        self._shift(generations)
        shutil.copyfile(self.log, self.log.with_name("access.log.1"))
        if look_between:
            self.discover()
        os.truncate(self.log, 0)

    def rotate(self, generations: int) -> None:
        """What logrotate's create does: shift the older generations up by one, rename the
        file to ``.1``; the application opens a new ``access.log`` (the writer reopens)."""
        self._shift(generations)
        os.rename(self.log, self.log.with_name("access.log.1"))
        self.writer.reopen()

    def _shift(self, generations: int) -> None:
        for n in range(generations, 0, -1):
            older = self.log.with_name(f"access.log.{n}")
            if older.exists():
                os.rename(older, self.log.with_name(f"access.log.{n + 1}"))

    def seqs(self) -> list[int]:
        """Sequence numbers of the lines read so far."""
        return seqs_of(ln.data.decode() for ln in self.lines)


@pytest.mark.parametrize("look_between", [False, True])
@pytest.mark.parametrize("look_at_second", [False, True])
@pytest.mark.parametrize("before_notice", [0, 2, 40])
async def test_two_copytruncates_while_paused_count_nothing_lost(
    tmp_path: Path, before_notice: int, look_at_second: bool, look_between: bool
) -> None:
    """Two copytruncates pass while reading is paused: each line is read once, 0 bytes lost.

    The first truncation is noticed while the file is empty (or holds a few lines: less
    than a whole head), so the file is read again from 0 knowing little of its bytes; the
    next generation grows, is copied and truncated, and a smaller one follows before
    reading resumes. The bytes of the middle generation are read from its copy, so a later
    truncation must not count them as lost.
    """
    tail = Tail(tmp_path)
    w = tail.writer
    w.write(100)
    tail.tracker.restore(tail.now)
    await tail.read_all()
    assert tail.seqs() == list(range(100))

    # The sink goes down: reading pauses; discovery goes on.
    w.write(300)
    tail.discover()
    tail.copytruncate(1, look_between=look_between)
    w.write(before_notice)
    tail.discover()  # notices the truncation
    assert tail.counters.truncations == 1
    w.write(2000)  # a big second generation
    if look_at_second:
        tail.discover()
    tail.copytruncate(1, look_between=look_between)
    w.write(50)  # a small third generation
    tail.discover()

    # The sink is back: everything is read.
    await tail.read_all()
    check_delivery(tail.seqs(), w.next, 0)

    # One more rotation once all is read: nothing of any generation was lost.
    w.write(10)
    tail.discover()
    await tail.read_all()
    tail.copytruncate(2, look_between=look_between)
    tail.discover()
    await tail.read_all()
    check_delivery(tail.seqs(), w.next, 0)
    assert tail.counters.truncated_bytes_lost == 0
    w.close()


@pytest.mark.parametrize("read_before", [False, True])
async def test_copy_seen_empty_then_filled_loses_and_freezes_nothing(
    tmp_path: Path, read_before: bool
) -> None:
    """Discovery sees the copy just created and still empty (logrotate has not written it
    yet), so it is read as a new file; then the original is truncated and rewritten.

    The original is read on from 0 (never left waiting on a copy it cannot have), every
    line is read, and the bytes the copy holds are not counted lost.
    """
    tail = Tail(tmp_path)
    w = tail.writer
    w.write(100)
    tail.tracker.restore(tail.now)
    if read_before:
        await tail.read_all()
    w.write(300)  # reading paused: unread lines
    tail.discover()
    copy = tail.log.with_name("access.log.1")
    copy.touch()
    tail.discover()  # the copy, empty: a new file
    shutil.copyfile(tail.log, copy)
    os.truncate(tail.log, 0)
    w.write(50)
    tail.discover()
    await tail.read_all()
    check_delivery(tail.seqs(), w.next, 0)  # the copy is read on from the original's offset
    assert tail.counters.truncations == 1
    assert tail.counters.truncated_bytes_lost == 0
    w.close()


@pytest.mark.parametrize("pattern", ["access.log", "access.log*"])
async def test_rotation_during_discovery_reads_every_generation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pattern: str
) -> None:
    """A rotation lands while discovery opens the generations it listed: every line is
    read once.

    logrotate renames every generation up by one, so the name listed for one generation
    (``access.log.1``) names the next one, already open, a moment later. Judged by that
    name, the unread generation passed for a copy of the open one and was never read (the
    outage test under load waited for its lines for ever); each file is now judged as
    the one listed, and a renamed one is found by its new name at the next pass.
    """
    tail = Tail(tmp_path, pattern)
    w = tail.writer
    w.write(100)
    tail.tracker.restore(tail.now)
    await tail.read_all()
    # Reading is paused (a sink outage): two generations are rotated unseen.
    tail.rotate(3)
    w.write(300)
    tail.rotate(3)
    w.write(300)
    # Discovery lists them, opens the newer (access.log), then logrotate runs before it
    # opens the older one by the name it listed (access.log.1).
    opened = tail.tracker.open

    def open_then_rotate(*args: Any, **kwargs: Any) -> Tracked | None:
        monkeypatch.setattr(tail.tracker, "open", opened)
        t = opened(*args, **kwargs)
        tail.rotate(3)
        w.write(50)
        return t

    monkeypatch.setattr(tail.tracker, "open", open_then_rotate)
    tail.discover()
    tail.discover()
    await tail.read_all()
    check_delivery(tail.seqs(), w.next, 0)
    assert tail.counters.files_opened == 4  # each generation once
    w.close()
