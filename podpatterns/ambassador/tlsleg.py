"""The upstream TLS leg: TLS over a plain TCP transport, with a real half-close.

asyncio's and uvloop's SSL transports cannot half-close (``can_write_eof()`` is False),
so a client FIN could only become a full close of the TLS leg, and the reply was lost.
Here an :class:`ssl.SSLObject` runs over two :class:`ssl.MemoryBIO` on top of an ordinary
TCP transport, and :class:`TLSTransport` offers the relay's :class:`~.relay.Leg` the same
transport interface as any other leg, with ``write_eof()`` meaning "send close_notify,
keep reading": in TLS 1.3 a close_notify closes only the sender's write side (RFC 8446
section 6.1).

Data flow: TCP bytes -> incoming BIO -> ``SSLObject.read`` -> ``protocol.data_received``;
``write`` -> ``SSLObject.write`` -> outgoing BIO -> TCP transport. Backpressure is the TCP
transport's: its ``pause_writing``/``resume_writing`` pass straight to the protocol, and
``pause_reading`` stops decrypting and pauses the TCP reads, so at most one TCP read of
ciphertext, plus one batch of plaintext, waits here per connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any, cast

from podpatterns.ambassador.connection import reset_socket

# Plaintext handed to the protocol per call: batching records (16 KiB each) saves a
# write syscall per record on the client leg.
READ_BATCH = 256 * 1024

# What _process concludes when a read would only ask for more ciphertext; never raised.
_WANT_READ = ssl.SSLWantReadError(ssl.SSL_ERROR_WANT_READ, "more ciphertext needed")


class TLSTransport(asyncio.Transport):
    """A TLS client connection over a TCP transport; see the module doc.

    Made by :func:`connect` (which does the handshake) and bound to its protocol with
    :meth:`attach`. The protocol sees the usual callbacks: ``data_received``,
    ``eof_received`` once (on the upstream's close_notify, or its TCP FIN without one),
    ``pause_writing``/``resume_writing`` and ``connection_lost`` once.
    """

    def __init__(
        self, context: ssl.SSLContext, server_hostname: str | None, server_side: bool = False
    ) -> None:
        super().__init__()
        self._context = context
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._sslobj = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=None if server_side else server_hostname,
        )
        self._raw: asyncio.Transport | None = None
        self._protocol: asyncio.Protocol | None = None
        self._waiter: asyncio.Future[None] | None = None  # the handshake waits on TCP
        self._backlog: list[bytes] = []  # plaintext taken out of the way of close_notify
        self._scheduled: asyncio.Handle | None = None
        self._reading_paused = False
        self._writing_paused = False  # the TCP transport asked us to stop writing
        self._raw_eof = False  # TCP FIN from the upstream
        self._eof_in = False  # eof_received delivered to the protocol
        self._eof_out = False  # close_notify sent
        self._closing = False
        self._lost = False
        self._lost_exc: Exception | None = None
        self._error: Exception | None = None  # a TLS error that ended the leg

    # -- set-up ----------------------------------------------------------------------------

    async def _handshake(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                self._sslobj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            self._flush()
            if self._lost:
                raise ConnectionResetError("upstream closed the connection during TLS handshake")
            if self._raw_eof:
                raise ssl.SSLEOFError(
                    ssl.SSL_ERROR_EOF, "upstream closed the connection during TLS handshake"
                )
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._flush()

    def _handshake_failed(self, exc: BaseException) -> None:
        raw = self._raw
        self._closing = True
        if raw is None:
            return
        if isinstance(exc, ssl.SSLError):
            # Let the upstream read the alert (e.g. bad_certificate) before the FIN.
            self._flush()
            raw.close()
        else:
            raw.abort()

    def attach(self, protocol: asyncio.Protocol) -> None:
        """Bind ``protocol`` after the handshake: ``connection_made`` is called now.

        Bytes, EOF or a loss that arrived since the handshake are delivered next.
        """
        self._protocol = protocol
        protocol.connection_made(self)
        loop = asyncio.get_running_loop()
        if self._lost:
            loop.call_soon(protocol.connection_lost, self._lost_error())
            return
        if self._writing_paused:
            protocol.pause_writing()
        self._schedule()

    # -- the asyncio.Transport interface the relay uses ------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and queue it on the TCP transport."""
        if self._eof_out and not self._closing:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._closing or not data:
            return
        try:
            self._sslobj.write(data)
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        """Write a sequence of byte strings as one TLS write."""
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        """True: :meth:`write_eof` sends close_notify and keeps reading."""
        return True

    def write_eof(self) -> None:
        """Half-close: send close_notify, then a TCP FIN; the upstream may still reply."""
        if self._eof_out or self._closing:
            return
        self._eof_out = True
        if self._send_close_notify():
            assert self._raw is not None
            # Mirror the client's FIN on TCP too, as the plaintext relay does. After our
            # close_notify nothing more is written on this connection anyway.
            if self._raw.can_write_eof():
                self._raw.write_eof()

    def close(self) -> None:
        """Send close_notify (unless sent), then close TCP after the buffered bytes."""
        if self._closing:
            return
        if self._protocol is not None and not self._eof_out and not self._lost:
            self._eof_out = True
            self._send_close_notify()
        self._closing = True
        self._unschedule()
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        """Close TCP now, dropping buffered bytes (the relay sets SO_LINGER for a reset)."""
        self._closing = True
        self._unschedule()
        if self._raw is not None:
            self._raw.abort()

    def is_closing(self) -> bool:
        """True once :meth:`close` or :meth:`abort` was called or the TCP leg is gone."""
        return self._closing

    def pause_reading(self) -> None:
        """Stop handing plaintext to the protocol and stop reading TCP."""
        if self._reading_paused:
            return
        self._reading_paused = True
        # After a TCP EOF asyncio keeps no reader; pausing and resuming would add one
        # back and report the EOF a second time.
        if self._raw is not None and not self._raw_eof and not self._closing:
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        """Resume: first what is already buffered here, then new TCP reads."""
        if not self._reading_paused:
            return
        self._reading_paused = False
        if self._raw is not None and not self._raw_eof and not self._closing:
            self._raw.resume_reading()
        self._schedule()

    def is_reading(self) -> bool:
        """False while paused by :meth:`pause_reading`."""
        return not self._reading_paused and not self._closing

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Flow-control limits of the TCP transport, on ciphertext bytes."""
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        """Ciphertext bytes waiting to be sent."""
        queued = self._raw.get_write_buffer_size() if self._raw is not None else 0
        return queued + self._outgoing.pending

    def get_write_buffer_limits(self) -> tuple[int, int]:
        """The TCP transport's ``(low, high)`` limits."""
        return self._raw.get_write_buffer_limits() if self._raw is not None else (0, 0)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """TLS details (``ssl_object``, ``peercert``, ``cipher``, ``sslcontext``,
        ``server_hostname``) or the TCP transport's (``socket``, ``peername``, ...)."""
        if name == "ssl_object":
            return self._sslobj
        if name == "sslcontext":
            return self._context
        if name == "peercert":
            return self._sslobj.getpeercert()
        if name == "cipher":
            return self._sslobj.cipher()
        if name == "server_hostname":
            return self._sslobj.server_hostname
        if self._raw is None:
            return default
        return self._raw.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Replace the protocol (asyncio API)."""
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The attached protocol (asyncio API)."""
        assert self._protocol is not None
        return self._protocol

    # -- internals -------------------------------------------------------------------------

    def _flush(self) -> None:
        """Move what the TLS engine produced to the TCP transport."""
        data = self._outgoing.read()
        if data and self._raw is not None and not self._raw.is_closing():
            self._raw.write(data)

    def _send_close_notify(self) -> bool:
        """Write our close_notify; False when the leg failed instead."""
        # While SSL_shutdown looks for the peer's close_notify it processes the records
        # already received: OpenSSL 3 fails on application data there
        # (APPLICATION_DATA_AFTER_CLOSE_NOTIFY) and OpenSSL 1.1 drops it. So take unread
        # plaintext and ciphertext out of its way, and put them back for read().
        pending = self._sslobj.pending()
        while pending:
            self._backlog.append(self._sslobj.read(pending))
            pending = self._sslobj.pending()
        held = self._incoming.read()
        try:
            self._sslobj.unwrap()
        except ssl.SSLWantReadError:
            pass  # close_notify is in the outgoing BIO; the upstream's comes later
        except ssl.SSLError as exc:
            self._fatal(exc)
            return False
        finally:
            if held:
                self._incoming.write(held)
        self._flush()
        self._schedule()
        return True

    def _schedule(self) -> None:
        # Deferred, not called in place: resume_reading runs inside the peer leg's
        # resume_writing, and handing it data from there would re-enter that transport.
        if (
            self._scheduled is None
            and self._protocol is not None
            and not self._closing
            and not self._eof_in
        ):
            self._scheduled = asyncio.get_running_loop().call_soon(self._run_scheduled)

    def _run_scheduled(self) -> None:
        self._scheduled = None
        self._process()

    def _unschedule(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None

    def _process(self) -> None:
        """Hand decrypted bytes to the protocol until paused, drained or at EOF."""
        protocol = self._protocol
        assert protocol is not None
        sslobj, incoming = self._sslobj, self._incoming
        while not self._reading_paused and not self._closing and not self._eof_in:
            if self._backlog:  # rare: taken out of the way of our close_notify
                chunks, self._backlog = self._backlog, []
                size = sum(len(c) for c in chunks)
            else:
                chunks, size = [], 0
            end: ssl.SSLError | None = None
            while size < READ_BATCH:
                try:
                    data = sslobj.read(READ_BATCH - size)
                except ssl.SSLError as exc:
                    end = exc
                    break
                if not data:
                    end = ssl.SSLZeroReturnError()
                    break
                chunks.append(data)
                size += len(data)
                if not incoming.pending and not sslobj.pending():
                    # Every byte of ciphertext consumed and no plaintext left: one more
                    # read could only raise SSLWantReadError, which costs more than
                    # decrypting a small record (issue 11's benchmark).
                    end = _WANT_READ
                    break
            if chunks:
                protocol.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            if end is None:
                continue  # a full batch; more may be buffered
            if isinstance(end, ssl.SSLWantReadError):
                # Reading may have produced records to send (a TLS 1.3 KeyUpdate reply).
                self._flush()
                if self._raw_eof:
                    # TCP FIN without close_notify: an EOF, as most TLS clients treat it
                    # (Python's suppress_ragged_eofs); see docs/ambassador-tls.md.
                    self._deliver_eof()
                return
            if isinstance(end, ssl.SSLZeroReturnError):  # the upstream's close_notify
                self._deliver_eof()
                return
            if not self._closing:
                self._fatal(end)
            return

    def _deliver_eof(self) -> None:
        if self._eof_in or self._closing:
            return
        self._eof_in = True
        assert self._protocol is not None
        if not self._protocol.eof_received():
            self.close()

    def _fatal(self, exc: Exception) -> None:
        """A TLS error ends the leg with a reset; the protocol gets ``exc`` as the cause."""
        if self._error is None:
            self._error = exc
        self._closing = True
        self._unschedule()
        if self._raw is not None:
            reset_socket(self._raw.get_extra_info("socket"))
            self._raw.abort()

    def _lost_error(self) -> Exception | None:
        return self._error or self._lost_exc

    # -- called by the TCP transport (through _Wire) ---------------------------------------

    def _wake(self, exc: BaseException | None = None) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def _on_data(self, data: bytes) -> None:
        if self._closing or self._eof_in:
            return  # nothing is read after the upstream's close_notify
        self._incoming.write(data)
        if self._protocol is None:
            self._wake()
        elif not self._reading_paused:
            self._process()

    def _on_eof(self) -> None:
        self._raw_eof = True
        if self._protocol is None:
            self._wake()
        elif not self._reading_paused and not self._closing:
            self._process()

    def _on_pause_writing(self) -> None:
        self._writing_paused = True
        if self._protocol is not None:
            self._protocol.pause_writing()

    def _on_resume_writing(self) -> None:
        self._writing_paused = False
        if self._protocol is not None:
            self._protocol.resume_writing()

    def _on_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._lost_exc = exc
        self._closing = True
        self._unschedule()
        if self._protocol is None:
            self._wake(exc or ConnectionResetError("upstream closed the connection"))
            return
        self._protocol.connection_lost(self._lost_error())


class _Wire(asyncio.Protocol):
    """The TCP transport's protocol: passes every event to its :class:`TLSTransport`."""

    def __init__(self, tls: TLSTransport) -> None:
        self._tls = tls

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._tls._raw = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._tls._on_data(data)

    def eof_received(self) -> bool:
        self._tls._on_eof()
        return True  # keep our write side open: the client may still be sending

    def pause_writing(self) -> None:
        self._tls._on_pause_writing()

    def resume_writing(self) -> None:
        self._tls._on_resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._tls._on_lost(exc)


async def connect(
    sock: socket.socket,
    context: ssl.SSLContext,
    *,
    server_hostname: str | None,
    handshake_timeout: float,
) -> TLSTransport:
    """Run the TLS client handshake on a connected TCP socket.

    Args:
        sock: a connected, non-blocking TCP socket; the transport owns it from now on.
        context: the client context (CA, client certificate, verification mode).
        server_hostname: SNI and the name verified against the certificate (an IP
            literal is verified against IP SANs and sends no SNI).
        handshake_timeout: seconds the whole handshake may take.

    Returns:
        The transport, handshake done, to be bound with :meth:`TLSTransport.attach`.

    Raises:
        ssl.SSLCertVerificationError: the upstream certificate did not verify.
        ssl.SSLError: any other TLS failure, including an EOF during the handshake.
        TimeoutError: the handshake took longer than ``handshake_timeout``.
        OSError: the TCP connection failed.
    """
    loop = asyncio.get_running_loop()
    tls = TLSTransport(context, server_hostname)
    await loop.create_connection(lambda: _Wire(tls), sock=sock)
    return await _handshake(tls, handshake_timeout)


async def accept(
    sock: socket.socket, context: ssl.SSLContext, *, handshake_timeout: float
) -> TLSTransport:
    """Run the TLS server handshake on an accepted socket (a listener that terminates
    the app's TLS: ``--listen-tls-cert``). Arguments, result and errors as :func:`connect`,
    ``context`` being a server context."""
    loop = asyncio.get_running_loop()
    tls = TLSTransport(context, None, server_side=True)
    await loop.connect_accepted_socket(lambda: _Wire(tls), sock=sock)
    return await _handshake(tls, handshake_timeout)


async def _handshake(tls: TLSTransport, seconds: float) -> TLSTransport:
    try:
        async with asyncio.timeout(seconds):
            await tls._handshake()
    except BaseException as exc:
        tls._handshake_failed(exc)
        raise
    return tls
