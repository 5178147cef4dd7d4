"""``podpatterns demo``: a small Pod on loopback, end to end, with a readable summary.

An embedded upstream service (a line-echo server standing in for a database), the
ambassador in front of it on 127.0.0.1, a client opening many short connections and one
bulk transfer each way, the admin endpoints queried while it runs, an "app" that writes
its health record to a shared directory (served on ``/readyz/app``), then the app's
tombstone starting the ambassador's graceful shutdown (``--exit-with app``), which lets
an in-flight connection finish.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from podpatterns import logs
from podpatterns.ambassador import Ambassador, RouteConfig
from podpatterns.commands.common import Command, Flags
from podpatterns.health.writer import Writer
from podpatterns.options import HostPort, Option, parse_int, resolve
from podpatterns.runtime import RuntimeConfig

if TYPE_CHECKING:
    import aiohttp  # loaded by demo() itself: declaring the command must stay light

LOOPBACK = "127.0.0.1"


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo every byte back (requests are lines; bulk is arbitrary), then half-close."""
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _request(port: int) -> float:
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(b"PING\n")
    await writer.drain()
    line = await reader.readline()
    writer.close()
    await writer.wait_closed()
    if line != b"PING\n":
        raise RuntimeError(f"unexpected reply {line!r}")
    return time.perf_counter() - start


async def _bulk(port: int, size: int) -> tuple[bool, float]:
    payload = os.urandom(1024 * 1024) * (size // (1024 * 1024))
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    start = time.perf_counter()

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()  # half-close: the reply must still come back whole

    sender = asyncio.create_task(send())
    digest = hashlib.sha256()
    while chunk := await reader.read(1 << 20):
        digest.update(chunk)
    await sender
    elapsed = time.perf_counter() - start
    writer.close()
    return digest.digest() == hashlib.sha256(payload).digest(), elapsed


async def _get(session: aiohttp.ClientSession, base: str, path: str) -> tuple[int, str]:
    async with session.get(base + path) as resp:
        return resp.status, await resp.text()


async def demo(connections: int = 200, megabytes: int = 64) -> dict[str, Any]:
    """Run the demo and return its figures (the CLI prints them)."""
    server = await asyncio.start_server(echo, LOOPBACK, 0)
    up_port = server.sockets[0].getsockname()[1]
    amb = Ambassador(
        [RouteConfig(listen=HostPort(LOOPBACK, 0), upstream=(HostPort(LOOPBACK, up_port),))]
    )
    # The Pod's shared volume: the "app" container writes its health record there, and
    # the ambassador finishes when the app's tombstone appears (--exit-with app).
    health_dir = Path(tempfile.mkdtemp(prefix="podpatterns-demo-"))
    app = Writer(health_dir, "app")
    app.set_starting()
    from podpatterns.health.coordination import pod_runtime

    runtime = pod_runtime(
        RuntimeConfig(
            admin=HostPort(LOOPBACK, 0),
            drain_timeout=5.0,
            shutdown_delay=0.2,
            health_dir=health_dir,
            exit_with="app",
        ),
        [amb],
    )
    await runtime.start()
    port = amb.addresses[0].port  # type: ignore[union-attr]
    assert runtime.admin_address is not None
    base = f"http://{runtime.admin_address}"
    out: dict[str, Any] = {
        "upstream": f"{LOOPBACK}:{up_port}",
        "ambassador": f"{LOOPBACK}:{port}",
        "admin": base,
    }
    import aiohttp

    async with aiohttp.ClientSession() as session:
        out["readyz_before"] = (await _get(session, base, "/readyz"))[0]
        out["app_readyz_starting"] = (await _get(session, base, "/readyz/app"))[0]
        app.set_ready()
        out["app_readyz_ready"] = await _wait_status(session, base + "/readyz/app", 200)
        sem = asyncio.Semaphore(32)

        async def one() -> float:
            async with sem:
                return await _request(port)

        t0 = time.perf_counter()
        latencies = sorted(await asyncio.gather(*(one() for _ in range(connections))))
        out["requests"] = connections
        out["request_rate"] = connections / (time.perf_counter() - t0)
        out["latency_p50_ms"] = statistics.median(latencies) * 1000
        out["latency_p99_ms"] = (
            latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
        )
        ok, elapsed = await _bulk(port, megabytes * 1024 * 1024)
        out["bulk_ok"] = ok
        out["bulk_mb"] = megabytes
        out["bulk_gbit_s"] = megabytes * 8 * 1024 * 1024 / elapsed / 1e9 * 2  # both ways
        _, text = await _get(session, base, "/metrics")
        out["metrics"] = [
            line
            for line in text.splitlines()
            if line.startswith("podpatterns_ambassador_")
            and ("bytes_total" in line or "connections_total" in line or "closed_total" in line)
        ]
        # The app finishes: its tombstone starts the ambassador's graceful shutdown, with a
        # connection still open that finishes inside the drain.
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        t_tomb = time.perf_counter()
        app.mark_exited(0, reason="demo done")
        await runtime.wait_stop_requested()
        out["tombstone_ms"] = (time.perf_counter() - t_tomb) * 1000
        out["shutdown_reason"] = runtime.shutdown_reason
        shutdown = asyncio.create_task(runtime.shutdown())
        await asyncio.sleep(0.05)
        out["readyz_draining"] = (await _get(session, base, "/readyz"))[0]
        writer.write(b"LAST REQUEST DURING DRAIN\n")
        await writer.drain()
        out["drain_reply"] = (await reader.readline()).decode().strip()
        writer.close()
        t_drain = time.perf_counter()
        await shutdown
        out["drain_seconds"] = time.perf_counter() - t_drain
        out["cut_at_deadline"] = runtime.cut_total
    server.close()
    await server.wait_closed()
    shutil.rmtree(health_dir, ignore_errors=True)
    return out


async def _wait_status(session: aiohttp.ClientSession, url: str, want: int) -> int:
    """Poll ``url`` (bounded) until it answers ``want``; the view refreshes on its own."""
    status = 0
    for _ in range(200):
        async with session.get(url) as resp:
            status = resp.status
        if status == want:
            break
        await asyncio.sleep(0.01)
    return status


DEMO_OPTIONS: tuple[Option[Any], ...] = (
    Option(
        "connections",
        parse_int(1, 100_000),
        200,
        "client connections to open",
        metavar="N",
        scope="demo",
    ),
    Option(
        "megabytes",
        parse_int(1, 4096),
        64,
        "bulk MiB to push each way",
        metavar="MIB",
        scope="demo",
    ),
)


@dataclass(frozen=True)
class DemoConfig:
    """What ``podpatterns demo`` pushes through the Pod."""

    connections: int = DEMO_OPTIONS[0].default
    megabytes: int = DEMO_OPTIONS[1].default


def build(
    flags: Flags, env: Mapping[str, str], file: Mapping[str, Any], file_label: str = ""
) -> DemoConfig:
    """The demo's config from flags and the environment.

    Raises:
        ConfigError: a count out of range (naming the flag and the value).
    """
    return DemoConfig(**resolve(DEMO_OPTIONS, flags, env, file, file_label))


def main(config: DemoConfig) -> int:
    """Run the demo; 0 when everything it checks held."""
    return run_demo(config.connections, config.megabytes)


def run_demo(connections: int = 200, megabytes: int = 64) -> int:
    """Run :func:`demo` on uvloop when available and print the summary; exit code."""
    logs.configure("warning", "auto")
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        factory = None
    from podpatterns.adapter.demo import adapter_demo, summary

    with asyncio.Runner(loop_factory=factory) as runner:
        r = runner.run(demo(connections, megabytes))
        a = runner.run(adapter_demo())
    p = sys.stdout.write
    p("podpatterns demo: a Pod on loopback\n")
    p(f"  upstream service   {r['upstream']}  (embedded echo server)\n")
    p(f"  ambassador         {r['ambassador']} -> upstream\n")
    p(f"  admin endpoints    {r['admin']}\n\n")
    p(
        f"  /readyz            {r['readyz_before']} while serving, "
        f"{r['readyz_draining']} while draining\n"
    )
    p(
        f"  short requests     {r['requests']} connections, {r['request_rate']:.0f}/s, "
        f"p50 {r['latency_p50_ms']:.2f} ms, p99 {r['latency_p99_ms']:.2f} ms\n"
    )
    p(
        f"  bulk transfer      {r['bulk_mb']} MiB each way with half-close, checksum "
        f"{'OK' if r['bulk_ok'] else 'MISMATCH'}, {r['bulk_gbit_s']:.1f} Gbit/s total\n"
    )
    p(
        f"  /readyz/app        {r['app_readyz_starting']} while the app starts, "
        f"{r['app_readyz_ready']} once its record says ready\n"
    )
    p(
        f"  app tombstone      {r['shutdown_reason']} after {r['tombstone_ms']:.0f} ms "
        "(the ambassador drains when the app exits)\n"
    )
    p(
        f"  graceful shutdown  in-flight reply {r['drain_reply']!r}, drained in "
        f"{r['drain_seconds'] * 1000:.0f} ms, {r['cut_at_deadline']} cut\n\n"
    )
    p("  /metrics (excerpt)\n")
    for line in r["metrics"]:
        p(f"    {line}\n")
    p("\n")
    for line in summary(a):
        p(line + "\n")
    ok = r["bulk_ok"] and r["readyz_before"] == 200 and r["readyz_draining"] == 503
    ok = ok and r["app_readyz_ready"] == 200 and r["shutdown_reason"] == "exit-with:app"
    ok = ok and a["distinct"] == a["written"] and a["parse_errors"] == 0
    return 0 if ok else 1


COMMAND = Command(
    name="demo",
    help="run a small Pod on loopback and print what happened",
    description="An embedded upstream, the ambassador in front of it and a client "
    "pushing traffic through, then a graceful shutdown.",
    options=DEMO_OPTIONS,
    build=build,
    main=main,
)
