"""The PostgreSQL handler's wire details that no stock server of ours can show.

PostgreSQL 18's protocol 3.2 makes cancel keys variable (up to 256 bytes); the servers
in the peer tests are PostgreSQL 15 with 4-byte keys, so the lengths are checked here on
a socket pair, through the same session code the route runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

import pytest
import structlog

from podpatterns.ambassador import Ambassador, RouteConfig
from podpatterns.ambassador.pgdrain import Frames, TransactionWatch
from podpatterns.ambassador.postgres import (
    CANCEL_REQUEST,
    PostgresHandler,
    error_response,
)
from podpatterns.ambassador.protocol import Failure, SocketStream
from podpatterns.ambassador.upstreams import Endpoint
from podpatterns.options import HostPort
from tests.waiting import eventually


def cancel_request(key: bytes) -> bytes:
    return struct.pack("!ii", 8 + len(key), CANCEL_REQUEST) + key


@pytest.mark.parametrize("secret_len", [4, 32, 256])
async def test_cancel_keys_of_every_allowed_length_are_routed(secret_len: int) -> None:
    """A CancelRequest whose key is 4 to 256 bytes is pinned to the endpoint that owns it."""
    handler = PostgresHandler(None)
    owner = Endpoint(HostPort("127.0.0.1", 5433))
    key = struct.pack("!i", 4242) + bytes(range(256))[:secret_len]
    handler.keys.add(key, owner)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.sendall(cancel_request(key))
        session = handler.open(SocketStream(ours), "unix")
        assert await session.accept() is True
        assert session.pinned is owner


@pytest.mark.parametrize("secret_len", [3, 257])
async def test_cancel_keys_of_other_lengths_are_dropped(secret_len: int) -> None:
    """A key shorter than 4 or longer than 256 bytes dials nothing, as the server ignores it."""
    handler = PostgresHandler(None)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        theirs.sendall(cancel_request(struct.pack("!i", 1) + b"k" * secret_len))
        session = handler.open(SocketStream(ours), "unix")
        assert await session.accept() is False
        assert session.pinned is None


def test_error_response_fields() -> None:
    """An ErrorResponse carries S and V severity, the SQLSTATE and the message, NUL-ended."""
    msg = error_response("53300", "too many")
    assert msg[:1] == b"E"
    assert struct.unpack("!i", msg[1:5])[0] == len(msg) - 1
    assert msg[5:] == b"SFATAL\0VFATAL\0C53300\0Mtoo many\0\0"


def test_sslmode_prefer_route_is_built_and_warns() -> None:
    """A --pg-sslmode prefer route builds, and says once that it may go on without TLS."""
    cfg = RouteConfig(
        listen=HostPort("127.0.0.1", 0),
        upstream=(HostPort("db.example.com", 5432),),
        protocol="postgres",
        upstream_tls=True,
        pg_sslmode="prefer",
    )
    with structlog.testing.capture_logs() as logs:
        Ambassador([cfg])
    assert "pg_sslmode_prefer" in [e["event"] for e in logs]


def _msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", 4 + len(body)) + body


def test_frames_find_ready_for_query_across_any_split() -> None:
    """ReadyForQuery and its status are found however the stream is cut into reads."""
    stream = (
        _msg(b"T", b"x" * 30)
        + _msg(b"D", b"y" * 70000)
        + _msg(b"C", b"SELECT 1\0")
        + _msg(b"Z", b"T")
        + _msg(b"Z", b"I")
    )
    for step in (1, 2, 5, 6, 7, 4096, len(stream)):
        frames = Frames(frozenset(b"Z"))
        found = []
        for i in range(0, len(stream), step):
            found += frames.walk(stream[i : i + step])
        assert found == [(ord("Z"), ord("T")), (ord("Z"), ord("I"))], step
        assert frames.at_boundary()


def test_frames_count_requests_without_body() -> None:
    """Sync (no body) and Query are both requests; a stream cut mid-message is not whole."""
    frames = Frames(frozenset(b"QSF"))
    data = _msg(b"P", b"\0select 1\0\0\0") + _msg(b"S") + _msg(b"Q", b"select 1\0")
    assert [k for k, _ in frames.walk(data)] == [ord("S"), ord("Q")]
    assert frames.walk(_msg(b"Q", b"select 2\0")[:7]) == [(ord("Q"), ord("s"))]
    assert not frames.at_boundary()


def test_a_pipeline_without_its_sync_is_not_at_rest() -> None:
    """Parse/Bind/Execute sent and not yet synced keep an idle session from being ended."""
    watch = TransactionWatch()
    assert watch.at_rest()
    watch.passed("client", _msg(b"P", b"\0select 1\0\0\0") + _msg(b"B", b"\0\0" + bytes(6)))
    assert not watch.at_rest()
    watch.passed("client", _msg(b"E", b"\0\0\0\0\0") + _msg(b"S"))
    assert not watch.at_rest()  # the Sync is not answered yet
    watch.passed("upstream", _msg(b"C", b"SELECT 1\0") + _msg(b"Z", b"I"))
    assert watch.at_rest()
    watch.passed("client", _msg(b"Q", b"begin\0"))
    watch.passed("upstream", _msg(b"C", b"BEGIN\0") + _msg(b"Z", b"T"))
    assert not watch.at_rest()  # inside a transaction block


class _Holding:
    """A session whose startup waits for the client, and whose refusal is a bug."""

    pinned = None

    def __init__(self, client: SocketStream) -> None:
        self.client = client

    async def accept(self) -> bool:
        await self.client.read_exactly(1)
        return False

    async def connect(self, upstream: socket.socket, endpoint: Endpoint) -> None:
        raise AssertionError("never dialed")

    async def refuse(self, failure: Failure) -> None:
        raise RuntimeError(f"refusal bug ({failure.kind})")

    def finished(self) -> None:
        pass


class _HoldingHandler:
    name = "holding"

    def open(self, client: SocketStream, label: str) -> _Holding:
        return _Holding(client)


async def test_a_refusal_that_crashes_is_logged_and_its_socket_closed() -> None:
    """A bug in a refusal (--on-limit reject) is logged with its traceback, the refused
    socket is closed, and the route stays live: the refusal task has an owner."""
    cfg = RouteConfig(
        listen=HostPort("127.0.0.1", 0),
        upstream=(HostPort("127.0.0.1", 9),),
        max_connections=1,
        on_limit="reject",
    )
    with structlog.testing.capture_logs() as events:
        amb = Ambassador([cfg], handlers={"default": _HoldingHandler()})
        await amb.start()
        try:
            address = amb.tcp_address()
            _, holder = await asyncio.open_connection(address.host, address.port)
            route = amb.routes[0]
            await eventually(lambda: route.in_flight() == 1)
            reader, refused = await asyncio.open_connection(address.host, address.port)
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read() == b""  # closed, by the refusal's owner
            await eventually(lambda: "connection_setup_bug" in [e["event"] for e in events])
            assert amb.is_live()
            for writer in (holder, refused):
                writer.close()
        finally:
            await amb.close()
    # the first; closing the route refuses the holder too ("shutdown"), with the same bug
    bug = next(e for e in events if e["event"] == "connection_setup_bug")
    assert bug["log_level"] == "error" and bug["error"] == "refusal bug (limit)"
    assert isinstance(bug["exc_info"], RuntimeError)
