"""Endpoint selection, retries, health and timeouts against real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections import Counter

import pytest

from podpatterns.ambassador import dial, proxy_protocol
from podpatterns.ambassador.upstreams import UpstreamPool
from podpatterns.options import HostPort
from tests.servers import (
    Handler,
    ambassador,
    echo,
    free_listener,
    port_of,
    read_all,
    serve,
    unix_path_of,
)
from tests.waiting import eventually

LOOP = "127.0.0.1"


def named(name: bytes) -> Handler:
    """A server that answers every connection with its name and closes."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(name)
        await w.drain()
        w.close()

    return handler


def greet_and_hold(greeting: bytes) -> Handler:
    """A server that greets and keeps the connection open until the client closes."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(greeting)
        await w.drain()
        await read_all(r)

    return handler


async def ask(port: int) -> bytes:
    """Connect through the ambassador and read the answer to EOF."""
    reader, writer = await asyncio.open_connection(LOOP, port)
    try:
        async with asyncio.timeout(10):
            return await read_all(reader)
    finally:
        writer.close()


def refused_address() -> tuple[socket.socket, HostPort]:
    """A bound, non-listening port: connects to it are refused."""
    s = socket.socket()
    s.bind((LOOP, 0))
    return s, HostPort(LOOP, s.getsockname()[1])


async def test_failover_to_second_endpoint() -> None:
    """With the first endpoint refusing, connections fail over to the second."""
    dead_sock, dead = refused_address()
    try:
        async with serve(named(b"B")) as b, ambassador([dead, b], retry_backoff=0.01) as amb:
            assert [await ask(port_of(amb)) for _ in range(3)] == [b"B"] * 3
            route = amb.routes[0]
            # passive health: after the first failure the dead endpoint is skipped
            assert route.stats.connect_failures[(str(dead), "refused")] == 1
            assert not route.pool.endpoints[0].is_up(asyncio.get_running_loop().time() + 0)
    finally:
        dead_sock.close()


async def test_blackholed_endpoint_times_out_then_fails_over() -> None:
    """An endpoint that never answers SYNs costs one connect timeout, then failover."""
    hole = free_listener(backlog=0)  # backlog full after one queued connection
    filler = []
    for _ in range(3):  # fill the accept queue; later SYNs are dropped (no RST)
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(hole.getsockname())
        filler.append(s)
    black = HostPort(LOOP, hole.getsockname()[1])
    try:
        async with (
            serve(named(b"B")) as b,
            ambassador([black, b], connect_timeout=0.3, retry_backoff=0.01) as amb,
        ):
            assert await ask(port_of(amb)) == b"B"
            stats = amb.routes[0].stats
            assert stats.connect_failures[(str(black), "timeout")] == 1
    finally:
        for s in filler:
            s.close()
        hole.close()


async def test_all_endpoints_down_counts_failure() -> None:
    """When no endpoint answers, the client is reset and the failure is counted."""
    s1, a1 = refused_address()
    s2, a2 = refused_address()
    try:
        async with ambassador([a1, a2], connect_retries=3, retry_backoff=0.01) as amb:
            with pytest.raises(ConnectionResetError):
                await ask(port_of(amb))
            await eventually(lambda: amb.in_flight() == 0)
            stats = amb.routes[0].stats
            assert stats.failed["refused"] == 1
            assert sum(stats.connect_failures.values()) == 4  # 1 + 3 retries
    finally:
        s1.close()
        s2.close()


async def test_round_robin_spreads_connections() -> None:
    """round_robin sends consecutive connections to each endpoint in turn."""
    async with (
        serve(named(b"A")) as a,
        serve(named(b"B")) as b,
        serve(named(b"C")) as c,
        ambassador([a, b, c], balance="round_robin") as amb,
    ):
        seen = Counter([await ask(port_of(amb)) for _ in range(9)])
    assert seen == Counter({b"A": 3, b"B": 3, b"C": 3})


async def test_least_conn_prefers_idle_endpoint() -> None:
    """least_conn picks the endpoint with fewer open connections."""

    async with (
        serve(greet_and_hold(b"A")) as a,
        serve(named(b"B")) as b,
        ambassador([a, b], balance="least_conn") as amb,
    ):
        reader, writer = await asyncio.open_connection(LOOP, port_of(amb))
        assert await reader.readexactly(1) == b"A"  # one open connection on A
        assert await ask(port_of(amb)) == b"B"
        writer.close()


async def test_active_health_check_marks_endpoint_down_and_up() -> None:
    """Active TCP checks take a dead endpoint out and put it back when it returns."""
    sock, addr = refused_address()
    async with (
        serve(named(b"B")) as b,
        ambassador([addr, b], health_check_interval=0.05, health_check_timeout=0.2) as amb,
    ):
        ep = amb.routes[0].pool.endpoints[0]
        await eventually(lambda: ep.healthy is False)
        assert await ask(port_of(amb)) == b"B"
        assert amb.routes[0].stats.connect_failures[(str(addr), "refused")] == 0
        sock.listen(8)  # the endpoint comes back
        await eventually(lambda: ep.healthy is True)
    sock.close()


async def test_ready_requires_upstream() -> None:
    """With --ready-requires-upstream, readiness follows endpoint health."""
    sock, addr = refused_address()
    async with ambassador(
        [addr], ready_requires_upstream=True, health_check_interval=0.05, health_check_timeout=0.2
    ) as amb:
        await eventually(lambda: not amb.is_ready())
        sock.listen(8)
        await eventually(amb.is_ready)
    sock.close()


async def test_readiness_waits_for_the_first_check_but_routing_does_not() -> None:
    """No readiness on a guess; meanwhile connections still follow the policy's order."""
    async with serve(named(b"A")) as a, serve(named(b"B")) as b:
        pool = UpstreamPool([a, b], active_checks=True)
        assert not pool.any_healthy()  # nothing has been checked yet
        assert [ep.address for ep in pool.candidates()] == [a, b]  # failover order kept
        assert UpstreamPool([a]).any_healthy()  # without active checks: up
        checks = asyncio.create_task(pool.health_loop(60.0, 5.0))
        try:
            await eventually(pool.any_healthy)
            assert [ep.healthy for ep in pool.endpoints] == [True, True]
        finally:
            checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checks


async def test_out_of_file_descriptors_is_a_counted_dial_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """socket() failing (EMFILE) ends the dial as a DialError, not an uncaught exception,
    and does not mark the endpoint down: it is not the endpoint's fault."""

    class NoDescriptors:
        def __getattr__(self, name: str) -> object:
            return getattr(socket, name)

        @staticmethod
        def socket(*args: object) -> socket.socket:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(dial, "socket", NoDescriptors())
    pool = UpstreamPool([HostPort(LOOP, 9)])
    policy = dial.DialPolicy(1.0, 2, 0.01, 0.01, keepalive=True, nodelay=True)
    ended: list[BaseException | None] = []
    dial.Dialer(
        asyncio.get_running_loop(), pool, policy, lambda s, e, exc: ended.append(exc)
    ).start()
    assert len(ended) == 1
    assert isinstance(ended[0], dial.DialError) and ended[0].reason == "error"
    assert "Too many open files" in str(ended[0])
    assert pool.any_healthy()


async def test_connection_limit_waits_in_backlog() -> None:
    """At the cap, new connections wait in the kernel backlog and proceed later."""

    async with serve(greet_and_hold(b"hi")) as a, ambassador([a], max_connections=2) as amb:
        port = port_of(amb)
        held = [await asyncio.open_connection(LOOP, port) for _ in range(2)]
        for r, _ in held:
            assert await r.readexactly(2) == b"hi"
        assert not amb.is_ready()  # saturated: readiness 503
        r3, w3 = await asyncio.open_connection(LOOP, port)  # completes in the backlog
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await r3.readexactly(2)
        assert amb.routes[0].stats.accepted == 2
        held[0][1].close()  # one slot frees up
        assert await asyncio.wait_for(r3.readexactly(2), 5) == b"hi"
        for _, w in [*held[1:], (r3, w3)]:
            w.close()
        await eventually(lambda: amb.in_flight() == 0)
        assert amb.is_ready()


async def test_connection_limit_reject_mode() -> None:
    """With --on-limit reject, excess connections are reset at once and counted."""

    async with (
        serve(greet_and_hold(b"hi")) as a,
        ambassador([a], max_connections=1, on_limit="reject") as amb,
    ):
        r1, w1 = await asyncio.open_connection(LOOP, port_of(amb))
        assert await r1.readexactly(2) == b"hi"
        with pytest.raises(ConnectionResetError):
            await ask(port_of(amb))
        assert amb.routes[0].stats.refused["limit"] == 1
        w1.close()


@pytest.mark.parametrize(
    ("option", "reason"),
    [("idle_timeout", "idle_timeout"), ("max_lifetime", "max_lifetime")],
)
async def test_idle_timeout_and_max_lifetime_close(option: str, reason: str) -> None:
    """Idle and over-age connections are closed and counted by reason."""
    async with serve(echo) as a, ambassador([a], **{option: 0.2}) as amb:
        reader, writer = await asyncio.open_connection(LOOP, port_of(amb))
        writer.write(b"x")
        assert await reader.readexactly(1) == b"x"
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(5):
                await read_all(reader)
        writer.close()
        await eventually(lambda: amb.in_flight() == 0)
        assert amb.routes[0].stats.closed[reason] == 1


async def test_half_close_timeout() -> None:
    """A half-closed connection idle past --half-close-timeout is closed."""

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_all(r)
        await asyncio.sleep(30)  # never answers

    async with serve(silent) as a, ambassador([a], half_close_timeout=0.2) as amb:
        reader, writer = await asyncio.open_connection(LOOP, port_of(amb))
        writer.write(b"q")
        writer.write_eof()
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(5):
                await read_all(reader)
        writer.close()
        await eventually(lambda: amb.in_flight() == 0)
        assert amb.routes[0].stats.closed["half_close_timeout"] == 1


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_proxy_protocol_header_carries_client_address(version: str, relay_mode: str) -> None:
    """The upstream receives a PROXY header naming the real client, then the data."""
    got: list[bytes] = []

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.append(await read_all(r))
        w.close()

    async with (
        serve(upstream) as a,
        ambassador([a], proxy_protocol=version, splice=relay_mode) as amb,
    ):
        reader, writer = await asyncio.open_connection(LOOP, port_of(amb))
        client_port = writer.get_extra_info("sockname")[1]
        writer.write(b"payload")
        writer.write_eof()
        await read_all(reader)
        await eventually(lambda: bool(got))
        writer.close()
    expected = proxy_protocol.header(version, (LOOP, client_port), (LOOP, port_of(amb)))
    assert got[0] == expected + b"payload"
    if version == "v1":
        assert expected == f"PROXY TCP4 {LOOP} {LOOP} {client_port} {port_of(amb)}\r\n".encode()
    else:
        assert expected.startswith(proxy_protocol.V2_SIGNATURE + b"\x21\x11\x00\x0c")


async def test_unix_socket_listener(tmp_path: object, relay_mode: str) -> None:
    """A unix-socket listener relays to a TCP upstream and removes its file on close."""
    from pathlib import Path

    from podpatterns.ambassador.config import UnixAddress

    assert isinstance(tmp_path, Path)
    path = tmp_path / "db.sock"
    async with serve(echo) as a:
        async with ambassador([a], listen=UnixAddress(path), splice=relay_mode) as amb:
            reader, writer = await asyncio.open_unix_connection(unix_path_of(amb))
            writer.write(b"over unix")
            writer.write_eof()
            assert await read_all(reader) == b"over unix"
            writer.close()
        assert not path.exists()
