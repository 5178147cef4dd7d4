"""Relay correctness over real sockets, for both relays (splice and Protocol)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from tests.servers import ambassador, echo, port_of, rand, read_all, serve, sha
from tests.waiting import eventually

LOOP = "127.0.0.1"


async def test_round_trip_checksums_both_ways(relay_mode: str) -> None:
    """Large payloads cross both ways concurrently, byte-exact, in order."""
    down_payload = rand(6 * 1024 * 1024)
    received_up: list[str] = []

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        send = asyncio.create_task(_send_then_eof(w, down_payload))
        received_up.append(sha(await read_all(r)))
        await send
        w.close()

    up_payload = rand(8 * 1024 * 1024 + 123)
    async with serve(upstream) as addr, ambassador([addr], splice=relay_mode) as amb:
        reader, writer = await asyncio.open_connection(LOOP, port_of(amb))
        send = asyncio.create_task(_send_then_eof(writer, up_payload))
        got = await read_all(reader)
        await send
        writer.close()
        await eventually(lambda: bool(received_up) and amb.in_flight() == 0)
        stats = amb.routes[0].stats
    assert sha(got) == sha(down_payload)
    assert received_up == [sha(up_payload)]
    assert stats.bytes_up == len(up_payload)
    assert stats.bytes_down == len(down_payload)


async def _send_then_eof(w: asyncio.StreamWriter, data: bytes) -> None:
    w.write(data)
    await w.drain()
    w.write_eof()


async def test_client_half_close_still_gets_late_reply(relay_mode: str) -> None:
    """A client that shut down its write side still receives a reply sent later."""

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        request = await read_all(r)  # EOF from the client arrives first
        await asyncio.sleep(0.5)
        w.write(b"reply to " + request)
        await w.drain()
        w.close()

    async with serve(upstream) as addr, ambassador([addr], splice=relay_mode) as amb:
        reader, writer = await asyncio.open_connection(LOOP, port_of(amb))
        writer.write(b"question")
        writer.write_eof()
        assert await read_all(reader) == b"reply to question"
        writer.close()


@pytest.mark.slow
async def test_half_close_reply_after_ten_seconds() -> None:
    """Both relays deliver a reply that comes 10 s after the client's FIN."""

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_all(r)
        await asyncio.sleep(10)
        w.write(b"late")
        await w.drain()
        w.close()

    async def one(mode: str) -> bytes:
        async with serve(upstream) as addr, ambassador([addr], splice=mode) as amb:
            reader, writer = await asyncio.open_connection(LOOP, port_of(amb))
            writer.write(b"q")
            writer.write_eof()
            data = await read_all(reader)
            writer.close()
            return data

    assert list(await asyncio.gather(one("on"), one("off"))) == [b"late", b"late"]


async def test_upstream_half_close_then_client_keeps_sending(relay_mode: str) -> None:
    """The upstream's FIN reaches the client while the client's data still flows up."""
    got_up: list[bytes] = []

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"banner")
        w.write_eof()  # the upstream is done talking; it keeps listening
        got_up.append(await read_all(r))
        w.close()

    tail = rand(2 * 1024 * 1024)
    async with serve(upstream) as addr, ambassador([addr], splice=relay_mode) as amb:
        reader, writer = await asyncio.open_connection(LOOP, port_of(amb))
        assert await read_all(reader) == b"banner"  # EOF seen by the client
        await _send_then_eof(writer, tail)
        await eventually(lambda: bool(got_up))
        writer.close()
    assert sha(got_up[0]) == sha(tail)


def _rst(w: asyncio.StreamWriter) -> None:
    sock = w.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    w.transport.abort()


async def test_upstream_reset_reaches_client_as_reset(relay_mode: str) -> None:
    """An upstream RST mid-stream is passed to the client as a RST, not a clean EOF."""

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"partial")
        await w.drain()
        await r.readexactly(4)
        _rst(w)

    async with serve(upstream) as addr, ambassador([addr], splice=relay_mode) as amb:
        reader, writer = await asyncio.open_connection(LOOP, port_of(amb))
        assert await reader.readexactly(7) == b"partial"
        writer.write(b"boom")
        with pytest.raises(ConnectionResetError):
            async with asyncio.timeout(5):
                await read_all(reader)
        writer.close()
        await eventually(lambda: amb.in_flight() == 0)
        assert amb.routes[0].stats.closed["reset"] == 1


async def test_client_reset_reaches_upstream_as_reset(relay_mode: str) -> None:
    """A client RST is passed to the upstream as a RST."""
    outcome: list[str] = []
    ready = asyncio.Event()

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        ready.set()
        try:
            await read_all(r)
            outcome.append("eof")
        except ConnectionResetError:
            outcome.append("reset")
        w.close()

    async with serve(upstream) as addr, ambassador([addr], splice=relay_mode) as amb:
        _, writer = await asyncio.open_connection(LOOP, port_of(amb))
        writer.write(b"hello")
        await writer.drain()
        await asyncio.wait_for(ready.wait(), 5)
        _rst(writer)
        await eventually(lambda: bool(outcome))
    assert outcome == ["reset"]


async def test_sockets_closed_once_and_nothing_leaks(relay_mode: str) -> None:
    """After many connections, the proxy holds no extra file descriptors."""
    import os

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async with serve(echo) as addr, ambassador([addr], splice=relay_mode) as amb:
        port = port_of(amb)
        reader, writer = await asyncio.open_connection(LOOP, port)  # warm pools
        await _send_then_eof(writer, b"x")
        await read_all(reader)
        writer.close()
        await eventually(lambda: amb.in_flight() == 0)
        before = fds()
        for _ in range(50):
            reader, writer = await asyncio.open_connection(LOOP, port)
            await _send_then_eof(writer, b"ping")
            assert await read_all(reader) == b"ping"
            writer.close()
            await writer.wait_closed()
        await eventually(lambda: amb.in_flight() == 0)
        await eventually(lambda: fds() <= before)
        assert amb.routes[0].stats.closed["eof"] == 51


async def test_slow_reader_does_not_grow_memory(relay_mode: str) -> None:
    """A client that stops reading stalls the upstream's writes (backpressure)."""
    sent = 0
    stalled = asyncio.Event()

    async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal sent
        chunk = b"z" * 65536
        try:
            while sent < 512 * 1024 * 1024:
                w.write(chunk)
                try:
                    async with asyncio.timeout(0.5):
                        await w.drain()
                except TimeoutError:
                    stalled.set()
                    await w.drain()
                sent += len(chunk)
        except ConnectionError:
            pass
        w.close()

    async with (
        serve(upstream) as addr,
        ambassador([addr], splice=relay_mode, buffer_size=256 * 1024) as amb,
    ):
        reader, writer = await asyncio.open_connection(LOOP, port_of(amb), limit=1 << 16)
        writer.transport.pause_reading()  # type: ignore[attr-defined]
        await asyncio.wait_for(stalled.wait(), 20)
        # Kernel socket buffers on three sockets plus the relay's bound; far below 512 MiB.
        assert sent < 64 * 1024 * 1024, sent
        first = sent
        # Lets time pass to prove no progress; slowness cannot make a stalled relay move.
        await asyncio.sleep(0.3)
        assert sent - first <= 1 << 20  # no progress while nobody reads
        writer.transport.resume_reading()  # type: ignore[attr-defined]
        await reader.readexactly(1 << 20)
        writer.close()
        del amb


async def test_upstream_refusing_fails_fast_and_is_counted(relay_mode: str) -> None:
    """A refused upstream closes the client with a reset and counts reason=refused."""
    s = socket.socket()
    s.bind((LOOP, 0))
    port = s.getsockname()[1]  # bound, never listening: connects are refused
    from podpatterns.options import HostPort

    try:
        async with ambassador(
            [HostPort(LOOP, port)], splice=relay_mode, connect_retries=1, retry_backoff=0.01
        ) as amb:
            reader, writer = await asyncio.open_connection(LOOP, port_of(amb))
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(5):
                    await read_all(reader)
            writer.close()
            await eventually(lambda: amb.in_flight() == 0)
            stats = amb.routes[0].stats
            assert stats.failed["refused"] == 1
            assert stats.connect_failures[(f"{LOOP}:{port}", "refused")] >= 1
    finally:
        s.close()
