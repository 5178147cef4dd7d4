"""The Loki sink, against a receiver that checks Loki's documented JSON push format.

Grafana Loki is not packaged by Debian and nothing may be downloaded here, so the
receiver checks what Loki's push API documents (``POST /loki/api/v1/push``,
``{"streams": [{"stream": {labels}, "values": [["<ns>", "<line>", {metadata}?]]}]}``,
entries of a stream in time order) and answers as Loki does: 400 "entry out of order"
for an entry older than the stream's newest, 429 when asked to.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from aiohttp import web

from podpatterns.adapter.sinks import DeadLetter
from podpatterns.adapter.sinks.loki import OTHER, LokiSink
from tests.adapter_harness import read_ndjson, serve_post

_LABEL = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LokiReceiver:
    """Checks every push against the documented format; keeps the streams received.

    Args:
        fail: answer the first ``fail`` requests with 429.
    """

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.attempts = 0
        self.headers: list[dict[str, str]] = []
        self.entries: dict[tuple[tuple[str, str], ...], list[list[Any]]] = {}
        self.newest: dict[tuple[tuple[str, str], ...], int] = {}

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.attempts <= self.fail:
            return web.Response(status=429, text="Ingestion rate limit exceeded")
        assert request.content_type == "application/json"
        body = json.loads(await request.read())
        self.headers.append(dict(request.headers))
        assert set(body) == {"streams"}
        for stream in body["streams"]:
            assert set(stream) == {"stream", "values"}
            labels = stream["stream"]
            assert all(_LABEL.match(k) and isinstance(v, str) for k, v in labels.items())
            key = tuple(sorted(labels.items()))
            last = self.newest.get(key, 0)
            for entry in stream["values"]:
                assert len(entry) in (2, 3) and entry[0].isdigit() and isinstance(entry[1], str)
                if len(entry) == 3:
                    assert all(isinstance(v, str) for v in entry[2].values())
                ts = int(entry[0])
                if ts < last:
                    return web.Response(
                        status=400,
                        text=f"entry with timestamp {ts} ignored, reason: 'entry out of order'",
                    )
                last = ts
            self.newest[key] = last
            self.entries.setdefault(key, []).extend(stream["values"])
        return web.Response(status=204)


async def serve(r: LokiReceiver) -> tuple[web.AppRunner, str]:
    return await serve_post("/loki/api/v1/push", r.handle)


def ts(second: int) -> str:
    return f"2024-05-01T12:00:{second:02d}Z"


NS = 1714564800_000_000_000


async def test_push_format_labels_sorted_values_metadata_and_tenant(tmp_path: Path) -> None:
    """Streams by label, values sorted per stream, line as JSON or a field, structured
    metadata, X-Scope-OrgID and gzip: what Loki's push API documents."""
    r = LokiReceiver()
    runner, url = await serve(r)
    sink = LokiSink(
        url,
        labels=(("app", "app"), ("level", "level")),
        metadata=(("trace_id", "trace"),),
        tenant="team-a",
        gzip_body=True,
    )
    await sink.start()
    records: list[dict[str, Any]] = [
        {"app": "web", "level": "info", "timestamp": ts(5), "message": "late", "trace": "t1"},
        {"app": "web", "level": "info", "timestamp": ts(1), "message": "early"},
        {"app": "db", "level": "error", "timestamp": ts(3), "message": "boom", "n": 1},
        {"app": "web", "message": "no level, no timestamp"},
    ]
    try:
        await sink.send(records)
    finally:
        await sink.close()
        await runner.cleanup()
    assert r.headers[0]["X-Scope-OrgID"] == "team-a"
    assert r.headers[0]["Content-Encoding"] == "gzip"
    web_info = r.entries[(("app", "web"), ("level", "info"))]
    assert [e[0] for e in web_info] == [str(NS + 1_000_000_000), str(NS + 5_000_000_000)]
    assert json.loads(web_info[0][1]) == records[1]
    assert web_info[1][2] == {"trace_id": "t1"}
    assert len(web_info[0]) == 2  # no metadata field: no third element
    (db,) = r.entries[(("app", "db"), ("level", "error"))]
    assert json.loads(db[1])["message"] == "boom"
    (bare,) = r.entries[(("app", "web"),)]  # a missing field is a missing label
    assert int(bare[0]) > NS


async def test_line_field_and_label_values_are_bounded(tmp_path: Path) -> None:
    """--loki-line-field picks the line; past --loki-max-label-values, new values fold
    into _other and are counted, as does a value longer than Loki takes."""
    r = LokiReceiver()
    runner, url = await serve(r)
    sink = LokiSink(url, labels=(("user", "user"),), max_label_values=2, line_field="message")
    await sink.start()
    try:
        await sink.send([{"user": f"u{i}", "message": f"m{i}"} for i in range(5)])
        await sink.send([{"user": "u0", "message": "again"}])
        await sink.send([{"user": "u" * 2049, "message": "long"}])
    finally:
        await sink.close()
        await runner.cleanup()
    assert set(r.entries) == {(("user", "u0"),), (("user", "u1"),), (("user", OTHER),)}
    assert [e[1] for e in r.entries[(("user", OTHER),)]] == ["m2", "m3", "m4", "long"]
    assert [e[1] for e in r.entries[(("user", "u0"),)]] == ["m0", "again"]
    assert sink.collect()["labels_folded"] == 4


async def test_429_is_retried_and_out_of_order_goes_to_the_dead_letter_file(
    tmp_path: Path,
) -> None:
    """429 is retried until accepted; Loki's 400 "entry out of order" is final: the batch
    goes to the dead-letter file with Loki's reason."""
    r = LokiReceiver(fail=2)
    runner, url = await serve(r)
    dl = DeadLetter(tmp_path / "dead.ndjson", 1 << 20)
    sink = LokiSink(url, labels=(("app", "app"),), backoff=0.01, dead_letter=dl)
    await sink.start()
    try:
        await sink.send([{"app": "web", "timestamp": ts(9), "message": "new"}])
        await sink.send([{"app": "web", "timestamp": ts(2), "message": "old"}])
    finally:
        await sink.close()
        await runner.cleanup()
    assert r.attempts == 4
    assert [e[1] for e in r.entries[(("app", "web"),)]] == [
        json.dumps({"app": "web", "timestamp": ts(9), "message": "new"}, separators=(",", ":"))
    ]
    (dead,) = read_ndjson(tmp_path / "dead.ndjson")
    assert dead["record"]["message"] == "old"
    assert dead["status"] == 400 and "entry out of order" in dead["reason"]
    assert sink.collect()["retries"] == 2 and sink.collect()["rejected"] == 1
