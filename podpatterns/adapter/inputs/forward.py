"""The Fluent forward input: what fluent-logger libraries, Fluentd and Fluent Bit send.

The Forward Protocol v1 (fluentd's wiki, "Forward Protocol Specification v1") over TCP
or a unix stream socket: a stream of msgpack arrays, each one message in one of the
modes

==========================  ==========================================================
Message                     ``[tag, time, record, option?]`` (fluent-logger)
Forward                     ``[tag, [[time, record], ...], option?]``
PackedForward               ``[tag, entries, option?]``, ``entries`` a msgpack stream
                            of ``[time, record]`` in a bin (or str)
CompressedPackedForward     the same, gzip-compressed, ``option.compressed == "gzip"``
                            (Fluentd's out_forward ``compress gzip``, Fluent Bit's
                            ``Compress gzip``)
==========================  ==========================================================

``time`` is an EventTime (msgpack ext type 0: seconds and nanoseconds), an integer
(seconds) or a float; ``nil`` or 0 means "now", as for Fluentd; an entry's time may be
``[time, metadata]`` (Fluent Bit 2.1+ event metadata, kept under ``metadata``). Each event becomes a
record: the event's record with ``tag`` (the message's tag) and ``timestamp`` (RFC 3339,
nanoseconds, UTC) added, the way the other inputs name them; a record's own ``tag``,
``timestamp`` or ``input`` is kept under ``record.KEY``. msgpack binary values become
text (UTF-8, invalid bytes replaced), other ext types base64.

Delivery: a message whose ``option`` carries ``chunk`` is answered ``{"ack": chunk}``
only once every event of it was appended to the spool (fsync'ed). That is what Fluentd's
``require_ack_response`` and Fluent Bit's ``Require_ack_response`` wait for: a chunk not
acknowledged is sent again, so an acknowledged event is never lost (at least once, as
the HTTP input's 200). Without ``chunk`` (fluent-logger-python) the guarantee is the TCP
input's: an event is safe once appended, and the adapter reads no faster than the spool
takes. ``option.size`` is the number of events by the specification, but
fluent-logger-node sends the entries' byte length and Fluentd only takes it as a hint: a
size that does not match the events decoded is counted (``size_mismatches``), never
refused.

Backpressure: a connection is read a chunk at a time; nothing more is read while the
spool is full (the sender's writes block; it buffers or retries). A message that is not
valid msgpack, has the wrong shape, or is larger than ``--forward-max-message``
(compressed or once decompressed) is counted (``bad_messages``), logged as
``forward_bad_message`` with the reason, and its connection closed; the events of the
messages before it on that connection are kept (and acknowledged). The handshake
(``HELO``/``PING``/``PONG``, shared_key authentication) and the UDP heartbeat are not
implemented: the input is for apps in the same Pod, on loopback or a unix socket
(Fluentd's default ``heartbeat_type transport`` needs nothing more).

msgpack decoding uses the ``msgpack`` package (the ``fluent`` extra).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import importlib
import importlib.util
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from podpatterns.adapter.inputs import Record, Spool
from podpatterns.adapter.inputs.otlp import BadRequest, rfc3339
from podpatterns.adapter.inputs.stream import Connection, StreamServer
from podpatterns.errors import ConfigError
from podpatterns.options import HostPort

if TYPE_CHECKING:
    from podpatterns.adapter.config import AdapterConfig

__all__ = [
    "BadMessage",
    "ForwardCounters",
    "ForwardInput",
    "decode_message",
    "inputs_from_config",
    "msgpack_available",
]

READ_CHUNK = 256 * 1024
"""Bytes read from a connection per turn."""
APPEND_RECORDS = 2000
"""Most records decoded before they are appended (a large PackedForward message is
decoded and appended in slices, so memory stays bounded)."""
MAX_DEPTH = 100
"""Deepest nesting of maps and arrays kept in a record (deeper: a bad message)."""
RESERVED = frozenset({"tag", "timestamp", "input"})
"""Fields the input sets; a record's own are kept under ``record.KEY``."""


def _msgpack() -> Any:
    """The ``msgpack`` module, imported on first use (it ships no type information, so it
    is typed ``Any`` here and the package type-checks without it)."""
    return importlib.import_module("msgpack")


def msgpack_available() -> bool:
    """True when the ``msgpack`` package (the ``fluent`` extra) can be imported."""
    try:
        return importlib.util.find_spec("msgpack") is not None
    except ModuleNotFoundError:  # pragma: no cover - a parent package missing
        return False


class BadMessage(ValueError):
    """A message that is not valid forward protocol (the reason is the message)."""


@dataclass
class ForwardCounters:
    """Plain integers counted by a forward input, read at scrape time."""

    connections: int = 0
    connections_open: int = 0
    connection_errors: int = 0
    bytes: int = 0
    messages: int = 0
    records: int = 0
    acks: int = 0
    bad_messages: int = 0
    size_mismatches: int = 0
    paused: int = 0
    records_dropped: int = 0


class _Time:
    """An EventTime (ext type 0) as nanoseconds since the epoch."""

    __slots__ = ("nanos",)

    def __init__(self, nanos: int) -> None:
        self.nanos = nanos


def _ext_hook(code: int, data: bytes) -> Any:
    msgpack = _msgpack()
    if code == 0 and len(data) == 8:
        return _Time(int.from_bytes(data[:4]) * 1_000_000_000 + int.from_bytes(data[4:]))
    return msgpack.ExtType(code, data)


def _unpacker(max_buffer: int, unicode_errors: str) -> Any:
    msgpack = _msgpack()
    return msgpack.Unpacker(
        raw=False,
        unicode_errors=unicode_errors,
        strict_map_key=False,
        ext_hook=_ext_hook,
        max_buffer_size=max_buffer,
        timestamp=3,  # msgpack's own timestamp (ext -1): a datetime, shown as RFC 3339
    )


def _text(s: str) -> str:
    """A string decoded with ``surrogateescape``: invalid UTF-8 bytes replaced."""
    if s.isascii():
        return s
    try:
        s.encode()
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return s


def _plain(v: Any, depth: int = 0) -> Any:
    """``v`` as a value JSON can hold (str keys; bytes and ext types as text).

    Raises:
        BadMessage: nested deeper than :data:`MAX_DEPTH`.
    """
    t = type(v)
    if t is str:
        return _text(v)
    if t is int or t is float or t is bool or v is None:
        return v
    if t is dict or t is list:
        # msgpack nests up to 1024 levels; Python's recursion (here and in the spool's
        # JSON encoder) would fail before that.
        if depth >= MAX_DEPTH:
            raise BadMessage(f"record nested deeper than {MAX_DEPTH} levels")
        if t is dict:
            return {_key(k): _plain(x, depth + 1) for k, x in v.items()}
        return [_plain(x, depth + 1) for x in v]
    if t is bytes:
        return v.decode("utf-8", "replace")
    if t is _Time:
        return _timestamp(v)
    if hasattr(v, "isoformat"):  # a msgpack timestamp (ext -1), decoded as a datetime
        return v.isoformat().replace("+00:00", "Z")
    if hasattr(v, "code") and hasattr(v, "data"):  # another ext type
        return base64.b64encode(v.data).decode()
    return str(v)


def _key(k: Any) -> str:
    if type(k) is str:
        return _text(k)
    if type(k) is bytes:
        return k.decode("utf-8", "replace")
    return str(_plain(k))


def _timestamp(t: Any) -> str:
    """RFC 3339 of an event's time: EventTime, integer or float seconds; nil/0: now."""
    if type(t) is _Time:
        nanos = t.nanos
    elif type(t) is int:
        nanos = t * 1_000_000_000
    elif type(t) is float:
        if not -1e12 < t < 1e12:  # NaN too
            raise BadMessage(f"event time {t} is out of range")
        nanos = round(t * 1e9)
    elif t is None:
        nanos = 0
    else:
        raise BadMessage(f"event time is a {type(t).__name__} (EventTime or integer expected)")
    if nanos == 0:
        nanos = time.time_ns()
    try:
        return rfc3339(nanos)
    except BadRequest as exc:
        raise BadMessage(str(exc)) from None


_SIMPLE = frozenset({str, int, float, bool, type(None)})


def _event(tag: str, t: Any, record: Any, valid_text: bool) -> Record:
    """The record of one event (``record`` is reused when it needs no conversion).

    Args:
        valid_text: the record's strings were decoded with ``replace`` (no surrogates).
    """
    if type(record) is not dict:
        raise BadMessage(f"record is a {type(record).__name__} (a map expected)")
    # The common case, checked in one pass: text keys, plain values.
    for k, v in record.items():
        tv = type(v)
        if type(k) is not str or tv not in _SIMPLE or not (valid_text or k.isascii()):
            break
        if tv is str and not valid_text and not v.isascii():
            break
    else:
        rec: Record = record
        if "tag" in rec or "timestamp" in rec or "input" in rec:
            for key in RESERVED & rec.keys():
                rec["record." + key] = rec.pop(key)
        rec["tag"] = tag
        rec["timestamp"] = _timestamp(t)
        return rec
    rec = {}
    for k, v in record.items():
        key = _key(k)
        rec["record." + key if key in RESERVED else key] = _plain(v)
    rec["tag"] = tag
    rec["timestamp"] = _timestamp(t)
    return rec


@dataclass(frozen=True)
class _Message:
    tag: str
    entries: Any  # list of [time, record]; bytes (packed); or None (Message mode)
    time: Any
    record: Any
    option: dict[Any, Any]


def _shape(msg: Any) -> _Message:
    """Check a message's shape and tell its mode."""
    if type(msg) is not list or not 2 <= len(msg) <= 4:
        raise BadMessage("not a forward message (an array of 2 to 4 items expected)")
    tag = msg[0]
    if type(tag) is bytes:
        tag = tag.decode("utf-8", "replace")
    if type(tag) is not str:
        raise BadMessage(f"tag is a {type(tag).__name__} (a string expected)")
    tag = _text(tag)
    second = msg[1]
    if type(second) in (list, bytes, str):
        if len(msg) > 3:
            raise BadMessage("Forward/PackedForward message with more than 3 items")
        option = msg[2] if len(msg) == 3 else None
        entries, t, record = second, None, None
    else:
        if len(msg) < 3:
            raise BadMessage("Message mode without a record")
        option = msg[3] if len(msg) == 4 else None
        entries, t, record = None, second, msg[2]
    if option is None:
        option = {}
    elif type(option) is not dict:
        raise BadMessage(f"option is a {type(option).__name__} (a map expected)")
    chunk = option.get("chunk")
    if chunk is not None and type(chunk) is not str:
        raise BadMessage("option chunk is not a string")
    compressed = option.get("compressed")
    if compressed not in (None, "text", "gzip"):
        raise BadMessage(f"option compressed {compressed!r} (gzip or text expected)")
    if compressed == "gzip" and type(entries) not in (bytes, str):
        raise BadMessage("compressed gzip without packed entries")
    return _Message(tag, entries, t, record, option)


def _gunzip(data: bytes, limit: int) -> bytes:
    """Every gzip member of ``data`` (Fluentd concatenates them), at most ``limit`` bytes.

    Raises:
        BadMessage: not gzip, truncated, or larger than ``limit`` once decompressed.
    """
    out: list[bytes] = []
    size = 0
    while data:
        d = zlib.decompressobj(wbits=31)
        try:
            chunk = d.decompress(data, limit - size + 1)
        except zlib.error as exc:
            raise BadMessage(f"compressed entries: {exc}") from None
        size += len(chunk)
        if size > limit or d.unconsumed_tail:
            raise BadMessage(f"compressed entries larger than {limit} bytes once decompressed")
        if not d.eof:
            raise BadMessage("compressed entries: truncated gzip stream")
        out.append(chunk)
        data = d.unused_data
    return b"".join(out)


def _packed(data: bytes) -> Iterator[Any]:
    """The ``[time, record]`` entries of a PackedForward stream."""
    if not data:
        return
    msgpack = _msgpack()
    unpacker = _unpacker(max(len(data), 1), "replace")
    unpacker.feed(data)
    try:
        yield from unpacker
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise BadMessage(f"packed entries: {exc or type(exc).__name__}") from None
    if unpacker.tell() != len(data):
        raise BadMessage("packed entries: truncated")


def decode_message(msg: Any, max_message: int) -> tuple[Iterator[Record], str | None, int | None]:
    """The records of one decoded forward message, its ``chunk`` (None: no ack) and its
    ``size`` option (None: not given, or not an integer).

    The records are produced lazily (a PackedForward message is decoded entry by entry);
    consuming them raises :class:`BadMessage` at the first bad entry.

    Raises:
        BadMessage: the message's shape is wrong.
    """
    m = _shape(msg)
    chunk: str | None = m.option.get("chunk")
    size = m.option.get("size")
    return _records(m, max_message), chunk, size if type(size) is int else None


def _records(m: _Message, max_message: int) -> Iterator[Record]:
    tag = m.tag
    if m.entries is None:
        yield _event(tag, m.time, m.record, False)
    else:
        entries = m.entries
        valid_text = type(entries) is not list  # decoded apart, with "replace"
        if type(entries) is str:  # v0 clients send the packed stream as a raw str
            entries = entries.encode("utf-8", "surrogateescape")
        if type(entries) is bytes:
            if m.option.get("compressed") == "gzip":
                entries = _gunzip(entries, max_message)
            entries = _packed(entries)
        for entry in entries:
            if type(entry) is not list or len(entry) != 2:
                raise BadMessage("entry is not [time, record]")
            t = entry[0]
            if type(t) is list:
                # Fluent Bit 2.1+ keeps the event's metadata: [[time, metadata], record].
                if len(t) != 2 or type(t[1]) is not dict:
                    raise BadMessage("entry time is not [time, metadata]")
                t, metadata = t
                rec = _event(tag, t, entry[1], valid_text)
                if metadata:
                    rec.setdefault("metadata", _plain(metadata))
                yield rec
            else:
                yield _event(tag, t, entry[1], valid_text)


class ForwardInput:
    """Accept forward-protocol connections on a TCP address or a unix stream socket.

    Args:
        address: a ``HostPort`` (loopback unless told otherwise) or a ``Path``.
        max_message: largest message, compressed or once decompressed.
        name: the ``input`` field of its records and the metrics' ``input`` label.
        option: the option it comes from, for errors.
        mode: permissions of the unix socket file.

    Raises:
        ConfigError: ``msgpack`` (the ``fluent`` extra) is not installed.
    """

    def __init__(
        self,
        address: HostPort | Path,
        *,
        max_message: int = 8 * 1024 * 1024,
        name: str = "forward",
        option: str = "--forward-listen",
        mode: int = 0o666,
    ) -> None:
        if not msgpack_available():
            raise ConfigError(
                f"{option}: needs the msgpack package (pip install 'podpatterns[fluent]')"
            )
        self.name = name
        self.max_message = max_message
        self.counters = ForwardCounters()
        self._server = StreamServer(
            name, option, address, self._serve, self.counters, read_chunk=READ_CHUNK, mode=mode
        )

    @property
    def address(self) -> HostPort | Path | None:
        """Where the input listens once started (the port the kernel chose, if 0)."""
        return self._server.address

    @property
    def port(self) -> int:
        """The TCP port listened on (the one the kernel chose for port 0).

        Raises:
            RuntimeError: not started, or a unix socket.
        """
        return self._server.port

    async def start(self, spool: Spool) -> None:
        """Bind and start accepting.

        Raises:
            BindError: the address or path cannot be bound.
        """
        await self._server.start(spool)

    async def _serve(self, conn: Connection) -> None:
        msgpack = _msgpack()
        c = self.counters
        # A partial message is held until its last byte arrives: at most one message
        # and one read beyond it.
        unpacker = _unpacker(self.max_message + READ_CHUNK, "surrogateescape")
        out = _Outbox(self, conn.writer)
        while not self._server.closing:
            data = await conn.read()
            if data is None:
                return
            if not data:
                if unpacker.tell() < out.fed:
                    # The sender died or gave up mid-message: nothing of it was
                    # stored or acknowledged.
                    c.connection_errors += 1
                    self._server.log.warning(
                        "input_connection_failed", input=self.name, error="closed inside a message"
                    )
                return
            c.bytes += len(data)
            out.fed += len(data)
            try:
                unpacker.feed(data)
            except msgpack.BufferFull:
                await self._bad(out, f"message larger than {self.max_message} bytes")
                return
            if not await self._messages(unpacker, out):
                return
            await out.flush()

    async def _messages(self, unpacker: Any, out: _Outbox) -> bool:
        """Decode and stage the complete messages fed so far; False after a bad one."""
        msgpack = _msgpack()
        c = self.counters
        start = unpacker.tell()
        while True:
            try:
                msg = next(unpacker)
            except StopIteration:  # the rest of what was fed is an incomplete message
                return True
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                # Not msgpack (msgpack's limits, derived from the buffer's, included).
                await self._bad(out, f"not msgpack: {exc or type(exc).__name__}")
                return False
            end = unpacker.tell()
            try:
                if end - start > self.max_message:
                    raise BadMessage(f"message larger than {self.max_message} bytes")
                start = end
                records, chunk, size = decode_message(msg, self.max_message)
                # A bad message stores nothing, unless it holds more than APPEND_RECORDS
                # events: those before the bad one may then be stored (not acknowledged).
                staged: list[Record] = []
                events = 0
                for rec in records:
                    events += 1
                    staged.append(rec)
                    if len(staged) + len(out.pending) >= APPEND_RECORDS:
                        out.pending += staged
                        staged = []
                        await out.flush()
            except BadMessage as exc:
                await self._bad(out, str(exc))
                return False
            out.pending += staged
            c.messages += 1
            if size is not None and size != events:
                c.size_mismatches += 1
            if chunk is not None:
                out.acks.append(chunk)

    async def _bad(self, out: _Outbox, reason: str) -> None:
        """Store and acknowledge the good messages before a bad one, then count and log
        it (its connection is then closed)."""
        await out.flush()
        self.counters.bad_messages += 1
        self._server.log.warning("forward_bad_message", input=self.name, reason=reason[:200])

    async def append(self, records: list[Record]) -> bool:
        """Append, waiting while the spool is full; retry a failing disk. False when
        shutting down with the spool full (nothing makes room; nothing acknowledged)."""
        server = self._server
        c = self.counters
        if await server.append(functools.partial(server.spool.append, records, source=self.name)):
            c.records += len(records)
            return True
        c.records_dropped += len(records)
        return False

    async def close(self) -> None:
        """Stop accepting; connections idle in a read end, appends in flight finish
        (within :data:`~podpatterns.adapter.inputs.stream.CLOSE_TIMEOUT`) and their
        messages are acknowledged."""
        await self._server.close()

    def is_live(self) -> bool:
        """No connection task of the input has died of a bug."""
        return self._server.is_live()

    def collect(self) -> dict[str, float]:
        """Connections, bytes, messages, records, acks, bad messages, pauses."""
        c = self.counters
        return {f.name: float(getattr(c, f.name)) for f in fields(c)}


class _Outbox:
    """What one connection has decoded and not yet appended, and the acks that wait for
    that append."""

    def __init__(self, owner: ForwardInput, writer: asyncio.StreamWriter) -> None:
        self.owner = owner
        self.writer = writer
        self.pending: list[Record] = []
        self.acks: list[str] = []
        self.fed = 0

    async def flush(self) -> None:
        """Append what is pending, then acknowledge the chunks that were complete."""
        msgpack = _msgpack()
        if self.pending:
            records, self.pending = self.pending, []
            if not await self.owner.append(records):
                self.acks.clear()  # not stored: the sender sends those chunks again
                return
        if self.acks:
            acks, self.acks = self.acks, []
            data = b"".join(msgpack.packb({"ack": chunk}) for chunk in acks)
            try:
                self.writer.write(data)
                await self.writer.drain()
            except OSError:
                return  # the sender went away: it sends those chunks again
            self.owner.counters.acks += len(acks)


def inputs_from_config(config: AdapterConfig) -> list[ForwardInput]:
    """The forward inputs ``config`` asks for (``--forward-listen``, ``--forward-unix``)."""
    out: list[ForwardInput] = []
    if config.forward_listen is not None:
        out.append(ForwardInput(config.forward_listen, max_message=config.forward_max_message))
    if config.forward_unix is not None:
        out.append(
            ForwardInput(
                config.forward_unix,
                max_message=config.forward_max_message,
                name="forward_unix",
                option="--forward-unix",
            )
        )
    return out
