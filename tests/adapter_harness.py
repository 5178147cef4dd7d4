"""Helpers for the adapter tests: sequence-numbered writers, a recording sink, checks."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aiohttp import web

from podpatterns.adapter import Adapter, AdapterConfig
from tests.peers import missing
from tests.waiting import eventually

SEQ = re.compile(r"seq=(\d+)")


def line(seq: int, pad: int = 40) -> bytes:
    """The test line for ``seq``: ``seq=N`` plus padding, newline-terminated."""
    return f"seq={seq} {'x' * pad}\n".encode()


class SeqWriter:
    """Append numbered lines to a file the way an application does (O_APPEND)."""

    def __init__(self, path: Path, start: int = 0) -> None:
        self.path = path
        self.next = start
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, n: int) -> None:
        """Write the next ``n`` lines in one write."""
        data = b"".join(line(s) for s in range(self.next, self.next + n))
        os.write(self.fd, data)
        self.next += n

    def reopen(self) -> None:
        """Close and open the path again (what an app does after a rotation)."""
        os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def close(self) -> None:
        """Close the descriptor."""
        os.close(self.fd)


class ListSink:
    """A sink that keeps what it was sent (acknowledges at once unless ``down``)."""

    name = "list"

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.batches = 0
        self.max_batch = 0
        self.down = False
        self._up = asyncio.Event()
        self._up.set()

    async def start(self) -> None:
        """Nothing to open."""

    async def send(self, records: list[dict[str, Any]]) -> None:
        """Keep the batch (after waiting while ``down``)."""
        await self._up.wait()
        self.records.extend(records)
        self.batches += 1
        self.max_batch = max(self.max_batch, len(records))

    def set_down(self, down: bool) -> None:
        """Make :meth:`send` block (down) or pass (up)."""
        if down:
            self._up.clear()
        else:
            self._up.set()

    async def close(self) -> None:
        """Nothing to close."""

    def collect(self) -> dict[str, Any]:
        """No counters."""
        return {}

    def seqs(self) -> list[int]:
        """The sequence numbers received, in order."""
        return seqs_of(r.get("message", "") for r in self.records)


def seqs_of(messages: Iterable[str]) -> list[int]:
    """Sequence numbers found in ``messages``."""
    out = []
    for m in messages:
        found = SEQ.search(m)
        if found:
            out.append(int(found.group(1)))
    return out


def read_ndjson(path: Path) -> list[dict[str, Any]]:
    """Records of an NDJSON file (a torn last line is ignored)."""
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for raw in path.read_bytes().splitlines():
        try:
            out.append(json.loads(raw))
        except ValueError:
            continue
    return out


def check_delivery(got: list[int], expected: int, max_duplicates: int) -> None:
    """Assert every seq in ``range(expected)`` arrived, with few duplicates."""
    counts = Counter(got)
    missing = [s for s in range(expected) if s not in counts]
    dupes = sum(c - 1 for c in counts.values())
    assert not missing, f"{len(missing)} missing, first {missing[:10]}"
    assert dupes <= max_duplicates, f"{dupes} duplicates > {max_duplicates}"
    extra = [s for s in counts if s >= expected]
    assert not extra, f"unexpected seqs {extra[:10]}"


def config(tmp: Path, *paths: str, **kw: Any) -> AdapterConfig:
    """A config tailing ``paths`` (relative to ``tmp``) with fast test timings."""
    kw.setdefault("checkpoint_dir", tmp / "cp")
    kw.setdefault("reconcile_interval", 0.1)
    kw.setdefault("rotate_wait", 0.3)
    kw.setdefault("batch_max_records", 500)
    return AdapterConfig(path=tuple(str(tmp / p) for p in paths), **kw)


@asynccontextmanager
async def running(cfg: AdapterConfig, sink: ListSink, **kw: Any) -> AsyncIterator[Adapter]:
    """An in-process adapter; drained (as on SIGTERM) and closed on exit."""
    adapter = Adapter(cfg, sink=sink, **kw)
    await adapter.start()
    try:
        yield adapter
    finally:
        adapter.stop_accepting()
        async with asyncio.timeout(20):
            await adapter.wait_drained()
        await adapter.close()


async def serve_post(
    route: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> tuple[web.AppRunner, str]:
    """An aiohttp server on a free loopback port answering POST ``route`` with
    ``handler``: its runner (``cleanup()`` it) and the route's URL."""
    app = web.Application()
    app.router.add_post(route, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}{route}"


class Receiver:
    """A real HTTP log receiver in a thread, for adapter processes: it keeps the NDJSON
    records POSTed to it; while :attr:`down`, it drops every connection unanswered (the
    adapter sees a network error, as from a peer that is down).
    """

    def __init__(self) -> None:
        self.down = threading.Event()
        self.records: list[dict[str, Any]] = []
        self.refused = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if receiver.down.is_set():
                    with receiver._lock:
                        receiver.refused += 1
                    self.close_connection = True
                    self.connection.close()
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                records = [json.loads(raw) for raw in body.splitlines() if raw]
                with receiver._lock:
                    receiver.records.extend(records)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ingest"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def seqs(self) -> list[int]:
        """The sequence numbers received, in order."""
        with self._lock:
            return seqs_of(str(r.get("message", "")) for r in self.records)

    def distinct(self) -> int:
        """How many distinct sequence numbers were received."""
        return len(set(self.seqs()))

    def close(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join()


def logrotate_binary() -> str:
    """The real logrotate (installed with apt-get when missing and root); skips without it."""
    found = shutil.which("logrotate") or (
        "/usr/sbin/logrotate" if os.path.exists("/usr/sbin/logrotate") else None
    )
    if found is None:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            subprocess.run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "logrotate"],
                check=False,
                capture_output=True,
                env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                timeout=300,
            )
            found = shutil.which("logrotate") or (
                "/usr/sbin/logrotate" if os.path.exists("/usr/sbin/logrotate") else None
            )
        if found is None:
            missing("logrotate is not installed (apt-get install logrotate)")
    return found


async def write_until_blocked(
    writer: asyncio.StreamWriter, line: Callable[[int], str], chunks: int = 200
) -> int:
    """Write chunks of 1000 numbered lines (``line(seq)``) until a drain takes longer
    than a second: the peer stopped reading. Bounded: ``chunks`` chunks and 60 s.

    Returns:
        How many lines were written (every one of them must arrive).

    Raises:
        AssertionError: the writer never blocked.
    """
    total = 0
    async with asyncio.timeout(60):
        for _ in range(chunks):
            writer.write("".join(line(total + i) for i in range(1000)).encode())
            total += 1000
            try:
                async with asyncio.timeout(1.0):
                    await writer.drain()
            except TimeoutError:
                return total
    raise AssertionError(f"the writer never blocked ({total} lines written)")


async def resume_until_delivered(sink: ListSink, writer: asyncio.StreamWriter, total: int) -> None:
    """Bring the sink back up, let the blocked writer finish and close, and wait until
    every one of ``total`` numbered lines has arrived."""
    sink.set_down(False)
    async with asyncio.timeout(60):
        await writer.drain()
    writer.close()
    await writer.wait_closed()
    await eventually(lambda: len(set(sink.seqs())) == total, within=60)
