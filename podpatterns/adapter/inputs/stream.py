"""What the stream inputs share: TCP and unix stream listeners whose connections push.

The TCP input, the syslog stream inputs and the Fluent forward input differ only in how a
connection's bytes become records. The rest is here, once:

- binding a ``HostPort`` or a unix socket path (:mod:`podpatterns.listen`), and removing
  the socket file at close if it is still ours;
- one task per connection, owned by a :class:`~podpatterns.tasks.TaskSet` (a bug in it is
  logged as ``task_died`` and makes :meth:`StreamServer.is_live` False);
- :meth:`Connection.read`: the next chunk, read only once the spool has room (the stream
  contract of :mod:`podpatterns.adapter.inputs`: a full spool pushes back through the
  socket);
- :meth:`StreamServer.append`: an append retried until the spool takes it, pausing the
  connection while the spool is full, retrying a failing disk;
- :meth:`StreamServer.close`: stop accepting, end connections idle in a read, let appends
  in flight finish (within :data:`CLOSE_TIMEOUT`).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from podpatterns import logs
from podpatterns.adapter.inputs import Spool, SpoolFull, bind_input, port_of
from podpatterns.listen import remove_unix
from podpatterns.options import HostPort
from podpatterns.tasks import TaskSet

__all__ = ["CLOSE_TIMEOUT", "Connection", "ConnectionCounters", "StreamServer"]

CLOSE_TIMEOUT = 10.0
"""Seconds close() waits for appends in flight before cancelling them."""
BACKLOG = 1024


class ConnectionCounters(Protocol):
    """The counters a stream input keeps about its connections (plain integers)."""

    connections: int
    """Connections accepted."""
    connections_open: int
    """Connections open now."""
    connection_errors: int
    """Connections ended by an error."""
    paused: int
    """Appends refused because the spool was full (the connection paused)."""


class Connection:
    """One accepted connection: its reader and writer, read a chunk at a time."""

    def __init__(
        self,
        server: StreamServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        task: asyncio.Task[Any],
    ) -> None:
        self.writer = writer
        self._server = server
        self._reader = reader
        self._task = task

    async def read(self) -> bytes | None:
        """The next chunk (``b""`` at the end of the stream), read once the spool has
        room: nothing more is read while it is full.

        Returns:
            ``None`` when the connection failed (counted in ``connection_errors`` and
            logged as ``input_connection_failed``).
        """
        server = self._server
        idle = server.idle
        idle[self._task] = True  # close() may end it here: nothing of it is pending
        try:
            await server.spool.wait_for_space()
            return await self._reader.read(server.read_chunk)
        except OSError as exc:
            server.counters.connection_errors += 1
            server.log.warning("input_connection_failed", input=server.name, error=str(exc))
            return None
        finally:
            idle[self._task] = False


class StreamServer:
    """Listen on a TCP address or a unix stream socket; serve each connection in a task.

    Args:
        name: the input's name (its records' ``input``, its tasks' names, its logs).
        option: the option the address comes from, for errors.
        address: a ``HostPort`` (loopback unless told otherwise) or a unix socket path.
        serve: reads one connection to its end (its bytes to records, appended with
            :meth:`append`); the connection is closed when it returns.
        counters: where connections and pauses are counted.
        read_chunk: most bytes one :meth:`Connection.read` returns.
        mode: permissions of the unix socket file.
    """

    def __init__(
        self,
        name: str,
        option: str,
        address: HostPort | Path,
        serve: Callable[[Connection], Awaitable[None]],
        counters: ConnectionCounters,
        *,
        read_chunk: int,
        mode: int = 0o666,
    ) -> None:
        self.name = name
        self.counters = counters
        self.read_chunk = read_chunk
        self.address: HostPort | Path | None = None
        """Where it listens once started (the port the kernel chose, if 0)."""
        self.closing = False
        """True once :meth:`close` was called: connections stop reading."""
        self.idle: dict[asyncio.Task[Any], bool] = {}
        """Each connection's task -> waiting in :meth:`Connection.read`."""
        self.log = logs.get("adapter")
        self._option = option
        self._configured = address
        self._serve = serve
        self._mode = mode
        self._unix_ino: int | None = None
        self._server: asyncio.AbstractServer | None = None
        self._spool: Spool | None = None
        self._tasks = TaskSet(name)

    @property
    def spool(self) -> Spool:
        """The spool records go to.

        Raises:
            RuntimeError: not started.
        """
        if self._spool is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._spool

    @property
    def port(self) -> int:
        """The TCP port listened on (the one the kernel chose for port 0).

        Raises:
            RuntimeError: not started, or a unix socket.
        """
        return port_of(self.name, self.address)

    async def start(self, spool: Spool) -> None:
        """Bind and start accepting.

        Raises:
            BindError: the address or path cannot be bound.
        """
        self._spool = spool
        bound = bind_input(
            self.name, self._option, self._configured, socket.SOCK_STREAM, self._mode, self.log
        )
        self.address, self._unix_ino, sock = bound.address, bound.unix_ino, bound.sock
        sock.listen(BACKLOG)
        if sock.family == socket.AF_UNIX:
            self._server = await asyncio.start_unix_server(
                self._accepted, sock=sock, limit=self.read_chunk
            )
        else:
            self._server = await asyncio.start_server(
                self._accepted, sock=sock, limit=self.read_chunk
            )
        self.log.info("input_listening", input=self.name, address=str(self.address))

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback: the connection's task is owned by our TaskSet, not by asyncio.
        if self.closing:
            writer.close()
            return
        self.counters.connections += 1
        task = self._tasks.spawn(
            self._connection(reader, writer), f"{self.name}-conn", may_return=True
        )
        self.idle[task] = True

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        c = self.counters
        c.connections_open += 1
        try:
            await self._serve(Connection(self, reader, writer, task))
        finally:
            c.connections_open -= 1
            self.idle.pop(task, None)
            writer.close()

    async def append(self, append: Callable[[], Awaitable[None]]) -> bool:
        """Run ``append()`` (a spool append) until the spool takes it.

        While the spool is full the connection waits for space (counted in ``paused``):
        a stream pushes back. A failing disk is retried with backoff.

        Returns:
            False when shutting down with the spool full: nothing will make room, and
            nothing was stored (the caller counts the drop).
        """
        delay = 0.05
        while True:
            try:
                await append()
                return True
            except SpoolFull:
                if self.closing:
                    return False
                self.counters.paused += 1
                await self.spool.wait_for_space()
            except OSError:
                # The disk failed: keep the records and try again; reading stays paused.
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def close(self) -> None:
        """Stop accepting; connections idle in a read end, appends in flight finish
        (within :data:`CLOSE_TIMEOUT`), then the rest are cancelled. Removes the unix
        socket file if it is still ours."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for task, idle in list(self.idle.items()):
            if idle:
                task.cancel()
        busy = [t for t in self.idle if not t.done()]
        if busy:
            await asyncio.wait(busy, timeout=CLOSE_TIMEOUT)
        await self._tasks.aclose()
        if self._server is not None:
            await self._server.wait_closed()
        if isinstance(self._configured, Path):
            remove_unix(self._configured, self._unix_ino)
            self._unix_ino = None

    def is_live(self) -> bool:
        """No connection task has died of a bug (logged as ``task_died``)."""
        return self._tasks.healthy
