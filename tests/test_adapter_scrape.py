"""The adapter's JSON scrape: an app's JSON status endpoint to Prometheus metrics (issue 15)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from podpatterns.adapter import Adapter
from podpatterns.adapter.config import build
from podpatterns.adapter.scrape import extract
from podpatterns.adapter.scrapeconf import scrapes_from_file
from podpatterns.errors import ConfigError
from podpatterns.options import HostPort
from podpatterns.runtime import Runtime, RuntimeConfig
from tests.waiting import POLL_MAX, TIMEOUT

STATUS = {
    "uptime": 12.5,
    "healthy": True,
    "queue": {"depth": "7", "limit": None},
    "workers": [{"id": "w1", "busy": 3}, {"id": "w2", "busy": 0}, {"id": "w3"}],
    "caches": {"users": {"hits": 10}, "orders": {"hits": 4}},
}


def decl(**kw: Any) -> Any:
    return scrapes_from_file([{"url": "http://127.0.0.1:1/", "metrics": [kw]}])[0].metrics[0]


def test_values_are_read_along_their_paths() -> None:
    assert extract(STATUS, decl(name="up_s", path="uptime")) == ([((), 12.5)], 0)
    assert extract(STATUS, decl(name="ok", path="healthy")) == ([((), 1.0)], 0)
    assert extract(STATUS, decl(name="q", path="queue.depth")) == ([((), 7.0)], 0)
    assert extract(STATUS, decl(name="q", path="queue.limit")) == ([], 1)  # null
    assert extract(STATUS, decl(name="q", path="queue.nothing")) == ([], 1)
    busy = decl(name="busy", path="workers[*].busy", labels={"worker": "@id", "pool": "main"})
    assert extract(STATUS, busy) == (
        [((("worker", "w1"), ("pool", "main")), 3.0), ((("worker", "w2"), ("pool", "main")), 0.0)],
        1,  # w3 has no busy
    )
    hits = decl(name="hits", path="caches.*.hits", labels={"cache": "@key"})
    assert extract(STATUS, hits) == (
        [((("cache", "users"),), 10.0), ((("cache", "orders"),), 4.0)],
        0,
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "scrape must be a non-empty list"),
        (
            [{"url": "ftp://x", "metrics": []}],
            "scrape[0]: url: 'ftp://x' must be an http(s):// URL",
        ),
        ([{"url": "http://a/"}], "scrape[0]: metrics: missing"),
        (
            [{"url": "http://a/", "metrics": [{"name": "a-b", "path": "x"}]}],
            "scrape[0]: metrics[0]: name: 'a-b' is not a Prometheus metric name",
        ),
        (
            [{"url": "http://a/", "metrics": [{"name": "podpatterns_x", "path": "x"}]}],
            "name: 'podpatterns_x' is not a Prometheus metric name of the app's own",
        ),
        (
            [{"url": "http://a/", "metrics": [{"name": "a", "path": "x..y"}]}],
            "metrics[0]: path: 'x..y' is not keys separated by dots",
        ),
        (
            [{"url": "http://a/", "metrics": [{"name": "a", "path": "x", "labels": {"w": "@id"}}]}],
            "labels: w: '@id' needs a [*] or * in the path to stand on",
        ),
        (
            [{"url": "http://a/", "metrics": [{"name": "a", "path": "x", "type": "histogram"}]}],
            "type: 'histogram' is not gauge or counter",
        ),
        (
            [
                {
                    "url": "http://a/",
                    "interval": "1s",
                    "timeout": "5s",
                    "metrics": [{"name": "a", "path": "x"}],
                }
            ],
            "scrape[0]: timeout: must be > 0 and <= interval (1s), got 5s",
        ),
        (
            [{"url": "http://a/", "metrics": [{"name": "a", "path": "x"}]}] * 2,
            "scrape[1]: name: 'a' used twice",
        ),
    ],
)
def test_bad_scrape_entries_are_config_errors(raw: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build({}, {}, {"scrape": raw}, "adapter.yaml")


async def metrics_text(admin: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as s, s.get(f"http://{admin}/metrics") as resp:
        text = await resp.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def until(admin: str, check: Any) -> dict[Any, float]:
    """Scrape the adapter until ``check(samples)`` holds."""
    async with asyncio.timeout(TIMEOUT):
        # Polling is the point: the exposition is the only way to see the values.
        while not check(got := await metrics_text(admin)):  # noqa: ASYNC110
            await asyncio.sleep(POLL_MAX)
    return got


async def test_an_app_status_endpoint_through_outages() -> None:
    """Values from a real HTTP endpoint; garbage, a 500 and a timeout each make `up` 0,
    hide the values and count the reason; then it recovers."""
    state: dict[str, Any] = {"mode": "ok", "doc": STATUS}
    hang = asyncio.Event()

    async def status(_: web.Request) -> web.StreamResponse:
        mode = state["mode"]
        if mode == "garbage":
            return web.Response(text="<html>not json", content_type="text/html")
        if mode == "error":
            return web.Response(status=500)
        if mode == "hang":
            await hang.wait()
        return web.json_response(state["doc"])

    app = web.Application()
    app.router.add_get("/status", status)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/status"
    config = build(
        {},
        {},
        {
            "scrape": [
                {
                    "url": url,
                    "name": "app",
                    "interval": "500ms",
                    "timeout": "500ms",
                    "metrics": [
                        {"name": "app_queue_depth", "path": "queue.depth"},
                        {
                            "name": "app_cache_hits",
                            "type": "counter",
                            "path": "caches.*.hits",
                            "labels": {"cache": "@key"},
                        },
                    ],
                }
            ]
        },
        "adapter.yaml",
    )
    adapter = Adapter(config)
    runtime = Runtime(RuntimeConfig(admin=HostPort("127.0.0.1", 0), shutdown_delay=0.0), [adapter])
    await runtime.start()
    admin = str(runtime.admin_address)
    up = ("podpatterns_adapter_scrape_up", (("scrape", "app"),))

    def errors(reason: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        return (
            "podpatterns_adapter_scrape_errors_total",
            (("reason", reason), ("scrape", "app")),
        )

    try:
        got = await until(admin, lambda g: g.get(up) == 1.0)
        assert got[("app_queue_depth", ())] == 7.0
        assert got[("app_cache_hits_total", (("cache", "users"),))] == 10.0
        for mode, reason in (
            ("garbage", "bad_json"),
            ("error", "http_status"),
            ("hang", "timeout"),
        ):
            state["mode"] = mode
            got = await until(admin, lambda g, r=reason: g.get(errors(r), 0) >= 1)
            assert got[up] == 0.0 and ("app_queue_depth", ()) not in got, mode
        hang.set()
        state["mode"] = "ok"
        # a document of several hundred KiB arrives in many chunks: read whole
        padding = {"history": [{"id": i, "note": "x" * 100} for i in range(3000)]}
        state["doc"] = json.loads(json.dumps(STATUS)) | {"queue": {"depth": 9}} | padding
        got = await until(admin, lambda g: g.get(("app_queue_depth", ())) == 9.0)
        assert got[up] == 1.0
    finally:
        hang.set()
        await runtime.shutdown()
        await runner.cleanup()


def test_one_name_is_one_metric() -> None:
    """A scraped value may not take a name declared under metrics:; StatsD refuses both."""
    scrape = [{"url": "http://127.0.0.1:1/", "metrics": [{"name": "app_requests", "path": "x"}]}]
    declared = [{"name": "app_requests_total", "type": "counter"}]
    with pytest.raises(ConfigError, match="metric 'app_requests' is also declared by metrics:"):
        build({"path": ["/x/*.log"]}, {}, {"metrics": declared, "scrape": scrape}, "a.yaml")
    config = build({"statsd_udp": HostPort("127.0.0.1", 0)}, {}, {"scrape": scrape}, "a.yaml")
    adapter = Adapter(config)
    assert adapter.statsd is not None
    adapter.statsd.metrics.feed(b"app_requests:1|c\nother:1|c\n")
    assert set(adapter.statsd.metrics.families) == {"other"}
    assert adapter.statsd.metrics.invalid == {"reserved_name": 1}
