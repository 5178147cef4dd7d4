"""A listening socket with its own accept loop.

Accepting is a reader callback on the listening socket that takes up to a batch of
connections per wake-up. Pausing removes the callback, so excess connections wait in the
kernel backlog (the default behaviour at the connection cap) rather than being refused.

A route whose connections all start the same short way (a PostgreSQL pool's apps) may
instead let the event loop's own server accept (:meth:`Listener.serve`): each connection
is born a transport with its protocol, without a socket object or a task of ours, which
is most of what a new connection costs in Python (issue 14's ``pgbench -C`` benchmark).

With ``--listen-tls-cert``, :class:`ListenerTLS` holds the server context with which a
protocol route terminates the app's TLS (PostgreSQL: after its SSLRequest).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import os
import socket
import ssl
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from podpatterns.ambassador.config import ListenAddress, RouteConfig, UnixAddress
from podpatterns.ambassador.tls import TLSContextProvider, _why
from podpatterns.errors import BindError, ConfigError
from podpatterns.listen import bind_inet, bind_unix
from podpatterns.options import HostPort

BACKLOG = 4096
_BATCH = 64


def bind(address: ListenAddress, backlog: int = BACKLOG) -> socket.socket:
    """Create, bind and listen a non-blocking socket (:mod:`podpatterns.listen`: a stale
    unix socket file is replaced, a live one or another file is an error).

    Raises:
        BindError: the address is in use, not permitted or not local.
    """
    if isinstance(address, UnixAddress):
        sock = bind_unix(address.path, socket.SOCK_STREAM, None, "--listen")
    else:
        sock = bind_inet(address, socket.SOCK_STREAM, "--listen")
    try:
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise BindError(f"--listen: cannot listen on {address}: {exc.strerror}") from None
    return sock


class Listener:
    """Accept connections on a bound socket and hand each to ``on_accept``."""

    def __init__(
        self,
        sock: socket.socket,
        on_accept: Callable[[socket.socket, Any], None],
        can_resume: Callable[[], bool] = lambda: True,
        unix: UnixAddress | None = None,
    ) -> None:
        self.sock = sock
        self._fd = sock.fileno()
        self._on_accept = on_accept
        self._can_resume = can_resume
        self._loop = asyncio.get_running_loop()
        self.accepting = False
        self.accept_errors = 0
        self._server: asyncio.AbstractServer | None = None  # serve(): the loop's server
        self.unix_path: str | None = None
        if sock.family == socket.AF_UNIX:
            if unix is None:
                # bind() binds under a temporary name and renames: getsockname() has it.
                raise ValueError("a unix socket listener needs its UnixAddress")
            self.unix_path = str(unix.path)
            self.address: ListenAddress = unix
        else:
            host, port = sock.getsockname()[:2]
            self.address = HostPort(host, port)

    async def serve(self, protocol_factory: Callable[[], asyncio.Protocol]) -> None:
        """Let the event loop's server accept, each connection a transport with the
        protocol ``protocol_factory`` makes; for good (no :meth:`pause`: a route with a
        connection cap keeps the reader callback, see Route.start).

        The server gets a duplicate of the socket: closing it (:meth:`close`) leaves this
        one to remove a unix socket's file, as the reader callback's way does.
        """
        if self.accepting or self.sock.fileno() < 0:
            raise RuntimeError("serve() on a listener accepting or closed")
        dup = self.sock.dup()
        try:
            if dup.family == socket.AF_UNIX:
                server = await self._loop.create_unix_server(
                    protocol_factory, sock=dup, backlog=BACKLOG
                )
            else:
                server = await self._loop.create_server(protocol_factory, sock=dup, backlog=BACKLOG)
        except BaseException:
            dup.close()
            raise
        self._server = server
        self.accepting = True

    def resume(self) -> None:
        """Start (or restart) accepting."""
        if self._server is not None:
            return  # serve(): the loop's server accepts until close()
        if not self.accepting and self.sock.fileno() >= 0:
            self.accepting = True
            self._loop.add_reader(self._fd, self._accept)

    def pause(self) -> None:
        """Stop accepting; new connections queue in the kernel backlog."""
        if self._server is not None:
            raise RuntimeError("a listener that serve()s does not pause")
        if self.accepting:
            self.accepting = False
            self._loop.remove_reader(self._fd)

    def close(self) -> None:
        """Stop accepting and close the socket (removes a unix socket file)."""
        if self._server is not None:
            self._server.close()  # closes its duplicate of the socket
            self._server = None
            self.accepting = False
        self.pause()
        if self.sock.fileno() >= 0:
            self.sock.close()
            if self.unix_path:
                with contextlib.suppress(OSError):
                    os.unlink(self.unix_path)

    def _retry(self) -> None:
        if self._can_resume():  # not at the connection cap, not shutting down
            self.resume()

    def _accept(self) -> None:
        for _ in range(_BATCH):
            if not self.accepting:
                return
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE/ENFILE/ENOBUFS: back off briefly instead of spinning.
                self.accept_errors += 1
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.pause()
                    self._loop.call_later(0.1, self._retry)
                return
            conn.setblocking(False)
            self._on_accept(conn, peer)


class ListenerTLS(TLSContextProvider):
    """The listener's TLS server context (``--listen-tls-cert``/``--listen-tls-key``),
    rebuilt when the files change on disk as the upstream's context is (a Secret
    volume's ``..data`` swap included); live connections keep theirs.

    Args:
        cert: the server certificate, with its chain (PEM).
        key: its private key (PEM).
        alpn: the ALPN protocols the server selects from (PostgreSQL: ``postgresql``).
        route: the route's name, for logs.
    """

    def __init__(
        self, cert: Path, key: Path, *, alpn: tuple[str, ...] = (), route: str = "default"
    ) -> None:
        self._certificates: weakref.WeakKeyDictionary[ssl.SSLContext, bytes] = (
            weakref.WeakKeyDictionary()
        )
        super().__init__(ca=None, cert=cert, key=key, verify=False, alpn=alpn, route=route)

    def certificate(self, context: ssl.SSLContext) -> bytes | None:
        """The certificate (DER) ``context`` presents, for SCRAM channel binding
        (``tls-server-end-point``); None for a context not built here. The ssl module
        does not tell a server its own certificate, so each context is kept with the
        first certificate of the file it was loaded from."""
        return self._certificates.get(context)

    def _build(self, initial: bool = False) -> ssl.SSLContext:
        assert self.cert is not None and self.key is not None
        try:
            pem = self.cert.read_bytes()
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(self.cert), str(self.key))
            if self.cert.read_bytes() != pem:  # replaced while loading: next time
                raise OSError(errno.EAGAIN, "the certificate file changed while loading")
            der = first_certificate(pem)
        except (OSError, ssl.SSLError) as exc:
            if initial:
                raise ConfigError(
                    f"--listen-tls-cert/--listen-tls-key: {str(self.cert)!r} / "
                    f"{str(self.key)!r}: cannot load: {_why(exc)}"
                ) from None
            raise
        # the TLS leg does not hold writes across a TLS 1.2 renegotiation (tlsleg.py)
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        if self.alpn:
            ctx.set_alpn_protocols(list(self.alpn))
        self._certificates[ctx] = der
        return ctx


def first_certificate(pem: bytes) -> bytes:
    """The first certificate (DER) of a PEM file: the leaf, in a chain file as
    ``load_cert_chain`` reads it. Raises :class:`ssl.SSLError` when there is none."""
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    start = pem.find(begin)
    stop = pem.find(end, start)
    try:
        if start < 0 or stop < 0:
            raise ValueError
        return base64.b64decode(b"".join(pem[start + len(begin) : stop].split()), validate=True)
    except ValueError:
        raise ssl.SSLError("no PEM certificate") from None


def listener_tls(cfg: RouteConfig) -> ListenerTLS | None:
    """The route's listener TLS, or None without ``--listen-tls-cert``."""
    if cfg.listen_tls_cert is None or cfg.listen_tls_key is None:
        return None
    alpn = ("postgresql",) if cfg.protocol == "postgres" else ()
    return ListenerTLS(cfg.listen_tls_cert, cfg.listen_tls_key, alpn=alpn, route=cfg.name)
