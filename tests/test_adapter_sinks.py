"""Sinks: HTTP retries and dead letters, TCP reconnects, stdout line limits, file sink."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from podpatterns.adapter import Adapter
from podpatterns.adapter.sinks import DeadLetter, encode
from podpatterns.adapter.sinks.file import FileSink
from podpatterns.adapter.sinks.http import HttpSink
from podpatterns.adapter.sinks.retry import Backoff, parse_retry_after
from podpatterns.adapter.sinks.stdout import StdoutSink, fit
from podpatterns.adapter.sinks.tcp import TcpSink
from podpatterns.options import HostPort
from tests.adapter_harness import (
    SeqWriter,
    check_delivery,
    config,
    read_ndjson,
    seqs_of,
    serve_post,
)
from tests.waiting import eventually


class Collector:
    """An aiohttp server that fails its first ``fail`` requests with ``status``."""

    def __init__(self, fail: int = 0, status: int = 503, retry_after: str | None = None) -> None:
        self.fail = fail
        self.status = status
        self.retry_after = retry_after
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.records: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        if len(self.requests) <= self.fail:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return web.Response(status=self.status, text="not now", headers=headers)
        if body[:2] == b"\x1f\x8b":  # aiohttp decompresses by itself; just in case
            body = gzip.decompress(body)
        if request.headers.get("Content-Type") == "application/json":
            self.records.extend(json.loads(body))
        else:
            self.records.extend(json.loads(x) for x in body.splitlines())
        return web.Response(status=200)


async def serve(c: Collector) -> tuple[web.AppRunner, str]:
    return await serve_post("/ingest", c.handle)


async def test_http_sink_down_then_back_loses_nothing(tmp_path: Path) -> None:
    """The HTTP sink refuses, then answers 503 several times, then recovers: 0 lost, 0 dupes."""
    c = Collector(fail=5, status=503)
    runner, url = await serve(c)
    port = int(url.split(":")[2].split("/")[0])
    await runner.cleanup()  # down: connection refused
    w = SeqWriter(tmp_path / "app.log")
    cfg = config(
        tmp_path, "*.log", sink="http", sink_url=url, sink_backoff=0.02, sink_backoff_max=0.1
    )
    adapter = Adapter(cfg)
    await adapter.start()
    try:
        w.write(3000)
        await eventually(lambda: adapter.sink.collect()["retries"] >= 3)
        app = web.Application()
        app.router.add_post("/ingest", c.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        w.write(3000)
        await eventually(lambda: len(c.records) >= 6000)
    finally:
        adapter.stop_accepting()
        await adapter.wait_drained()
        await adapter.close()
        await runner.cleanup()
    check_delivery(seqs_of(r["message"] for r in c.records), 6000, 0)


async def test_http_sink_options_and_retry_after(tmp_path: Path) -> None:
    """gzip, JSON array, headers and a bearer token from a file; 429 honours Retry-After."""
    c = Collector(fail=1, status=429, retry_after="0")
    runner, url = await serve(c)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    sink = HttpSink(
        url, fmt="json", gzip_body=True, headers=(("X-Tenant", "t1"),), token_file=token
    )
    await sink.start()
    try:
        await sink.send([{"message": "a"}, {"message": "b"}])
    finally:
        await sink.close()
        await runner.cleanup()
    headers, _ = c.requests[-1]
    assert headers["Authorization"] == "Bearer s3cret"
    assert headers["X-Tenant"] == "t1"
    assert headers["Content-Encoding"] == "gzip"
    assert c.records == [{"message": "a"}, {"message": "b"}]
    assert len(c.requests) == 2


async def test_http_sink_logs_never_show_url_credentials() -> None:
    """Basic auth in --sink-url works, and the sink's events (failing, recovered) show the
    URL without its user:password@."""
    c = Collector(fail=1, status=503, retry_after="0")
    runner, url = await serve(c)
    secret_url = url.replace("http://", "http://bob:pw-SECRET@")
    sink = HttpSink(secret_url)
    await sink.start()
    try:
        with structlog.testing.capture_logs() as logs:
            await sink.send([{"message": "a"}])
    finally:
        await sink.close()
        await runner.cleanup()
    headers, _ = c.requests[-1]
    assert headers["Authorization"] == "Basic " + base64.b64encode(b"bob:pw-SECRET").decode()
    events = [e["event"] for e in logs]
    assert "sink_failing" in events and "sink_recovered" in events, events
    assert "pw-SECRET" not in repr(logs)


async def test_http_4xx_goes_to_the_dead_letter_file(tmp_path: Path) -> None:
    """A 400 is not retried: the records go to the dead-letter file with status and reason."""
    c = Collector(fail=1, status=400)
    runner, url = await serve(c)
    dl = DeadLetter(tmp_path / "dead.ndjson", 1 << 20)
    sink = HttpSink(url, dead_letter=dl)
    await sink.start()
    try:
        await sink.send([{"message": "bad"}])
    finally:
        await sink.close()
        await runner.cleanup()
    [item] = read_ndjson(tmp_path / "dead.ndjson")
    assert item == {"record": {"message": "bad"}, "status": 400, "reason": "not now"}
    assert len(c.requests) == 1


def test_dead_letter_is_size_capped(tmp_path: Path) -> None:
    """Beyond --dead-letter-max-bytes records are counted, not written."""
    one = len(encode({"record": {"message": "x" * 50}, "status": 400, "reason": "r"})) + 1
    dl = DeadLetter(tmp_path / "dead.ndjson", 2 * one + 10)
    dl.write([({"message": "x" * 50}, 400, "r")] * 10)
    assert dl.written == 2
    assert dl.dropped == 8
    assert (tmp_path / "dead.ndjson").stat().st_size == 2 * one


def test_backoff_is_capped_jittered_and_honours_retry_after() -> None:
    """Backoff grows exponentially up to the cap, with jitter; Retry-After wins (capped)."""
    b = Backoff(0.1, 1.0)
    delays = [b.next_delay() for _ in range(20)]
    assert all(0 <= d <= 1.0 for d in delays)
    assert b.next_delay(retry_after=0.5) == 0.5
    assert b.next_delay(retry_after=100) == 1.0
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("soon") is None
    assert Backoff(0.1, 1, retries=2).exhausted() is False


async def test_tcp_sink_reconnects_and_resends(tmp_path: Path) -> None:
    """The TCP sink reconnects after the peer drops it; every line arrives."""
    got: list[bytes] = []
    conns = 0

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        first = conns == 1
        while line := await r.readline():
            got.append(line)
            if first:
                break  # drop the first connection after one line
        w.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sink = TcpSink(HostPort("127.0.0.1", port), backoff=0.01, backoff_max=0.05)
    await sink.start()
    try:
        await sink.send([{"n": 1}, {"n": 2}])
        await eventually(sink.peer_closed)
        for i in range(3, 50):
            await sink.send([{"n": i}])
        await eventually(lambda: {json.loads(x)["n"] for x in got} >= set(range(3, 50)))
    finally:
        await sink.close()
        server.close()
        await server.wait_closed()
    assert conns >= 2


def test_stdout_lines_stay_under_the_limit() -> None:
    """A record longer than --stdout-max-line is split into marked parts, or truncated."""
    rec = {"message": "é" * 20000 + '\n"x', "file": "/f", "offset": 7}
    parts = fit(rec, 4096, "split")
    assert all(len(p) <= 4096 for p in parts)
    decoded = [json.loads(p) for p in parts]
    assert "".join(d["message"] for d in decoded) == rec["message"]
    assert [d["part"] for d in decoded] == list(range(1, len(parts) + 1))
    assert all(d["offset"] == 7 for d in decoded)
    [cut] = fit(rec, 4096, "truncate")
    assert len(cut) <= 4096
    assert json.loads(cut)["truncated"] is True


async def test_stdout_sink_writes_json_lines(tmp_path: Path) -> None:
    """The stdout sink writes one JSON object per line to its descriptor."""
    import os

    path = tmp_path / "out"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    sink = StdoutSink(1024, "split", fd=fd)
    await sink.start()
    await sink.send([{"message": "a"}, {"message": "b" * 5000}])
    os.close(fd)
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[0]) == {"message": "a"}
    assert all(len(x) < 1024 for x in lines)
    assert sink.collect()["oversized"] == 1


async def test_file_sink_appends_and_fsyncs(tmp_path: Path) -> None:
    """The file sink appends NDJSON and fsyncs each batch when asked."""
    sink = FileSink(tmp_path / "out.ndjson", fsync=True)
    await sink.start()
    await sink.send([{"a": 1}])
    await sink.send([{"a": 2}])
    await sink.close()
    assert read_ndjson(tmp_path / "out.ndjson") == [{"a": 1}, {"a": 2}]
    assert sink.fsyncs == 2
    assert encode({"k": "é"}) == '{"k":"é"}'.encode()
    assert json.loads(encode({"k": "\ud800"})) == {"k": "\ud800"}  # a lone surrogate


async def test_file_sink_ends_a_line_torn_by_a_crash(tmp_path: Path) -> None:
    """After a SIGKILL mid-batch left half a record, the resent records are each whole
    (the torn half becomes one invalid line of its own, not the start of the next)."""
    out = tmp_path / "out.ndjson"
    out.write_bytes(b'{"a":1}\n{"a":2,"mess')  # killed while writing the second record
    sink = FileSink(out)
    await sink.start()
    await sink.send([{"a": 2}, {"a": 3}])  # the unacknowledged batch, sent again
    await sink.close()
    lines = out.read_bytes().splitlines()
    assert lines == [b'{"a":1}', b'{"a":2,"mess', b'{"a":2}', b'{"a":3}']
    sink = FileSink(out)  # a file that ends with a newline gets nothing added
    await sink.start()
    await sink.close()
    assert out.read_bytes().splitlines() == lines


async def test_https_sink_verifies_the_server(tmp_path: Path) -> None:
    """HTTPS: accepted with --sink-ca naming the server's CA; an unknown CA is retried, not sent."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    c = Collector()
    app = web.Application()
    app.router.add_post("/ingest", c.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    url = f"https://127.0.0.1:{runner.addresses[0][1]}/ingest"
    good = HttpSink(url, ca_file=ca_file)
    untrusted = HttpSink(url, retries=2, backoff=0.01, dead_letter=DeadLetter(None, 0))
    await good.start()
    await untrusted.start()
    try:
        await good.send([{"message": "secure"}])
        await untrusted.send([{"message": "never"}])
    finally:
        await good.close()
        await untrusted.close()
        await runner.cleanup()
    assert c.records == [{"message": "secure"}]
    assert untrusted.rejected == 1 and untrusted.dead_letter.dropped == 1
