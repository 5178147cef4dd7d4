"""The zero-copy relay: ``os.splice`` socket -> pipe -> socket, driven by the event loop.

Each direction owns a pipe (taken lazily on its first bytes, so idle connections hold
no pipes, and returned to a small pool when the connection ends empty). A readable
source is spliced into the pipe, the pipe into the destination; when the destination
would block, reading stops and a writer callback waits for it. Bytes in flight per
direction are bounded by the pipe (``buffer_size``; the kernel counts pipe slots, not
bytes, so the real bound is a small multiple of it: a 1 MiB pipe filled from TCP held up
to 5.8 MB in the measurements this relay was designed from. That kernel memory is not in
the RSS figures of docs/benchmarks.md, whose "Memory" section counts the pipes' fds).

EOF on a source becomes ``shutdown(SHUT_WR)`` on the destination once the pipe is empty
(half-close); a reset or error on either socket resets the other. Only for plaintext
TCP/unix legs: TLS goes through :mod:`.relay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import socket

from podpatterns.ambassador.connection import Connection, reset_socket

SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0
_POOL_MAX = 64


def available() -> bool:
    """True when this platform has ``os.splice`` (Linux, Python >= 3.10)."""
    return hasattr(os, "splice") and hasattr(fcntl, "F_SETPIPE_SZ")


class PipePool:
    """Reuse empty pipes across connections: saves three syscalls per direction."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = []

    def take(self) -> tuple[int, int]:
        if self._free:
            return self._free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # over /proc/sys/fs/pipe-max-size or the user's pipe quota: keep the default size
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, self.size)
        return r, w

    def give(self, pipe: tuple[int, int], empty: bool) -> None:
        if empty and len(self._free) < _POOL_MAX:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        while self._free:
            r, w = self._free.pop()
            os.close(r)
            os.close(w)


class _Direction:
    __slots__ = (
        "done",
        "dst",
        "dst_fd",
        "eof",
        "inflight",
        "nbytes",
        "pipe",
        "relay",
        "src",
        "src_fd",
        "src_side",
        "writing",
    )

    def __init__(
        self, relay: SpliceRelay, src: socket.socket, dst: socket.socket, src_side: str
    ) -> None:
        self.relay = relay
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.src_side = src_side
        self.pipe: tuple[int, int] | None = None
        self.inflight = 0
        self.nbytes = 0
        self.eof = False
        self.done = False
        self.writing = False

    def on_readable(self) -> None:
        relay = self.relay
        if self.pipe is None:
            try:
                self.pipe = relay.pool.take()
            except OSError:
                # EMFILE/ENFILE: no pipe for this direction. Fail this connection; left
                # registered, the readable socket would spin the loop forever.
                relay.conn.end_by_proxy("no_pipe")
                relay.abort()
                return
        try:
            n = os.splice(self.src_fd, self.pipe[1], relay.chunk, flags=SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            relay.failed(self.src_side, exc)
            return
        if n == 0:
            self.eof = True
            relay.loop.remove_reader(self.src_fd)
            if self.inflight == 0:
                self._finish()
            return
        self.nbytes += n
        self.inflight += n
        self.flush()

    def flush(self) -> None:
        relay = self.relay
        assert self.pipe is not None
        while self.inflight:
            try:
                m = os.splice(self.pipe[0], self.dst_fd, self.inflight, flags=SPLICE_FLAGS)
            except BlockingIOError:
                if not self.writing:
                    self.writing = True
                    if not self.eof:
                        relay.loop.remove_reader(self.src_fd)
                    relay.loop.add_writer(self.dst_fd, self.flush)
                return
            except OSError as exc:
                relay.failed("upstream" if self.src_side == "client" else "client", exc)
                return
            self.inflight -= m
        if self.writing:
            self.writing = False
            relay.loop.remove_writer(self.dst_fd)
            if not self.eof:
                relay.loop.add_reader(self.src_fd, self.on_readable)
        if self.eof:
            self._finish()

    def _finish(self) -> None:
        """Source sent FIN and the pipe is empty: half-close toward the destination."""
        if self.done:
            return
        self.done = True
        relay = self.relay
        relay.conn.note_end(self.src_side, "eof")
        # the destination may already be gone; its own direction reports that
        with contextlib.suppress(OSError):
            self.dst.shutdown(socket.SHUT_WR)
        relay.direction_done()


class SpliceRelay:
    """Relay two connected, non-blocking sockets with ``os.splice`` (see module doc)."""

    __slots__ = ("chunk", "closed", "conn", "csock", "down", "loop", "pool", "up", "usock")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: Connection,
        csock: socket.socket,
        usock: socket.socket,
        pool: PipePool,
    ) -> None:
        self.loop = loop
        self.conn = conn
        self.csock = csock
        self.usock = usock
        self.pool = pool
        self.chunk = pool.size
        self.closed = False
        self.up = _Direction(self, csock, usock, "client")
        self.down = _Direction(self, usock, csock, "upstream")
        conn.relay = self

    def start(self) -> None:
        """Begin relaying in both directions."""
        self.loop.add_reader(self.up.src_fd, self.up.on_readable)
        self.loop.add_reader(self.down.src_fd, self.down.on_readable)

    # -- Relay protocol ------------------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        return self.up.nbytes, self.down.nbytes

    def half_closed(self) -> bool:
        return self.up.done != self.down.done

    def abort(self) -> None:
        self.conn.note_end("proxy", self.conn.reason or "aborted")
        self._close(reset=True)

    def close(self) -> None:
        """End both sockets with a FIN; bytes still in the pipes are dropped."""
        self.conn.note_end("proxy", self.conn.reason or "closed")
        self._close(reset=False)

    # -- internals -----------------------------------------------------------------------

    def direction_done(self) -> None:
        if self.up.done and self.down.done:
            self._close(reset=False)

    def failed(self, side: str, exc: OSError) -> None:
        reset = exc.errno in (errno.ECONNRESET, errno.EPIPE)
        self.conn.note_end(side, "reset" if reset else "error")
        self._close(reset=True)

    def _close(self, reset: bool) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.loop
        for d in (self.up, self.down):
            if not d.eof:
                loop.remove_reader(d.src_fd)
            if d.writing:
                loop.remove_writer(d.dst_fd)
            if d.pipe is not None:
                self.pool.give(d.pipe, empty=d.inflight == 0)
                d.pipe = None
        for sock in (self.csock, self.usock):
            if reset:
                reset_socket(sock)
            sock.close()
        self.conn.bytes_up = self.up.nbytes
        self.conn.bytes_down = self.down.nbytes
        self.conn.finish()
