"""The PostgreSQL handler's wire details that no stock server of ours can show.

PostgreSQL 18's protocol 3.2 makes cancel keys variable (up to 256 bytes); the servers
in the peer tests are PostgreSQL 15 with 4-byte keys, so the lengths are checked here on
a socket pair, through the same session code the route runs.
"""

from __future__ import annotations

import socket
import struct

import pytest
import structlog

from podpatterns.ambassador import Ambassador, RouteConfig
from podpatterns.ambassador.postgres import (
    CANCEL_REQUEST,
    PostgresHandler,
    error_response,
)
from podpatterns.ambassador.protocol import SocketStream
from podpatterns.ambassador.upstreams import Endpoint
from podpatterns.options import HostPort


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
