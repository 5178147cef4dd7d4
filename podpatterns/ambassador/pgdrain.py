"""Drain PostgreSQL sessions at transaction boundaries (``--pg-drain transaction``).

A byte relay can only cut a session at the drain deadline, which aborts whatever
transaction it was in. To end each session where the application loses nothing, the
route follows the messages of both directions after the startup (issue 11):

* the client's requests that the server answers with exactly one ReadyForQuery: Query
  (``Q``), Sync (``S``) and FunctionCall (``F``), pipelined or not;
* the server's ReadyForQuery (``Z``) and its transaction status: ``I`` idle, ``T`` in a
  transaction block, ``E`` in a failed one.

A session is *at rest* when every request has had its ReadyForQuery, the last one said
``I``, the client's last message was such a request (not an extended-protocol message
waiting for its Sync), and both streams stand at a message boundary. When draining starts (after
``--shutdown-delay``) a session at rest gets what the server itself sends on a fast
shutdown, ``FATAL 57P01`` ("terminating connection due to administrator command"), then
a FIN; the server gets a Terminate. Any other session is left to run and is ended the
same way when it next comes to rest; what is still open at ``--drain-timeout`` is cut and
counted. A pool (psycopg_pool, asyncpg, HikariCP...) sees the 57P01 as the server's own
admin shutdown: it discards the connection and opens a new one.

Why it frames from the start: message boundaries cannot be found in the middle of a
stream, so the legs are walked from the end of the startup, when both streams stand at a
boundary. Walking costs no copy (the headers are read in place and the bytes forwarded as
they came) but it needs the bytes in Python, so such a route relays with the Protocol
relay, never splice; docs/ambassador-postgres.md has the measured cost. ``--pg-drain
off`` keeps the byte relay.

``--pg-metrics`` (:mod:`.pgmetrics`) uses the same walk, not a second one: the client's
Execute (``E``) and the start of the server's ErrorResponse (``E``) are reported too, and
the watch counts and times the queries as each ReadyForQuery closes its request.

Reference: https://www.postgresql.org/docs/current/protocol-flow.html and
protocol-message-formats.html.
"""

from __future__ import annotations

import struct

from podpatterns.ambassador.pgmetrics import (
    ERROR_HEAD,
    TEXT_HEAD,
    QueryCycles,
    QueryStats,
    SlowQueries,
    parse_text,
)
from podpatterns.ambassador.postgres import error_response
from podpatterns.ambassador.relay import Leg, ProtocolRelay

ADMIN_SHUTDOWN = "57P01"
DRAIN_MESSAGE = (
    "terminating connection due to administrator command (podpatterns ambassador is shutting down)"
)
TERMINATE = b"X\x00\x00\x00\x04"
_REQUESTS = frozenset(b"QSF")  # client messages each answered by one ReadyForQuery
_READY = ord("Z")
_IDLE = ord("I")
_QUERY = ord("Q")
_SYNC = ord("S")
_PARSE = ord("P")
_EXECUTE = ord("E")  # from the client; from the server the same byte is ErrorResponse
_ERROR = ord("E")
_UNPACK_LENGTH = struct.Struct("!i").unpack_from


class Frames:
    """Walks one direction's message stream (type byte, int32 length) in place.

    Args:
        kinds: the message types to report.
        heads: those of ``kinds`` whose body start (up to ``head_size`` bytes) is kept in
            :attr:`heads`, in order: a split one is carried to the next read (bounded).
    """

    __slots__ = ("broken", "carry", "head_kinds", "head_size", "heads", "kinds", "last", "skip")

    def __init__(
        self, kinds: frozenset[int], heads: frozenset[int] = frozenset(), head_size: int = 0
    ) -> None:
        self.kinds = kinds
        self.head_kinds = heads
        self.head_size = head_size
        self.heads: list[bytes] = []  # body starts of head_kinds messages, for the caller
        self.skip = 0  # bytes of the current message still to pass
        self.carry = b""  # the start of a header split across reads
        self.broken = False  # a length no message has: stop following this stream
        self.last = -1  # the type of the last message that started, -1 before any

    def at_boundary(self) -> bool:
        """True when the bytes seen so far end exactly with a whole message."""
        return not self.skip and not self.carry and not self.broken

    def walk(self, data: bytes) -> list[tuple[int, int]]:
        """The messages of :attr:`kinds` that start in ``data``, in order.

        Returns:
            ``(type, first body byte)`` pairs; the byte is -1 for a message without body.
        """
        n = len(data)
        if self.broken:
            return []
        if self.skip >= n:  # the middle of a large message (a DataRow, a CopyData)
            self.skip -= n
            return []
        found: list[tuple[int, int]] = []
        pos = self.skip
        if self.carry:  # rare: copies one read to join the split header
            data = self.carry + data
            n = len(data)
            pos = 0
            self.carry = b""
        kinds = self.kinds
        while pos < n:
            if n - pos < 5:
                self.carry = data[pos:]
                break
            kind = data[pos]
            (length,) = _UNPACK_LENGTH(data, pos + 1)
            if length < 4:
                self.broken = True
                return found
            self.last = kind
            if kind in kinds:
                if kind in self.head_kinds:
                    end = pos + 5 + min(length - 4, self.head_size)
                    if end > n:
                        self.carry = data[pos:]  # at most 5 + head_size bytes
                        break
                    self.heads.append(data[pos + 5 : end])
                if length > 4:
                    if n - pos < 6:
                        self.carry = data[pos:]
                        break
                    found.append((kind, data[pos + 5]))
                else:
                    found.append((kind, -1))
            pos += 1 + length
        self.skip = pos - n if pos > n else 0
        return found


class TransactionWatch:
    """One session's requests and ReadyForQuery statuses (a :class:`~.protocol.SessionWatch`).

    Made by the PostgreSQL session at ReadyForQuery, when both streams stand at a
    message boundary; :meth:`make_leg` gives the route's Protocol relay its legs.

    Args:
        stats: with ``--pg-metrics``, the endpoint's counts (:mod:`.pgmetrics`) that this
            session adds into; the watch then also follows Execute and ErrorResponse.
        drains: False with ``--pg-drain off``: :meth:`drain` leaves the session alone.
        slow: with ``--pg-slow-query`` (and ``stats``), where queries at least that slow
            are reported; the watch then keeps the start of each Query and Parse text.
    """

    def __init__(
        self,
        stats: QueryStats | None = None,
        *,
        drains: bool = True,
        slow: SlowQueries | None = None,
    ) -> None:
        self.requests = 0  # requests the client sent
        self.ready = 0  # ReadyForQuery the server sent (not counting the startup's)
        self.status = _IDLE
        self.drains = drains
        self.draining = False
        self.ended = False
        # what the app is told, and the close reason: drain() may be asked for another
        # cause than shutdown (--pg-close-on-role-change)
        self.message = DRAIN_MESSAGE
        self.end_reason = "drained"
        self.relay: ProtocolRelay | None = None
        self.stats = stats
        if stats is None:
            self.client = Frames(_REQUESTS)
            self.server = Frames(frozenset((_READY,)))
        else:
            if slow is None:
                self.client = Frames(_REQUESTS | {_EXECUTE})
            else:
                texts = frozenset((_QUERY, _PARSE))
                self.client = Frames(_REQUESTS | {_EXECUTE, _PARSE}, texts, TEXT_HEAD)
            self.server = Frames(frozenset((_READY, _ERROR)), frozenset((_ERROR,)), ERROR_HEAD)
        # the counting itself, shared with the pool's sessions (pgpool.ClientSession)
        self.counts = QueryCycles(stats, slow) if stats is not None else None

    def make_leg(self, relay: ProtocolRelay, side: str) -> Leg:
        """The relay's leg for ``side``: a :class:`Leg` that shows this watch its bytes."""
        self.relay = relay
        return WatchedLeg(relay, side, self)

    def passed(self, side: str, data: bytes) -> None:
        """``side`` sent ``data``, which was passed on outside the relay's legs."""
        if self.counts is not None:
            self._count(side, data, self.counts)
        elif side == "client":
            for _ in self.client.walk(data):
                self.requests += 1
        else:
            for _, status in self.server.walk(data):
                self.ready += 1
                self.status = status
        if self.draining:
            self._end_if_at_rest()

    def _count(self, side: str, data: bytes, counts: QueryCycles) -> None:
        """:meth:`passed` with ``--pg-metrics``: also time and count the queries."""
        counts.now = 0.0
        if side == "client":
            client = self.client
            for kind, _ in client.walk(data):
                if kind == _EXECUTE:
                    counts.execute()
                    continue
                if kind == _PARSE:  # only followed with --pg-slow-query
                    counts.parse(parse_text(client.heads.pop(0)))
                    continue
                self.requests += 1
                if kind == _QUERY:
                    counts.query(client.heads.pop(0) if counts.slow else b"")
                elif kind == _SYNC:
                    counts.sync()
                else:
                    counts.function_call()
        else:
            server = self.server
            for kind, status in server.walk(data):
                if kind == _ERROR:
                    counts.error(server.heads.pop(0))
                    continue
                self.ready += 1
                counts.ready(self.status, status)
                self.status = status

    def at_rest(self) -> bool:
        """Idle between transactions, nothing asked and unanswered, both streams whole."""
        return (
            self.status == _IDLE
            and self.requests == self.ready
            # Parse/Bind/Execute... not yet followed by a Sync: a pipeline being sent
            and (self.client.last == -1 or self.client.last in _REQUESTS)
            and self.client.at_boundary()
            and self.server.at_boundary()
        )

    def drain(self) -> None:
        """End the session now if it is at rest, else when it next comes to rest."""
        if not self.drains:
            return  # --pg-drain off: watched for --pg-metrics only
        self.draining = True
        self._end_if_at_rest()

    def _end_if_at_rest(self) -> None:
        relay = self.relay
        if self.ended or relay is None or not self.at_rest():
            return
        client, upstream = relay.client.transport, relay.upstream.transport
        if client is None or upstream is None:
            return  # the relay is not attached yet: drain() runs again once it is
        if relay.client.eof or relay.upstream.eof or client.is_closing() or upstream.is_closing():
            return  # the session is ending by itself (a Terminate and FIN, say)
        self.ended = True
        relay.conn.end_by_proxy(self.end_reason)
        # The server's own fast shutdown says this, and pools know it: discard, reconnect.
        client.write(error_response(ADMIN_SHUTDOWN, self.message))
        upstream.write(TERMINATE)
        client.close()  # after the bytes it holds, then a FIN
        upstream.close()


class WatchedLeg(Leg):
    """A relay leg that passes its bytes on, then shows them to its watch."""

    __slots__ = ("watch",)

    def __init__(self, relay: ProtocolRelay, side: str, watch: TransactionWatch) -> None:
        super().__init__(relay, side)
        self.watch = watch

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.watch.passed(self.side, data)
