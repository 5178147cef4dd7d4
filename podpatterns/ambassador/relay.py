"""The portable relay: two ``asyncio.Protocol`` legs writing into each other.

Why Protocols: the streams API costs a coroutine round-trip and a ``drain()`` per chunk;
in the measurements this relay was designed from (2 vCPUs, one iperf3 stream) a streams
relay moved 5.4 Gbit/s, a Protocol relay on uvloop 20.9. docs/benchmarks.md has this
relay's current figures (``--splice off``) beside HAProxy's. Backpressure is
the transports' own: when a leg's write buffer passes ``buffer_size`` the transport calls
``pause_writing`` on it, and the leg pauses reading on its peer. Memory per direction is
bounded by ``buffer_size`` plus one read.

Half-close: a FIN from one side becomes ``write_eof()`` on the other after the buffered
bytes; the connection ends when both directions have finished. A reset or error on one
leg is passed on as a reset on the other. The upstream TLS leg half-closes with a
close_notify (:mod:`.tlsleg`, docs/ambassador-tls.md); a transport that cannot half-close
at all is given a close instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from podpatterns.ambassador.connection import Connection, reset_socket


class Leg(asyncio.Protocol):
    """One side of a relayed connection; forwards what it reads to its peer."""

    __slots__ = ("eof", "lost", "nbytes", "peer", "pending", "relay", "side", "transport")

    def __init__(self, relay: ProtocolRelay, side: str) -> None:
        self.relay = relay
        self.side = side
        self.transport: Any = None
        self.peer: Leg = self
        self.eof = False  # this side has sent its FIN
        self.lost = False
        self.nbytes = 0
        self.pending: list[bytes] = []  # read before the peer transport existed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=self.relay.buffer_size)  # type: ignore[attr-defined]
        peer = self.peer
        if peer.pending:
            transport.writelines(peer.pending)  # type: ignore[attr-defined]
            peer.pending = []
            if peer.transport is not None and not peer.lost:
                peer.transport.resume_reading()
        if peer.lost:  # the other leg ended before this one was attached
            transport.close()
            return
        if peer.eof:
            self.relay.forward_eof(peer)

    def data_received(self, data: bytes) -> None:
        self.nbytes += len(data)
        out = self.peer.transport
        if out is None or self.peer.lost:
            if not self.peer.lost:
                self.pending.append(data)
                self.transport.pause_reading()
            return
        out.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer.transport is not None:
            self.relay.forward_eof(self)
        return True  # keep our write side open: the reply may still come

    def pause_writing(self) -> None:
        peer = self.peer.transport
        if peer is not None and not self.peer.lost:
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer.transport
        if peer is not None and not self.peer.lost:
            peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.relay.leg_lost(self, exc)


class ProtocolRelay:
    """Relay bytes between a client leg and an upstream leg (see the module doc)."""

    __slots__ = ("buffer_size", "client", "conn", "upstream")

    def __init__(
        self,
        conn: Connection,
        buffer_size: int,
        make_leg: Callable[[ProtocolRelay, str], Leg] = Leg,
    ) -> None:
        """Args: ``make_leg`` builds each side's leg (a protocol's watch may frame them)."""
        self.conn = conn
        self.buffer_size = buffer_size
        self.client = make_leg(self, "client")
        self.upstream = make_leg(self, "upstream")
        self.client.peer = self.upstream
        self.upstream.peer = self.client
        conn.relay = self

    # -- Relay protocol ------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        return self.client.nbytes, self.upstream.nbytes

    def half_closed(self) -> bool:
        return self.client.eof != self.upstream.eof

    def abort(self) -> None:
        self.conn.note_end("proxy", self.conn.reason or "aborted")
        for leg in (self.client, self.upstream):
            if leg.transport is not None and not leg.lost:
                if leg.transport.is_closing() and not leg.transport.get_write_buffer_size():
                    continue  # closed with a FIN (close()) and flushed: let the FIN be
                reset_socket(leg.transport.get_extra_info("socket"))
                leg.transport.abort()

    def close(self) -> None:
        """End both legs with a FIN, after the bytes they hold (``--drain-close fin``)."""
        self.conn.note_end("proxy", self.conn.reason or "closed")
        self._close_both()

    # -- called by the legs --------------------------------------------------------------

    def forward_eof(self, leg: Leg) -> None:
        """``leg``'s side finished sending: half-close toward the other side."""
        out = leg.peer
        if out.lost or out.transport is None:
            return
        self.conn.note_end(leg.side, "eof")
        if out.transport.can_write_eof():
            out.transport.write_eof()
        else:
            # This transport cannot half-close (asyncio's own SSL transport, say; the
            # ambassador's TLS leg can): close it after the buffered bytes.
            out.transport.close()
        if out.eof:  # both directions finished
            self._close_both()

    def leg_lost(self, leg: Leg, exc: Exception | None) -> None:
        peer = leg.peer
        if exc is not None:
            self.conn.note_end(
                leg.side, "reset" if isinstance(exc, ConnectionResetError) else "error"
            )
            if peer.transport is not None and not peer.lost:
                reset_socket(peer.transport.get_extra_info("socket"))
                peer.transport.abort()
        elif peer.transport is not None and not peer.lost:
            self.conn.note_end(leg.side, "closed")
            peer.transport.close()  # flushes what is buffered, then FIN
        if peer.lost or peer.transport is None:
            self.conn.bytes_up = self.client.nbytes
            self.conn.bytes_down = self.upstream.nbytes
            self.conn.finish()

    def _close_both(self) -> None:
        for leg in (self.client, self.upstream):
            if leg.transport is not None and not leg.lost:
                leg.transport.close()
