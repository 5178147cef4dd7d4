"""One proxied connection: identity, byte counts and how it ended.

Both relays (:mod:`.relay` and :mod:`.splice`) fill the same record, and call
:meth:`Connection.finish` exactly once when both sockets are closed.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

_ids = itertools.count(1)
_LINGER_RESET = struct.pack("ii", 1, 0)


def reset_socket(sock: socket.socket | None) -> None:
    """Make the next close of ``sock`` send a TCP RST instead of a FIN."""
    if sock is None:
        return
    # already closed, or a unix socket: a plain close is all there is
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def peer_label(peer: Any) -> str:
    """``ip:port`` for TCP peers, ``unix`` for unix-socket peers."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"[{peer[0]}]:{peer[1]}" if ":" in str(peer[0]) else f"{peer[0]}:{peer[1]}"
    return "unix"


class Relay(Protocol):
    """What a route needs from a running relay."""

    def counts(self) -> tuple[int, int]:
        """Bytes moved so far: (client -> upstream, upstream -> client)."""

    def half_closed(self) -> bool:
        """True once one direction has finished and the other still runs."""

    def abort(self) -> None:
        """Cut both legs now with a reset; :meth:`Connection.finish` follows."""

    def close(self) -> None:
        """End both legs with a FIN; :meth:`Connection.finish` follows once they close."""


class Connection:
    """Accounting for one client connection through the ambassador."""

    __slots__ = (
        "_client",
        "bytes_down",
        "bytes_up",
        "closed_by",
        "endpoint",
        "expires_at",
        "id",
        "idle_mark",
        "idle_since",
        "on_finish",
        "peer",
        "reason",
        "relay",
        "started",
        "upstream",
    )

    def __init__(
        self, client: str | None, on_finish: Callable[[Connection], None], peer: Any = None
    ) -> None:
        self.id = next(_ids)
        self._client = client
        self.peer = peer  # the address accept() gave: ``client`` is made from it when read
        self.upstream = ""
        self.endpoint: object = None
        self.started = time.monotonic()
        self.bytes_up = 0  # client -> upstream
        self.bytes_down = 0  # upstream -> client
        self.closed_by = ""  # "client", "upstream" or "proxy": who ended it first
        self.reason = ""  # eof, reset, error, idle_timeout, lifetime, drain_cut, ...
        self.relay: Relay | None = None
        self.on_finish: Callable[[Connection], None] | None = on_finish
        self.expires_at: float | None = None
        self.idle_mark = -1  # activity() at the last sweep
        self.idle_since = self.started

    @property
    def client(self) -> str:
        """``ip:port`` of the client (``unix`` for a unix socket), for logs: formatted
        when first read, as most connections are never logged one by one."""
        client = self._client
        if client is None:
            client = self._client = peer_label(self.peer)
        return client

    def note_end(self, closed_by: str, reason: str) -> None:
        """Record who ended the connection first and why (first call wins)."""
        if not self.closed_by:
            self.closed_by = closed_by
            self.reason = reason

    def end_by_proxy(self, reason: str) -> None:
        """The proxy ends the connection (timeout, drain cut): overrides earlier notes."""
        self.closed_by = "proxy"
        self.reason = reason

    def finish(self) -> None:
        """Called once by the relay when both legs are closed."""
        callback, self.on_finish = self.on_finish, None
        if callback is not None:
            callback(self)


def discard_input(sock: socket.socket, limit: int = 65536) -> None:
    """Read and drop what the peer sent and nobody read (up to ``limit`` bytes), without
    waiting, so that the close that follows sends a FIN: closing a socket with unread
    input sends a reset, and the peer may lose the last words written before it."""
    with contextlib.suppress(OSError):
        while limit > 0:
            data = sock.recv(min(limit, 16384), socket.MSG_DONTWAIT)
            if not data:
                return
            limit -= len(data)


def abandon(
    conn: Connection,
    csock: socket.socket,
    usock: socket.socket | None,
    reset: bool = True,
) -> None:
    """Tear down a connection whose relay never fully started; finish it once.

    ``reset=False`` closes the client with a FIN: a protocol handler's last words
    (an error message) are read before the end of the stream, not lost to a reset.
    """
    if conn.relay is not None:
        conn.relay.abort()  # resets the legs that have transports
    if reset:
        reset_socket(csock)
    if csock.fileno() >= 0:  # still ours: no transport took it
        if not reset:
            discard_input(csock)
        csock.close()
    if conn.relay is None and usock is not None and usock.fileno() >= 0:
        usock.close()
    conn.finish()  # idempotent: a no-op when the relay already finished it
