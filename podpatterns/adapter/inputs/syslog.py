"""Syslog inputs: unix datagram and stream sockets, TCP (RFC 6587) and UDP.

Each listener is an :class:`~podpatterns.adapter.inputs.Input`. What arrives is framed,
parsed (RFC 5424, else RFC 3164 as apps and ``glibc``'s ``syslog()`` write it) into a
record and handed to the spool; a message that does not parse is kept raw, marked
``parse_error``, and counted.

- **Stream inputs** (TCP, unix stream) read a chunk, append its messages, and await
  :meth:`~podpatterns.adapter.inputs.Spool.wait_for_space` before reading the next one:
  while the spool is full nothing is read, the socket buffers fill and the app's writes
  block (backpressure, nothing lost). Framing is detected per message as rsyslog's
  ``imtcp`` does (RFC 6587): a frame starting with a digit is octet-counted
  (``LEN SP MSG``), anything else runs to the next LF (or NUL, which ``glibc`` ends
  stream messages with). The common stream, LF-framed messages, is appended as it
  arrived (:meth:`~podpatterns.adapter.inputs.Spool.append_raw`, the complete frames of
  the chunk; an incomplete last one waits for the next chunk) and parsed when the spool
  is read back (:func:`decode_block`): the spool makes the bytes durable without a record
  built or encoded first. Anything else (octet counting, NUL delimiters, an over-long
  frame) is framed and parsed first and appended as records.
- **Datagram inputs** (UDP, unix datagram) cannot push back: received messages are
  batched and appended by one task; what the spool refuses (:class:`SpoolFull`) or what
  exceeds the pending bound while an append is in flight is dropped and counted.

Counters are per input (never per peer: a label per peer port would be unbounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from podpatterns import logs
from podpatterns.adapter.inputs import Record, Spool, SpoolFull, bind_input, port_of
from podpatterns.adapter.inputs.stream import Connection, StreamServer
from podpatterns.listen import remove_unix
from podpatterns.options import HostPort
from podpatterns.tasks import TaskSet

if TYPE_CHECKING:
    from podpatterns.adapter.config import AdapterConfig

__all__ = [
    "FACILITIES",
    "SEVERITIES",
    "Framer",
    "SyslogCounters",
    "SyslogDatagramInput",
    "SyslogStreamInput",
    "decode_block",
    "inputs_from_config",
    "parse_message",
]

FACILITIES = (
    "kern",
    "user",
    "mail",
    "daemon",
    "auth",
    "syslog",
    "lpr",
    "news",
    "uucp",
    "cron",
    "authpriv",
    "ftp",
    "ntp",
    "security",
    "console",
    "solaris-cron",
    *(f"local{i}" for i in range(8)),
)
"""Facility names by code (RFC 5424 table 1, with rsyslog's names)."""
SEVERITIES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
"""Severity names by code (RFC 5424 table 2)."""

READ_CHUNK = 256 * 1024
"""Bytes a stream input reads (and appends) per turn."""
DATAGRAM_BATCH = 2000
"""Most datagrams parsed and appended at once."""
DATAGRAM_PENDING_BYTES = 4 * 1024 * 1024
"""Bytes of datagram records waiting for an append in flight; beyond it, dropped."""

# -- parsing ------------------------------------------------------------------------------

_MONTHS = {
    m: i + 1
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
    )
}


# RFC 5424 6.3: SD-ELEMENT = "[" SD-ID *(SP SD-PARAM) "]", SD-PARAM = NAME "=" %d34 VALUE %d34
# (names and SD-IDs: printable, no '=', SP, ']' or '"'; in a value '"', '\' and ']' are
# escaped with a backslash). One match checks a whole message; the elements are then
# taken apart.
_SD_NAME = r'[^ \]="]+'
_SD_TEXT = r'(?:[^"\\]|\\.)*'  # a PARAM-VALUE between its quotes
_SD_PARAMS = rf'(?: {_SD_NAME}="{_SD_TEXT}")*'
_SD_TOKEN = re.compile(rf'(?:^|(?<=\]))\[({_SD_NAME})|({_SD_NAME})="({_SD_TEXT})"')
_SD_ESCAPE = re.compile(r'\\(["\\\]])')
_RFC5424 = re.compile(
    rf"1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|(?:\[{_SD_NAME}{_SD_PARAMS}\])+)(?: (.*))?\Z",
    re.DOTALL,
)
_PRI = [(FACILITIES[p >> 3], SEVERITIES[p & 7]) for p in range(192)]


def _parse_sd(text: str) -> dict[str, dict[str, str]]:
    """RFC 5424 STRUCTURED-DATA (already matched) as ``{SD-ID: {name: value}}``.

    ``[id k="v" k2="v\\"2"][id2]`` becomes ``{"id": {"k": "v", "k2": 'v"2'}, "id2": {}}``
    (PARAM-VALUE escapes undone).
    """
    out: dict[str, dict[str, str]] = {}
    if "\\" not in text:
        # No escapes (the common case): '"' and ']' occur only as the grammar (checked
        # already) places them, so plain splits take it apart, faster than the scan:
        # 'a="1" b="2"' without its last '"' splits at '"' into 'a=', '1', ' b=', '2'.
        for element in text[1:-1].split("]["):
            sd_id, _, rest = element.partition(" ")
            found = out.setdefault(sd_id, {})
            if rest:
                parts = iter(rest[:-1].split('"'))
                for name, value in zip(parts, parts, strict=False):
                    found[name.lstrip(" ")[:-1]] = value
        return out
    return _sd_scan(text)


def _sd_scan(text: str) -> dict[str, dict[str, str]]:
    """:func:`_parse_sd` by a scan of tokens: for any STRUCTURED-DATA, escapes too."""
    out: dict[str, dict[str, str]] = {}
    params: dict[str, str] = {}
    # One scan: an SD-ID opens an element, each NAME="VALUE" after it belongs to it.
    for sd_id, name, value in _SD_TOKEN.findall(text):
        if sd_id:
            params = out.setdefault(sd_id, {})
        else:
            params[name] = _SD_ESCAPE.sub(r"\1", value) if "\\" in value else value
    return out


def _rfc5424(rec: Record, text: str, pos: int) -> Record | None:
    m = _RFC5424.match(text, pos)
    if m is None:
        return None
    timestamp, hostname, app_name, procid, msgid, sd, message = m.groups()
    if timestamp != "-":
        rec["timestamp"] = timestamp
    if hostname != "-":
        rec["hostname"] = hostname
    if app_name != "-":
        rec["app_name"] = app_name
    if procid != "-":
        rec["procid"] = procid
    if msgid != "-":
        rec["msgid"] = msgid
    if sd != "-":
        rec["structured_data"] = _parse_sd(sd)
    if message is None:
        message = ""
    rec["message"] = message[1:] if message.startswith("\ufeff") else message  # the BOM
    return rec


def _timestamp_3164(text: str, now: time.struct_time) -> str | None:
    """``Mmm dd hh:mm:ss`` as ISO 8601 (local time; the year inferred as rsyslog does)."""
    month = _MONTHS.get(text[:3])
    day = text[4:6].strip()
    clock = text[7:15]
    if (
        month is None
        or text[3] != " "
        or not day.isdigit()
        or len(clock) != 8
        or clock[2] != ":"
        or clock[5] != ":"
        or not clock.replace(":", "").isdigit()
    ):
        return None
    year = now.tm_year
    if month > now.tm_mon + 1:  # a December message received in January
        year -= 1
    return f"{year:04d}-{month:02d}-{int(day):02d}T{clock}"


def _tag(rec: Record, text: str) -> str:
    """Split ``TAG[PID]: `` off ``text`` into app_name and procid; the message is left."""
    colon = text.find(":", 0, 64)
    if colon <= 0:
        return text
    tag = text[:colon]
    procid = None
    if tag.endswith("]"):
        bracket = tag.find("[")
        if bracket <= 0:
            return text
        tag, procid = tag[:bracket], tag[bracket + 1 : -1]
    if not tag or " " in tag or "[" in tag:
        return text
    rec["app_name"] = tag
    if procid:
        rec["procid"] = procid
    rest = text[colon + 1 :]
    return rest[1:] if rest.startswith(" ") else rest


def _rfc3164(rec: Record, rest: str, now: time.struct_time) -> Record:
    # What arrives as "BSD syslog" varies: remote senders write "TIMESTAMP HOST TAG: MSG",
    # glibc's syslog() on /dev/log "TIMESTAMP TAG[PID]: MSG" (no host), Python's
    # SysLogHandler only "MSG" (with its ident prefix, if set). Like rsyslog, the word
    # after the timestamp is a host name only when it cannot be a tag.
    stamp = _timestamp_3164(rest, now) if len(rest) > 15 and rest[15] == " " else None
    if stamp is not None:
        rec["timestamp"] = stamp
        rest = rest[16:]
        word, sep, after = rest.partition(" ")
        if sep and word and not word.endswith(":") and "[" not in word:
            rec["hostname"] = word
            rest = after
    rec["message"] = _tag(rec, rest)
    return rec


def parse_message(text: str, now: time.struct_time | None = None) -> Record | None:
    """One syslog message (without framing) as a record; ``None`` when it has no PRI.

    Fields: ``facility`` and ``severity`` (names), ``timestamp``, ``hostname``,
    ``app_name``, ``procid``, ``msgid``, ``structured_data`` (``{SD-ID: {name: value}}``)
    and ``message``; fields the message leaves out (or sets to RFC 5424's ``-``) are
    absent. RFC 3164 timestamps become ISO 8601 without an offset (the sender's local
    time), the year inferred.

    Args:
        text: the message.
        now: the local time the year of an RFC 3164 timestamp is inferred from.
    """
    end = text.find(">", 1, 5)
    if not text.startswith("<") or end < 2 or not text[1:end].isdigit():
        return None
    pri = int(text[1:end])
    if pri > 191:
        return None
    facility, severity = _PRI[pri]
    rec: Record = {"facility": facility, "severity": severity}
    if text.startswith("1 ", end + 1):
        return _rfc5424(rec, text, end + 1)
    return _rfc3164(rec, text[end + 1 :], now or time.localtime())


# -- framing ------------------------------------------------------------------------------


class Framer:
    """Split a syslog byte stream into messages (RFC 6587), detected per message.

    A frame starting with a digit is octet-counted (``LEN SP MSG``); any other runs to
    the next LF or NUL (non-transparent framing; a CR before the LF is dropped). A
    message longer than ``max_message`` keeps its first ``max_message`` bytes and is
    marked truncated; the rest is skipped (an octet-counted one exactly by its length, so
    the next frame is found), never held.

    Args:
        max_message: longest message kept.
    """

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        self._skip = 0  # bytes of an over-long octet-counted frame still to skip
        self._skip_line = False  # inside an over-long delimited frame: skip to LF/NUL

    @property
    def held(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[bytes, bool]]:
        """Add the next bytes; return the complete messages as ``(bytes, truncated)``."""
        buf = self._buf
        buf += data
        out: list[tuple[bytes, bool]] = []
        limit = self.max_message
        pos = 0
        if not (self._skip or self._skip_line or b"\0" in buf):
            pos = self._lf_frames(buf, out)
        n = len(buf)
        while pos < n:
            if self._skip:
                step = min(self._skip, n - pos)
                self._skip -= step
                pos += step
                continue
            if self._skip_line:
                end = _delimiter(buf, pos)
                if end < 0:
                    pos = n
                    break
                self._skip_line = False
                pos = end + 1
                continue
            first = buf[pos]
            if first in b"\n\0\r ":  # between frames (an LF after an octet-counted one)
                pos += 1
                continue
            if 0x30 <= first <= 0x39:  # a digit: octet counting, if "LEN SP" follows
                space = buf.find(b" ", pos, pos + 11)
                if space < 0 and n - pos < 11 and buf[pos:].isdigit():
                    break  # the length is not complete yet
                if space > pos and buf[pos:space].isdigit():
                    length = int(buf[pos:space])
                    start = space + 1
                    keep = min(length, limit)
                    if n - start < keep:
                        break
                    out.append((bytes(buf[start : start + keep]), length > limit))
                    self._skip = length - keep
                    pos = start + keep
                    continue
            end = _delimiter(buf, pos)
            if end < 0:
                if n - pos > limit:
                    out.append((bytes(buf[pos : pos + limit]), True))
                    self._skip_line = True
                    pos = n
                break
            out.append(self._delimited(buf, pos, end))
            pos = end + 1
        del buf[:pos]
        return out

    def take(self, data: bytes) -> bytes | None:
        """The fast path for LF-framed streams: add ``data``; return the complete frames
        held as they arrived (``b""`` if none is complete yet).

        A new :class:`Framer` with the same ``max_message`` splits what this returns into
        the very messages :meth:`feed` would have returned (:func:`decode_block`); the
        incomplete last frame is held. Returns ``None``, and takes nothing, when the
        stream needs :meth:`feed`: inside an over-long frame, a NUL, a frame that starts
        with a digit (octet counting may follow), an incomplete frame longer than
        ``max_message``.
        """
        if self._skip or self._skip_line:
            return None
        whole = bytes(self._buf) + data if self._buf else data
        end = whole.rfind(b"\n") + 1
        if (
            len(whole) - end > self.max_message
            or b"\0" in whole
            or _DIGIT_FIRST.match(whole)
            or _DIGIT_NEXT.search(whole, 0, end)
        ):
            return None
        self._buf = bytearray(whole[end:])
        return whole[:end]

    def _lf_frames(self, buf: bytearray, out: list[tuple[bytes, bool]]) -> int:
        """The fast path for the common stream, LF-framed messages only: split at once,
        up to the first frame that starts with a digit (octet counting may follow: the
        careful loop takes over there). Returns where it stopped."""
        end = buf.rfind(b"\n")
        if end < 0:
            return 0
        limit = self.max_message
        pos = 0
        for part in bytes(buf[:end]).split(b"\n"):
            head = part.lstrip(b" \r")
            if head[:1].isdigit():
                return pos
            pos += len(part) + 1
            if not head:
                continue
            if head[-1:] == b"\r":
                head = head[:-1]
            out.append((head[:limit], True) if len(head) > limit else (head, False))
        return pos

    def _delimited(self, buf: bytearray, pos: int, end: int) -> tuple[bytes, bool]:
        if buf[end - 1] == 0x0D and buf[end] == 0x0A:
            end -= 1
        if end - pos > self.max_message:
            return bytes(buf[pos : pos + self.max_message]), True
        return bytes(buf[pos:end]), False

    def flush(self) -> tuple[bytes, bool] | None:
        """The held incomplete frame, at the end of the stream (``None`` if nothing)."""
        data = bytes(self._buf).strip(b"\r\n\0 ")
        self._buf.clear()
        self._skip = 0
        self._skip_line = False
        return (data[: self.max_message], len(data) > self.max_message) if data else None


# A frame starting with a digit (after spaces or CRs), first in a chunk or after an LF.
_DIGIT_FIRST = re.compile(rb"[ \r]*[0-9]")
_DIGIT_NEXT = re.compile(rb"\n[ \r]*[0-9]")


def _delimiter(buf: bytearray, pos: int) -> int:
    """Index of the first LF or NUL at or after ``pos``; -1 if none."""
    lf = buf.find(b"\n", pos)
    nul = buf.find(b"\0", pos, lf if lf >= 0 else len(buf))
    return nul if nul >= 0 else lf


# -- counters and records -------------------------------------------------------------


@dataclass
class SyslogCounters:
    """One input's counters (plain integers, read at scrape time).

    Attributes:
        messages: messages turned into records.
        bytes_read: bytes received (frames and datagrams as they arrived).
        parse_errors: messages kept raw (no valid PRI, malformed RFC 5424).
        invalid_utf8: messages with invalid UTF-8 (replaced).
        truncated: messages longer than the maximum (cut and marked).
        dropped: messages dropped: datagrams (spool full, or too many pending), and a
            stream's last chunk when shutting down with the spool full.
        connections: stream connections accepted.
        connections_open: stream connections open now.
        connection_errors: stream connections ended by an error.
        paused: stream appends refused because the spool was full (the connection
            paused).
    """

    messages: int = 0
    bytes_read: int = 0
    parse_errors: int = 0
    invalid_utf8: int = 0
    truncated: int = 0
    dropped: int = 0
    connections: int = 0
    connections_open: int = 0
    connection_errors: int = 0
    paused: int = 0


_STREAM_COUNTERS = ("connections", "connections_open", "connection_errors", "paused")


class _Records:
    """Messages -> records, counted."""

    def __init__(self, counters: SyslogCounters) -> None:
        self.counters = counters

    def decode(self, data: bytes, source: str, max_message: int) -> list[Record]:
        """The records of complete frames taken by :meth:`Framer.take`, ``input`` set."""
        framer = Framer(max_message)
        messages = framer.feed(data)
        last = framer.flush()
        if last is not None:  # not from take(): a block always ends with its LF
            messages.append(last)
        out = self.make(messages)
        for rec in out:
            rec["input"] = source
        return out

    def make(self, messages: list[tuple[bytes, bool]]) -> list[Record]:
        c = self.counters
        now = time.localtime()
        out: list[Record] = []
        for data, truncated in messages:
            data = data.rstrip(b"\n\0")
            try:
                text = data.decode()
            except UnicodeDecodeError:
                text = data.decode("utf-8", "replace")
                c.invalid_utf8 += 1
            try:
                rec = parse_message(text, now)
            except Exception:  # a parser bug must not stop the input: count it
                rec = None
            if rec is None:
                c.parse_errors += 1
                rec = {"message": text, "parse_error": "syslog"}
            if truncated:
                rec["truncated"] = True
                c.truncated += 1
            out.append(rec)
        c.messages += len(out)
        return out


def decode_block(data: bytes, source: str) -> list[Record]:
    """The records of a raw syslog block in the spool, when no input registered its own
    decoder (after a restart without that input): counted nowhere, default maximum
    message size."""
    return _Records(SyslogCounters()).decode(data, source, 64 * 1024)


class _Listening:
    """What the syslog inputs share: binding, the unix socket file, counters.

    Args:
        name: the input's name (the records' ``input``, the metrics' ``input``).
        option: the option it comes from, for errors.
        address: ``HostPort`` for TCP/UDP, a ``Path`` for a unix socket.
        mode: permissions of the unix socket file.
        max_message: longest message kept (longer ones truncated and counted).
    """

    kind: ClassVar[socket.SocketKind]

    def __init__(
        self,
        name: str,
        option: str,
        address: HostPort | Path,
        *,
        mode: int = 0o666,
        max_message: int = 64 * 1024,
    ) -> None:
        self.name = name
        self.counters = SyslogCounters()
        self.max_message = max_message
        self._option = option
        self._configured = address
        self._mode = mode
        self._unix_ino: int | None = None
        self._records = _Records(self.counters)
        self._tasks = TaskSet(name)
        self._log = logs.get("adapter")
        self._spool: Spool | None = None
        self._closing = False
        self.address: HostPort | Path | None = None
        """Where the input listens once started (the port the kernel chose, if 0)."""
        self._setup()

    def _setup(self) -> None:
        """The subclass's own state."""

    async def start(self, spool: Spool) -> None:
        """Bind and start serving.

        Raises:
            BindError: the address or path cannot be bound.
        """
        self._spool = spool
        await self._serve_on(self._bind())
        self._log.info("input_listening", input=self.name, address=str(self.address))

    async def _serve_on(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def _bind(self) -> socket.socket:
        bound = bind_input(
            self.name, self._option, self._configured, self.kind, self._mode, self._log
        )
        self.address, self._unix_ino = bound.address, bound.unix_ino
        return bound.sock

    @property
    def port(self) -> int:
        """The TCP or UDP port listened on (the one the kernel chose for port 0).

        Raises:
            RuntimeError: not started, or a unix socket.
        """
        return port_of(self.name, self.address)

    def _remove_socket_file(self) -> None:
        """Remove our unix socket file, unless another process has replaced it since."""
        if isinstance(self._configured, Path):
            remove_unix(self._configured, self._unix_ino)
            self._unix_ino = None

    def is_live(self) -> bool:
        """No task of the input has died."""
        return self._tasks.healthy

    def collect(self) -> dict[str, float]:
        """The input's counters (name -> value), those of connections for streams only."""
        c = self.counters
        skip = () if self.kind == socket.SOCK_STREAM else _STREAM_COUNTERS
        return {f.name: float(getattr(c, f.name)) for f in fields(c) if f.name not in skip}


class SyslogStreamInput(_Listening):
    """Syslog over TCP or a unix stream socket (RFC 6587 framing), with backpressure.

    Arguments as :class:`_Listening`'s; ``address`` a ``HostPort`` for TCP, a ``Path``
    for a unix stream socket.
    """

    kind = socket.SOCK_STREAM

    def _setup(self) -> None:
        self._server = StreamServer(
            self.name,
            self._option,
            self._configured,
            self._serve,
            self.counters,
            read_chunk=READ_CHUNK,
            mode=self._mode,
        )

    async def start(self, spool: Spool) -> None:
        """Bind and start serving.

        Raises:
            BindError: the address or path cannot be bound.
        """
        self._spool = spool
        await self._server.start(spool)
        self.address = self._server.address

    async def _serve(self, conn: Connection) -> None:
        server = self._server
        spool = server.spool
        framer = Framer(self.max_message)
        c = self.counters
        while not server.closing:
            data = await conn.read()
            if data is None:
                data = b""  # the connection failed: what the framer holds is appended
            c.bytes_read += len(data)
            block = framer.take(data) if data else None
            if block:
                count = block.count(b"\n")
                if not await server.append(
                    functools.partial(
                        spool.append_raw,
                        block,
                        source=self.name,
                        kind="syslog",
                        count=count,
                        decode=self._decode,
                    )
                ):
                    c.dropped += count
                continue
            if block is not None:
                continue
            # At the end, feed() first: what take() held may start with a digit
            # (octet counting), which only feed() frames.
            messages = framer.feed(data)
            if not data:
                last = framer.flush()
                if last is not None:
                    messages.append(last)
            if messages:
                records = self._records.make(messages)
                if not await server.append(
                    functools.partial(spool.append, records, source=self.name)
                ):
                    c.dropped += len(records)
            if not data:
                return

    def _decode(self, data: bytes, source: str) -> list[Record]:
        return self._records.decode(data, source, self.max_message)

    async def close(self) -> None:
        """Stop accepting; connections idle in a read end, appends in flight finish
        (within :data:`~podpatterns.adapter.inputs.stream.CLOSE_TIMEOUT`)."""
        self._closing = True
        await self._server.close()

    def is_live(self) -> bool:
        """No connection task of the input has died of a bug."""
        return self._server.is_live()


class SyslogDatagramInput(_Listening):
    """Syslog over UDP or a unix datagram socket: best effort, every drop counted.

    Arguments as :class:`_Listening`'s (``address`` a ``HostPort`` for UDP, a ``Path``
    for a unix datagram socket such as ``/dev/log``). Messages received while an append
    is in flight wait, up to :data:`DATAGRAM_PENDING_BYTES`; beyond it they are dropped.
    """

    kind = socket.SOCK_DGRAM

    def _setup(self) -> None:
        self._pending: list[tuple[bytes, bool]] = []
        self._pending_bytes = 0
        self._wake = asyncio.Event()
        self._transport: asyncio.DatagramTransport | None = None
        self._flusher: asyncio.Task[None] | None = None

    async def _serve_on(self, sock: socket.socket) -> None:
        if sock.family == socket.AF_UNIX:
            # A sender must never block on a full receive queue: default sizes are small.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _DatagramProtocol(self._received), sock=sock
        )
        self._flusher = self._tasks.spawn(
            self._flush_loop(), f"{self.name}-append", may_return=True
        )

    def _received(self, data: bytes) -> None:
        c = self.counters
        c.bytes_read += len(data)
        data = data.rstrip(b"\n\0\r")
        if not data:
            return
        truncated = len(data) > self.max_message
        if truncated:
            data = data[: self.max_message]
        if self._pending_bytes + len(data) > DATAGRAM_PENDING_BYTES:
            c.dropped += 1
            return
        self._pending.append((data, truncated))
        self._pending_bytes += len(data)
        self._wake.set()

    async def _flush_loop(self) -> None:
        # Returning is its end only once closing and nothing is pending.
        while True:
            await self._wake.wait()
            await self._flush()
            if self._closing and not self._pending:
                return

    async def _flush(self) -> None:
        assert self._spool is not None
        self._wake.clear()
        while self._pending:
            # At most DATAGRAM_BATCH per append: parsing a large backlog at once would
            # hold the event loop (and every other input) for too long.
            messages = self._pending[:DATAGRAM_BATCH]
            del self._pending[:DATAGRAM_BATCH]
            self._pending_bytes -= sum(len(m) for m, _ in messages)
            records = self._records.make(messages)
            try:
                await self._spool.append(records, source=self.name)
            except SpoolFull:
                self.counters.dropped += len(records)

    async def close(self) -> None:
        """Stop receiving; what was received is appended (or counted as dropped)."""
        self._closing = True
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._flusher is not None and not self._flusher.done():
            self._wake.set()
            await asyncio.wait([self._flusher])
        await self._tasks.aclose()
        self._remove_socket_file()


class _DatagramProtocol(asyncio.DatagramProtocol):
    def __init__(self, received: Callable[[bytes], None]) -> None:
        self._received = received

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self._received(data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors on an unconnected UDP socket concern no one here


def inputs_from_config(config: AdapterConfig) -> list[SyslogStreamInput | SyslogDatagramInput]:
    """The syslog inputs ``config`` asks for (``--syslog-unix`` and the others)."""
    kw: dict[str, Any] = {
        "mode": config.syslog_socket_mode,
        "max_message": config.syslog_max_message,
    }
    out: list[SyslogStreamInput | SyslogDatagramInput] = []
    if config.syslog_unix is not None:
        out.append(SyslogDatagramInput("syslog_unix", "--syslog-unix", config.syslog_unix, **kw))
    if config.syslog_unix_stream is not None:
        out.append(
            SyslogStreamInput(
                "syslog_unix_stream", "--syslog-unix-stream", config.syslog_unix_stream, **kw
            )
        )
    if config.syslog_tcp is not None:
        out.append(SyslogStreamInput("syslog_tcp", "--syslog-tcp", config.syslog_tcp, **kw))
    if config.syslog_udp is not None:
        out.append(SyslogDatagramInput("syslog_udp", "--syslog-udp", config.syslog_udp, **kw))
    return out
