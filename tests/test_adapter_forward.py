"""The Fluent forward input: fluent-logger for Python over TCP and a unix socket,
fluent-logger for Node.js with acknowledgements in each of its modes, every event mode at
the protocol level, backpressure, bad input, configuration, and the kill-9 contract
(every acknowledged chunk arrives)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import importlib.util
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import msgpack
import pytest
import structlog
from fluent import handler as fluent_handler
from fluent import sender as fluent_sender

from podpatterns.adapter import AdapterConfig
from podpatterns.adapter.inputs import forward
from podpatterns.adapter.inputs.forward import READ_CHUNK, ForwardInput
from podpatterns.adapter.pipeline import build_inputs
from podpatterns.errors import ConfigError
from podpatterns.options import HostPort
from tests.adapter_harness import ListSink, read_ndjson, running
from tests.peers import missing
from tests.proc import Proc, outputs, run
from tests.test_adapter_inputs_http import delivered
from tests.test_adapter_syslog import MemorySpool, has, started
from tests.waiting import eventually, wait_until

LOCAL = HostPort("127.0.0.1", 0)
# 2026-12-02T08:00:00.123456789Z
SECONDS = 1796198400
NANOS = 123456789


def event_time(seconds: int, nanos: int) -> msgpack.ExtType:
    """An EventTime: ext type 0, seconds and nanoseconds as two big-endian uint32."""
    return msgpack.ExtType(0, seconds.to_bytes(4, "big") + nanos.to_bytes(4, "big"))


def packb(obj: Any) -> bytes:
    data = msgpack.packb(obj)
    assert isinstance(data, bytes)
    return data


@pytest.fixture
def spool() -> MemorySpool:
    return MemorySpool()


@contextlib.asynccontextmanager
async def connected(
    inp: ForwardInput,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client connection to ``inp`` (TCP)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", inp.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def acks(reader: asyncio.StreamReader, n: int) -> list[Any]:
    """The next ``n`` objects the server answers (bounded: 30 s)."""
    unpacker = msgpack.Unpacker(raw=False)
    got: list[Any] = []
    async with asyncio.timeout(30):
        while len(got) < n:
            data = await reader.read(4096)
            assert data, f"connection closed after {got}"
            unpacker.feed(data)
            got.extend(unpacker)
    return got


async def closed_by_server(reader: asyncio.StreamReader) -> None:
    """Wait until the server closes the connection, answering nothing more (bounded: 30 s).

    Closed with bytes of ours unread, the kernel resets the connection instead.
    """
    async with asyncio.timeout(30):
        try:
            rest = await reader.read()
        except ConnectionResetError:
            return
    assert rest == b"", rest


# -- fluent-logger, the Python client ---------------------------------------------------


async def test_fluent_logger_events_arrive_with_tag_time_and_fields(tmp_path: Path) -> None:
    """Events sent by fluent-logger's FluentSender (integer and nanosecond times) and its
    logging handler reach the sink as records with tag, timestamp and the record's fields;
    a record's own ``tag`` is kept under ``record.tag``."""
    sink = ListSink()
    cfg = AdapterConfig(forward_listen=LOCAL, spool_dir=tmp_path / "spool")
    async with running(cfg, sink) as adapter:
        [inp] = adapter.inputs
        assert isinstance(inp, ForwardInput)
        port = inp.port

        def client() -> None:
            s = fluent_sender.FluentSender("app", host="127.0.0.1", port=port)
            assert s.emit_with_time("web", SECONDS, {"message": "plain", "n": 1, "tag": "mine"})
            s.close()
            ns = fluent_sender.FluentSender(
                "app", host="127.0.0.1", port=port, nanosecond_precision=True
            )
            assert ns.emit_with_time("web", SECONDS + NANOS / 1e9, {"message": "nanos"})
            ns.close()
            h = fluent_handler.FluentHandler("app.log", host="127.0.0.1", port=port)
            h.setFormatter(fluent_handler.FluentRecordFormatter({"level": "%(levelname)s"}))
            log = logging.getLogger("test_forward_client")
            log.propagate = False
            log.addHandler(h)
            try:
                log.warning({"message": "from logging", "order": 42})
            finally:
                log.removeHandler(h)
                h.close()

        await asyncio.to_thread(client)
        await eventually(lambda: len(sink.records) == 3, "3 records in the sink")
    plain, nanos, logged = sink.records
    assert plain["message"] == "plain" and plain["n"] == 1
    assert plain["tag"] == "app.web" and plain["record.tag"] == "mine"
    assert plain["timestamp"] == "2026-12-02T08:00:00.000000000Z"
    assert plain["input"] == "forward"
    assert nanos["message"] == "nanos" and nanos["timestamp"].startswith("2026-12-02T08:00:00.1234")
    assert logged["tag"] == "app.log" and logged["level"] == "WARNING"
    assert logged["message"] == "from logging" and logged["order"] == 42
    c = inp.collect()
    assert c["records"] == 3 and c["connections"] == 3 and c["acks"] == 0


async def test_fluent_logger_over_a_unix_socket(tmp_path: Path, spool: MemorySpool) -> None:
    """fluent-logger's ``unix://`` transport reaches ``--forward-unix``; the socket file
    is removed on close."""
    path = tmp_path / "fluent.sock"
    inp = ForwardInput(path, name="forward_unix", option="--forward-unix")
    async with started(inp, spool):

        def client() -> None:
            s = fluent_sender.FluentSender("app", host=f"unix://{path}")
            assert s.emit("x", {"message": "over unix"})
            s.close()

        await asyncio.to_thread(client)
        [rec] = await has(spool, 1)
    assert rec["message"] == "over unix" and rec["tag"] == "app.x"
    assert spool.sources == {"forward_unix"}
    assert not path.exists()


# -- fluent-logger for Node.js: a client with acknowledgements ---------------------------

NODE_CLIENT = r"""
// node client.js PORT MODE COUNT: COUNT events with requireAckResponse in MODE
// (Message, PackedForward, CompressedPackedForward); prints how many were acknowledged.
const logger = require("fluent-logger");
const [port, mode, count] = [Number(process.argv[2]), process.argv[3], Number(process.argv[4])];
const sender = logger.createFluentSender("node", {
  host: "127.0.0.1", port, timeout: 10.0, reconnectInterval: 600000,
  requireAckResponse: true, ackResponseTimeout: 30000, eventMode: mode,
});
let acked = 0, failed = 0;
const done = () => {
  if (acked + failed < count) return;
  console.log(JSON.stringify({ acked, failed }));
  sender.end();
};
sender.on("error", (e) => console.error(String(e)));
for (let i = 0; i < count; i++) {
  const time = i % 2 ? logger.EventTime.fromTimestamp(1796198400123) : 1796198400;
  sender.emit(mode, { message: `n${i}`, i }, time, (err) => {
    err ? failed++ : acked++;
    done();
  });
}
"""


def node_modules() -> Path:
    """Where ./dev installs fluent-logger for Node.js (in the virtualenv)."""
    modules = Path(sys.prefix) / "node" / "node_modules"
    if shutil.which("node") is None or not (modules / "fluent-logger").is_dir():
        missing("node and fluent-logger for Node.js (./dev test installs them)")
    return modules


@pytest.mark.parametrize("mode", ["Message", "PackedForward", "CompressedPackedForward"])
async def test_node_fluent_logger_gets_every_event_acknowledged(
    tmp_path: Path, spool: MemorySpool, mode: str
) -> None:
    """fluent-logger for Node.js with ``requireAckResponse``, in each of its event modes
    (EventTime and integer times), gets every event acknowledged, and every
    acknowledged event is stored."""
    modules = node_modules()
    script = tmp_path / "client.js"
    script.write_text(NODE_CLIENT)
    count = 50
    async with started(ForwardInput(LOCAL), spool) as inp:
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(script),
            str(inp.port),
            mode,
            str(count),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "NODE_PATH": str(modules)},
        )
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode(errors="replace")
        assert json.loads(out) == {"acked": count, "failed": 0}, err.decode(errors="replace")
        recs = await has(spool, count)
    assert sorted(r["i"] for r in recs) == list(range(count))
    assert {r["tag"] for r in recs} == {f"node.{mode}"}
    assert {r["timestamp"] for r in recs} == {
        "2026-12-02T08:00:00.000000000Z",
        "2026-12-02T08:00:00.123000000Z",
    }
    assert inp.counters.acks >= 1 and inp.counters.bad_messages == 0


# -- the protocol: modes, times, acknowledgements ----------------------------------------


async def test_every_mode_is_decoded_and_acknowledged(spool: MemorySpool) -> None:
    """Message, Forward, PackedForward (bin and str) and CompressedPackedForward (two gzip
    members, as Fluentd concatenates them) with EventTime, integer and float times, and
    Fluent Bit's ``[[time, metadata], record]`` entries: every event is stored, and each
    chunk is answered ``{"ack": chunk}``."""
    entries = [[event_time(SECONDS, NANOS), {"message": "p0"}], [SECONDS, {"message": "p1"}]]
    packed = b"".join(packb(e) for e in entries)
    messages = [
        ["t.msg", event_time(SECONDS, NANOS), {"message": "m"}, {"chunk": "c1"}],
        [
            "t.fwd",
            [[SECONDS, {"message": "f0"}], [SECONDS + 0.5, {"message": "f1"}]],
            {"chunk": "c2", "size": 2},
        ],
        ["t.packed", packed, {"chunk": "c3", "size": 2}],
        [
            "t.gzip",
            gzip.compress(packb(entries[0])) + gzip.compress(packb(entries[1])),
            {"chunk": "c4", "size": 2, "compressed": "gzip"},
        ],
        ["t.noack", SECONDS, {"message": "n"}],
        # Fluent Bit 2.1+ with its event metadata: [[time, metadata], record].
        ["t.meta", [[[event_time(SECONDS, 0), {"otlp": {"k": 1}}], {"message": "md"}]]],
    ]
    # A v0 client's PackedForward: the entries as a msgpack raw str, not a bin.
    v0 = msgpack.packb(["t.v0", packed, {"chunk": "c5"}], use_bin_type=False)
    async with started(ForwardInput(LOCAL), spool) as inp, connected(inp) as (reader, writer):
        writer.write(b"".join(packb(m) for m in messages) + v0)
        await writer.drain()
        got = await acks(reader, 5)
        assert got == [{"ack": f"c{i}"} for i in range(1, 6)]
        recs = await has(spool, 11)
    by_tag = [(r["tag"], r["message"]) for r in recs]
    assert by_tag == [
        ("t.msg", "m"),
        ("t.fwd", "f0"),
        ("t.fwd", "f1"),
        ("t.packed", "p0"),
        ("t.packed", "p1"),
        ("t.gzip", "p0"),
        ("t.gzip", "p1"),
        ("t.noack", "n"),
        ("t.meta", "md"),
        ("t.v0", "p0"),
        ("t.v0", "p1"),
    ]
    assert recs[0]["timestamp"] == "2026-12-02T08:00:00.123456789Z"
    assert recs[2]["timestamp"] == "2026-12-02T08:00:00.500000000Z"
    assert recs[4]["timestamp"] == "2026-12-02T08:00:00.000000000Z"
    c = inp.collect()
    assert recs[8]["metadata"] == {"otlp": {"k": 1}}
    assert c["size_mismatches"] == 0
    assert (c["messages"], c["records"], c["acks"], c["bad_messages"]) == (7, 11, 5, 0)


async def test_values_json_cannot_hold_become_text(spool: MemorySpool) -> None:
    """Binary values and keys become text (invalid UTF-8 replaced), an EventTime inside a
    record RFC 3339, other ext types base64, nested maps and arrays are kept; time nil is
    "now"."""
    rec = {
        "bin": b"caf\xc3\xa9 \xff",
        b"binkey": 1,
        7: "int key",
        "when": event_time(SECONDS, 0),
        "ext": msgpack.ExtType(5, b"\x01\x02"),
        "nested": {"list": [1, b"two", None, 2.5, True]},
    }
    async with started(ForwardInput(LOCAL), spool) as inp, connected(inp) as (_, writer):
        writer.write(packb(["t", None, rec]))
        await writer.drain()
        [got] = await has(spool, 1)
    assert got["bin"] == "café \ufffd" and got["binkey"] == 1 and got["7"] == "int key"
    assert got["when"] == "2026-12-02T08:00:00.000000000Z"
    assert got["ext"] == "AQI="
    assert got["nested"] == {"list": [1, "two", None, 2.5, True]}
    assert got["timestamp"][:4] >= "2026"


async def test_invalid_utf8_in_strings_is_replaced(spool: MemorySpool) -> None:
    """Strings (msgpack str) that are not UTF-8, in any mode, are stored with the bad bytes
    replaced; valid non-ASCII text is kept as it is."""
    # [tag, nil, {"bad": "\xffab", "ok": "é"}] by hand: msgpack libraries pack valid text only.
    message = b"\x93\xa1t\xc0\x82\xa3bad\xa3\xffab\xa2ok\xa2\xc3\xa9"
    packed = b"\x92\xc0\x81\xa3bad\xa3\xffab"  # one [nil, {"bad": "\xffab"}] entry
    async with started(ForwardInput(LOCAL), spool) as inp, connected(inp) as (_, writer):
        writer.write(message + packb(["p", packed]))
        await writer.drain()
        first, second = await has(spool, 2)
    assert first["bad"] == "\ufffdab" and first["ok"] == "é"
    assert second["bad"] == "\ufffdab" and second["tag"] == "p"


async def test_ack_only_after_the_events_are_stored(spool: MemorySpool) -> None:
    """While the spool is full nothing is read and nothing acknowledged; once there is
    space the events are stored, and only then is the chunk acknowledged."""
    spool.full = True
    async with started(ForwardInput(LOCAL), spool) as inp, connected(inp) as (reader, writer):
        writer.write(
            packb(["t", [[SECONDS, {"message": "a"}], [SECONDS, {"message": "b"}]], {"chunk": "k"}])
        )
        await writer.drain()
        await eventually(lambda: spool.waiting, "the input waiting for space")
        assert inp.counters.bytes == 0 and inp.counters.acks == 0
        spool.full = False
        got = await acks(reader, 1)
        # The ack was written after the append returned: the events are in the spool.
        assert got == [{"ack": "k"}]
        assert [r["message"] for r in spool.records] == ["a", "b"]


def _buffers() -> int:
    """The most bytes the kernel can buffer on one loopback TCP connection (both ends)."""
    rmem = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return rmem + wmem


async def test_backpressure_pauses_the_client_nothing_lost(spool: MemorySpool) -> None:
    """Once the spool is full the input reads no more: a client writing more than every
    buffer can hold is held up; once there is space every event arrives, in order."""
    size = len(packb(["t", SECONDS, {"message": f"{0:08d}", "pad": "x" * 1000}]))
    count = (_buffers() + 200 * size + 4 * READ_CHUNK) // size + 1000
    payload = b"".join(
        packb(["t", SECONDS, {"message": f"{i:08d}", "pad": "x" * 1000}]) for i in range(count)
    )
    spool.capacity = 200
    async with started(ForwardInput(LOCAL), spool) as inp:
        done = threading.Event()

        def client() -> None:
            with socket.create_connection(("127.0.0.1", inp.port)) as s:
                s.sendall(payload)
            done.set()

        sender = asyncio.ensure_future(asyncio.to_thread(client))
        try:
            await eventually(lambda: spool.waiting, "the input waiting for space")
            # Waiting, it reads nothing more: it has read at most the records the spool
            # took and two chunks, so the client (more than every buffer) cannot be done.
            assert inp.counters.bytes <= len(spool.records) * size + 2 * READ_CHUNK
            assert not done.is_set()
            spool.capacity = None
            spool.full = False
            await has(spool, count)
        finally:
            spool.full = False
            await asyncio.wait_for(sender, 60)
    assert [r["message"] for r in spool.records] == [f"{i:08d}" for i in range(count)]


# -- bad input ------------------------------------------------------------------------------


def _deep(n: int) -> Any:
    v: Any = 0
    for _ in range(n):
        v = [v]
    return v


BAD = [
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", "not a forward message", id="http-garbage"),
    pytest.param(b"\xc1\xc1\xc1", "not msgpack", id="invalid-msgpack"),
    pytest.param(packb({"tag": "t"}), "not a forward message", id="a-map"),
    pytest.param(packb(["t"]), "not a forward message", id="one-item"),
    pytest.param(packb([1, SECONDS, {}]), "tag is a int", id="int-tag"),
    pytest.param(packb(["t", "x", {}]), "", id="str-entries-not-msgpack"),
    pytest.param(packb(["t", SECONDS, "not a map"]), "record is a str", id="record-not-map"),
    pytest.param(packb(["t", [[SECONDS]]]), "entry is not [time, record]", id="short-entry"),
    pytest.param(packb(["t", [["noon", {}]]]), "event time is a str", id="str-time"),
    pytest.param(packb(["t", SECONDS, {}, "opt"]), "option is a str", id="option-not-map"),
    pytest.param(packb(["t", float("nan"), {}]), "event time nan is out of range", id="nan-time"),
    pytest.param(packb(["t", 1e300, {}]), "out of range", id="huge-time"),
    pytest.param(packb(["t", 2**63, {}]), "out of range", id="huge-int-time"),
    pytest.param(
        packb(["t", SECONDS, {"deep": _deep(500)}]),
        "nested deeper",
        id="deep",
    ),
    pytest.param(
        packb(["t", b"not gzip", {"compressed": "gzip"}]), "compressed entries", id="bad-gzip"
    ),
    pytest.param(
        packb(["t", gzip.compress(packb([SECONDS, {}]))[:-6], {"compressed": "gzip"}]),
        "truncated",
        id="truncated-gzip",
    ),
    pytest.param(
        packb(["t", gzip.compress(b"\x00" * 200_000), {"compressed": "gzip"}]),
        "larger than 65536 bytes once decompressed",
        id="gzip-bomb",
    ),
    pytest.param(
        packb(["t", SECONDS, {"message": "x" * 70_000}]), "larger than 65536", id="oversized"
    ),
    pytest.param(
        packb(["t", SECONDS, {"m": "x" * 300_000}]), "larger than 65536", id="way-oversized"
    ),
]


@pytest.mark.parametrize(("data", "reason"), BAD)
async def test_bad_input_is_counted_and_closes_the_connection(
    spool: MemorySpool, data: bytes, reason: str
) -> None:
    """A bad message closes its connection with a ``forward_bad_message`` event naming
    the reason, and is counted; the good message before it was stored and acknowledged,
    nothing of the bad one is, and the input goes on serving new connections."""
    good = packb(["t", SECONDS, {"message": "before"}, {"chunk": "ok"}])
    with structlog.testing.capture_logs() as logs:
        inp = ForwardInput(LOCAL, max_message=64 * 1024)
        async with started(inp, spool):
            async with connected(inp) as (reader, writer):
                writer.write(good)
                assert await acks(reader, 1) == [{"ack": "ok"}]
                writer.write(data)
                with contextlib.suppress(OSError):  # the server may close before it all left
                    await writer.drain()
                await closed_by_server(reader)
            assert inp.counters.bad_messages == 1
            assert [r["message"] for r in spool.records] == ["before"]
            async with connected(inp) as (reader, writer):
                writer.write(packb(["t", SECONDS, {"message": "after"}, {"chunk": "2"}]))
                await writer.drain()
                assert await acks(reader, 1) == [{"ack": "2"}]
            assert inp.is_live()
    assert [r["message"] for r in spool.records] == ["before", "after"]
    assert inp.counters.acks == 2
    [bad] = [e for e in logs if e["event"] == "forward_bad_message"]
    assert reason in bad["reason"] and bad["input"] == "forward"
    assert not [e for e in logs if e["event"] == "task_died"]


async def test_messages_before_a_bad_one_in_the_same_read_are_acknowledged(
    spool: MemorySpool,
) -> None:
    """Good messages that arrive together with a bad one are stored and acknowledged
    before the connection is closed."""
    good = [packb(["t", SECONDS, {"message": f"g{i}"}, {"chunk": f"c{i}"}]) for i in range(3)]
    async with started(ForwardInput(LOCAL), spool) as inp, connected(inp) as (reader, writer):
        writer.write(b"".join(good) + packb(["t", SECONDS, "not a map"]))
        await writer.drain()
        async with asyncio.timeout(30):
            answered = await reader.read()  # everything, up to the close
    assert list(msgpack.Unpacker(BytesIO(answered), raw=False)) == [
        {"ack": "c0"},
        {"ack": "c1"},
        {"ack": "c2"},
    ]
    assert [r["message"] for r in spool.records] == ["g0", "g1", "g2"]
    assert inp.counters.bad_messages == 1


def reason_is(reason: str) -> Callable[[dict[str, Any]], bool]:
    """An event filter: its ``reason`` contains ``reason``."""
    return lambda e: reason in str(e["reason"])


def test_the_adapter_process_logs_bad_messages_and_counts_on_metrics(tmp_path: Path) -> None:
    """The adapter process logs forward_bad_message with the reason, never a traceback,
    stays alive, and its /metrics counts bad messages, records and acks per input."""
    p = Proc(
        "adapter",
        "--forward-listen",
        "127.0.0.1:0",
        "--spool-dir",
        str(tmp_path / "spool"),
        "--forward-max-message",
        "64KiB",
        "--admin",
        "127.0.0.1:0",
        "--shutdown-delay",
        "0",
        "--sink",
        "file",
        "--sink-path",
        str(tmp_path / "out.ndjson"),
    )
    try:
        port = forward_port(p)
        for data, reason in (
            (packb(["t", SECONDS, "not a map"]), "record is a str"),
            (packb(["t", SECONDS, {"m": "x" * 70_000}]), "larger than 65536"),
        ):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(data)
                with contextlib.suppress(ConnectionResetError):  # closed with bytes unread
                    assert s.recv(100) == b""  # closed by the adapter
            ev = p.wait_event("forward_bad_message", reason_is(reason))
            assert ev["input"] == "forward"
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(packb(["t", SECONDS, {"message": "alive"}, {"chunk": "z"}]))
            assert msgpack.unpackb(s.recv(100)) == {"ack": "z"}
        wait_until(lambda: len(read_ndjson(tmp_path / "out.ndjson")) == 1, "the good event")
        with urllib.request.urlopen(p.admin_url() + "/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        for event, value in (("bad_messages", 2), ("acks", 1), ("records", 1)):
            line = (
                f'podpatterns_adapter_input_events_total{{event="{event}",input="forward"}} '
                f"{value:.1f}"
            )
            assert line in metrics, [m for m in metrics.splitlines() if "input_events" in m]
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        p.stop()
    assert "Traceback" not in p.log_text(1000)


# -- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (("--forward-listen", "24224"), "--spool-dir: missing"),
        (("--forward-listen", "nowhere:x"), "--forward-listen"),
        (
            (
                "--forward-listen",
                "127.0.0.1:0",
                "--spool-dir",
                "/s",
                "--forward-max-message",
                "1KiB",
            ),
            "--forward-max-message",
        ),
        (
            (
                "--forward-listen",
                "127.0.0.1:7000",
                "--tcp-listen",
                "127.0.0.1:7000",
                "--spool-dir",
                "/s",
            ),
            "--forward-listen",
        ),
    ],
)
def test_bad_forward_options_are_one_line_exit_2(args: tuple[str, ...], want: str) -> None:
    """Bad forward options exit 2 with one line naming the option, never a traceback."""
    done = run("adapter", *args, "--admin", "off")
    assert done.returncode == 2, outputs(done)
    assert want in done.stderr and "Traceback" not in done.stderr, outputs(done)
    assert len(done.stderr.strip().splitlines()) == 1, outputs(done)


def test_both_listeners_from_the_config() -> None:
    """``--forward-listen`` and ``--forward-unix`` are two inputs, named apart (their
    records' ``input`` and their metrics' label)."""
    cfg = AdapterConfig(
        forward_listen=LOCAL,
        forward_unix=Path("/run/fluent.sock"),
        forward_max_message=1024 * 1024,
        spool_dir=Path("/s"),
    )
    inputs = build_inputs(cfg)
    assert [i.name for i in inputs] == ["forward", "forward_unix"]
    assert all(isinstance(i, ForwardInput) and i.max_message == 1024 * 1024 for i in inputs)


def test_a_bare_port_binds_loopback() -> None:
    """``--forward-listen 24224`` listens on 127.0.0.1 (the Pod's loopback)."""
    cfg = AdapterConfig(forward_listen=HostPort("127.0.0.1", 24224), spool_dir=Path("/s"))
    assert cfg.pushed_inputs == ("--forward-listen",)
    from podpatterns.adapter.config import parse_local_bind

    assert parse_local_bind("24224") == HostPort("127.0.0.1", 24224)


def test_missing_fluent_extra_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without msgpack (the fluent extra; its absence is simulated) --forward-listen is
    refused naming the extra."""
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "msgpack" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ConfigError, match=r"--forward-listen: .*podpatterns\[fluent\]"):
        AdapterConfig(forward_listen=LOCAL, spool_dir=Path("/s"))
    with pytest.raises(ConfigError, match=r"--forward-unix: .*podpatterns\[fluent\]"):
        AdapterConfig(forward_unix=Path("/s/f.sock"), spool_dir=Path("/s"))
    monkeypatch.undo()
    monkeypatch.setattr(forward, "msgpack_available", lambda: False)
    with pytest.raises(ConfigError, match=r"podpatterns\[fluent\]"):
        ForwardInput(LOCAL)


# -- the kill-9 contract, across real processes -----------------------------------------

BATCH = 200


def forward_port(p: Proc) -> int:
    """The forward input's port, from its input_listening event."""
    ev = p.wait_event("input_listening", lambda e: e.get("input") == "forward")
    return int(str(ev["address"]).rsplit(":", 1)[1])


def adapter_proc(tmp: Path) -> Proc:
    """``podpatterns adapter`` with only the forward input, into tmp/out.ndjson."""
    return Proc(
        "adapter",
        "--forward-listen",
        "127.0.0.1:0",
        "--spool-dir",
        str(tmp / "spool"),
        "--spool-segment-bytes",
        "256KiB",
        "--sink",
        "file",
        "--sink-path",
        str(tmp / "out.ndjson"),
        "--admin",
        "off",
        "--shutdown-delay",
        "0",
        "--batch-max-records",
        str(BATCH),
    )


class AckingSender:
    """A client thread sending numbered events in Forward-mode chunks (1-50 events),
    each with a ``chunk`` id, and waiting for its ack before the next, as Fluentd's
    out_forward with ``require_ack_response``; keeps the numbers acknowledged."""

    def __init__(self, port: int, start: int, rng: random.Random) -> None:
        self.port = port
        self.next = start
        self.acked: list[int] = []
        self.rng = rng
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 30  # bounded whatever happens to the adapter
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                unpacker = msgpack.Unpacker(raw=False)
                while not self.stop.is_set() and time.monotonic() < deadline:
                    n = self.rng.randint(1, 50)
                    seqs = range(self.next, self.next + n)
                    self.next += n
                    chunk = f"chunk-{seqs[0]}"
                    entries = [[SECONDS, {"message": f"seq={i}"}] for i in seqs]
                    s.sendall(packb(["t", entries, {"chunk": chunk, "size": n}]))
                    while True:
                        data = s.recv(4096)
                        if not data:
                            return  # the adapter was killed: this chunk was not acked
                        unpacker.feed(data)
                        answers = list(unpacker)
                        if answers:
                            break
                    assert answers == [{"ack": chunk}]
                    self.acked += seqs
        except OSError:
            return

    def join(self) -> None:
        """Stop and wait for the thread."""
        self.stop.set()
        self.thread.join()


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_loses_no_acknowledged_chunk(tmp_path: Path, seed: int) -> None:
    """A client sends acked chunks of numbered events while the adapter is SIGKILLed at
    random points and restarted: every acknowledged event arrives; duplicates stay within
    one batch per kill."""
    rng = random.Random(seed)
    kills = 3
    acked: list[int] = []
    start = 0
    for _ in range(kills):
        p = adapter_proc(tmp_path)
        try:
            sender = AckingSender(forward_port(p), start, rng)
            time.sleep(rng.uniform(0.2, 1.5))  # a random kill point, not a wait
            p.p.kill()
            p.wait()
            sender.join()
            acked += sender.acked
            start = sender.next
        finally:
            p.stop()
    assert acked, "no chunk was acknowledged before the kills"
    p = adapter_proc(tmp_path)
    try:
        forward_port(p)
        want = set(acked)
        wait_until(lambda: want <= set(delivered(tmp_path)), "every acked event in the sink", 60)
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        p.stop()
    got = Counter(delivered(tmp_path))
    assert want <= set(got)
    dupes = sum(c - 1 for c in got.values())
    assert dupes <= kills * BATCH, f"{dupes} duplicates"


def test_sigterm_ships_every_acknowledged_event_and_exits_0(tmp_path: Path) -> None:
    """After SIGTERM, with a client still connected, the adapter exits 0 and every event it
    acknowledged is in the sink."""
    p = adapter_proc(tmp_path)
    try:
        port = forward_port(p)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            unpacker = msgpack.Unpacker(raw=False)
            for n in range(20):
                entries = [[SECONDS, {"message": f"seq={n * 10 + i}"}] for i in range(10)]
                s.sendall(packb(["t", entries, {"chunk": str(n)}]))
                while not (answers := list(unpacker)):
                    data = s.recv(4096)
                    assert data, "closed before the ack"
                    unpacker.feed(data)
                assert answers == [{"ack": str(n)}]
            p.signal(signal.SIGTERM)
            assert p.wait(30) == 0
    finally:
        p.stop()
    assert sorted(delivered(tmp_path)) == list(range(200))
