"""Syslog inputs: parsing, RFC 6587 framing, unix/TCP/UDP listeners fed by real clients
(util-linux ``logger``, Python's ``SysLogHandler``, a real rsyslog forwarding over TCP),
backpressure on streams and counted drops on datagrams."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import logging.handlers
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podpatterns.adapter import Adapter, AdapterConfig
from podpatterns.adapter.config import build
from podpatterns.adapter.inputs import Record, SpoolFull
from podpatterns.adapter.inputs.syslog import (
    READ_CHUNK,
    Framer,
    SyslogDatagramInput,
    SyslogStreamInput,
    parse_message,
)
from podpatterns.errors import BindError, ConfigError
from podpatterns.listen import bind_unix
from podpatterns.options import HostPort
from tests.adapter_harness import (
    ListSink,
    check_delivery,
    resume_until_delivered,
    write_until_blocked,
)
from tests.peers import need
from tests.proc import Proc
from tests.waiting import eventually, wait_until

LOCAL = HostPort("127.0.0.1", 0)
SPOOL = {"spool_dir": "/spool"}
NOW = time.struct_time((2026, 12, 2, 8, 0, 0, 2, 336, 0))


class MemorySpool:
    """An in-memory :class:`~podpatterns.adapter.inputs.Spool` the test can fill up."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.sources: set[str] = set()
        self.refused = 0
        self.waiting = 0
        self.capacity: int | None = None
        """Records after which the spool turns full by itself."""
        self._space = asyncio.Event()
        self._space.set()

    @property
    def full(self) -> bool:
        return not self._space.is_set()

    @full.setter
    def full(self, value: bool) -> None:
        if value:
            self._space.clear()
        else:
            self._space.set()

    async def append(self, records: list[Record], *, source: str) -> None:
        if self.full:
            self.refused += 1
            raise SpoolFull(0.1)
        self.records.extend(records)
        self.sources.add(source)
        if self.capacity is not None and len(self.records) >= self.capacity:
            self.full = True

    async def append_raw(
        self,
        data: bytes,
        *,
        source: str,
        kind: str,
        count: int,
        decode: Callable[[bytes, str], list[Record]],
    ) -> None:
        # Decoded at once (the real spool decodes when it reads back); ``input`` is the
        # real spool's, as append() leaves it out here.
        assert kind == "syslog" and count == data.count(b"\n")
        records = decode(data, source)
        assert all(r.pop("input") == source for r in records)
        await self.append(records, source=source)

    async def wait_for_space(self) -> None:
        self.waiting += 1
        try:
            await self._space.wait()
        finally:
            self.waiting -= 1

    def messages(self) -> list[str]:
        return [r["message"] for r in self.records]


@pytest.fixture
def spool() -> MemorySpool:
    return MemorySpool()


@contextlib.asynccontextmanager
async def started(inp: Any, spool: MemorySpool) -> AsyncIterator[Any]:
    await inp.start(spool)
    try:
        yield inp
    finally:
        await inp.close()


async def run(*argv: str) -> None:
    """Run a client command to its end without blocking the loop the inputs run on."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, f"{argv}: {out.decode(errors='replace')}"


async def has(spool: MemorySpool, n: int) -> list[Record]:
    await eventually(lambda: len(spool.records) >= n, f"{n} records in the spool")
    return spool.records


# -- parsing --------------------------------------------------------------------------


def test_rfc5424_fields_and_structured_data() -> None:
    """An RFC 5424 message gives named facility/severity, header fields, SD as a nested
    dict (escapes undone) and the message without its BOM."""
    text = (
        '<165>1 2026-12-02T08:00:00.123Z web-1 myapp 42 ID47 [exampleSDID@32473 iut="3" '
        'eventSource="Appli\\"cation" eventID="1011"][examplePriority@32473 class="high"] '
        "\ufeffAn application event"
    )
    assert parse_message(text) == {
        "facility": "local4",
        "severity": "notice",
        "timestamp": "2026-12-02T08:00:00.123Z",
        "hostname": "web-1",
        "app_name": "myapp",
        "procid": "42",
        "msgid": "ID47",
        "structured_data": {
            "exampleSDID@32473": {"iut": "3", "eventSource": 'Appli"cation', "eventID": "1011"},
            "examplePriority@32473": {"class": "high"},
        },
        "message": "An application event",
    }


def test_rfc5424_structured_data_edge_cases() -> None:
    """A repeated SD-ID merges, ']' and '\\' escapes are undone, a param name may hold
    '[' (RFC 5424 allows it) and a value '[' or '] '."""
    rec = parse_message(r'<14>1 - - - - - [a x="1\]\\"][b [y="[z] "][a w="2"] m')
    assert rec is not None
    assert rec["structured_data"] == {"a": {"x": "1]\\", "w": "2"}, "b": {"[y": "[z] "}}
    assert rec["message"] == "m"


def test_rfc5424_nil_fields_are_absent() -> None:
    """RFC 5424's ``-`` leaves a field out; a message may be empty."""
    assert parse_message("<14>1 - - - - - -") == {
        "facility": "user",
        "severity": "info",
        "message": "",
    }


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        (  # a remote sender: timestamp, host, tag[pid]
            "<34>Oct 11 22:14:15 mymachine su[99]: 'su root' failed",
            {
                "facility": "auth",
                "severity": "crit",
                "timestamp": "2026-10-11T22:14:15",
                "hostname": "mymachine",
                "app_name": "su",
                "procid": "99",
                "message": "'su root' failed",
            },
        ),
        (  # glibc's syslog() on /dev/log: no host name
            "<13>Dec  2 07:59:58 myapp[123]: key: value",
            {
                "facility": "user",
                "severity": "notice",
                "timestamp": "2026-12-02T07:59:58",
                "app_name": "myapp",
                "procid": "123",
                "message": "key: value",
            },
        ),
        (  # a December message received in January is last year's
            "<13>Dec 31 23:59:59 h app: x",
            {"timestamp": "2026-12-31T23:59:59"},
        ),
        (  # Python's SysLogHandler: no timestamp
            "<11>myapp: it broke",
            {"facility": "user", "severity": "err", "app_name": "myapp", "message": "it broke"},
        ),
        ("<6>just text", {"facility": "kern", "severity": "info", "message": "just text"}),
    ],
)
def test_rfc3164_variants(text: str, fields: dict[str, str]) -> None:
    """The BSD forms apps really send parse into the same fields."""
    now = NOW if "Dec 31" not in text else time.struct_time((2027, 1, 1, 0, 0, 0, 4, 1, 0))
    rec = parse_message(text, now)
    assert rec is not None
    assert {k: rec.get(k) for k in fields} == fields


@pytest.mark.parametrize(
    "text",
    ["no pri", "<192>1 - - - - - -", "<>x", "<13", "<14>1 - - - - - [bad", "<14>1 - - - -"],
)
def test_unparseable(text: str) -> None:
    """No valid PRI, or a malformed RFC 5424 header or SD: not parsed (kept raw)."""
    assert parse_message(text) is None


# -- framing --------------------------------------------------------------------------

STREAM = (
    b"<13>newline framed\n"
    b"17 <14>octet\ncounted"
    b"<15>nul terminated\0"
    b"\n5 <9>ab"
    b"<13>crlf\r\n"
    b"2026-12-02 is not a length\n"
)
FRAMES = [
    b"<13>newline framed",
    b"<14>octet\ncounted",
    b"<15>nul terminated",
    b"<9>ab",
    b"<13>crlf",
    b"2026-12-02 is not a length",
]


LF_STREAM = STREAM.replace(b"nul terminated\0", b"lf terminated\n")
LF_FRAMES = [f.replace(b"nul", b"lf") for f in FRAMES]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 10_000])
@pytest.mark.parametrize(("stream", "frames"), [(STREAM, FRAMES), (LF_STREAM, LF_FRAMES)])
def test_framer_detects_framing_per_message(step: int, stream: bytes, frames: list[bytes]) -> None:
    """Octet-counted, LF- and NUL-terminated frames mixed in one stream, fed in any chunks
    (with no NUL, LF frames take the fast path up to each octet-counted one)."""
    framer = Framer(1024)
    got: list[bytes] = []
    for i in range(0, len(stream), step):
        got += [m for m, truncated in framer.feed(stream[i : i + step]) if not truncated]
    assert got == frames
    assert framer.held == 0


def test_framer_truncates_and_skips_exactly() -> None:
    """Over-long frames keep their head, marked; the rest is skipped (an octet-counted one
    by its length), never held, and the next frame is intact."""
    framer = Framer(480)
    big = b"<13>" + b"x" * 2000
    data = b"%d " % len(big) + big + b"<13>next\n" + big + b"\n<13>after\n"
    got = []
    for i in range(0, len(data), 100):
        got += framer.feed(data[i : i + 100])
        assert framer.held <= 480 + 100
    assert got == [
        (big[:480], True),
        (b"<13>next", False),
        (big[:480], True),
        (b"<13>after", False),
    ]


def test_framer_flush_emits_unterminated_tail() -> None:
    """At the end of a stream an unterminated message is emitted."""
    framer = Framer(1024)
    assert framer.feed(b"<13>no newline") == []
    assert framer.flush() == (b"<13>no newline", False)
    assert framer.flush() is None


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='<>0123456789 -[]="\\:abc\ufeffJanDec', max_size=120))
def test_parse_message_never_raises(text: str) -> None:
    """Any text gives a record with a message, or None: never an exception."""
    rec = parse_message(text, NOW)
    assert rec is None or isinstance(rec["message"], str)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=60), max_size=30), st.sampled_from([b"", b"\n", b"12 "]))
def test_framer_bounded_on_any_bytes(chunks: list[bytes], glue: bytes) -> None:
    """Any bytes in any chunks: no exception, messages never longer than the maximum,
    and what is held stays bounded (the maximum, a length prefix and one chunk)."""
    framer = Framer(480)
    for chunk in chunks:
        for message, _ in framer.feed(chunk + glue):
            assert len(message) <= 480
        assert framer.held <= 480 + 11 + len(chunk) + len(glue)


# -- unix sockets ---------------------------------------------------------------------


def test_bind_unix_replaces_stale_socket_with_mode(tmp_path: Path) -> None:
    """A stale socket file is replaced; the new one has the asked permissions at once."""
    path = tmp_path / "log"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stale.bind(str(path))
    stale.close()
    sock = bind_unix(path, socket.SOCK_DGRAM, 0o620, "--syslog-unix")
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o620
        assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]  # no temporary left
    finally:
        sock.close()


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM], ids=["dgram", "stream"])
def test_bind_unix_refuses_live_socket_and_other_files(
    tmp_path: Path, kind: socket.SocketKind
) -> None:
    """A socket something listens on, or a path that is not a socket, is a BindError."""
    live = tmp_path / "live"
    other = socket.socket(socket.AF_UNIX, kind)
    other.bind(str(live))
    if kind == socket.SOCK_STREAM:
        other.listen(1)
    regular = tmp_path / "file"
    regular.write_text("data")
    try:
        with pytest.raises(BindError, match=r"--syslog-unix: .*live' is in use"):
            bind_unix(live, kind, 0o666, "--syslog-unix")
        with pytest.raises(BindError, match=r"--syslog-unix: .*file' exists and is not a socket"):
            bind_unix(regular, kind, 0o666, "--syslog-unix")
        assert regular.read_text() == "data"
    finally:
        other.close()


async def test_socket_file_removed_on_close_unless_replaced(
    tmp_path: Path, spool: MemorySpool
) -> None:
    """close() removes the input's socket file, but not one another process put there."""
    path = tmp_path / "log"
    inp = SyslogDatagramInput("syslog_unix", "--syslog-unix", path)
    await inp.start(spool)
    await inp.close()
    assert not path.exists()
    inp = SyslogDatagramInput("syslog_unix", "--syslog-unix", path)
    await inp.start(spool)
    path.unlink()
    successor = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    successor.bind(str(path))
    try:
        await inp.close()
        assert path.exists()
    finally:
        successor.close()


# -- real clients ---------------------------------------------------------------------


async def test_logger_unix_datagram_dev_log_symlink(tmp_path: Path, spool: MemorySpool) -> None:
    """``logger`` writing to a /dev/log-style symlink reaches the unix datagram input, in
    both formats, with the fields parsed."""
    logger = need("logger")
    path = tmp_path / "syslog.sock"
    dev_log = tmp_path / "dev-log"
    dev_log.symlink_to(path)
    async with started(SyslogDatagramInput("syslog_unix", "--syslog-unix", path), spool):
        await run(logger, "--socket", str(dev_log), "-t", "app", "-p", "daemon.err", "one")
        await run(
            logger,
            *("--socket", str(dev_log), "--rfc5424", "-t", "app", "-p", "local0.info"),
            *("--msgid", "M1", "--sd-id", "ctx@1", "--sd-param", 'user="bob"', "two"),
        )
        recs = await has(spool, 2)
    by = {r["message"]: r for r in recs}
    assert by["one"]["facility"] == "daemon" and by["one"]["severity"] == "err"
    assert by["one"]["app_name"] == "app" and "timestamp" in by["one"]
    two = by["two"]
    assert (two["facility"], two["severity"], two["app_name"]) == ("local0", "info", "app")
    assert two["msgid"] == "M1"
    assert two["structured_data"]["ctx@1"] == {"user": "bob"}
    assert spool.sources == {"syslog_unix"}
    assert not any("parse_error" in r for r in recs)


GLIBC_SYSLOG = """
import syslog
syslog.openlog("glibcapp", syslog.LOG_PID, syslog.LOG_LOCAL1)
syslog.syslog(syslog.LOG_ERR, "from glibc: disk full")
"""


@pytest.mark.root
async def test_glibc_syslog_through_dev_log_symlink(tmp_path: Path, spool: MemorySpool) -> None:
    """glibc's own syslog() (Python's syslog module), in a mount namespace where /dev/log
    is a symlink to the input's socket: the local BSD form parses, PID and all."""
    unshare = need("unshare")
    if os.geteuid() != 0:
        pytest.skip("needs root: a private mount namespace with its own /dev")
    path = tmp_path / "log.sock"
    script = 'mount -t tmpfs tmpfs /dev && ln -s "$1" /dev/log && exec "$2" -c "$3"'
    async with started(SyslogDatagramInput("syslog_unix", "--syslog-unix", path), spool):
        await run(
            unshare, "--mount", "--propagation", "private", "sh", "-c", script,
            "sh", str(path), sys.executable, GLIBC_SYSLOG,
        )  # fmt: skip
        [rec] = await has(spool, 1)
    assert (rec["facility"], rec["severity"], rec["app_name"]) == ("local1", "err", "glibcapp")
    assert rec["procid"].isdigit() and "hostname" not in rec
    assert rec["message"] == "from glibc: disk full"
    assert rec["timestamp"][4] == "-"


async def test_logger_unix_stream(tmp_path: Path, spool: MemorySpool) -> None:
    """``logger --socket`` on a unix stream socket (it falls back from datagram)."""
    logger = need("logger")
    path = tmp_path / "stream.sock"
    inp = SyslogStreamInput("syslog_unix_stream", "--syslog-unix-stream", path)
    async with started(inp, spool):
        for word in ("alpha", "beta"):
            await run(logger, "--socket", str(path), "-t", "app", word)
        recs = await has(spool, 2)
    assert [r["message"] for r in recs] == ["alpha", "beta"]
    assert all(r["app_name"] == "app" for r in recs)
    assert inp.counters.connections == 2


@pytest.mark.parametrize("framing", [["--octet-count"], []], ids=["octet", "newline"])
async def test_logger_tcp_both_framings(spool: MemorySpool, framing: list[str]) -> None:
    """``logger --tcp`` with octet counting and with newline framing, RFC 5424 and 3164."""
    logger = need("logger")
    async with started(SyslogStreamInput("syslog_tcp", "--syslog-tcp", LOCAL), spool) as inp:
        port = str(inp.port)
        for fmt in ("--rfc5424", "--rfc3164"):
            await run(
                logger, "--tcp", "--server", "127.0.0.1", "--port", port, fmt, *framing,
                "-t", "web", "-p", "user.warning", f"hello {fmt}",
            )  # fmt: skip
        recs = await has(spool, 2)
    assert [r["message"] for r in recs] == ["hello --rfc5424", "hello --rfc3164"]
    for r in recs:
        assert (r["app_name"], r["severity"], r["hostname"]) == ("web", "warning", r["hostname"])
        assert r["hostname"]
        assert "parse_error" not in r


async def test_logger_udp(spool: MemorySpool) -> None:
    """``logger --udp`` reaches the UDP input."""
    logger = need("logger")
    async with started(SyslogDatagramInput("syslog_udp", "--syslog-udp", LOCAL), spool) as inp:
        await run(
            logger, "--udp", "--server", "127.0.0.1", "--port", str(inp.port),
            "--rfc5424", "-t", "web", "over udp",
        )  # fmt: skip
        [rec] = await has(spool, 1)
    assert (rec["message"], rec["app_name"]) == ("over udp", "web")


def _emit(handler: logging.Handler, messages: list[str]) -> None:
    log = logging.getLogger(f"syslog-test-{id(handler)}")
    log.propagate = False
    log.addHandler(handler)
    try:
        for m in messages:
            log.warning(m)
    finally:
        log.removeHandler(handler)
        handler.close()


@pytest.mark.parametrize("kind", ["unix", "tcp", "udp"])
async def test_python_syslog_handler(tmp_path: Path, spool: MemorySpool, kind: str) -> None:
    """Python's ``logging.handlers.SysLogHandler`` over a unix datagram socket, TCP and UDP
    (it ends each message with a NUL and sends no timestamp)."""
    inp: SyslogStreamInput | SyslogDatagramInput
    if kind == "unix":
        inp = SyslogDatagramInput("syslog_unix", "--syslog-unix", tmp_path / "log")
    elif kind == "tcp":
        inp = SyslogStreamInput("syslog_tcp", "--syslog-tcp", LOCAL)
    else:
        inp = SyslogDatagramInput("syslog_udp", "--syslog-udp", LOCAL)
    async with started(inp, spool):
        address: Any = str(inp.address) if kind == "unix" else ("127.0.0.1", inp.port)
        socktype = socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM

        def send() -> None:
            handler = logging.handlers.SysLogHandler(
                address, facility="local5", socktype=None if kind == "unix" else socktype
            )
            handler.ident = "pyapp: "
            _emit(handler, ["first", "second"])

        await asyncio.to_thread(send)
        recs = await has(spool, 2)
    assert [r["message"] for r in recs] == ["first", "second"]
    for r in recs:
        assert (r["facility"], r["severity"], r["app_name"]) == ("local5", "warning", "pyapp")


RSYSLOG_CONF = """
global(workDirectory="{work}")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{work}/in.sock")
*.* action(type="omfwd" target="127.0.0.1" port="{port}" protocol="tcp"
           TCP_Framing="octet-counted" template="RSYSLOG_SyslogProtocol23Format")
"""


@pytest.mark.peer
async def test_rsyslog_forwards_octet_counted_rfc5424(tmp_path: Path, spool: MemorySpool) -> None:
    """A real rsyslog (imuxsock -> omfwd TCP, octet-counted, RFC 5424 template) forwarding
    into the TCP input: the app's fields arrive as sent."""
    rsyslogd = need("rsyslogd")
    logger = need("logger")
    async with started(SyslogStreamInput("syslog_tcp", "--syslog-tcp", LOCAL), spool) as inp:
        conf = tmp_path / "rsyslog.conf"
        conf.write_text(RSYSLOG_CONF.format(work=tmp_path, port=inp.port))
        log = (tmp_path / "rsyslog.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            *(rsyslogd, "-n", "-f", str(conf), "-i", str(tmp_path / "pid")),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            sock = tmp_path / "in.sock"
            await eventually(
                lambda: sock.exists() or proc.returncode is not None, "rsyslog's socket"
            )
            assert proc.returncode is None, (tmp_path / "rsyslog.log").read_text()
            await run(
                logger, "--socket", str(sock), "-t", "shop", "-i", "-p", "local2.notice",
                "order 17 paid",
            )  # fmt: skip
            # rsyslog's %msg% keeps the space after "shop:"; RFC 5424 keeps it in MSG.
            await eventually(
                lambda: " order 17 paid" in spool.messages(), "the app's message via rsyslog"
            )
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)
            log.close()
    [rec] = [r for r in spool.records if r["message"] == " order 17 paid"]
    assert (rec["facility"], rec["severity"], rec["app_name"]) == ("local2", "notice", "shop")
    assert rec["hostname"] and rec["procid"].isdigit() and rec["timestamp"][:2] == "20"
    assert not any("parse_error" in r for r in spool.records)
    assert inp.counters.connections >= 1


# -- backpressure and drops -----------------------------------------------------------


def _buffers() -> int:
    """The most bytes the kernel can buffer on one loopback TCP connection (both ends)."""
    rmem = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    wmem = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return rmem + wmem


async def test_tcp_backpressure_pauses_client_nothing_lost(spool: MemorySpool) -> None:
    """Once the spool is full the TCP input reads no more: a client writing more than every
    buffer can hold is held up; once there is space, every message arrives, in order."""
    line = b"<14>1 - h app - - - " + b"x" * 1000 + b" %08d\n"
    size = len(line % 0)
    spool.capacity = 200  # full after ~200 records: mid-stream, not before the first read
    count = (_buffers() + 200 * size + 4 * READ_CHUNK) // size + 1000
    payload = b"".join(line % i for i in range(count))
    async with started(SyslogStreamInput("syslog_tcp", "--syslog-tcp", LOCAL), spool) as inp:
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
            assert inp.counters.bytes_read <= len(spool.records) * size + 2 * READ_CHUNK
            assert not done.is_set()
            spool.capacity = None
            spool.full = False
            await has(spool, count)
        finally:
            spool.full = False
            await asyncio.wait_for(sender, 60)
    assert [r["message"][-8:] for r in spool.records] == [f"{i:08d}" for i in range(count)]
    assert inp.counters.messages == count


async def test_udp_drops_counted_when_spool_full(spool: MemorySpool) -> None:
    """A full spool drops datagrams, every one counted; later ones get through."""
    spool.full = True
    async with started(SyslogDatagramInput("syslog_udp", "--syslog-udp", LOCAL), spool) as inp:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(50):
                s.sendto(b"<14>dropped %d" % i, ("127.0.0.1", inp.port))
            await eventually(lambda: inp.counters.dropped == 50, "50 drops counted")
            assert spool.records == []
            spool.full = False
            s.sendto(b"<14>kept", ("127.0.0.1", inp.port))
            await has(spool, 1)
    assert spool.messages() == ["kept"]
    assert inp.collect()["dropped"] == 50


async def test_unparseable_and_oversized_counted(spool: MemorySpool) -> None:
    """A message without PRI is kept raw and counted; an over-long one cut and counted."""
    inp = SyslogStreamInput("syslog_tcp", "--syslog-tcp", LOCAL, max_message=480)
    async with started(inp, spool):
        _, writer = await asyncio.open_connection("127.0.0.1", inp.port)
        writer.write(b"not syslog at all\n<13>" + b"y" * 1000 + b"\n")
        await writer.drain()
        writer.close()
        recs = await has(spool, 2)
    assert recs[0] == {"message": "not syslog at all", "parse_error": "syslog"}
    assert recs[1]["truncated"] is True and len(recs[1]["message"]) == 480 - 4
    c = inp.collect()
    assert (c["parse_errors"], c["truncated"], c["messages"]) == (1, 1, 2)


# -- configuration --------------------------------------------------------------------


def test_config_bare_port_binds_loopback() -> None:
    """``--syslog-tcp 5514`` binds 127.0.0.1; a host is used only when given."""
    cfg = build({"syslog_tcp": "5514", "syslog_udp": "0.0.0.0:514", **SPOOL}, {}, {})
    assert cfg.syslog_tcp == HostPort("127.0.0.1", 5514)
    assert cfg.syslog_udp == HostPort("0.0.0.0", 514)
    assert cfg.path == ()  # a syslog input alone is enough


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"syslog_tcp": "nope"}, "--syslog-tcp: 'nope' is not HOST:PORT"),
        ({"syslog_unix": "/x"}, "--spool-dir: missing (--syslog-unix needs"),
        (
            {"syslog_unix": "/x", "syslog_socket_mode": "999", **SPOOL},
            "--syslog-socket-mode: '999' is not",
        ),
        (
            {"syslog_unix": "/x", "syslog_max_message": "10", **SPOOL},
            "--syslog-max-message: 10 is out of range",
        ),
        (
            {"syslog_unix": "/x", "syslog_unix_stream": "/x", **SPOOL},
            "--syslog-unix-stream: '/x' is also",
        ),
    ],
)
def test_config_errors_name_the_option(flags: dict[str, str], message: str) -> None:
    """Bad syslog options are one-line errors naming the option and the value."""
    with pytest.raises(ConfigError) as err:
        build(flags, {}, {})
    assert str(err.value).startswith(message)


# -- end to end: the adapter command, a file sink -------------------------------------


@pytest.mark.peer
def test_adapter_command_syslog_inputs_to_file_sink(tmp_path: Path, procs: list[Proc]) -> None:
    """``podpatterns adapter`` with the four syslog inputs and a file sink: logger (unix
    datagram via a /dev/log symlink, unix stream, UDP), SysLogHandler and a real rsyslog
    forwarding over TCP all arrive with their fields and their input; SIGTERM exits 0 and
    removes the socket files."""
    logger = need("logger")
    rsyslogd = need("rsyslogd")
    dgram, stream, out = tmp_path / "log.sock", tmp_path / "stream.sock", tmp_path / "out.ndjson"
    adapter = Proc(
        "adapter",
        *("--syslog-unix", str(dgram), "--syslog-unix-stream", str(stream)),
        *("--syslog-tcp", "127.0.0.1:0", "--syslog-udp", "127.0.0.1:0"),
        *("--spool-dir", str(tmp_path / "spool"), "--sink", "file", "--sink-path", str(out)),
        *("--admin", "127.0.0.1:0"),
    )
    procs.append(adapter)

    def port(name: str) -> int:
        event = adapter.wait_event("input_listening", lambda e: e.get("input") == name)
        return int(str(event["address"]).rsplit(":", 1)[1])

    tcp, udp = port("syslog_tcp"), port("syslog_udp")
    adapter.wait_event("adapter_started")
    dev_log = tmp_path / "dev-log"
    dev_log.symlink_to(dgram)
    subprocess.run([logger, "--socket", str(dev_log), "-t", "a", "via dev log"], check=True)
    subprocess.run([logger, "--socket", str(stream), "-t", "b", "via stream"], check=True)
    subprocess.run(
        [logger, "--udp", "--server", "127.0.0.1", "--port", str(udp), "-t", "c", "via udp"],
        check=True,
    )
    handler = logging.handlers.SysLogHandler(("127.0.0.1", tcp), socktype=socket.SOCK_STREAM)
    handler.ident = "d: "
    _emit(handler, ["via handler"])
    conf = tmp_path / "rsyslog.conf"
    conf.write_text(RSYSLOG_CONF.format(work=tmp_path, port=tcp))
    with (tmp_path / "rsyslog.log").open("wb") as log:
        rsyslog = subprocess.Popen(
            [rsyslogd, "-n", "-f", str(conf), "-i", str(tmp_path / "pid")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: (tmp_path / "in.sock").exists() or rsyslog.poll() is not None)
        assert rsyslog.poll() is None, (tmp_path / "rsyslog.log").read_text()
        subprocess.run(
            [logger, "--socket", str(tmp_path / "in.sock"), "-t", "e", "via rsyslog"], check=True
        )

        def records() -> dict[str, dict[str, Any]]:
            text = out.read_text() if out.exists() else ""
            recs = [json.loads(ln) for ln in text.splitlines()]
            return {r["message"].strip(): r for r in recs if r["message"].startswith(("v", " v"))}

        got = wait_until(lambda: len(r := records()) == 5 and r, "5 records in the file sink")
        with urllib.request.urlopen(adapter.admin_url() + "/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
    finally:
        rsyslog.terminate()
        rsyslog.wait(15)
    assert adapter.terminate() == 0
    expected = {
        "via dev log": ("a", "syslog_unix"),
        "via stream": ("b", "syslog_unix_stream"),
        "via udp": ("c", "syslog_udp"),
        "via handler": ("d", "syslog_tcp"),
        "via rsyslog": ("e", "syslog_tcp"),
    }
    assert {m: (r.get("app_name"), r["input"]) for m, r in got.items()} == expected
    assert all(r["severity"] == "notice" or m == "via handler" for m, r in got.items())
    assert not dgram.exists() and not stream.exists()
    # Per input, never per peer: one series per input and event.
    for name in ("syslog_unix", "syslog_unix_stream", "syslog_udp"):
        sample = f'podpatterns_adapter_input_events_total{{event="messages",input="{name}"}} 1.0'
        assert sample in metrics, metrics
    assert "port" not in metrics.split("podpatterns_adapter_input_events_total", 1)[1]
    assert 'event="connections",input="syslog_udp"' not in metrics  # datagrams have none


async def test_syslog_tcp_backpressure_through_the_real_spool(tmp_path: Path) -> None:
    """The adapter with its real spool, the sink down: once the spool is full the syslog
    TCP input stops reading and the app's writes block; once the sink is back, every
    message arrives exactly once."""
    sink = ListSink()
    sink.set_down(True)
    mib = 1024 * 1024
    cfg = AdapterConfig(
        syslog_tcp=LOCAL,
        spool_dir=tmp_path / "spool",
        spool_max_bytes=mib,
        queue_max_bytes=mib,
        batch_max_bytes=mib,
        batch_max_records=500,
    )
    adapter = Adapter(cfg, sink=sink)
    await adapter.start()
    [inp] = adapter.inputs
    assert isinstance(inp, SyslogStreamInput)
    total = 0
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", inp.port)
        total = await write_until_blocked(
            writer, lambda seq: f"<14>1 - h app - - - seq={seq} {'x' * 80}\n"
        )
        # Read: what the full spool holds (records are larger spooled than sent) and a
        # chunk waiting for space; the rest is in the socket buffers and the writer.
        assert inp.counters.bytes_read <= mib + 2 * READ_CHUNK
        await resume_until_delivered(sink, writer, total)
    finally:
        sink.set_down(False)
        adapter.stop_accepting()
        await asyncio.wait_for(adapter.wait_drained(), 30)
        await adapter.close()
    check_delivery(sink.seqs(), total, max_duplicates=0)
    assert {r["input"] for r in sink.records} == {"syslog_tcp"}
    assert inp.counters.dropped == 0
