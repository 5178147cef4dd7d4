"""A counting HTTP receiver for the adapter benchmark, run in a process of its own.

It accepts ``POST`` (and ``PUT``) on any path, decompresses ``Content-Encoding: gzip``
bodies itself (so it can count the bytes on the wire), counts the newline-terminated
records in every body and answers 200. ``GET /count`` returns the totals as JSON, and
``GET /sample`` the first record it received, so the benchmark can check that every line
arrived and what a record looks like. It prints ``PORT <n>`` on stdout once it listens
(port 0 binds any free port). Usage::

    python bench/http_receiver.py [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import zlib

from aiohttp import web


class Counts:
    """What the receiver has seen."""

    def __init__(self) -> None:
        self.requests = 0
        self.lines = 0
        self.wire_bytes = 0
        self.body_bytes = 0
        self.gzip_requests = 0
        self.sample = b""


async def receive(request: web.Request) -> web.Response:
    """Count the records of one body; 200 when the body decodes, 400 when it does not."""
    counts: Counts = request.app["counts"]
    # Read the raw bytes: aiohttp would otherwise inflate the body before we see its size.
    raw = bytearray()
    async for chunk in request.content.iter_any():
        raw += chunk
    body = bytes(raw)
    counts.wire_bytes += len(body)
    if request.headers.get("Content-Encoding", "").lower() == "gzip":
        try:
            body = zlib.decompress(body, wbits=31)  # 31: gzip header and trailer
        except zlib.error as exc:
            return web.Response(status=400, text=f"bad gzip: {exc}")
        counts.gzip_requests += 1
    counts.requests += 1
    counts.body_bytes += len(body)
    counts.lines += body.count(b"\n")
    if not counts.sample and body:
        counts.sample = body.split(b"\n", 1)[0]
    return web.Response(status=200)


async def count(request: web.Request) -> web.Response:
    """The totals as JSON."""
    c: Counts = request.app["counts"]
    return web.json_response(
        {
            "requests": c.requests,
            "gzip_requests": c.gzip_requests,
            "lines": c.lines,
            "wire_bytes": c.wire_bytes,
            "body_bytes": c.body_bytes,
        }
    )


async def sample(request: web.Request) -> web.Response:
    """The first record received, as it arrived."""
    c: Counts = request.app["counts"]
    return web.Response(body=c.sample, content_type="application/octet-stream")


async def reset(request: web.Request) -> web.Response:
    """Zero the totals (between measurements)."""
    request.app["counts"] = Counts()
    return web.Response(status=204)


async def serve(port: int) -> None:
    """Listen on 127.0.0.1:``port`` until killed; print the bound port."""
    # auto_decompress off: receive() inflates, counting compressed and plain bytes.
    app = web.Application(
        client_max_size=256 * 1024 * 1024, handler_args={"auto_decompress": False}
    )
    app["counts"] = Counts()
    app.router.add_get("/count", count)
    app.router.add_get("/sample", sample)
    app.router.add_post("/reset", reset)
    app.router.add_route("POST", "/{tail:.*}", receive)
    app.router.add_route("PUT", "/{tail:.*}", receive)
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", port), backlog=128)
    await web.SockSite(runner, sock).start()
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def main() -> int:
    """Parse the flags and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
