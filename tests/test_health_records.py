"""Health records: schema round trip, atomic writes, reader semantics, torn-write fuzz."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podpatterns.dirwatch import DirWatcher
from podpatterns.health import records
from podpatterns.health.reader import State, Tracker, read_record
from podpatterns.health.records import Check, Phase, Record, RecordError, write_atomic
from podpatterns.health.watch import wait_exited, wait_ready, wait_status
from podpatterns.health.writer import Writer
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parents[1]


def tombstone(name: str = "app", code: int = 0) -> Record:
    now = time.time()
    return Record(
        name=name,
        instance="i1",
        pid=7,
        phase=Phase.EXITED,
        seq=3,
        started_at=now,
        updated_at=now,
        exit_code=code,
        reason="done",
    )


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_round_trip_through_the_file(tmp_path: Path) -> None:
    """A written record reads back equal, with the documented keys."""
    rec = Record(
        name="app",
        instance="abc",
        pid=12,
        phase=Phase.NOT_READY,
        seq=4,
        interval=2.0,
        started_at=time.time(),
        updated_at=time.time(),
        checks=(Check("http://127.0.0.1:8080/healthz", False, "503", time.time()),),
        reason="warming up",
    )
    write_atomic(tmp_path, rec)
    assert read_record(tmp_path, "app").record == rec
    doc = json.loads((tmp_path / "app.json").read_text())
    assert doc["schema"] == records.SCHEMA_VERSION and doc["phase"] == "not_ready"
    assert [p.name for p in tmp_path.iterdir()] == ["app.json"]  # no temp file left


def test_missing_file_means_not_started(tmp_path: Path) -> None:
    """No record file: state missing, not unknown and not exited."""
    status = Tracker(tmp_path).status("app")
    assert status.state is State.MISSING and not status.exited and not status.ready


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b'{"phase": "exited"}',
        b"[1, 2]",
        b"\xff\xfe garbage",
        b'{"schema": 2, "phase": "exited"}',
        b"x" * (records.MAX_RECORD_BYTES + 10),
    ],
    ids=["empty", "partial", "old-ad-hoc", "array", "binary", "newer-schema", "huge"],
)
def test_bad_file_means_unknown(tmp_path: Path, content: bytes) -> None:
    """Empty, partial, foreign or oversized files read as unknown, never exited or ready."""
    (tmp_path / "app.json").write_bytes(content)
    status = Tracker(tmp_path).status("app")
    assert status.state is State.UNKNOWN and status.error


def test_every_prefix_of_a_tombstone_is_unknown(tmp_path: Path) -> None:
    """A torn tombstone (any strict prefix of it) never reads as exited."""
    data = tombstone().to_json().rstrip(b"\n")
    tracker = Tracker(tmp_path)
    for cut in range(len(data)):
        (tmp_path / "app.json").write_bytes(data[:cut])
        assert tracker.status("app").state is State.UNKNOWN, data[:cut]
    (tmp_path / "app.json").write_bytes(data)
    assert tracker.status("app").exited


def test_future_timestamp_is_rejected(tmp_path: Path) -> None:
    """A record stamped beyond the allowed clock skew is unknown, not trusted."""
    rec = tombstone()
    future = time.time() + records.CLOCK_SKEW + 60
    write_atomic(tmp_path, Record(**{**rec.__dict__, "updated_at": future}))
    status = Tracker(tmp_path).status("app")
    assert status.state is State.UNKNOWN and "future" in (status.error or "")


def test_record_with_another_name_is_unknown(tmp_path: Path) -> None:
    """A record whose name differs from its file name is not trusted."""
    (tmp_path / "app.json").write_bytes(tombstone("db").to_json())
    assert Tracker(tmp_path).status("app").state is State.UNKNOWN


def test_tombstone_needs_exit_code_or_signal() -> None:
    """An exited record must carry exactly one of exit_code and signal."""
    doc = json.loads(tombstone().to_json())
    doc["exit_code"] = None
    with pytest.raises(RecordError, match="exactly one"):
        Record.from_json(json.dumps(doc).encode())


def test_temp_files_are_not_records(tmp_path: Path) -> None:
    """Readers list NAME.json only: dot-prefixed temp files and other names are ignored."""
    write_atomic(tmp_path, tombstone("app"))
    (tmp_path / ".db.json.1234.tmp").write_text("{")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "Bad_Name.json").write_text("{}")
    assert Tracker(tmp_path).names() == ["app"]


def test_staleness_is_judged_on_the_readers_clock(tmp_path: Path) -> None:
    """Ready turns stale after 3 intervals without a new seq, on the reader's clock only."""
    clock = Clock()
    writer = Writer(tmp_path, "app", interval=1.0, clock=lambda: 0.0)  # writer wall clock: 1970
    writer.set_ready()
    tracker = Tracker(tmp_path, monotonic=clock)
    # First sight: not stale whatever updated_at says, but a ready record is trusted
    # only once its heartbeat is seen to advance (issue 10, item 7).
    assert tracker.status("app").state is State.UNCONFIRMED
    writer.heartbeat()
    assert tracker.status("app").ready
    clock.now += 2.9
    assert tracker.status("app").ready
    clock.now += 0.2
    stale = tracker.status("app")
    assert stale.state is State.STALE and not stale.ready and not stale.exited
    writer.heartbeat()
    assert tracker.status("app").ready  # a new seq is fresh again


def test_new_instance_replaces_old_state(tmp_path: Path) -> None:
    """A restart (new instance id) is tracked afresh, even with a lower seq."""
    clock = Clock()
    tracker = Tracker(tmp_path, monotonic=clock)
    old = Writer(tmp_path, "app", interval=1.0)
    for _ in range(5):
        old.heartbeat()
    old.mark_exited(1)
    assert tracker.status("app").exited
    clock.now += 100
    new = Writer(tmp_path, "app", interval=1.0)
    new.set_ready()
    status = tracker.status("app")
    assert status.ready and status.record is not None and status.record.seq == 0


def test_writer_phases_and_final_tombstone(tmp_path: Path) -> None:
    """The writer goes through the phases with growing seq; the tombstone is final."""
    writer = Writer(tmp_path, "app")
    seqs = [
        writer.set_starting().seq,
        writer.set_not_ready("warming").seq,
        writer.set_ready().seq,
        writer.set_draining().seq,
    ]
    assert seqs == [0, 1, 2, 3]
    rec = writer.mark_exited(signal=signal.SIGTERM, reason="terminated")
    assert rec.exited and rec.signal == 15 and rec.exit_code is None
    with pytest.raises(RuntimeError, match="tombstone"):
        writer.set_ready()
    with pytest.raises(ValueError, match="exactly one"):
        Writer(tmp_path, "other").mark_exited()
    assert records.exit_summary(rec) == "signal 15 (SIGTERM): terminated"


def test_bad_container_name_is_refused(tmp_path: Path) -> None:
    """Names must be DNS labels, so a name can never escape the directory."""
    for bad in ("../x", "App", "", "a" * 64, "-a"):
        with pytest.raises(ValueError, match="container name"):
            Writer(tmp_path, bad)


async def test_async_heartbeat_advances_seq(tmp_path: Path) -> None:
    """`async with writer.heartbeating()` heartbeats from the running loop until exit."""
    writer = Writer(tmp_path, "app", interval=0.02)
    writer.set_ready()
    async with writer.heartbeating():
        await eventually(lambda: writer.record.seq >= 4)
    seq = writer.record.seq
    # Lets time pass to prove no heartbeat follows; a slow machine cannot fake a pass
    # here (a heartbeat that runs on would be seen later, never hidden by slowness).
    await asyncio.sleep(0.1)
    assert writer.record.seq == seq  # stopped with the block
    assert read_record(tmp_path, "app").record == writer.record


async def test_heartbeat_block_ends_after_the_write_in_flight(tmp_path: Path) -> None:
    """A heartbeat write in flight (on its thread) when the block ends has finished by the
    time ``async with`` returns: no heartbeat can land after the block (a tombstone
    written right after it must stay the last write)."""
    started, finished = threading.Event(), threading.Event()

    class SlowWriter(Writer):
        def heartbeat(self) -> Record:
            if self.record.seq >= 1:  # the heartbeats of the task, not the first one
                started.set()
                time.sleep(0.3)  # a slow disk: the thread is still writing at exit
                finished.set()
            return super().heartbeat()

    writer = SlowWriter(tmp_path, "app", interval=0.01)
    writer.set_ready()
    async with writer.heartbeating():
        await asyncio.to_thread(started.wait, 10)
    assert finished.is_set()  # before: the write went on after the block had ended
    seq = writer.record.seq
    writer.mark_exited(0)
    assert writer.record.seq == seq + 1 and read_record(tmp_path, "app").record == writer.record


async def test_wait_ready_and_exited_follow_the_disk(tmp_path: Path) -> None:
    """wait_ready returns on ready; wait_exited sees a tombstone written before it started."""
    writer = Writer(tmp_path, "app")
    writer.set_starting()
    waiter = asyncio.create_task(wait_ready(tmp_path, "app"))
    # Lets the waiter run to prove it does not return while starting; slowness can only
    # make this check weaker, never fail a correct waiter.
    await asyncio.sleep(0.05)
    assert not waiter.done()
    writer.set_ready()
    async with asyncio.timeout(5):
        assert (await waiter).ready
    writer.mark_exited(0)
    async with asyncio.timeout(5):
        assert (await wait_exited(tmp_path, "app")).exited


async def test_watcher_falls_back_to_polling(tmp_path: Path) -> None:
    """When no watcher can be created (e.g. inotify limits), reads go on by polling."""

    def no_inotify(path: Path, resync: float) -> object:
        raise OSError(24, "inotify_init1: too many open files")

    watcher = DirWatcher(tmp_path, resync=0.02, watch=no_inotify)  # type: ignore[arg-type]
    tracker = Tracker(tmp_path)
    task = asyncio.create_task(wait_status(tracker, "app", lambda s: s.exited, watcher=watcher))
    await eventually(lambda: watcher.mode == "polling")
    write_atomic(tmp_path, tombstone())
    async with asyncio.timeout(5):
        assert (await task).exited
    assert watcher.mode == "polling" and watcher.fallbacks == 1


_FUZZ_WRITER = """
import os, sys, time
from pathlib import Path
from podpatterns.health.records import Check
from podpatterns.health.writer import Writer
w = Writer(Path(sys.argv[1]), "app", interval=60)
pad = "x" * 4000
i = 0
print("go", flush=True)
while True:
    w.set_check(Check("probe", i % 2 == 0, pad))
    (w.set_not_ready if i % 2 else w.set_starting)("fuzz")
    i += 1
"""

_NAIVE_WRITER = """
import os, sys, time
data = open(sys.argv[2], "rb").read()
print("go", flush=True)
while True:
    with open(sys.argv[1], "wb") as fh:   # not atomic: readers may see any prefix
        for i in range(0, len(data), 7):
            fh.write(data[i:i + 7]); fh.flush()
"""


@pytest.mark.parametrize("writer", ["atomic", "naive"])
def test_killed_writers_never_yield_wrong_state(tmp_path: Path, writer: str) -> None:
    """Writers SIGKILLed mid-write, read concurrently, never read as exited or ready."""
    src = tmp_path / "tombstone.json"
    data = tombstone().to_json().rstrip(b"\n")
    # the naive writer writes a tombstone minus its last byte: never a whole record
    src.write_bytes(data[:-1])
    health = tmp_path / "health"
    health.mkdir()
    seen: set[State] = set()
    stop = threading.Event()

    def read_loop() -> None:
        tracker = Tracker(health)
        while not stop.is_set():
            seen.add(tracker.status("app").state)

    reader = threading.Thread(target=read_loop)
    reader.start()
    rng = random.Random(4)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        for _ in range(8):
            args = (
                [sys.executable, "-c", _FUZZ_WRITER, str(health)]
                if writer == "atomic"
                else [sys.executable, "-c", _NAIVE_WRITER, str(health / "app.json"), str(src)]
            )
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=env)
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"go\n"
            time.sleep(rng.uniform(0.01, 0.08))
            proc.kill()
            proc.wait(10)
            proc.stdout.close()
    finally:
        stop.set()
        reader.join(10)
    allowed = {State.MISSING, State.UNKNOWN, State.STARTING, State.NOT_READY}
    assert seen <= allowed, seen
    if writer == "atomic":
        assert State.UNKNOWN not in seen  # atomic writes are never seen torn
        leftovers = [p.name for p in health.iterdir() if p.name != "app.json"]
        assert all(records.is_record_file(n) is False for n in leftovers)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_garbage_never_reads_as_a_state(data: bytes) -> None:
    """Arbitrary bytes are refused with RecordError; no other exception escapes."""
    with pytest.raises(RecordError):
        Record.from_json(data)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_mutated_tombstone_json_is_valid_or_refused(data: st.DataObject) -> None:
    """Fields of a tombstone replaced with arbitrary JSON values are validated, not crashed on."""
    doc = json.loads(tombstone().to_json())
    key = data.draw(st.sampled_from(sorted(doc)))
    doc[key] = data.draw(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    )
    try:
        rec = Record.from_json(json.dumps(doc).encode())
    except RecordError:
        return
    assert isinstance(rec.phase, Phase)
