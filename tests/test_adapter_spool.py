"""The durable spool: appends fsync'ed in groups, read back in order, acknowledged through
the checkpoint, bounded, repaired after a crash; and pushed records through the pipeline."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import structlog

from podpatterns.adapter import Adapter, AdapterConfig
from podpatterns.adapter.checkpoint import CheckpointStore
from podpatterns.adapter.inputs import SpoolFull
from podpatterns.adapter.inputs.tcp import TcpInput
from podpatterns.adapter.spool import Spool, segment_name
from podpatterns.errors import BindError, ConfigError
from podpatterns.options import HostPort
from podpatterns.tasks import TaskSet
from tests.adapter_harness import (
    ListSink,
    check_delivery,
    resume_until_delivered,
    write_until_blocked,
)
from tests.waiting import eventually

MiB = 1024 * 1024


class Running:
    """A spool opened in ``directory`` with its writer task running."""

    def __init__(self, directory: Path, acked: dict[int, int] | None = None, **kw: Any) -> None:
        kw.setdefault("max_bytes", 8 * MiB)
        kw.setdefault("segment_bytes", 64 * 1024)
        self.spool = Spool(directory, **kw)
        self.forget = self.spool.open(acked or {})
        self.tasks = TaskSet("test")

    async def __aenter__(self) -> Spool:
        self.tasks.spawn(self.spool.run(), "writer", may_return=True)
        return self.spool

    async def __aexit__(self, *exc: object) -> None:
        await self.spool.stop()
        await self.tasks.aclose()
        self.spool.close()


def segment_files(directory: Path) -> list[Path]:
    """The spool's segment files, in order."""
    return sorted(directory.glob("spool-*.ndjson"))


def numbered(start: int, n: int) -> list[dict[str, Any]]:
    """Records ``{"n": i}`` for ``i`` in ``[start, start + n)``."""
    return [{"n": i, "pad": "x" * 40} for i in range(start, start + n)]


async def read_all(spool: Spool) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """Read what the spool holds now (synced), with the marks reached."""
    out: list[dict[str, Any]] = []
    marks: dict[int, int] = {}
    while True:
        try:
            async with asyncio.timeout(0.2):
                got = await spool.read(MiB, 10_000)
        except TimeoutError:
            return out, marks
        if got is None:
            return out, marks
        records, _, m = got
        out += records
        marks.update(m)


async def test_append_is_on_disk_when_it_returns_and_reads_back_in_order(tmp_path: Path) -> None:
    """append() returns once the NDJSON lines are in a segment file; read() returns them in
    order, each tagged with its input."""
    async with Running(tmp_path) as spool:
        await spool.append(numbered(0, 3), source="tcp")
        [seg] = segment_files(tmp_path)
        lines = seg.read_bytes().splitlines()
        assert [json.loads(x)["n"] for x in lines] == [0, 1, 2]
        await spool.append(numbered(3, 2), source="http")
        records, marks = await read_all(spool)
    assert [r["n"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["input"] for r in records] == ["tcp"] * 3 + ["http"] * 2
    assert marks == {int(seg.name[6:22]): seg.stat().st_size}


async def test_concurrent_appends_share_one_fsync(tmp_path: Path) -> None:
    """50 appends made at once are written with fewer syncs than appends (group commit)."""
    async with Running(tmp_path) as spool:
        await asyncio.gather(*(spool.append(numbered(i, 1), source="t") for i in range(50)))
        c = spool.counters
        assert c.appends == 50 and c.records_appended == 50
        assert c.syncs < 50
        records, _ = await read_all(spool)
    assert sorted(r["n"] for r in records) == list(range(50))


async def test_segments_roll_and_are_deleted_once_acknowledged(tmp_path: Path) -> None:
    """Segments are sealed at their size; a sealed segment whose records were all
    acknowledged is deleted, and its number is reported for the checkpoint to forget."""
    async with Running(tmp_path, segment_bytes=64 * 1024) as spool:
        for i in range(40):
            await spool.append(numbered(i * 100, 100), source="t")
        assert spool.segments() > 3
        before = spool.unacknowledged_bytes
        records, marks = await read_all(spool)
        assert [r["n"] for r in records] == list(range(4000))
        spool.acknowledged(marks)
        assert spool.unacknowledged_bytes < before
        removed = await spool.remove_done()
        assert removed and all(not (tmp_path / segment_name(s)).exists() for s in removed)
        # What the reader holds open and the active segment stay.
        assert 1 <= spool.segments() <= 2


async def test_full_spool_refuses_with_retry_after_then_has_space_again(tmp_path: Path) -> None:
    """Beyond max_bytes unacknowledged, append raises SpoolFull (nothing stored) with a
    Retry-After estimate; once acknowledged, wait_for_space returns and appends succeed."""
    async with Running(tmp_path, max_bytes=MiB) as spool:
        chunk = numbered(0, 4000)  # ~250 KB
        appended = 0
        with pytest.raises(SpoolFull) as full:
            for _ in range(100):
                await spool.append(list(chunk), source="t")
                appended += 1
        assert 1 <= full.value.retry_after <= 60
        assert spool.counters.full == 1
        assert spool.unacknowledged_bytes <= MiB
        waiting = asyncio.ensure_future(spool.wait_for_space())
        await asyncio.sleep(0)
        assert not waiting.done()
        records, marks = await read_all(spool)
        assert len(records) == appended * len(chunk)
        spool.acknowledged(marks)
        await asyncio.wait_for(waiting, 5)
        await spool.append(numbered(0, 1), source="t")


async def test_a_torn_tail_is_cut_and_counted_never_merged(tmp_path: Path) -> None:
    """A segment ending in a torn line (a crash inside a write) is cut at its last newline
    on open; the next record is read whole, not merged with the torn bytes."""
    seg = tmp_path / segment_name(7)
    seg.write_bytes(b'{"n":1}\n{"n":2}\n{"n":3,"pa')
    async with Running(tmp_path) as spool:
        assert spool.counters.torn_tails == 1
        assert spool.counters.torn_bytes == len(b'{"n":3,"pa')
        await spool.append([{"n": 4}], source="t")
        records, _ = await read_all(spool)
    assert [r["n"] for r in records] == [1, 2, 4]
    assert seg.read_bytes() == b'{"n":1}\n{"n":2}\n'


async def test_reopen_resumes_after_what_the_checkpoint_acknowledged(tmp_path: Path) -> None:
    """Reopened with the checkpoint's offsets, the spool reads only what was not
    acknowledged; fully acknowledged segments are deleted on open; numbers never repeat."""
    async with Running(tmp_path, segment_bytes=64 * 1024) as spool:
        for i in range(20):
            await spool.append(numbered(i * 100, 100), source="t")
        await read_all(spool)
    segs = [int(p.name[6:22]) for p in segment_files(tmp_path)]
    # Acknowledged: every segment but the last two, and half of the next to last.
    sizes = {s: (tmp_path / segment_name(s)).stat().st_size for s in segs}
    half_seg = segs[-2]
    raw = (tmp_path / segment_name(half_seg)).read_bytes()
    half = raw.index(b"\n", len(raw) // 2) + 1
    acked = {s: sizes[s] for s in segs[:-2]} | {half_seg: half}
    expected_first = json.loads(raw[half : raw.index(b"\n", half)])["n"]
    run = Running(tmp_path, acked)
    assert set(run.forget) == set(segs[:-2])
    async with run as spool:
        again, _ = await read_all(spool)
        new = spool._active
        assert new is not None and new.seq > max(segs)
    assert [r["n"] for r in again] == list(range(expected_first, 2000))


async def test_unwritable_spool_dir_is_a_one_line_config_error(tmp_path: Path) -> None:
    """A spool directory that is a file fails start with a ConfigError naming --spool-dir."""
    (tmp_path / "file").write_text("")
    cfg = AdapterConfig(tcp_listen=HostPort("127.0.0.1", 0), spool_dir=tmp_path / "file" / "spool")
    adapter = Adapter(cfg, sink=ListSink())
    with pytest.raises(ConfigError, match="--spool-dir: cannot use"):
        await adapter.start()


async def test_an_input_that_cannot_bind_fails_start_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    """A taken --tcp-listen port fails start with a BindError naming the flag; the tasks
    started before it are stopped."""
    taken = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = taken.sockets[0].getsockname()[1]
    try:
        cfg = AdapterConfig(tcp_listen=HostPort("127.0.0.1", port), spool_dir=tmp_path / "s")
        adapter = Adapter(cfg, sink=ListSink())
        with pytest.raises(BindError, match="--tcp-listen: cannot bind"):
            await adapter.start()
        assert len(adapter._tasks) == 0
    finally:
        taken.close()
        await taken.wait_closed()


def test_pushed_input_needs_spool_dir_and_path_is_optional() -> None:
    """An adapter with only a pushed input is valid (no --path) but needs --spool-dir."""
    with pytest.raises(ConfigError, match="--spool-dir: missing"):
        AdapterConfig(tcp_listen=HostPort("127.0.0.1", 0))
    with pytest.raises(ConfigError, match="--path: missing"):
        AdapterConfig()
    AdapterConfig(tcp_listen=HostPort("127.0.0.1", 0), spool_dir=Path("/tmp/x"))


# -- through the pipeline --------------------------------------------------------------


def tcp_config(tmp: Path, **kw: Any) -> AdapterConfig:
    """An adapter with only the TCP input on an ephemeral loopback port."""
    kw.setdefault("batch_max_records", 500)
    return AdapterConfig(tcp_listen=HostPort("127.0.0.1", 0), spool_dir=tmp / "spool", **kw)


def tcp_port(adapter: Adapter) -> int:
    """The port the adapter's TCP input bound."""
    [inp] = adapter.inputs
    assert isinstance(inp, TcpInput) and inp.address is not None
    return inp.address[1]


async def send_lines(port: int, lines: list[bytes]) -> None:
    """Connect, write ``lines``, close."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"".join(lines))
    await writer.drain()
    writer.close()
    await writer.wait_closed()


async def test_pushed_records_skip_the_parser_and_get_every_transform(tmp_path: Path) -> None:
    """Records from the spool are shipped as structured (JSON lines stay objects, text
    lines become messages), not re-parsed by --parse, and transforms apply to them."""
    sink = ListSink()
    cfg = tcp_config(tmp_path, parse="logfmt", add_field=(("env", "test"),), drop_field=("secret",))
    adapter = Adapter(cfg, sink=sink)
    await adapter.start()
    try:
        await send_lines(
            tcp_port(adapter), [b'{"level":"info","secret":"s","n":1}\n', b"a=b plain text\n"]
        )
        await eventually(lambda: len(sink.records) == 2)
    finally:
        adapter.stop_accepting()
        await asyncio.wait_for(adapter.wait_drained(), 20)
        await adapter.close()
    first, second = sink.records
    assert first == {"level": "info", "n": 1, "input": "tcp", "env": "test"}
    assert second == {"message": "a=b plain text", "input": "tcp", "env": "test"}


async def test_restart_resends_only_what_was_not_acknowledged(tmp_path: Path) -> None:
    """Records spooled while the sink is down survive a restart (the checkpoint in the
    spool directory), and what was acknowledged before is not sent again."""
    sink = ListSink()
    adapter = Adapter(tcp_config(tmp_path), sink=sink)
    await adapter.start()
    port = tcp_port(adapter)
    await send_lines(port, [f"seq={i}\n".encode() for i in range(1000)])
    await eventually(lambda: len(sink.records) == 1000)
    sink.set_down(True)
    await send_lines(port, [f"seq={i}\n".encode() for i in range(1000, 3000)])
    await eventually(lambda: adapter.spool and adapter.spool.counters.records_appended == 3000)
    adapter.stop_accepting()
    adapter.cut()
    await adapter.close()
    saved = CheckpointStore(tmp_path / "spool")
    saved.load()
    assert saved.loaded_spool  # the acknowledged offsets are in the checkpoint
    delivered = [int(r["message"][4:]) for r in sink.records]

    sink2 = ListSink()
    adapter2 = Adapter(tcp_config(tmp_path), sink=sink2)
    await adapter2.start()
    try:
        await eventually(
            lambda: len(set(delivered) | {int(r["message"][4:]) for r in sink2.records}) == 3000
        )
        delivered += [int(r["message"][4:]) for r in sink2.records]
    finally:
        adapter2.stop_accepting()
        await asyncio.wait_for(adapter2.wait_drained(), 20)
        await adapter2.close()
    check_delivery(delivered, 3000, max_duplicates=500)
    assert not any(r["message"] == "seq=0" for r in sink2.records)


async def test_tcp_backpressure_pauses_reading_and_loses_nothing(tmp_path: Path) -> None:
    """With the sink down and the spool full, the TCP input stops reading (the app's
    writes block); once the sink is back every line arrives."""
    sink = ListSink()
    sink.set_down(True)
    cfg = tcp_config(tmp_path, spool_max_bytes=MiB, queue_max_bytes=MiB, batch_max_bytes=MiB)
    adapter = Adapter(cfg, sink=sink)
    await adapter.start()
    total = 0
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", tcp_port(adapter))
        spool = adapter.spool
        assert spool is not None
        total = await write_until_blocked(writer, lambda seq: f"seq={seq} {'x' * 90}\n")
        tcp = adapter.inputs[0].collect()
        assert tcp["paused"] >= 1
        assert spool.unacknowledged_bytes <= MiB + 200_000
        await resume_until_delivered(sink, writer, total)
    finally:
        sink.set_down(False)
        adapter.stop_accepting()
        await asyncio.wait_for(adapter.wait_drained(), 30)
        await adapter.close()
    check_delivery(sink.seqs(), total, max_duplicates=0)
    # Every acknowledged segment but the active one is gone.
    assert len(segment_files(tmp_path / "spool")) <= 2


async def test_records_read_from_memory_equal_those_read_from_disk(tmp_path: Path) -> None:
    """The reader takes the latest appends from memory; they are the records a reader of
    the segment files gets (after a restart), in the same order, with the same marks."""
    async with Running(tmp_path) as spool:
        for i in range(30):
            await spool.append([*numbered(i * 50, 50), {"u": "é\u2028", "f": 1.5}], source="t")
        hot, hot_marks = await read_all(spool)
        assert spool.counters.records_from_memory == len(hot) == 30 * 51
    async with Running(tmp_path) as again:
        cold, cold_marks = await read_all(again)
        assert again.counters.records_from_memory == 0
    assert hot == cold
    assert {k: v for k, v in cold_marks.items() if k in hot_marks} == hot_marks


def test_a_spool_dir_the_globs_would_tail_is_refused(tmp_path: Path) -> None:
    """--spool-dir inside what --path tails is a config error naming both."""
    with pytest.raises(ConfigError, match=r"--spool-dir: .* would be read by --path"):
        AdapterConfig(
            path=(str(tmp_path / "**" / "*.ndjson"),),
            tcp_listen=HostPort("127.0.0.1", 0),
            spool_dir=tmp_path / "spool",
        )


async def test_appends_waiting_when_the_writer_is_cancelled_are_refused(tmp_path: Path) -> None:
    """A writer cancelled (a drain cut short) refuses the appends it had not confirmed
    with SpoolFull, so no HTTP request waits for an answer that never comes."""
    run = Running(tmp_path)
    spool = await run.__aenter__()
    await asyncio.sleep(0)  # the writer waits for work
    waiting = asyncio.ensure_future(spool.append(numbered(0, 1), source="t"))
    await asyncio.sleep(0)  # the append is queued for the writer
    await run.tasks.aclose()
    with pytest.raises(SpoolFull):
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(SpoolFull):
        await spool.append(numbered(1, 1), source="t")
    spool.close()


async def test_a_lone_surrogate_is_stored_and_read_back(tmp_path: Path) -> None:
    """A string with a lone surrogate (valid JSON: "\\ud800") is stored, escaped, and
    read back the same from disk."""
    async with Running(tmp_path) as spool:
        await spool.append([{"m": "a\ud800b"}, {"m": "é"}], source="t")
    async with Running(tmp_path) as again:
        records, _ = await read_all(again)
    assert [r["m"] for r in records] == ["a\ud800b", "é"]


async def test_a_tcp_connection_dying_of_a_bug_makes_the_adapter_not_live(
    tmp_path: Path,
) -> None:
    """A bug in a connection's task (here the spool raising what it never should) is
    logged as task_died and turns the adapter's is_live() False, so /livez answers 503
    instead of the input going quietly deaf."""
    cfg = tcp_config(tmp_path)
    adapter = Adapter(cfg, sink=ListSink())
    await adapter.start()
    try:
        spool = adapter.spool
        assert spool is not None and adapter.is_live()

        async def broken(records: list[dict[str, Any]], *, source: str) -> None:
            raise RuntimeError("a bug")

        spool.append = broken  # type: ignore[method-assign]
        with structlog.testing.capture_logs() as logs:
            _, writer = await asyncio.open_connection("127.0.0.1", tcp_port(adapter))
            writer.write(b"seq=0\n")
            await writer.drain()
            await eventually(lambda: not adapter.is_live(), "the adapter not live")
        assert any(e["event"] == "task_died" for e in logs), logs
        writer.close()
    finally:
        adapter.stop_accepting()
        await asyncio.wait_for(adapter.wait_drained(), 30)
        await adapter.close()
