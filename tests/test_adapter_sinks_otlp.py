"""The OTLP/HTTP logs sink, against a receiver that decodes with the official definitions
(opentelemetry-proto from PyPI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, SeverityNumber

from podpatterns.adapter import Adapter
from podpatterns.adapter.sinks import DeadLetter
from podpatterns.adapter.sinks.otlp import OtlpSink
from tests.adapter_harness import config, read_ndjson, serve_post
from tests.proc import run
from tests.waiting import eventually


class OtlpReceiver:
    """An OTLP/HTTP logs endpoint: decodes every request with the official definitions.

    Args:
        fail: answer the first ``fail`` requests with ``status``.
        status: the failure status.
        rejected: report this many rejected records in ``partial_success``.
    """

    def __init__(self, fail: int = 0, status: int = 503, rejected: int = 0) -> None:
        self.fail = fail
        self.status = status
        self.rejected = rejected
        self.requests: list[tuple[dict[str, str], ExportLogsServiceRequest]] = []
        self.attempts = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        body = await request.read()  # aiohttp undoes Content-Encoding: gzip
        if self.attempts <= self.fail:
            return web.Response(status=self.status, headers={"Retry-After": "0"})
        req = ExportLogsServiceRequest()
        if request.content_type == "application/json":
            json_format.Parse(body, req)
        else:
            assert request.content_type == "application/x-protobuf"
            req.ParseFromString(body)
        self.requests.append((dict(request.headers), req))
        resp = ExportLogsServiceResponse()
        if self.rejected:
            resp.partial_success.rejected_log_records = self.rejected
            resp.partial_success.error_message = "2 records too large"
        return web.Response(body=resp.SerializeToString(), content_type="application/x-protobuf")

    def log_records(self) -> list[LogRecord]:
        """Every LogRecord received, in order."""
        return [
            lr
            for _, req in self.requests
            for rl in req.resource_logs
            for sl in rl.scope_logs
            for lr in sl.log_records
        ]


async def serve(r: OtlpReceiver) -> tuple[web.AppRunner, str]:
    return await serve_post("/v1/logs", r.handle)


def value(v: AnyValue) -> Any:
    """An AnyValue as plain Python."""
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    return getattr(v, kind)


def attributes(lr: Any) -> dict[str, Any]:
    return {kv.key: value(kv.value) for kv in lr.attributes}


async def test_records_arrive_as_log_records_with_every_field(tmp_path: Path) -> None:
    """Through the adapter: body, severity, timestamps, typed attributes, resource and scope,
    protobuf and gzip on the wire."""
    r = OtlpReceiver()
    runner, url = await serve(r)
    log = tmp_path / "app.log"
    lines = [
        {
            "ts": "2024-05-01T12:00:00.250Z",
            "level": "WARN",
            "message": "disk low",
            "pct": 91.5,
            "n": 3,
            "ok": False,
            "tags": ["a", 1],
            "ctx": {"user": "u1"},
        },
        {"ts": 1714564800, "level": "whatever", "message": "plain"},
        {"level": "error", "message": {"structured": True}},
    ]
    log.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = config(
        tmp_path,
        "*.log",
        parse="json",
        timestamp_field="ts",
        sink="otlp",
        sink_url=url,
        sink_gzip=True,
        otlp_resource=(("service.name", "web"), ("k8s.pod.name", "web-0")),
    )
    adapter = Adapter(cfg)
    await adapter.start()
    try:
        await eventually(lambda: len(r.log_records()) >= 3)
    finally:
        adapter.stop_accepting()
        await adapter.wait_drained()
        await adapter.close()
        await runner.cleanup()
    headers, req = r.requests[0]
    assert headers["Content-Type"] == "application/x-protobuf"
    assert headers["Content-Encoding"] == "gzip"
    rl = req.resource_logs[0]
    assert {kv.key: value(kv.value) for kv in rl.resource.attributes} == {
        "service.name": "web",
        "k8s.pod.name": "web-0",
    }
    assert rl.scope_logs[0].scope.name == "podpatterns.adapter"
    first, second, third = r.log_records()
    assert first.body.string_value == "disk low"
    assert first.severity_text == "WARN"
    assert first.severity_number == SeverityNumber.SEVERITY_NUMBER_WARN
    assert first.time_unix_nano == 1714564800_250_000_000
    assert first.observed_time_unix_nano > 0
    attrs = attributes(first)
    assert attrs == {
        "ts": "2024-05-01T12:00:00.250Z",
        "pct": 91.5,
        "n": 3,
        "ok": False,
        "tags": ["a", 1],
        "ctx": {"user": "u1"},
        "file": str(log),
        "file_id": attrs["file_id"],
        "offset": 0,
    }
    assert "timestamp" not in attrs and "level" not in attrs and "message" not in attrs
    assert second.time_unix_nano == 1714564800_000_000_000
    assert second.severity_text == "whatever"
    assert second.severity_number == SeverityNumber.SEVERITY_NUMBER_UNSPECIFIED
    assert second.body.string_value == "plain"
    assert third.time_unix_nano == 0  # no timestamp: unknown, as OTLP allows
    assert third.severity_number == SeverityNumber.SEVERITY_NUMBER_ERROR
    assert value(third.body) == {"structured": True}


async def test_json_encoding_is_otlp_json(tmp_path: Path) -> None:
    """--otlp-encoding json: the body parses as OTLP/JSON into the official message."""
    r = OtlpReceiver()
    runner, url = await serve(r)
    sink = OtlpSink(url, encoding="json", severity_field="severity")
    await sink.start()
    try:
        await sink.send([{"message": "m", "severity": 3, "big": 2**70, "none": None}])
    finally:
        await sink.close()
        await runner.cleanup()
    headers, _ = r.requests[0]
    assert headers["Content-Type"] == "application/json"
    (lr,) = r.log_records()
    assert lr.body.string_value == "m"
    # --parse syslog gives severities 0-7: 3 is "err".
    assert (lr.severity_text, lr.severity_number) == ("err", SeverityNumber.SEVERITY_NUMBER_ERROR)
    assert attributes(lr) == {"big": str(2**70), "none": None}


async def test_retries_then_partial_success_goes_to_the_dead_letter_file(tmp_path: Path) -> None:
    """503s with Retry-After are retried; a partial_success is final, counted and
    dead-lettered with the collector's message."""
    r = OtlpReceiver(fail=2, status=503, rejected=2)
    runner, url = await serve(r)
    dl = DeadLetter(tmp_path / "dead.ndjson", 1 << 20)
    sink = OtlpSink(url, dead_letter=dl, backoff=0.01)
    await sink.start()
    try:
        await sink.send([{"message": str(i), "file": "f", "offset": i} for i in range(5)])
    finally:
        await sink.close()
        await runner.cleanup()
    assert r.attempts == 3 and len(r.log_records()) == 5
    assert sink.collect() == {"requests": 3, "retries": 2, "rejected": 2}
    (entry,) = read_ndjson(tmp_path / "dead.ndjson")
    assert entry["status"] == 200
    assert entry["reason"] == "2 records too large"
    summary = entry["record"]["otlp_partial_success"]
    assert summary["rejected_log_records"] == 2 and summary["batch_records"] == 5
    assert summary["first"]["offset"] == 0 and summary["last"]["offset"] == 4


async def test_a_4xx_goes_to_the_dead_letter_file(tmp_path: Path) -> None:
    """A 400 from the collector is final: every record of the batch is dead-lettered."""
    r = OtlpReceiver(fail=1, status=400)
    runner, url = await serve(r)
    dl = DeadLetter(tmp_path / "dead.ndjson", 1 << 20)
    sink = OtlpSink(url, dead_letter=dl)
    await sink.start()
    try:
        await sink.send([{"message": "a"}, {"message": "b"}])
    finally:
        await sink.close()
        await runner.cleanup()
    assert [e["record"]["message"] for e in read_ndjson(tmp_path / "dead.ndjson")] == ["a", "b"]
    assert r.attempts == 1


def test_without_opentelemetry_proto_the_error_says_what_to_install(tmp_path: Path) -> None:
    """--sink otlp without the otlp extra: exit 2 and one line saying what to install."""
    # A regular package named opentelemetry first on the path hides the installed one.
    shadow = tmp_path / "shadow" / "opentelemetry"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    proc = run(
        "adapter",
        "--path",
        str(tmp_path / "*.log"),
        "--sink",
        "otlp",
        "--sink-url",
        "http://127.0.0.1:4318/v1/logs",
        env={"PYTHONPATH": str(tmp_path / "shadow")},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--sink: otlp needs the opentelemetry-proto package" in lines[0]
    assert "podpatterns[otlp]" in lines[0]


async def test_kubernetes_metadata_becomes_resource_attributes(tmp_path: Path) -> None:
    """The k8s_* fields go to the resource under their semantic-convention names, not to
    every LogRecord; a record whose value differs keeps it as an attribute."""
    r = OtlpReceiver()
    runner, url = await serve(r)
    sink = OtlpSink(url, resource=(("service.name", "shop"),))
    meta = {
        "k8s_pod": "shop-0",
        "k8s_namespace": "prod",
        "k8s_labels": {"app": "shop"},
        "k8s_annotations": {"team": "a"},
    }
    await sink.start()
    try:
        await sink.send([{"message": "a", **meta}, {"message": "b", **meta, "k8s_pod": "other"}])
    finally:
        await sink.close()
        await runner.cleanup()
    ((_, req),) = r.requests
    resource = {kv.key: value(kv.value) for kv in req.resource_logs[0].resource.attributes}
    assert resource == {
        "service.name": "shop",
        "k8s.pod.name": "shop-0",
        "k8s.namespace.name": "prod",
        "k8s.pod.label.app": "shop",
        "k8s.pod.annotation.team": "a",
    }
    first, second = r.log_records()
    assert attributes(first) == {}
    assert attributes(second) == {"k8s_pod": "other"}
