"""The adapter's StatsD input: StatsD in, Prometheus out (issue 15)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import statsd  # type: ignore[import-untyped]
from prometheus_client.parser import text_string_to_metric_families

from podpatterns.adapter import Adapter, AdapterConfig
from podpatterns.adapter.config import build
from podpatterns.adapter.statsd import BadLine, StatsdMetrics, parse_line
from podpatterns.adapter.statsdmap import StatsdMapping, mappings_from_file
from podpatterns.errors import ConfigError
from podpatterns.options import HostPort
from podpatterns.runtime import Runtime, RuntimeConfig
from tests.proc import Proc, run
from tests.waiting import POLL_MAX, TIMEOUT, wait_until


def samples(store: StatsdMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every exposed sample: (name, sorted labels) -> value."""
    out = {}
    for family in store.collect():
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# -- the line format -----------------------------------------------------------------------


def test_the_forms_of_a_line() -> None:
    (s,) = parse_line("shop.orders:3|c|@0.5|#region:eu,tier:gold")
    assert (s.name, s.kind, s.value, s.rate, s.tags) == (
        "shop.orders",
        "c",
        3.0,
        0.5,
        (("region", "eu"), ("tier", "gold")),
    )
    (s,) = parse_line("cpu,host=web-1,core=0:42|g")  # InfluxDB tags
    assert (s.name, s.tags) == ("cpu", (("host", "web-1"), ("core", "0")))
    (s,) = parse_line("cpu#host=web-1:42|g")  # Librato tags
    assert (s.name, s.tags) == ("cpu", (("host", "web-1"),))
    a, b = parse_line("req:1|c:2|c|@0.1")  # several values for one name
    assert (a.value, a.rate, b.value, b.rate) == (1.0, 1.0, 2.0, 0.1)
    (s,) = parse_line("queue:-4|g")
    assert s.relative and s.value == -4
    (s,) = parse_line("users:ann|s")
    assert (s.kind, s.text) == ("s", "ann")
    (s,) = parse_line("lat:12|ms|#k:v|c:abc123|T1700000000")  # container id, timestamp
    assert s.tags == (("k", "v"),)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("no-colon", "malformed"),
        ("x:1", "malformed"),
        ("x:1|q", "bad_type"),
        ("x:abc|c", "bad_value"),
        ("x:nan|g", "bad_value"),
        ("x:-1|c", "negative_counter"),
        ("x:1|c|@2", "bad_rate"),
        ("x:1|c|@zero", "bad_rate"),
        ("x:1|c|what", "malformed"),
    ],
)
def test_a_bad_line_says_why(line: str, reason: str) -> None:
    with pytest.raises(BadLine) as info:
        parse_line(line)
    assert info.value.reason == reason


# -- what the samples make -----------------------------------------------------------------


def test_counters_gauges_sets_and_rates() -> None:
    store = StatsdMetrics()
    store.feed(
        b"hits:1|c\nhits:2|c|@0.5\nhits:1|c|#path:/a\n"
        b"temp:20|g\ntemp:+3|g\ntemp:-1|g\n"
        b"users:ann|s\nusers:bob|s\nusers:ann|s\n"
    )
    got = samples(store)
    assert got[("hits_total", ())] == 5.0  # 1 + 2 / 0.5
    assert got[("hits_total", (("path", "/a"),))] == 1.0
    assert got[("temp", ())] == 22.0
    assert got[("users", ())] == 2.0
    assert store.events["lines"] == 9 and store.events["samples"] == 9


def test_timer_buckets_match_values_computed_here() -> None:
    buckets = (0.01, 0.1, 1.0)
    store = StatsdMetrics(buckets=buckets)
    values_ms = [5, 50, 50, 500, 5000, 7]
    store.feed(b"".join(b"api.latency:%d|ms\n" % v for v in values_ms))
    store.feed(b"api.latency:20|ms|@0.25\n")  # one sample standing for four
    weighted = [(v / 1000, 1.0) for v in values_ms] + [(0.02, 4.0)]
    got = samples(store)
    for bound in buckets:
        want = sum(w for v, w in weighted if v <= bound)
        assert got[("api_latency_bucket", (("le", str(bound)),))] == want, bound
    assert got[("api_latency_bucket", (("le", "+Inf"),))] == sum(w for _, w in weighted)
    assert got[("api_latency_count", ())] == sum(w for _, w in weighted)
    assert got[("api_latency_sum", ())] == pytest.approx(sum(v * w for v, w in weighted))


def test_mappings_name_and_label_dotted_names() -> None:
    mappings = mappings_from_file(
        [
            {"match": "shop.*.orders.*", "name": "shop_orders", "labels": {"region": "$1"}},
            {"match": "shop.*.*", "name": "shop_$2", "labels": {"region": "$1", "x": "y"}},
        ]
    )
    store = StatsdMetrics(mappings)
    store.feed(b"shop.eu.orders.paid:2|c\nshop.us.errors:1|c|#x:app\nother.thing:1|c\n")
    got = samples(store)
    assert got[("shop_orders_total", (("region", "eu"),))] == 2.0
    # first match wins; the mapping's label beats the app's tag of the same name
    assert got[("shop_errors_total", (("region", "us"), ("x", "y")))] == 1.0
    assert got[("other_thing_total", ())] == 1.0


def test_bounds_conflicts_and_reserved_names_are_counted() -> None:
    store = StatsdMetrics(max_series=3)
    store.feed(b"".join(b"req:1|c|#user:u%d\n" % i for i in range(10)))
    store.feed(b"req:1|g\n")  # a gauge of a counter's name
    store.feed(b"podpatterns_adapter_lines:1|c\n")
    store.feed(b"x:1|q\nx:1|q\n\xff:1|c\n")
    events = store.collect_events()
    assert len(store.families["req"].series) == 3
    assert events["series_dropped"] == 7
    assert events["type_conflicts"] == 1
    assert events["invalid_reserved_name"] == 1
    assert events["invalid_bad_type"] == 2
    assert events["invalid_bad_utf8"] == 1


def test_idle_series_expire_and_free_their_slot() -> None:
    """--statsd-expire-after 10s: a label set without a sample for 10s leaves /metrics and
    is counted, freeing its slot under max_series; a metric left without series goes; a
    counter that comes back starts from zero (as with statsd_exporter's ttl)."""
    now = [100.0]
    store = StatsdMetrics(max_series=2, expire_after=10.0, clock=lambda: now[0])
    store.feed(b"req:1|c|#u:a\nreq:1|c|#u:b\nq:5|g\n")
    now[0] += 5
    store.feed(b"req:2|c|#u:b\nreq:1|c|#u:c\n")  # c: over the cap, dropped
    assert store.collect_events()["series_dropped"] == 1
    now[0] += 5  # a and q idle 10s
    store.feed(b"req:1|c|#u:c\n")  # a's slot is free again
    got = samples(store)
    assert got == {("req_total", (("u", "b"),)): 3.0, ("req_total", (("u", "c"),)): 1.0}
    assert "q" not in store.families
    assert store.collect_events()["series_expired"] == 2
    now[0] += 10
    assert samples(store) == {}
    store.feed(b"req:1|c|#u:b\n")
    assert samples(store) == {("req_total", (("u", "b"),)): 1.0}
    assert store.collect_events()["series_expired"] == 4
    assert StatsdMetrics().expire_after is None  # off by default


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"statsd_mappings": "x"}, "statsd_mappings must be a list"),
        ({"statsd_mappings": [{"name": "a"}]}, "statsd_mappings[0]: match: missing"),
        ({"statsd_mappings": [{"match": "a.*"}]}, "statsd_mappings[0]: name: missing"),
        (
            {"statsd_mappings": [{"match": "a.*", "name": "a_$2"}]},
            "statsd_mappings[0]: 'a.*': $2 in 'a_$2', but the match has 1 '*'",
        ),
        (
            {"statsd_mappings": [{"match": "a", "name": "a", "labels": {"bad-name": "x"}}]},
            "label 'bad-name' is not a valid Prometheus label name",
        ),
        (
            {"statsd_mappings": [{"match": "a", "name": "a", "when": 1}]},
            "statsd_mappings[0]: unknown key 'when'",
        ),
    ],
)
def test_bad_mappings_are_config_errors(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build({"statsd_udp": HostPort("127.0.0.1", 0)}, {}, raw, "adapter.yaml")


def test_mappings_need_a_statsd_input() -> None:
    with pytest.raises(ConfigError, match="statsd_mappings: given without --statsd-udp"):
        AdapterConfig(path=("/x/*.log",), statsd_mappings=(StatsdMapping("a", "a"),))


@pytest.mark.parametrize("value", ["1,0.5", "a,b", "", "1,inf"])
def test_bad_buckets_are_usage_errors(value: str) -> None:
    proc = run("adapter", "--statsd-udp", "127.0.0.1:0", "--statsd-buckets", value)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--statsd-buckets" in proc.stderr, proc.stderr


def test_a_bad_expire_after_is_a_usage_error() -> None:
    """--statsd-expire-after that is not a duration: exit 2, one line naming it."""
    proc = run("adapter", "--statsd-udp", "127.0.0.1:0", "--statsd-expire-after", "soon")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "--statsd-expire-after" in proc.stderr and "'soon'" in proc.stderr, proc.stderr


# -- with real clients ----------------------------------------------------------------------


async def scrape(admin: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as s, s.get(f"http://{admin}/metrics") as resp:
        text = await resp.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_the_statsd_client_library_over_udp_and_tcp(tmp_path: Path) -> None:
    """pystatsd's UDP and TCP clients to a metrics-only adapter; a Prometheus scrape."""
    adapter = Adapter(
        AdapterConfig(
            statsd_udp=HostPort("127.0.0.1", 0),
            statsd_tcp=HostPort("127.0.0.1", 0),
            statsd_buckets=(0.1, 1.0),
        )
    )
    runtime = Runtime(RuntimeConfig(admin=HostPort("127.0.0.1", 0), shutdown_delay=0.0), [adapter])
    await runtime.start()
    try:
        server = adapter.statsd
        assert server is not None and server.udp_address and server.tcp_address
        udp_at, tcp_at = server.udp_address, server.tcp_address
        admin = str(runtime.admin_address)
        udp = statsd.StatsClient(*udp_at, prefix="shop")

        def over_tcp() -> None:
            client = statsd.TCPStatsClient(*tcp_at, prefix="shop")
            for _ in range(10):
                client.incr("tcp_orders")
            client.timing("checkout", 250)
            client.close()

        for _ in range(5):
            udp.incr("orders")
        udp.gauge("queue", 7)
        udp.gauge("queue", 3, delta=True)
        udp.set("visitors", "ann")
        udp.close()
        await asyncio.to_thread(over_tcp)

        def complete(got: dict[Any, float]) -> bool:
            return (
                got.get(("shop_tcp_orders_total", ())) == 10
                and got.get(("shop_queue", ())) == 10
                and ("shop_visitors", ()) in got
            )

        async with asyncio.timeout(TIMEOUT):
            # Polling is the point: a scrape is the only way to see the samples.
            while not complete(got := await scrape(admin)):  # noqa: ASYNC110
                await asyncio.sleep(POLL_MAX)
        assert got[("shop_orders_total", ())] == 5.0
        assert got[("shop_checkout_bucket", (("le", "1.0"),))] == 1.0
        assert got[("shop_checkout_bucket", (("le", "0.1"),))] == 0.0
        assert got[("shop_visitors", ())] == 1.0
        events = {
            labels: value
            for (name, labels), value in got.items()
            if name == "podpatterns_adapter_input_events_total"
        }
        assert events[(("event", "lines"), ("input", "statsd"))] >= 19
    finally:
        await runtime.shutdown()


async def test_an_idle_series_leaves_the_scrape_of_a_running_adapter() -> None:
    """--statsd-expire-after on a running adapter: a label set the client stops sending
    leaves /metrics and is counted as expired; one it goes on sending stays."""
    adapter = Adapter(AdapterConfig(statsd_udp=HostPort("127.0.0.1", 0), statsd_expire_after=2.0))
    runtime = Runtime(RuntimeConfig(admin=HostPort("127.0.0.1", 0), shutdown_delay=0.0), [adapter])
    await runtime.start()
    try:
        assert adapter.statsd is not None and adapter.statsd.udp_address
        admin = str(runtime.admin_address)
        client = statsd.StatsClient(*adapter.statsd.udp_address)
        client.incr("jobs,kind=once")  # InfluxDB-style tags
        sent = 0
        expired = ("podpatterns_adapter_input_events_total", (("event", "series_expired"),))
        async with asyncio.timeout(TIMEOUT):
            while True:
                client.incr("jobs,kind=live")
                sent += 1
                got = await scrape(admin)
                events = {
                    (name, tuple(kv for kv in labels if kv[0] != "input")): v
                    for (name, labels), v in got.items()
                }
                if events.get(expired) and ("jobs_total", (("kind", "once"),)) not in got:
                    break
                await asyncio.sleep(POLL_MAX)  # the client's next sample
        client.close()
        assert events[expired] == 1.0
        assert got[("jobs_total", (("kind", "live"),))] >= 1.0
    finally:
        await runtime.shutdown()


@pytest.mark.skipif(shutil.which("nc") is None, reason="needs nc (netcat-openbsd)")
def test_nc_to_a_running_adapter_process(tmp_path: Path) -> None:
    """`nc -u` (and a line with garbage) to `podpatterns adapter --statsd-udp`; SIGTERM."""
    proc = Proc(
        "adapter",
        "--statsd-udp",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--shutdown-delay",
        "0",
    )
    try:
        address = proc.wait_event("statsd_listening")["udp"]
        host, port = address.rsplit(":", 1)
        admin = proc.admin_url().removeprefix("http://")
        payload = b"deploys:1|c|#env:prod\nnot a metric\ndeploys:1|c|#env:prod\n"
        subprocess.run(["nc", "-u", "-q1", host, port], input=payload, check=True, timeout=30)

        def deploys() -> float | None:
            got = asyncio.run(scrape(admin))
            return got.get(("deploys_total", (("env", "prod"),)))

        assert wait_until(deploys, "deploys on /metrics") == 2.0
        proc.wait_event("statsd_invalid", lambda e: e.get("reason") == "malformed")
        assert proc.terminate() == 0
    finally:
        proc.stop()


async def test_openmetrics_when_the_scraper_asks_for_it(tmp_path: Path) -> None:
    """Prometheus asks for OpenMetrics first: the app's metrics (StatsD and declared ones)
    and the adapter's own parse as OpenMetrics; without the Accept header, text format."""
    from prometheus_client.openmetrics.parser import (
        text_string_to_metric_families as openmetrics_families,
    )

    config = build(
        {"statsd_udp": HostPort("127.0.0.1", 0), "path": [str(tmp_path / "*.log")]},
        {},
        {"metrics": [{"name": "lines", "type": "counter"}]},
        "adapter.yaml",
    )
    adapter = Adapter(config)
    runtime = Runtime(RuntimeConfig(admin=HostPort("127.0.0.1", 0), shutdown_delay=0.0), [adapter])
    await runtime.start()
    try:
        assert adapter.statsd is not None
        adapter.statsd.metrics.feed(b"hits:2|c\nqueue:3|g\nlat:5|ms\nusers:ann|s\n")
        url = f"http://{runtime.admin_address}/metrics"
        accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        async with aiohttp.ClientSession() as s:
            async with s.get(url, headers={"Accept": accept}) as resp:
                kind, text = resp.headers["Content-Type"], await resp.text()
            async with s.get(url) as resp:
                plain = resp.headers["Content-Type"]
        assert kind.startswith("application/openmetrics-text") and text.endswith("# EOF\n")
        assert plain.startswith("text/plain; version=0.0.4")
        families = {f.name: f for f in openmetrics_families(text)}  # type: ignore[no-untyped-call]
        assert families["hits"].type == "counter"
        assert families["hits"].samples[0].value == 2.0
        assert {"queue", "lat", "users", "lines"} <= set(families)
        assert "podpatterns_adapter_input_events" in families
    finally:
        await runtime.shutdown()
