"""The HTTP input: OTLP/HTTP logs from the OpenTelemetry SDK's exporter, NDJSON, the error
answers, a full spool, and the kill-9 contract (every record answered 200 arrives)."""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from podpatterns.adapter import Adapter, AdapterConfig
from podpatterns.adapter.inputs.http import HttpInput
from podpatterns.errors import ConfigError
from podpatterns.options import HostPort
from tests.adapter_harness import ListSink, Receiver, read_ndjson
from tests.proc import Proc, outputs, run
from tests.waiting import eventually, wait_until

MiB = 1024 * 1024


def http_config(tmp: Path, **kw: Any) -> AdapterConfig:
    """An adapter with only the HTTP input, on an ephemeral loopback port."""
    return AdapterConfig(http_listen=HostPort("127.0.0.1", 0), spool_dir=tmp / "spool", **kw)


@asynccontextmanager
async def serving(cfg: AdapterConfig, sink: ListSink | None = None) -> AsyncIterator[str]:
    """An in-process adapter; yields the HTTP input's base URL; drained on exit."""
    adapter = Adapter(cfg, sink=sink)
    await adapter.start()
    [inp] = adapter.inputs
    assert isinstance(inp, HttpInput) and inp.address is not None
    try:
        yield f"http://127.0.0.1:{inp.address[1]}"
    finally:
        if sink is not None:
            sink.set_down(False)
        adapter.stop_accepting()
        async with asyncio.timeout(30):
            await adapter.wait_drained()
        await adapter.close()


def export_with_the_sdk(url: str) -> tuple[str, str]:
    """Export three log records with the OpenTelemetry SDK's OTLP/HTTP exporter (gzip),
    the first inside a span (blocking: run in a thread); the span's trace and span ids."""
    from opentelemetry._logs import SeverityNumber
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    provider = LoggerProvider(resource=Resource.create({"service.name": "checkout"}))
    exporter = OTLPLogExporter(endpoint=url + "/v1/logs", compression=Compression.Gzip)
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    logger = provider.get_logger("shop.payments", "1.2")
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("pay") as span:
        ctx = span.get_span_context()
        logger.emit(
            body="payment failed",
            severity_number=SeverityNumber.ERROR,
            severity_text="ERROR",
            attributes={"order_id": 42, "message": "shadowed"},
        )
    logger.emit(body={"k": [1, "two"]}, severity_number=SeverityNumber.INFO)
    logger.emit(body="third", severity_number=SeverityNumber.WARN2)
    provider.shutdown()
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


async def test_the_otel_sdk_exporter_delivers_records_with_their_fields(tmp_path: Path) -> None:
    """Records exported by the OpenTelemetry Python SDK (protobuf, gzip) reach a file sink
    with body, severity, timestamps, trace and span ids, attributes and resource."""
    out = tmp_path / "out.ndjson"
    cfg = http_config(tmp_path, sink="file", sink_path=out)
    async with serving(cfg) as url:
        trace_id, span_id = await asyncio.to_thread(export_with_the_sdk, url)
        await eventually(lambda: len(read_ndjson(out)) == 3)
    first, second, third = read_ndjson(out)
    assert first["message"] == "payment failed"
    assert first["severity"] == "ERROR" and first["severity_number"] == 17
    assert first["trace_id"] == trace_id and first["span_id"] == span_id
    assert first["order_id"] == 42 and first["attributes.message"] == "shadowed"
    assert first["resource.service.name"] == "checkout"
    assert first["scope.name"] == "shop.payments" and first["scope.version"] == "1.2"
    assert first["input"] == "otlp"
    assert first["timestamp"].endswith("Z") and "observed_timestamp" in first
    assert second["body"] == {"k": [1, "two"]} and second["severity"] == "INFO"
    assert "trace_id" not in second
    assert third["severity"] == "WARN2" and third["message"] == "third"


async def test_otlp_json_with_a_bad_record_is_a_partial_success(tmp_path: Path) -> None:
    """OTLP/JSON is decoded (hex ids, string integers); a malformed log record is rejected
    alone and reported in partialSuccess; the others are stored."""
    sink = ListSink()
    doc = {
        "resourceLogs": [
            {
                "resource": {
                    "attributes": [{"key": "k8s.pod.name", "value": {"stringValue": "p"}}]
                },
                "scopeLogs": [
                    {
                        "scope": {"name": "s"},
                        "logRecords": [
                            {
                                "timeUnixNano": "1700000000000000001",
                                "severityNumber": 9,
                                "body": {"stringValue": "hello"},
                                "traceId": "5B8EFFF798038103D269B633813FC60C",
                                "spanId": "EEE19B7EC3C1B174",
                                "attributes": [{"key": "n", "value": {"intValue": "7"}}],
                            },
                            {"traceId": "not-hex", "body": {"stringValue": "bad"}},
                        ],
                    }
                ],
            }
        ]
    }
    async with serving(http_config(tmp_path), sink) as url, aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/logs", json=doc) as resp:
            assert resp.status == 200
            body = await resp.json()
        await eventually(lambda: len(sink.records) == 1)
    assert body["partialSuccess"]["rejectedLogRecords"] == "1"
    assert "traceId" in body["partialSuccess"]["errorMessage"]
    [rec] = sink.records
    assert rec["message"] == "hello" and rec["n"] == 7 and rec["severity"] == "INFO"
    assert rec["timestamp"] == "2023-11-14T22:13:20.000000001Z"
    assert rec["trace_id"] == "5b8efff798038103d269b633813fc60c"
    assert rec["resource.k8s.pod.name"] == "p"


async def test_ndjson_and_json_arrays_gzip_or_not(tmp_path: Path) -> None:
    """POST /v1/logs/ndjson takes NDJSON (plain or gzip) and, as application/json, an
    array of objects; each is answered 200 with the count accepted."""
    sink = ListSink()
    ndjson = b"".join(json.dumps({"n": i}).encode() + b"\n" for i in range(5))
    async with serving(http_config(tmp_path), sink) as url, aiohttp.ClientSession() as s:
        ep = url + "/v1/logs/ndjson"
        async with s.post(ep, data=ndjson, headers={"Content-Type": "application/x-ndjson"}) as r:
            assert (r.status, await r.json()) == (200, {"accepted": 5})
        zipped = gzip.compress(ndjson)
        headers = {"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"}
        async with s.post(ep, data=zipped, headers=headers) as r:
            assert r.status == 200
        async with s.post(ep, json=[{"n": 10}, {"n": 11}]) as r:
            assert (r.status, await r.json()) == (200, {"accepted": 2})
        await eventually(lambda: len(sink.records) == 12)
    assert sorted(r["n"] for r in sink.records) == sorted([*range(5), *range(5), 10, 11])
    assert {r["input"] for r in sink.records} == {"http"}


async def test_bad_requests_get_their_status_and_reason(tmp_path: Path) -> None:
    """413 beyond --http-max-body (also once decompressed), 400 naming the bad line, 415
    for another content type, 400 for a body that is not OTLP; nothing is stored."""
    sink = ListSink()
    cfg = http_config(tmp_path, http_max_body=64 * 1024)
    async with serving(cfg, sink) as url, aiohttp.ClientSession() as s:
        ep = url + "/v1/logs/ndjson"
        big = b'{"pad":"' + b"x" * 70_000 + b'"}\n'
        async with s.post(ep, data=big) as r:
            assert r.status == 413
        bomb = gzip.compress(b'{"a":1}\n' * 20_000)  # small compressed, 160 KB inflated
        async with s.post(ep, data=bomb, headers={"Content-Encoding": "gzip"}) as r:
            assert r.status == 413
        async with s.post(ep, data=b'{"a":1}\nnot json\n') as r:
            assert r.status == 400
            assert "line 2" in await r.text()
        async with s.post(ep, data=b"<xml/>", headers={"Content-Type": "application/xml"}) as r:
            assert r.status == 415
        proto = {"Content-Type": "application/x-protobuf"}
        async with s.post(url + "/v1/logs", data=b"\xff\xff\xff", headers=proto) as r:
            assert r.status == 400
            assert r.content_type == "application/x-protobuf"
        async with s.get(url + "/v1/logs") as r:
            assert r.status == 405
    assert sink.records == []


async def test_full_spool_answers_429_then_recovers_when_the_sink_is_back(tmp_path: Path) -> None:
    """With the sink down the spool fills: 429 with Retry-After, nothing stored of that
    request; once the sink is back, the same request is answered 200 and every record
    answered 200 arrives."""
    sink = ListSink()
    sink.set_down(True)
    cfg = http_config(tmp_path, spool_max_bytes=MiB, queue_max_bytes=MiB, batch_max_bytes=MiB)
    answered: list[int] = []
    seq = 0

    def body(n: int) -> bytes:
        return b"".join(
            json.dumps({"message": f"seq={seq + i}", "pad": "x" * 200}).encode() + b"\n"
            for i in range(n)
        )

    async with serving(cfg, sink) as url, aiohttp.ClientSession() as s:
        ep = url + "/v1/logs/ndjson"
        for _ in range(20):  # bounded: ~20 x 230 KB
            async with s.post(ep, data=body(1000)) as r:
                if r.status == 429:
                    retry_after = int(r.headers["Retry-After"])
                    break
                assert r.status == 200
                answered += range(seq, seq + 1000)
                seq += 1000
        else:
            pytest.fail("never 429")
        assert 1 <= retry_after <= 60
        sink.set_down(False)

        # The client retries as told, faster than Retry-After (bounded: 300 tries, 30 s).
        async with asyncio.timeout(30):
            for _ in range(300):
                async with s.post(ep, data=body(1000)) as r:
                    if r.status == 200:
                        break
                    assert r.status == 429
                await asyncio.sleep(0.1)
            else:
                pytest.fail("still 429 after the sink came back")
        answered += range(seq, seq + 1000)
        await eventually(lambda: len({r["message"] for r in sink.records}) >= len(answered))
    got = Counter(int(r["message"][4:]) for r in sink.records)
    assert set(answered) <= set(got)


# -- the kill-9 contract, across real processes -----------------------------------------

BATCH = 200


def adapter_proc(tmp: Path) -> Proc:
    """``podpatterns adapter`` with only the HTTP input, into tmp/out.ndjson."""
    return Proc(
        "adapter",
        "--http-listen",
        "127.0.0.1:0",
        "--spool-dir",
        str(tmp / "spool"),
        "--spool-segment-bytes",
        "256KiB",
        "--sink",
        "file",
        "--sink-path",
        str(tmp / "out.ndjson"),
        "--admin",
        "off",
        "--shutdown-delay",
        "0",
        "--batch-max-records",
        str(BATCH),
    )


class Poster:
    """A client thread posting numbered records (1-50 per request) until stopped; keeps
    the numbers answered 200."""

    def __init__(self, url: str, start: int, rng: random.Random) -> None:
        self.url = url + "/v1/logs/ndjson"
        self.next = start
        self.answered: list[int] = []
        self.rng = rng
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 30  # bounded whatever happens to the adapter
        while not self.stop.is_set() and time.monotonic() < deadline:
            n = self.rng.randint(1, 50)
            seqs = range(self.next, self.next + n)
            self.next += n
            body = b"".join(f'{{"message":"seq={i}"}}\n'.encode() for i in seqs)
            req = urllib.request.Request(self.url, data=body, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    if resp.status == 200:
                        self.answered += seqs
            except (OSError, urllib.error.URLError):
                return  # the adapter was killed: what was not answered may or may not arrive

    def join(self) -> None:
        """Stop and wait for the thread."""
        self.stop.set()
        self.thread.join()


def delivered(tmp: Path) -> list[int]:
    """The numbers of the records in the sink's file."""
    return [int(str(r["message"])[4:]) for r in read_ndjson(tmp / "out.ndjson")]


def http_port(p: Proc) -> int:
    """The HTTP input's port, from its input_listening event."""
    ev = p.wait_event("input_listening", lambda e: e.get("input") == "http")
    return int(str(ev["address"]).rsplit(":", 1)[1])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_random_points_loses_nothing_answered_200(tmp_path: Path, seed: int) -> None:
    """A client posts numbered records while the adapter is SIGKILLed at random points and
    restarted: every record answered 200 arrives; duplicates stay within one batch per
    kill."""
    rng = random.Random(seed)
    kills = 3
    answered: list[int] = []
    start = 0
    for _ in range(kills):
        p = adapter_proc(tmp_path)
        try:
            poster = Poster(f"http://127.0.0.1:{http_port(p)}", start, rng)
            time.sleep(rng.uniform(0.2, 1.5))
            p.p.kill()
            p.wait()
            poster.join()
            answered += poster.answered
            start = poster.next
        finally:
            p.stop()
    assert answered, "no request was answered before the kills"
    p = adapter_proc(tmp_path)
    try:
        http_port(p)
        want = set(answered)
        wait_until(
            lambda: want <= set(delivered(tmp_path)), "every record answered 200 in the sink", 60
        )
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        p.stop()
    got = Counter(delivered(tmp_path))
    assert want <= set(got)
    dupes = sum(c - 1 for c in got.values())
    assert dupes <= kills * BATCH, f"{dupes} duplicates"


@pytest.mark.parametrize(
    ("args", "want"),
    [
        (("--http-listen", "127.0.0.1:4318"), "--spool-dir: missing"),
        (("--http-listen", "nowhere"), "--http-listen"),
        (
            ("--http-listen", "[::1]:0", "--spool-dir", "/s", "--http-max-body", "10"),
            "--http-max-body",
        ),
        (
            ("--tcp-listen", "[::1]:0", "--spool-dir", "/s", "--spool-max-bytes", "1KiB"),
            "--spool-max",
        ),
    ],
)
def test_bad_input_options_are_one_line_exit_2(args: tuple[str, ...], want: str) -> None:
    """Bad input options exit 2 with one line naming the option, never a traceback."""
    done = run("adapter", *args, "--admin", "off")
    assert done.returncode == 2, outputs(done)
    assert want in done.stderr and "Traceback" not in done.stderr, outputs(done)
    assert len(done.stderr.strip().splitlines()) == 1, outputs(done)


def test_missing_otlp_extra_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without opentelemetry-proto (the otlp extra; it cannot be uninstalled for one test,
    so its absence is simulated), --http-listen is refused naming the extra."""
    from podpatterns.adapter.inputs import otlp

    monkeypatch.setattr(otlp, "protobuf_available", lambda: False)
    with pytest.raises(ConfigError, match=r"podpatterns\[otlp\]"):
        HttpInput(HostPort("127.0.0.1", 0), max_body=MiB)


def test_non_loopback_listen_is_warned(tmp_path: Path) -> None:
    """An input bound beyond loopback logs input_not_loopback (like the admin server)."""
    p = Proc(
        "adapter",
        "--http-listen",
        "0.0.0.0:0",
        "--spool-dir",
        str(tmp_path / "spool"),
        "--admin",
        "off",
        "--shutdown-delay",
        "0",
    )
    try:
        ev = p.wait_event("input_not_loopback")
        assert ev["input"] == "http"
        p.wait_event("adapter_started")
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        p.stop()


async def test_extreme_timestamps_never_fail_the_server(tmp_path: Path) -> None:
    """The largest fixed64 time_unix_nano is a date (year 2554); an OTLP/JSON timestamp no
    date can hold rejects its record alone (partial success), never a server error."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    req = ExportLogsServiceRequest()
    lr = req.resource_logs.add().scope_logs.add().log_records.add()
    lr.time_unix_nano = 2**64 - 1
    lr.body.string_value = "far"
    doc = {"resourceLogs": [{"scopeLogs": [{"logRecords": [{"timeUnixNano": str(10**30)}, {}]}]}]}
    sink = ListSink()
    proto = {"Content-Type": "application/x-protobuf"}
    async with serving(http_config(tmp_path), sink) as url, aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/logs", data=req.SerializeToString(), headers=proto) as r:
            assert r.status == 200
        async with s.post(url + "/v1/logs", json=doc) as r:
            assert r.status == 200
            body = await r.json()
        await eventually(lambda: len(sink.records) == 2)
    assert body["partialSuccess"]["rejectedLogRecords"] == "1"
    assert "out of range" in body["partialSuccess"]["errorMessage"]
    assert sink.records[0]["timestamp"].startswith("2554-")


async def test_a_request_in_flight_at_shutdown_is_answered(tmp_path: Path) -> None:
    """On shutdown the listener closes (new connections are refused) while a request whose
    body is still arriving is read, spooled, answered 200, and its records shipped."""
    sink = ListSink()
    adapter = Adapter(http_config(tmp_path), sink=sink)
    await adapter.start()
    [inp] = adapter.inputs
    assert isinstance(inp, HttpInput) and inp.address is not None and inp._runner is not None
    server = inp._runner.server
    assert server is not None
    port = inp.address[1]
    body = b'{"n":1}\n' * 1000
    head = (
        "POST /v1/logs/ndjson HTTP/1.1\r\nHost: adapter\r\nContent-Type: application/x-ndjson"
        f"\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body[:100])
        await writer.drain()
        await eventually(lambda: server.requests_count >= 1, "the request is being handled")
        adapter.stop_accepting()
        refused = False
        for _ in range(200):  # bounded: the listener closes as the drain starts
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
            except OSError:  # refused, or reset by a listener closing meanwhile
                refused = True
                break
            w.close()
            await asyncio.sleep(0.02)
        assert refused
        writer.write(body[100:])
        await writer.drain()
        async with asyncio.timeout(15):
            status = await reader.readline()
        assert status.startswith(b"HTTP/1.1 200"), status
    finally:
        writer.close()
    async with asyncio.timeout(30):
        await adapter.wait_drained()
    await adapter.close()
    assert len(sink.records) == 1000


def test_sigterm_with_the_sink_down_exits_0_and_keeps_what_was_answered(tmp_path: Path) -> None:
    """SIGTERM while the sink is down: the drain is cut at --drain-timeout, the process
    exits 0, and the records answered 200 are shipped by the next start."""
    receiver = Receiver()
    receiver.down.set()

    def start() -> Proc:
        return Proc(
            "adapter",
            "--http-listen",
            "127.0.0.1:0",
            "--spool-dir",
            str(tmp_path / "spool"),
            "--sink",
            "http",
            "--sink-url",
            receiver.url,
            "--sink-backoff-max",
            "200ms",
            "--admin",
            "off",
            "--shutdown-delay",
            "0",
            "--drain-timeout",
            "1s",
        )

    try:
        p = start()
        try:
            url = f"http://127.0.0.1:{http_port(p)}/v1/logs/ndjson"
            body = b"".join(f'{{"message":"seq={i}"}}\n'.encode() for i in range(100))
            with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10) as r:
                assert r.status == 200
            p.signal(signal.SIGTERM)
            assert p.wait(30) == 0
        finally:
            p.stop()
        assert receiver.distinct() == 0
        receiver.down.clear()
        p = start()
        try:
            wait_until(lambda: receiver.distinct() == 100, "the 100 records at the receiver", 30)
            p.signal(signal.SIGTERM)
            assert p.wait(30) == 0
        finally:
            p.stop()
    finally:
        receiver.close()
