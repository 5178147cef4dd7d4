"""The runtime used as a library inside the caller's own event loop."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from podpatterns.ambassador import Ambassador, RouteConfig
from podpatterns.errors import BindError
from podpatterns.options import HostPort
from podpatterns.runtime import Phase, Runtime, RuntimeConfig
from tests.servers import echo, read_all, serve

LOOP = "127.0.0.1"


async def test_embedded_runtime_reports_ports_and_stops_without_signals() -> None:
    """A runtime starts in the caller's loop, reports bound ports, serves probes and
    stops cleanly through shutdown() with no signals and no sys.exit."""
    async with serve(echo) as up:
        amb = Ambassador([RouteConfig(listen=HostPort(LOOP, 0), upstream=(up,))])
        rt = Runtime(RuntimeConfig(admin=HostPort(LOOP, 0), drain_timeout=2), [amb])
        await rt.start()
        assert rt.phase is Phase.READY
        assert rt.admin_address is not None
        assert rt.admin_address.port != 0
        port = amb.addresses[0].port  # type: ignore[union-attr]
        assert port != 0
        async with aiohttp.ClientSession() as http:
            for path in ("/livez", "/readyz", "/startupz"):
                async with http.get(f"http://{rt.admin_address}{path}") as resp:
                    assert resp.status == 200
                    assert (await resp.json())["status"] == "ok"
        reader, writer = await asyncio.open_connection(LOOP, port)
        writer.write(b"hi")
        writer.write_eof()
        assert await read_all(reader) == b"hi"
        writer.close()
        await rt.shutdown()
        assert rt.phase in (Phase.STOPPED,)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(LOOP, port)


async def test_run_returns_after_request_shutdown() -> None:
    """run() serves until request_shutdown() and then drains; no work means no wait."""
    async with serve(echo) as up:
        amb = Ambassador([RouteConfig(listen=HostPort(LOOP, 0), upstream=(up,))])
        rt = Runtime(RuntimeConfig(drain_timeout=30), [amb])
        task = asyncio.create_task(rt.run())
        await asyncio.wait_for(rt.wait_started(), 5)
        rt.request_shutdown("test")
        async with asyncio.timeout(2):  # far below the 30 s drain deadline
            await task
        assert rt.shutdown_reason == "test"


async def test_bind_error_is_raised_and_earlier_routes_closed() -> None:
    """start() raises BindError naming the address; routes already bound are released."""
    taken = socket.socket()
    taken.bind((LOOP, 0))
    taken.listen()
    busy = taken.getsockname()[1]
    first = HostPort(LOOP, 0)
    amb = Ambassador(
        [
            RouteConfig(name="a", listen=first, upstream=(HostPort(LOOP, 9),)),
            RouteConfig(name="b", listen=HostPort(LOOP, busy), upstream=(HostPort(LOOP, 9),)),
        ]
    )
    rt = Runtime(RuntimeConfig(), [amb])
    try:
        with pytest.raises(BindError, match=f"cannot bind {LOOP}:{busy}"):
            await rt.start()
        assert rt.phase is Phase.STOPPED
        assert amb.routes[0].listener is not None
        assert amb.routes[0].listener.sock.fileno() == -1  # closed again
    finally:
        taken.close()


async def test_admin_bind_error() -> None:
    """An admin address in use raises BindError naming --admin."""
    taken = socket.socket()
    taken.bind((LOOP, 0))
    taken.listen()
    try:
        rt = Runtime(RuntimeConfig(admin=HostPort(LOOP, taken.getsockname()[1])), [])
        with pytest.raises(BindError, match="--admin: cannot bind"):
            await rt.start()
    finally:
        taken.close()


def test_tune_gc_raises_only_the_young_threshold() -> None:
    """The process entry collects the youngest generation less often (hot paths make
    thousands of short-lived containers a batch); the older generations keep theirs."""
    import gc

    from podpatterns.runtime.process import GC_YOUNG_THRESHOLD, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
    finally:
        gc.set_threshold(*before)
