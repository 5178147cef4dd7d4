"""In-process servers for tests: small real TCP upstreams and an in-process ambassador.

Everything binds port 0 on loopback and reads the port back.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from podpatterns.ambassador import Ambassador, RouteConfig
from podpatterns.ambassador.config import UnixAddress
from podpatterns.commands.demo import echo
from podpatterns.options import HostPort

__all__ = [
    "LOOP",
    "Handler",
    "ambassador",
    "echo",
    "free_listener",
    "port_of",
    "rand",
    "read_all",
    "serve",
    "sha",
    "unix_path_of",
]

LOOP = "127.0.0.1"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def serve(handler: Handler, host: str = LOOP) -> AsyncIterator[HostPort]:
    """Run a TCP server on ``host`` port 0; yield its address."""
    writers: set[asyncio.StreamWriter] = set()
    tasks: set[asyncio.Task[None]] = set()

    async def tracked(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        writers.add(w)
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(r, w)
        finally:
            w.close()

    server = await asyncio.start_server(tracked, host, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield HostPort(host, port)
    finally:
        server.close()
        # Python 3.11's Server.close() leaves accepted connections open: close them.
        for task in tasks:
            task.cancel()
        for w in writers:
            w.transport.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


@asynccontextmanager
async def ambassador(upstreams: list[HostPort], **kw: Any) -> AsyncIterator[Ambassador]:
    """An in-process ambassador listening on 127.0.0.1 port 0."""
    kw.setdefault("listen", HostPort(LOOP, 0))
    amb = Ambassador([RouteConfig(upstream=tuple(upstreams), **kw)])
    await amb.start()
    try:
        yield amb
    finally:
        await amb.close()


def port_of(amb: Ambassador) -> int:
    """The TCP port of the first route."""
    addr = amb.addresses[0]
    assert isinstance(addr, HostPort)
    return addr.port


def unix_path_of(amb: Ambassador) -> str:
    """The socket path of the first route."""
    addr = amb.addresses[0]
    assert isinstance(addr, UnixAddress)
    return str(addr.path)


def free_listener(host: str = LOOP, backlog: int = 0) -> socket.socket:
    """A bound, listening socket that the test owns (for blackholes and refusals)."""
    s = socket.socket()
    s.bind((host, 0))
    s.listen(backlog)
    return s


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Read until EOF."""
    chunks = []
    while chunk := await reader.read(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def sha(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def rand(n: int) -> bytes:
    """``n`` random bytes."""
    return os.urandom(n)
