"""Raw spool lines: chunks an input appends as they arrived (syslog frames), decoded when
the spool is read back; the same records, marks and crash guarantees as records."""

from __future__ import annotations

import asyncio
import signal
import socket
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from podpatterns.adapter.inputs import Record
from podpatterns.adapter.inputs.syslog import Framer, _parse_sd, _sd_scan, decode_block
from podpatterns.adapter.spool import Spool, segment_name
from podpatterns.tasks import TaskSet
from tests.adapter_harness import read_ndjson
from tests.proc import Proc
from tests.waiting import wait_until

MiB = 1024 * 1024


class Running:
    """A spool opened in ``directory`` with its writer task running."""

    def __init__(self, directory: Path, acked: dict[int, int] | None = None, **kw: Any) -> None:
        kw.setdefault("max_bytes", 8 * MiB)
        kw.setdefault("segment_bytes", 64 * 1024)
        self.spool = Spool(directory, **kw)
        self.spool.open(acked or {})
        self.tasks = TaskSet("test")

    async def __aenter__(self) -> Spool:
        self.tasks.spawn(self.spool.run(), "writer", may_return=True)
        return self.spool

    async def __aexit__(self, *exc: object) -> None:
        await self.spool.stop()
        await self.tasks.aclose()
        self.spool.close()


def lines(start: int, n: int) -> bytes:
    """``n`` LF-framed RFC 5424 messages numbered from ``start``."""
    return b"".join(
        f'<134>1 2026-12-02T08:00:00Z web shop 7 M [x@1 n="{i}"] seq={i}\n'.encode()
        for i in range(start, start + n)
    )


async def read_batches(
    spool: Spool, max_records: int = 10_000
) -> list[tuple[list[Record], dict[int, int]]]:
    """The batches the spool hands out now (synced), with their marks."""
    out: list[tuple[list[Record], dict[int, int]]] = []
    while True:
        try:
            async with asyncio.timeout(0.2):
                got = await spool.read(MiB, max_records)
        except TimeoutError:
            return out
        if got is None:
            return out
        records, _, marks = got
        out.append((records, marks))


def seqs(batches: list[tuple[list[Record], dict[int, int]]]) -> list[int]:
    return [int(r["message"][4:]) for records, _ in batches for r in records]


async def append_raw(spool: Spool, data: bytes) -> None:
    await spool.append_raw(
        data, source="syslog_tcp", kind="syslog", count=data.count(b"\n"), decode=decode_block
    )


# -- the fast framing path ----------------------------------------------------------------

_ALPHABET = b"<1>\n\n\r\0 7aa"
_BYTES = st.binary(max_size=80).map(
    # Mostly frame-like bytes: LFs, CRs, NULs, spaces, digits and PRIs.
    lambda b: bytes(_ALPHABET[x % len(_ALPHABET)] for x in b)
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_BYTES, max_size=30), st.integers(min_value=4, max_value=40))
def test_take_then_decode_gives_what_feed_gives(chunks: list[bytes], limit: int) -> None:
    """A stream read in any chunks: the blocks :meth:`Framer.take` returns, each split by
    a new framer, plus what :meth:`Framer.feed` returns when take() declines, are the very
    messages (and truncation marks) feed() alone returns; a message split across chunks
    included."""
    plain = Framer(limit)
    want = [m for chunk in chunks for m in plain.feed(chunk)]
    if (last := plain.flush()) is not None:
        want.append(last)
    fast = Framer(limit)
    got: list[tuple[bytes, bool]] = []
    for chunk in chunks:
        block = fast.take(chunk)
        if block is None:
            got += fast.feed(chunk)
        elif block:
            assert block.endswith(b"\n")
            again = Framer(limit)
            got += again.feed(block)
            assert again.flush() is None
    got += fast.feed(b"")  # the end of the stream, as the input handles it
    if (last := fast.flush()) is not None:
        got.append(last)
    assert got == want


def test_take_holds_an_incomplete_frame_until_its_lf() -> None:
    """A message split across chunks is held, then returned whole with its LF."""
    framer = Framer(1024)
    assert framer.take(b"<13>1 - - - - - - one\n<13>1 - - - - - - tw") == b"<13>1 - - - - - - one\n"
    assert framer.held == len(b"<13>1 - - - - - - tw")
    assert framer.take(b"o\n") == b"<13>1 - - - - - - two\n"
    assert framer.take(b"8 <13>x") is None  # octet counting may follow: feed() takes over


_SD_NAME = st.text(alphabet="abcxyz@.0189-_", min_size=1, max_size=6)
_SD_VALUE = st.lists(
    st.sampled_from(["a", " ", "=", "[", "é", '\\"', "\\\\", "\\]", "x y", "k=v"]), max_size=6
).map("".join)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.tuples(_SD_NAME, st.lists(st.tuples(_SD_NAME, _SD_VALUE), max_size=4)),
        min_size=1,
        max_size=4,
    )
)
def test_structured_data_fast_path_equals_the_scan(
    elements: list[tuple[str, list[tuple[str, str]]]],
) -> None:
    """Any STRUCTURED-DATA, with escapes or without: the split fast path and the token
    scan agree."""
    text = "".join(
        f"[{sd_id}" + "".join(f' {k}="{v}"' for k, v in params) + "]" for sd_id, params in elements
    )
    assert _parse_sd(text) == _sd_scan(text)


# -- the spool ------------------------------------------------------------------------------


async def test_raw_lines_read_back_as_records_from_memory_and_disk(tmp_path: Path) -> None:
    """Raw appends and record appends mixed: read back in order, the raw ones decoded, the
    same from memory as from the segment files (after a restart, by the default decoder
    of their kind)."""
    async with Running(tmp_path) as spool:
        await append_raw(spool, lines(0, 10))
        await spool.append([{"message": "seq=10"}], source="other")
        await append_raw(spool, lines(11, 5))
        hot = await read_batches(spool)
        assert spool.counters.records_from_memory == 16
        assert spool.counters.raw_appends == 2
        assert spool.counters.records_appended == 16
    assert seqs(hot) == list(range(16))
    rec = hot[0][0][0]
    assert rec["input"] == "syslog_tcp" and rec["structured_data"] == {"x@1": {"n": "0"}}
    text = (tmp_path / segment_name(1)).read_bytes()
    assert text.startswith(b'["raw","syslog","syslog_tcp","')
    async with Running(tmp_path) as again:
        cold = await read_batches(again)
        assert again.counters.records_from_memory == 0
    assert [r for b, _ in cold for r in b] == [r for b, _ in hot for r in b]
    assert {k: v for _, m in cold for k, v in m.items()} == {
        k: v for _, m in hot for k, v in m.items()
    }


async def test_a_raw_line_larger_than_a_batch_is_split_and_marked_once(tmp_path: Path) -> None:
    """A raw line of 25 messages with batches of 10: three batches, only the last carries
    the line's offset (the checkpoint covers the line once all of it is acknowledged);
    the record appended next, in memory too, joins the last one."""
    async with Running(tmp_path) as spool:
        await append_raw(spool, lines(0, 25))
        await spool.append([{"message": "seq=25"}], source="other")
        batches = await read_batches(spool, max_records=10)
    assert [len(b) for b, _ in batches] == [10, 10, 6]
    assert [bool(m) for _, m in batches] == [False, False, True]
    assert seqs(batches) == list(range(26))
    assert batches[2][1] == {1: (tmp_path / segment_name(1)).stat().st_size}


async def test_raw_lines_in_memory_are_gathered_into_full_batches(tmp_path: Path) -> None:
    """Raw lines of 7 messages with batches of 10: the reader gathers them from memory
    into full batches, each marked at the last line it completes."""
    async with Running(tmp_path) as spool:
        for i in range(6):
            await append_raw(spool, lines(i * 7, 7))
        data = (tmp_path / segment_name(1)).read_bytes()
        ends = [i + 1 for i, b in enumerate(data) if b == 0x0A]
        batches = await read_batches(spool, max_records=10)
    assert [len(b) for b, _ in batches] == [10, 10, 10, 10, 2]
    # Batch k ends with message 10k + 9: the lines of 7 it completes end before that.
    want = [{1: ends[0]}, {1: ends[1]}, {1: ends[3]}, {1: ends[4]}, {1: ends[5]}]
    assert [m for _, m in batches] == want
    assert seqs(batches) == list(range(42))


async def test_torn_raw_line_is_cut_and_the_checkpoint_resumes_mid_segment(
    tmp_path: Path,
) -> None:
    """A crash inside the write of a raw line: the torn line is cut on open (never
    decoded); reopened with the checkpoint at the end of the first line, only the second
    is read again."""
    async with Running(tmp_path) as spool:
        await append_raw(spool, lines(0, 4))
        await append_raw(spool, lines(4, 4))
    seg = tmp_path / segment_name(1)
    whole = seg.read_bytes()
    first_end = whole.index(b"\n") + 1
    torn = b'["raw","syslog","syslog_tcp","PDEzND4x'  # the start of a third, no LF
    seg.write_bytes(whole + torn)
    async with Running(tmp_path, {1: first_end}) as spool:
        assert spool.counters.torn_tails == 1 and spool.counters.torn_bytes == len(torn)
        again = await read_batches(spool)
    assert seqs(again) == [4, 5, 6, 7]
    assert seg.read_bytes() == whole


async def test_a_corrupt_raw_line_is_counted_and_skipped(tmp_path: Path) -> None:
    """A raw line that does not decode (a disk error, a hand edit) is counted and skipped;
    the lines after it are read."""
    seg = tmp_path / segment_name(3)
    seg.write_bytes(b'["raw","syslog","syslog_tcp","not base64!"]\n{"message":"seq=1"}\n')
    async with Running(tmp_path) as spool:
        got = await read_batches(spool)
        assert spool.counters.corrupt_records == 1
    assert seqs(got) == [1]


# -- end to end: SIGKILL while the spool is read back --------------------------------------


def test_sigkill_then_restart_delivers_every_spooled_syslog_message(tmp_path: Path) -> None:
    """``podpatterns adapter --syslog-tcp`` fed messages in pieces that split them across
    TCP segments; once the spool holds them all it is SIGKILLed (the file sink has part of
    them) and restarted: every message arrives, duplicates at most a batch and a chunk."""
    n = 30_000
    args = (
        "adapter",
        *("--syslog-tcp", "127.0.0.1:0", "--spool-dir", str(tmp_path / "spool")),
        *("--sink", "file", "--sink-path", str(tmp_path / "out.ndjson")),
        *("--batch-max-records", "500", "--admin", "127.0.0.1:0", "--shutdown-delay", "0"),
    )
    p = Proc(*args)
    try:
        ev = p.wait_event("input_listening", lambda e: e.get("input") == "syslog_tcp")
        port = int(str(ev["address"]).rsplit(":", 1)[1])
        p.wait_event("adapter_started")
        payload = lines(0, n)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            for at in range(0, len(payload), 7_777):  # pieces that end inside messages
                sock.sendall(payload[at : at + 7_777])

        def spooled() -> bool:
            with urllib.request.urlopen(p.admin_url() + "/metrics", timeout=5) as resp:
                text = resp.read().decode()
            return f"podpatterns_adapter_spool_records_total {n}.0" in text

        wait_until(spooled, f"{n} records in the spool", 60)
        p.p.kill()
        p.wait()
    finally:
        p.stop()
    before = len(read_ndjson(tmp_path / "out.ndjson"))
    p = Proc(*args)
    try:
        wait_until(
            lambda: (
                {int(r["message"][4:]) for r in read_ndjson(tmp_path / "out.ndjson")}
                == set(range(n))
            ),
            "every message in the file sink",
            60,
        )
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        p.stop()
    got = Counter(int(r["message"][4:]) for r in read_ndjson(tmp_path / "out.ndjson"))
    dupes = sum(c - 1 for c in got.values())
    # At most what the checkpoint had not covered at the kill: one batch of 500, or one
    # raw chunk (a TCP read: 256 KiB, about 4,000 of these messages).
    assert dupes <= 4_500, (dupes, before)
    assert set(got) == set(range(n))


async def test_otlp_protobuf_bodies_spooled_raw_read_back_as_records(tmp_path: Path) -> None:
    """An OTLP protobuf body appended raw reads back as the records from_protobuf gives
    (``input`` set), from memory and, after a restart, from disk."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    from podpatterns.adapter.inputs import otlp

    req = ExportLogsServiceRequest()
    rl = req.resource_logs.add()
    kv = rl.resource.attributes.add()
    kv.key, kv.value.string_value = "service.name", "shop"
    lrs = rl.scope_logs.add().log_records
    for i in range(30):
        lr = lrs.add()
        lr.time_unix_nano = 1_796_198_400_000_000_000 + i
        lr.body.string_value = f"seq={i}"
        lr.severity_number = 9  # type: ignore[assignment]  # INFO; protobuf has no stubs
    body = req.SerializeToString()
    assert otlp.check_protobuf(body) == 30
    want = [{**r, "input": "otlp"} for r in otlp.from_protobuf(body)]
    async with Running(tmp_path) as spool:
        await spool.append_raw(
            body, source="otlp", kind="otlp-protobuf", count=30, decode=otlp.decode_block
        )
        hot = await read_batches(spool, max_records=20)
    async with Running(tmp_path) as again:
        cold = await read_batches(again, max_records=20)
    assert [r for b, _ in hot for r in b] == want == [r for b, _ in cold for r in b]
    assert want[0]["resource.service.name"] == "shop" and want[0]["severity"] == "INFO"
