"""The protocol-handler interface: what a route calls between accept and relay.

A route with ``--protocol tcp`` (the default) has no handler: it dials on accept and
relays bytes from the first one. A route that names a protocol gives each accepted
connection to its handler, which owns the connection until the session is established:

1. :meth:`ProtocolSession.accept` reads the client's side of the startup (a PostgreSQL
   SSLRequest answered ``N``, then the StartupMessage), and may pin the connection to one
   endpoint (a PostgreSQL CancelRequest must reach the server that holds the session);
2. the route dials an endpoint as for any connection (retries, balancing, health);
3. :meth:`ProtocolSession.connect` runs the upstream side of the startup on the
   connected socket (TLS as the protocol negotiates it, then authentication, relayed
   between the two ends) and returns an :class:`Established`: the upstream socket or
   TLS leg, and any bytes read past the startup;
4. the route hands both to the same relays as a ``tcp`` route (the splice relay on a
   plaintext upstream, the Protocol relay otherwise), so nothing is framed after startup.

Whatever fails before the session exists reaches the handler as a :class:`Failure`, and
:meth:`ProtocolSession.refuse` tells the client in the protocol's own terms (a
PostgreSQL ErrorResponse with a SQLSTATE) before the route closes the connection.

The startup phase is plain asyncio code over :class:`SocketStream` and
:class:`TLSStream`: it runs once per connection, bounded by ``--startup-timeout``.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Protocol

from podpatterns.ambassador.relay import Leg, ProtocolRelay
from podpatterns.ambassador.tlsleg import TLSTransport
from podpatterns.ambassador.upstreams import Endpoint

#: What can go wrong before a session exists (:attr:`Failure.kind`).
FAILURE_KINDS = (
    "unreachable",  # no endpoint could be connected
    "tls",  # TLS failed: verification, handshake, or the server refused TLS
    "protocol",  # a peer broke the protocol (a bad startup packet, injected bytes)
    "upstream_closed",  # the upstream ended the connection during the startup
    "timeout",  # the startup took longer than --startup-timeout
    "limit",  # --max-connections reached with --on-limit reject
    "shutdown",  # the ambassador is shutting down
    "auth",  # the ambassador cannot authenticate upstream as configured (a method refused)
    "credentials",  # the ambassador has no secret to authenticate with (file, command)
    "role",  # no endpoint has the role the route targets (PostgreSQL: a primary)
)


class Failure(Exception):
    """Why a connection could not be established, for :meth:`ProtocolSession.refuse`.

    Args:
        kind: one of :data:`FAILURE_KINDS`.
        message: one line naming the cause and the upstream; shown to the application,
            so never a secret (no password, no startup parameters beyond the names).
    """

    def __init__(self, kind: str, message: str) -> None:
        if kind not in FAILURE_KINDS:
            raise ValueError(f"Failure kind {kind!r}: not one of {FAILURE_KINDS}")
        super().__init__(message)
        self.kind = kind
        self.message = message


class Stream(Protocol):
    """One end of a connection during the startup phase."""

    #: True while a :meth:`write` is under way (a cancelled one leaves a partial message).
    writing: bool

    async def read(self) -> bytes:
        """Some bytes, or ``b""`` at the end of the stream."""

    async def read_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes. Raises ConnectionError when the stream ends first."""

    async def write(self, data: bytes) -> None:
        """Send ``data`` (all of it before returning)."""

    def take_buffered(self) -> bytes:
        """Bytes received and not read yet, which the relay must deliver first."""


class SocketStream:
    """A plaintext socket during the startup phase (``loop.sock_recv``/``sock_sendall``).

    :meth:`read_exactly` never reads past ``n`` bytes, so a handler that reads framed
    messages with it leaves what follows in the kernel, for the relay.
    """

    def __init__(self, sock: socket.socket, read_size: int = 65536, ahead: bytes = b"") -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray(ahead)  # what the caller read from ``sock`` already
        self._read_size = read_size
        #: True while :meth:`write` runs: if it is cut short (cancelled), the peer's
        #: stream stops inside a message, and nothing more may be sent on it.
        self.writing = False

    async def _recv(self, n: int) -> bytes:
        # The bytes are often there already (a message's body behind its header): take
        # them without the loop. uvloop's sock_recv always waits for readability first,
        # which costs a poll handle and five system calls (issue 11's benchmark).
        try:
            return self.sock.recv(n)
        except (BlockingIOError, InterruptedError):
            return await self._loop.sock_recv(self.sock, n)

    async def read(self) -> bytes:
        """Buffered bytes, or what one ``recv`` returns; ``b""`` at EOF."""
        if self._buf:
            return self.take_buffered()
        return await self._recv(self._read_size)

    async def read_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes. Raises ConnectionError at EOF first."""
        while len(self._buf) < n:
            data = await self._recv(n - len(self._buf))
            if not data:
                raise ConnectionResetError("the peer closed the connection")
            self._buf += data
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def write(self, data: bytes) -> None:
        """Send all of ``data``."""
        self.writing = True
        await self._loop.sock_sendall(self.sock, data)
        self.writing = False

    def take_buffered(self) -> bytes:
        """Bytes read ahead and not consumed."""
        out = bytes(self._buf)
        self._buf.clear()
        return out


class _Collector(asyncio.Protocol):
    """A TLS leg's protocol during the startup phase: keeps what arrives for reads."""

    LIMIT = 1024 * 1024  # pause the TLS reads past this much unread plaintext

    def __init__(self) -> None:
        self.transport: TLSTransport | None = None
        self.buf = bytearray()
        self.eof = False
        self.lost: Exception | None = None
        self.gone = False
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, TLSTransport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > self.LIMIT and self.transport is not None:
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.lost = exc
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class TLSStream:
    """A TLS leg (:mod:`.tlsleg`, handshake done) during the startup phase.

    :meth:`hand_over` gives the leg to the relay's protocol afterwards.
    """

    #: Never True: :meth:`write` hands the whole message to the TLS engine at once.
    writing = False

    def __init__(self, transport: TLSTransport) -> None:
        self.transport = transport
        self.handed_over = False  # True once :meth:`hand_over` gave the leg away
        self._collector = _Collector()
        transport.attach(self._collector)

    async def read(self) -> bytes:
        """Decrypted bytes, or ``b""`` at EOF. Raises ConnectionError when the leg failed."""
        c = self._collector
        while not c.buf:
            if c.eof or c.gone:
                if c.lost is not None:
                    raise ConnectionResetError(str(c.lost) or type(c.lost).__name__)
                return b""
            c.waiter = asyncio.get_running_loop().create_future()
            try:
                await c.waiter
            finally:
                c.waiter = None
        out = self.take_buffered()
        self.transport.resume_reading()
        return out

    async def read_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes. Raises ConnectionError at EOF first."""
        c = self._collector
        while len(c.buf) < n:
            have = bytes(c.buf)
            c.buf.clear()
            more = await self.read()
            if not more:
                raise ConnectionResetError("the peer closed the connection")
            c.buf += have + more
        out = bytes(c.buf[:n])
        del c.buf[:n]
        return out

    async def write(self, data: bytes) -> None:
        """Encrypt and queue ``data``; raises ConnectionError when the leg is gone."""
        if self._collector.gone or self.transport.is_closing():
            raise ConnectionResetError("the TLS connection is closed")
        self.transport.write(data)

    def take_buffered(self) -> bytes:
        """Decrypted bytes not read yet."""
        out = bytes(self._collector.buf)
        self._collector.buf.clear()
        return out

    def hand_over(self, protocol: asyncio.Protocol) -> None:
        """Bind the relay's protocol to the leg (after :meth:`take_buffered`)."""
        self.handed_over = True
        self.transport.attach(protocol)
        self.transport.resume_reading()


class SessionWatch(Protocol):
    """Follows an established session through the Protocol relay, to end it at a boundary.

    A handler that can end its sessions cleanly on shutdown (PostgreSQL between
    transactions: :mod:`.pgdrain`) returns one in :attr:`Established.watch`; the route
    then relays that connection with the Protocol relay (never splice: the watch must see
    the bytes) and calls :meth:`drain` when draining starts.
    """

    def make_leg(self, relay: ProtocolRelay, side: str) -> Leg:
        """The relay's leg for ``side`` (``client`` or ``upstream``)."""

    def passed(self, side: str, data: bytes) -> None:
        """``side`` sent ``data``, which the route passed on outside the legs."""

    def drain(self) -> None:
        """End the session at its next boundary (now, if it is at one)."""


@dataclass
class Established:
    """The session exists: what the route hands to the relays.

    Attributes:
        upstream: the upstream's plaintext socket; with ``tls`` None the splice relay may
            take it.
        tls: the upstream TLS leg, when the protocol negotiated TLS.
        to_client: bytes read from the upstream past the startup, owed to the client
            before anything the relay reads.
        to_upstream: the same, from the client toward the upstream.
        watch: follows the session to end it at a boundary on shutdown, or None.
        client: the client's TLS leg, when the listener terminated the app's TLS
            (``--listen-tls-cert``); None for a plaintext client socket.
    """

    upstream: socket.socket
    tls: TLSStream | None = None
    to_client: bytes = b""
    to_upstream: bytes = b""
    watch: SessionWatch | None = None
    client: TLSStream | None = None


class ProtocolSession(Protocol):
    """One client connection of a protocol-aware route, until its session exists."""

    @property
    def pinned(self) -> Endpoint | None:
        """After :meth:`accept`: the one endpoint this connection must reach, or None for
        the route's usual choice (balancing, failover)."""

    async def accept(self) -> bool:
        """Run the client's side of the startup.

        Returns:
            True when there is an upstream to dial; False when the connection is over
            (the client left, or a request needs no upstream); the route closes it.

        Raises:
            Failure: the client broke the protocol; :meth:`refuse` is called next.
            ConnectionError: the client is gone.
        """

    async def connect(self, upstream: socket.socket, endpoint: Endpoint) -> Established | None:
        """Run the upstream side of the startup on a connected socket.

        Args:
            upstream: connected, non-blocking; this session owns it until it returns.
            endpoint: the endpoint it is connected to (remember it to route a later
                request of this session, such as a cancel, to the same server).

        Returns:
            What the relays take over, or None when the connection is complete without a
            relay (a forwarded cancel request; an authentication error already passed
            to the client); the route then closes both sockets.

        Raises:
            Failure: the upstream startup failed; :meth:`refuse` is called next.
            ConnectionError: a peer went away.
        """

    async def refuse(self, failure: Failure) -> None:
        """Tell the client why in the protocol's own terms; the route closes it after.

        Called at most once, for failures before the session exists. Also for a
        connection refused before :meth:`accept` ran (at the cap with ``on_limit
        reject``, or new while the route drains): ``refuse`` may then run the client's
        side of the startup first, within ``startup_timeout``. And for one whose
        :meth:`accept` was cut short (a drain, the timeout): then it must not wait for
        the rest of what the client was sending.
        """

    def finished(self) -> None:
        """The connection has ended (whatever happened): forget its state."""


class ProtocolHandler(Protocol):
    """A route's protocol (``--protocol NAME``): one session per accepted connection."""

    name: str

    def open(self, client: SocketStream, label: str) -> ProtocolSession:
        """A session for a connection just accepted.

        Args:
            client: the client socket (plaintext, non-blocking), for the startup phase.
            label: the client's ``ip:port`` or ``unix``, for logs.
        """
