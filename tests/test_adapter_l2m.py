"""Logs to metrics: declarations, counting, the series cap, and exact counts across SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from podpatterns.adapter.checkpoint import NAME, CheckpointStore
from podpatterns.adapter.config import build
from podpatterns.adapter.l2m import MetricState, declarations
from podpatterns.errors import ConfigError
from tests.peers import candidate_ports, need
from tests.proc import Proc
from tests.waiting import wait_until

# -- what the "application" writes: each line's fields are a function of its number -------

STATUSES = (200, 200, 200, 404, 500)
BOUNDS = (0.5, 1.0, 2.5, 4.0)


def status_of(i: int) -> int:
    """The status of line ``i``."""
    return STATUSES[(i * 7) % len(STATUSES)]


def rt_of(i: int) -> float:
    """The request time of line ``i``: a multiple of 1/8, so every sum is exact in floats
    whatever the order the values are added in."""
    return ((i * 13) % 41) * 0.125


def line(i: int) -> bytes:
    """Line ``i`` of the access log (JSON)."""
    return json.dumps({"seq": i, "status": status_of(i), "rt": rt_of(i), "method": "GET"}).encode()


DECLARED: list[dict[str, Any]] = [
    {"name": "http_requests", "type": "counter", "labels": ["status"]},
    {"name": "http_request_seconds", "type": "histogram", "field": "rt", "buckets": list(BOUNDS)},
    {
        "name": "http_error_seconds",
        "type": "counter",
        "field": "rt",
        "match": {"status": "^5"},
    },
]


def expected(n: int) -> dict[str, Any]:
    """The values the declared metrics must have after lines 0..n-1, computed here."""
    statuses = Counter(str(status_of(i)) for i in range(n))
    buckets = [0] * (len(BOUNDS) + 1)
    total = 0.0
    errors = 0.0
    for i in range(n):
        v = rt_of(i)
        buckets[next((k for k, b in enumerate(BOUNDS) if v <= b), len(BOUNDS))] += 1
        total += v
        if status_of(i) >= 500:
            errors += v
    return {"requests": dict(statuses), "buckets": buckets, "sum": total, "errors": errors}


def scraped(text: str) -> dict[str, Any]:
    """The declared metrics' values in an exposition, shaped like :func:`expected`."""
    out: dict[str, Any] = {"requests": {}, "buckets": [], "sum": 0.0, "errors": 0.0}
    cumulative: list[float] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "http_requests_total":
                out["requests"][s.labels["status"]] = s.value
            elif s.name == "http_request_seconds_bucket":
                cumulative.append(s.value)
            elif s.name == "http_request_seconds_sum":
                out["sum"] = s.value
            elif s.name == "http_error_seconds_total":
                out["errors"] = s.value
    out["buckets"] = [int(c - p) for c, p in zip(cumulative, [0.0, *cumulative], strict=False)]
    return out


def scrape(url: str) -> str:
    """GET /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        body: bytes = resp.read()
    return body.decode()


def write_config(tmp: Path, metrics: list[dict[str, Any]]) -> Path:
    """A config file declaring ``metrics``."""
    path = tmp / "adapter.yaml"
    path.write_text(yaml.safe_dump({"metrics": metrics}))
    return path


# -- declarations ---------------------------------------------------------------------------


def config_with(metrics: Any) -> Any:
    """The adapter config built from a file declaring ``metrics``."""
    return build({"path": ["/var/log/app/*.log"]}, {}, {"metrics": metrics}, "adapter.yaml")


def test_declarations_build_into_the_config() -> None:
    """A valid metrics: list is compiled into the config, names and labels as declared."""
    config = config_with(DECLARED)
    names = [m.exposed for m in config.metrics]
    assert names == ["http_requests_total", "http_request_seconds", "http_error_seconds_total"]
    assert config.metrics[0].labels == (("status", "status"),)
    assert config.metrics[1].buckets == BOUNDS


@pytest.mark.parametrize(
    ("metric", "needles"),
    [
        ({"name": "bad-name", "type": "counter"}, ["metrics[0]", "name", "bad-name"]),
        ({"name": "x", "type": "timer"}, ["'x'", "type", "timer", "counter, gauge"]),
        (
            {"name": "x", "type": "summary"},
            ["'x'", "type: 'summary'", "not supported", "type: histogram", "histogram_quantile"],
        ),
        (
            {"name": "x", "type": "counter", "expire_after": "soon"},
            ["'x'", "expire_after", "'soon'", "not a duration"],
        ),
        (
            {"name": "x", "type": "counter", "expire_after": [30]},
            ["'x'", "expire_after", "single value"],
        ),
        ({"name": "x", "type": "gauge"}, ["'x'", "field: missing"]),
        ({"name": "x", "type": "counter", "colour": 1}, ["'x'", "colour", "unknown key"]),
        ({"name": "x", "type": "counter", "labels": ["a-b"]}, ["'x'", "labels", "a-b"]),
        ({"name": "x", "type": "counter", "match": {"f": "("}}, ["'x'", "match", "regex"]),
        (
            {"name": "x", "type": "histogram", "field": "v", "buckets": [1, 0.5]},
            ["'x'", "buckets", "ascending"],
        ),
        (
            {"name": "x", "type": "histogram", "field": "v", "labels": ["le"]},
            ["'x'", "labels", "le"],
        ),
        ({"name": "x", "type": "counter", "max_series": 0}, ["'x'", "max_series", ">= 1"]),
        ({"name": "x", "type": "gauge", "field": "v", "buckets": [1]}, ["'x'", "buckets"]),
        ({"name": "podpatterns_x", "type": "counter"}, ["podpatterns_x", "name", "prefix"]),
        ("x", ["metrics[0]", "mapping"]),
    ],
)
def test_a_bad_declaration_is_one_line_naming_the_metric_and_key(
    metric: Any, needles: list[str]
) -> None:
    """Each bad declaration: a ConfigError of one line naming the metric and the key."""
    with pytest.raises(ConfigError) as info:
        config_with([metric])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("adapter.yaml: metrics[0]")
    for needle in needles:
        assert needle in message, message


def test_a_name_declared_twice_is_refused() -> None:
    """``x`` and ``x_total`` are the same counter: refused, naming it."""
    with pytest.raises(ConfigError, match=r"metrics\[1\] 'x_total': name: declared twice"):
        config_with([{"name": "x", "type": "counter"}, {"name": "x_total", "type": "counter"}])


def test_sink_none_without_metrics_is_refused() -> None:
    """--sink none alone would discard everything: a config error saying what it is for."""
    with pytest.raises(ConfigError, match="--sink: none discards every record"):
        build({"path": ["/var/log/app/*.log"], "sink": ["none"]}, {}, {}, "adapter.yaml")


@pytest.mark.parametrize(
    ("args", "metric", "needle"),
    [
        (
            (),
            {"name": "lat", "type": "histogram", "field": "rt", "buckets": []},
            "metrics[0] 'lat': buckets: []",
        ),
        (
            (),
            {"name": "hits", "type": "counter", "expire_after": "soon"},
            "metrics[0] 'hits': expire_after: 'soon' is not a duration",
        ),
        (
            ("--metrics-expire-after", "soon"),
            {"name": "hits", "type": "counter"},
            "--metrics-expire-after: 'soon' is not a duration",
        ),
    ],
)
def test_a_bad_declaration_exits_2_with_one_line(
    tmp_path: Path, args: tuple[str, ...], metric: dict[str, Any], needle: str
) -> None:
    """The real command: exit 2, one line naming the metric and the key (or the option),
    no traceback."""
    cfg = write_config(tmp_path, [metric])
    p = Proc(
        "adapter", "--config", str(cfg), "--path", str(tmp_path / "*.log"), "--admin", "off", *args
    )
    try:
        assert p.wait(30) == 2
    finally:
        p.stop()
    errors = [ln for ln in p.lines if ln.strip() and not ln.startswith("{")]
    assert len(errors) == 1, p.lines
    assert needle in errors[0], errors[0]
    assert "Traceback" not in "\n".join(p.lines)


# -- counting -------------------------------------------------------------------------------


def test_histogram_buckets_equal_values_computed_here() -> None:
    """Histogram buckets, sum and counters equal what the test computes from the records."""
    state = MetricState(declarations(DECLARED))
    records = [json.loads(line(i)) for i in range(997)]
    for start in range(0, len(records), 100):  # batches, as acknowledged
        state.observe(records[start : start + 100])
    text = _exposition(state)
    assert scraped(text) == expected(997)


def test_values_as_strings_gauges_and_invalid_values() -> None:
    """Numeric strings count (nginx's $request_time is text); a gauge holds the last value;
    a missing or non-numeric value, or a negative one for a counter, is skipped and counted."""
    state = MetricState(
        declarations(
            [
                {"name": "bytes", "type": "counter", "field": "n", "labels": {"m": "method"}},
                {"name": "depth", "type": "gauge", "field": "n"},
            ]
        )
    )
    state.observe(
        [
            {"n": "1.5", "method": "GET"},
            {"n": 2, "method": "POST"},
            {"n": "x", "method": "GET"},
            {"method": "GET"},
            {"n": -1, "method": "GET"},
            {"n": "4"},
        ]
    )
    families = {f.name: f for f in text_string_to_metric_families(_exposition(state))}
    values = {tuple(s.labels.items()): s.value for s in families["bytes"].samples}
    assert values == {(("m", "GET"),): 1.5, (("m", "POST"),): 2.0, (("m", ""),): 4.0}
    assert [s.value for s in families["depth"].samples] == [4.0]
    assert dict(state.invalid()) == {"bytes_total": 3, "depth": 2}


def test_batching_does_not_change_any_value_or_series() -> None:
    """Counted a batch at a time (in any split) the series equal those counted one record
    at a time, bit for bit (float sums added in record order), with records missing a label
    field, values as text and an integer too large for a float (skipped, counted)."""
    decls = declarations(
        [
            {"name": "req", "type": "counter", "labels": ["m", "s"]},
            {"name": "req_by_m", "type": "counter", "labels": ["m"]},
            {"name": "lat", "type": "histogram", "field": "t", "buckets": [0.01, 0.1, 1.0]},
            {"name": "lat_by_s", "type": "histogram", "field": "t", "labels": ["s"]},
            {"name": "bytes", "type": "counter", "field": "t"},
            {"name": "last", "type": "gauge", "field": "t", "labels": ["m"]},
        ]
    )
    rng = random.Random(7)
    records: list[dict[str, Any]] = []
    for i in range(3000):
        rec: dict[str, Any] = {"m": rng.choice("GPD"), "s": rng.choice((200, 404, "500"))}
        rec["t"] = rng.choice((rng.random() / 7, f"{rng.random():.3f}", 3, 10**400, "x"))
        if i % 97 == 0:
            del rec["m"]
        records.append(rec)
    one_at_a_time = MetricState(decls)
    for rec in records:
        one_at_a_time.observe([rec])
    for size in (1000, 333, 3000):
        batched = MetricState(decls)
        for start in range(0, len(records), size):
            batched.observe(records[start : start + size])
        assert batched.dump() == one_at_a_time.dump()
    assert dict(one_at_a_time.invalid())["bytes_total"] > 0


def test_series_over_the_cap_are_dropped_and_counted() -> None:
    """max_series 3: the first 3 label sets are kept; every observation of another is dropped
    and counted; kept series go on counting."""
    state = MetricState(
        declarations([{"name": "hits", "type": "counter", "labels": ["u"], "max_series": 3}])
    )
    users = [f"u{i % 10}" for i in range(100)]
    state.observe([{"u": u} for u in users])
    families = {f.name: f for f in text_string_to_metric_families(_exposition(state))}
    kept = {s.labels["u"]: s.value for s in families["hits"].samples}
    assert kept == {"u0": 10.0, "u1": 10.0, "u2": 10.0}
    assert dict(state.dropped()) == {"hits_total": 70}


def test_state_round_trips_and_a_changed_declaration_starts_from_zero() -> None:
    """dump -> restore gives the same exposition; a metric whose labels changed starts at 0."""
    decls = declarations(DECLARED)
    state = MetricState(decls)
    state.observe([json.loads(line(i)) for i in range(50)])
    saved = json.loads(json.dumps(state.dump()))
    again = MetricState(decls)
    again.restore(saved)
    assert _exposition(again) == _exposition(state)
    changed = [{**DECLARED[0], "labels": ["status", "method"]}, *DECLARED[1:]]
    other = MetricState(declarations(changed))
    other.restore(saved)
    assert other.metrics[0].series == {}
    assert other.metrics[1].series == state.metrics[1].series


def test_a_checkpoint_without_metrics_still_loads(tmp_path: Path) -> None:
    """Checkpoints written before logs-to-metrics (no metrics key) load as before."""
    (tmp_path / NAME).write_text(json.dumps({"version": 1, "files": []}))
    store = CheckpointStore(tmp_path)
    assert store.load() == {}
    assert store.loaded_metrics is None
    assert store.fallbacks == 0


def _exposition(state: MetricState) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=True)
    registry.register(state)
    return generate_latest(registry).decode()


# -- idle-series expiry (time driven through an injected clock) ------------------------------


class Clock:
    """A wall clock the test moves: seconds since the epoch, as ``time.time``."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def series_of(state: MetricState, name: str) -> dict[str, float]:
    """The exposed samples of ``name`` (one label ``u``, or none) as {label value: value}."""
    return {
        s.labels.get("u", ""): s.value
        for family in text_string_to_metric_families(_exposition(state))
        for s in family.samples
        if s.name == name
    }


HITS = {"name": "hits", "type": "counter", "labels": ["u"]}


def test_idle_series_expire_and_a_returning_one_starts_from_zero() -> None:
    """expire_after 60s: a series not updated for 60s leaves /metrics and is counted; one
    updated meanwhile stays; an expired series that comes back starts again from zero."""
    clock = Clock()
    state = MetricState(declarations([{**HITS, "expire_after": "1m"}]), clock)
    state.observe([{"u": "a"}, {"u": "b"}, {"u": "b"}])
    clock.now += 30
    state.observe([{"u": "a"}])
    clock.now += 29.9
    assert series_of(state, "hits_total") == {"a": 2.0, "b": 2.0}  # b idle 59.9s: kept
    clock.now += 0.1
    assert series_of(state, "hits_total") == {"a": 2.0}  # b idle 60s: gone
    assert dict(state.expired()) == {"hits_total": 1}
    state.observe([{"u": "b"}])
    assert series_of(state, "hits_total") == {"a": 2.0, "b": 1.0}
    clock.now += 30
    assert series_of(state, "hits_total") == {"b": 1.0}
    assert dict(state.expired()) == {"hits_total": 2}
    assert dict(state.series_count()) == {"hits_total": 1}


def test_every_kind_expires_and_expiry_is_off_by_default() -> None:
    """Gauges and histograms expire like counters; a metric without expire_after keeps its
    series however long they are idle."""
    clock = Clock()
    state = MetricState(
        declarations(
            [
                {"name": "depth", "type": "gauge", "field": "v", "labels": ["u"]},
                {"name": "lat", "type": "histogram", "field": "v", "labels": ["u"]},
                HITS,
            ],
            expire_after=10.0,
        )
        + declarations([{**HITS, "name": "kept"}]),
        clock,
    )
    state.observe([{"u": "a", "v": 0.5}])
    clock.now += 10
    assert dict(state.expired()) == {"depth": 1, "lat": 1, "hits_total": 1, "kept_total": 0}
    clock.now += 86400 * 365
    assert series_of(state, "kept_total") == {"a": 1.0}
    assert [len(m.series) for m in state.metrics] == [0, 0, 0, 1]


def test_expiry_frees_a_slot_under_the_cap() -> None:
    """max_series 2: a third label set is dropped while two are live; once one of them has
    expired, the third gets its slot (a label churn does not lock the cap)."""
    clock = Clock()
    state = MetricState(declarations([{**HITS, "max_series": 2, "expire_after": "10s"}]), clock)
    state.observe([{"u": "a"}, {"u": "b"}])
    clock.now += 5
    state.observe([{"u": "b"}, {"u": "c"}, {"u": "c"}])
    assert series_of(state, "hits_total") == {"a": 1.0, "b": 2.0}
    assert dict(state.dropped()) == {"hits_total": 2}
    clock.now += 5  # a idle 10s
    state.observe([{"u": "c"}])
    assert series_of(state, "hits_total") == {"b": 2.0, "c": 1.0}
    assert dict(state.dropped()) == {"hits_total": 2}
    assert dict(state.expired()) == {"hits_total": 1}


def test_idleness_survives_a_restart_by_the_saved_wall_clock() -> None:
    """The state saved with the checkpoint carries each series' last update: restored
    later, a series idle since before the save expires on time (at once if its time has
    passed), a live one does not, and the expired count goes on."""
    clock = Clock()
    decls = declarations([{**HITS, "expire_after": "1m"}])
    state = MetricState(decls, clock)
    state.observe([{"u": "old"}])
    clock.now += 30
    state.observe([{"u": "gone"}, {"u": "live"}])
    clock.now += 30  # old expires now
    state.observe([{"u": "live"}])
    clock.now += 30  # gone expires now
    state.observe([{"u": "live"}])
    saved = json.loads(json.dumps(state.dump()))  # what the generation holds
    assert dict(state.expired()) == {"hits_total": 2}
    assert saved["metrics"]["hits_total"]["expired"] == 2

    clock.now += 30  # the restart, 30s later: live idle 30s
    again = MetricState(decls, clock)
    again.restore(saved)
    assert series_of(again, "hits_total") == {"live": 3.0}
    clock.now += 29.9
    again.observe([])
    assert series_of(again, "hits_total") == {"live": 3.0}
    clock.now += 0.1
    assert series_of(again, "hits_total") == {}
    assert dict(again.expired()) == {"hits_total": 3}

    # The same generation restored by a process started an hour later: expired at start.
    late = MetricState(decls, Clock(clock.now + 3600))
    late.restore(saved)
    assert series_of(late, "hits_total") == {}
    assert dict(late.expired()) == {"hits_total": 3}


def test_series_saved_without_times_are_idle_from_the_restore() -> None:
    """A state saved before expiry was turned on (no times), or with a time in the future
    (the clock was set back), counts as updated at the restore: never expired early."""
    clock = Clock()
    plain = MetricState(declarations([HITS]), clock)
    plain.observe([{"u": "a"}])
    saved = json.loads(json.dumps(plain.dump()))
    assert "touched" not in saved["metrics"]["hits_total"]
    clock.now += 3600
    state = MetricState(declarations([{**HITS, "expire_after": "1m"}]), clock)
    state.restore(saved)
    assert series_of(state, "hits_total") == {"a": 1.0}
    clock.now += 60
    assert series_of(state, "hits_total") == {}

    future = MetricState(declarations([{**HITS, "expire_after": "1m"}]), Clock(clock.now + 600))
    future.observe([{"u": "a"}])
    ahead = json.loads(json.dumps(future.dump()))
    state = MetricState(declarations([{**HITS, "expire_after": "1m"}]), clock)
    state.restore(ahead)
    clock.now += 60
    assert series_of(state, "hits_total") == {}


def test_expire_after_defaults_to_the_option_and_a_metric_may_override_it() -> None:
    """metrics_expire_after applies to every metric without its own expire_after; a
    metric's own (off included, unquoted in YAML) wins; the default is off."""
    text = """
metrics_expire_after: 30m
metrics:
  - {name: a, type: counter}
  - {name: b, type: counter, expire_after: off}
  - {name: c, type: counter, expire_after: 10s}
  - {name: d, type: counter, expire_after: 90}
"""
    config = build({"path": ["/var/log/app/*.log"]}, {}, yaml.safe_load(text), "adapter.yaml")
    assert [m.expire_after for m in config.metrics] == [1800.0, None, 10.0, 90.0]
    assert config_with([HITS]).metrics[0].expire_after is None


# -- real processes -------------------------------------------------------------------------


def adapter(tmp: Path, *extra: str, admin: str = "off", batch: int = 50) -> Proc:
    """``podpatterns adapter`` with the declared metrics, tailing tmp/logs/*.log."""
    return Proc(
        "adapter",
        "--config",
        str(tmp / "adapter.yaml"),
        "--path",
        str(tmp / "logs" / "*.log"),
        "--parse",
        "json",
        "--checkpoint-dir",
        str(tmp / "cp"),
        "--admin",
        admin,
        "--shutdown-delay",
        "0",
        "--reconcile-interval",
        "50ms",
        "--rotate-wait",
        "300ms",
        "--batch-max-records",
        str(batch),
        *extra,
    )


def test_metrics_only_adapter_serves_declared_metrics(tmp_path: Path) -> None:
    """--sink none: the declared metrics and the series-dropped counter on /metrics."""
    write_config(tmp_path, [*DECLARED, {"name": "by_seq", "type": "counter", "labels": ["seq"]}])
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "app.log").write_bytes(b"".join(line(i) + b"\n" for i in range(1500)))
    p = adapter(tmp_path, "--sink", "none", admin="127.0.0.1:0")
    try:
        url = p.admin_url()
        want = expected(1500)
        wait_until(lambda: scraped(scrape(url)) == want, "all 1500 records counted")
        text = scrape(url)
        assert (
            'podpatterns_adapter_metric_series_dropped_total{metric="by_seq_total"} 500.0' in text
        )
        assert text.count("by_seq_total{") == 1000  # the default cap
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        p.stop()


def labelled(text: str, name: str, label: str) -> dict[str, float]:
    """The samples ``name`` of an exposition as {value of ``label``: value}."""
    return {
        s.labels[label]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


def own(text: str, name: str, metric: str = "hits_total") -> float | None:
    """The adapter's own per-metric sample ``name`` (``podpatterns_adapter_...``)."""
    return labelled(text, name, "metric").get(metric)


EXPIRED = "podpatterns_adapter_metric_series_expired_total"


def append(log: Path, *values: str) -> None:
    """Append one JSON line per value (``{"u": value}``) to ``log``."""
    with log.open("ab") as f:
        f.write(b"".join(json.dumps({"u": v}).encode() + b"\n" for v in values))


def expiring(tmp_path: Path, expire_after: float, want: dict[str, float]) -> tuple[Proc, str]:
    """A metrics-only adapter counting ``hits`` by ``u`` with ``expire_after``, once it has
    counted ``want`` (that many lines of each value, written first); and its admin URL."""
    write_config(tmp_path, [{**HITS, "expire_after": f"{expire_after:g}s"}])
    (tmp_path / "logs").mkdir(exist_ok=True)
    append(tmp_path / "logs" / "app.log", *(u for u, n in want.items() for _ in range(int(n))))
    p = adapter(tmp_path, "--sink", "none", admin="127.0.0.1:0")
    try:
        url = p.admin_url()
        wait_until(lambda: labelled(scrape(url), "hits_total", "u") == want, f"{want} counted")
    except BaseException:
        p.stop()
        raise
    return p, url


def test_an_idle_series_leaves_the_metrics_of_a_running_adapter(tmp_path: Path) -> None:
    """expire_after 2s on a real adapter: a label set no longer logged leaves /metrics and
    is counted as expired; one logged on stays, its count exact."""
    log = tmp_path / "logs" / "app.log"
    p, url = expiring(tmp_path, 2.0, {"idle": 1.0, "live": 1.0})
    try:
        written = [1]

        def idle_gone() -> bool:
            append(log, "live")  # the live series goes on being updated
            written[0] += 1
            text = scrape(url)
            return "idle" not in labelled(text, "hits_total", "u") and bool(own(text, EXPIRED))

        wait_until(idle_gone, "the idle series expired")
        want = {"live": float(written[0])}
        wait_until(lambda: labelled(scrape(url), "hits_total", "u") == want, "live counted")
        text = scrape(url)
        assert own(text, EXPIRED) == 1.0
        assert own(text, "podpatterns_adapter_metric_series") == 1.0
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        p.stop()


def test_idleness_survives_sigkill_and_restart(tmp_path: Path) -> None:
    """A series idle since before a SIGKILL is expired when the restarted adapter finds its
    saved last update older than expire_after (by the wall clock, not from the restart);
    a series updated shortly before the kill survives with its exact count, which goes on."""
    expire = 8.0  # live is idle some 3s at the restart, plus its start-up
    log = tmp_path / "logs" / "app.log"
    written = 1

    def saved() -> dict[str, Any]:
        store = CheckpointStore(tmp_path / "cp")
        store.load()
        if store.loaded_metrics is None:
            return {}  # counted before the first generation is written
        entry: dict[str, Any] = store.loaded_metrics["metrics"]["hits_total"]
        return {k[0]: t for (k, _), t in zip(entry["series"], entry["touched"], strict=True)}

    a, url = expiring(tmp_path, expire, {"idle": 3.0, "live": 1.0})
    try:
        idle_at = wait_until(lambda: saved().get("idle"), "idle's last update saved")

        def live_updated_late() -> bool:
            nonlocal written
            if labelled(scrape(url), "hits_total", "u").get("live") == written:
                if time.time() >= idle_at + expire - 3.0:
                    return True
                append(log, "live")
                written += 1
            return False

        wait_until(live_updated_late, "live updated until 3s before idle expires", 30.0)
        a.p.kill()
        a.wait()
    finally:
        a.stop()
    times = saved()
    assert times["idle"] == idle_at  # killed while idle was still kept
    assert times["live"] > idle_at + expire - 4.5
    # The restart comes once idle has been idle for expire_after by the wall clock.
    wait_until(lambda: time.time() >= idle_at + expire, "idle for expire_after", 30.0)
    b = adapter(tmp_path, "--sink", "none", admin="127.0.0.1:0")
    try:
        assert b.wait_event("metric_series_expired_at_start")["series"] == 1  # idle only
        url = b.admin_url()
        # The metrics advance just before their generation is written: a batch the kill
        # caught between the two is read and counted again, once.
        want = {"live": float(written)}
        wait_until(lambda: labelled(scrape(url), "hits_total", "u") == want, "live exact")
        assert own(scrape(url), EXPIRED) == 1.0
        append(log, "live", "live")
        want = {"live": float(written + 2)}
        wait_until(lambda: labelled(scrape(url), "hits_total", "u") == want, "live goes on")
        b.signal(signal.SIGTERM)
        assert b.wait(30) == 0
    finally:
        b.stop()


def _kill_run(tmp_path: Path, seed: int, kills: int, sink: tuple[str, ...] = ()) -> None:
    """Write and rotate an access log while the adapter is SIGKILLed at random points, then
    check the counters against what was written: not one lost, not one counted twice.
    ``sink``: the adapter's sink and parse options (default: a file sink, JSON)."""
    rng = random.Random(seed)
    write_config(tmp_path, DECLARED)
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "app.log"
    stop = threading.Event()
    written = [0]

    def app() -> None:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        n = 0
        rotations = 0
        next_rotation = time.monotonic() + 1.0
        while not stop.is_set():
            k = rng.randint(1, 20)
            os.write(fd, b"".join(line(i) + b"\n" for i in range(n, n + k)))
            n += k
            time.sleep(0.001)
            if time.monotonic() >= next_rotation:
                rotations += 1
                os.rename(log, logs / f"app.log.{rotations}")
                os.write(fd, b"".join(line(i) + b"\n" for i in range(n, n + 10)))
                n += 10
                os.close(fd)
                fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                next_rotation = time.monotonic() + 1.0
        os.close(fd)
        written[0] = n

    sink = sink or ("--sink", "file", "--sink-path", str(tmp_path / "out.ndjson"))
    writer = threading.Thread(target=app)
    writer.start()
    try:
        for _ in range(kills):
            p = adapter(tmp_path, *sink, batch=200)
            try:
                p.wait_event("adapter_started")
                time.sleep(rng.uniform(0.05, 1.2))
                p.p.kill()
                p.wait()
            finally:
                p.stop()
    finally:
        stop.set()
        writer.join()
    n = written[0]
    want = expected(n)
    p = adapter(tmp_path, *sink, admin="127.0.0.1:0", batch=200)
    try:
        url = p.admin_url()

        def counted() -> float:
            return float(sum(scraped(scrape(url))["requests"].values()))

        wait_until(lambda: counted() >= n, f"{n} records counted", 120.0)
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        p.stop()
    # The last generation's state, as the next start would restore it.
    state = MetricState(declarations(DECLARED))
    store = CheckpointStore(tmp_path / "cp")
    store.load()
    state.restore(store.loaded_metrics)
    assert scraped(_exposition(state)) == want


@pytest.mark.parametrize("seed", [11, 12])
def test_counts_are_exact_across_sigkill_at_random_points(tmp_path: Path, seed: int) -> None:
    """SIGKILL at random points while writing and rotating: counters and histogram buckets
    equal what was written (never reset, never double-counted)."""
    _kill_run(tmp_path, seed, kills=4)


def test_counts_are_exact_across_sigkill_metrics_only_regex(tmp_path: Path) -> None:
    """The same with --sink none and a regex parser: the metrics-only pipeline, whose
    records carry only the fields the metrics read, counts exactly across SIGKILL too."""
    regex = r'"status": (?P<status>\d+), "rt": (?P<rt>[\d.]+), "method": "(?P<method>\w+)"'
    _kill_run(tmp_path, 17, kills=4, sink=("--sink", "none", "--parse", "regex", "--regex", regex))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [13, 14, 15, 16])
def test_counts_are_exact_across_sigkill_more_seeds(tmp_path: Path, seed: int) -> None:
    """As above, with more seeds and more kills."""
    _kill_run(tmp_path, seed, kills=8)


# -- a real Prometheus scrapes the adapter --------------------------------------------------


@contextlib.contextmanager
def run_prometheus(workdir: Path, target: str) -> Iterator[str]:
    """Prometheus from the OS packages scraping ``target`` (host:port) every 250ms; yields
    its URL once it is ours that answers (another one may hold a candidate port)."""
    binary = need("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "250ms", "scrape_timeout": "200ms"},
                "scrape_configs": [
                    {"job_name": "adapter", "static_configs": [{"targets": [target]}]}
                ],
            }
        )
    )
    data = workdir / "tsdb"
    for port in candidate_ports():
        url = f"http://127.0.0.1:{port}"
        log = workdir / f"prometheus-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={data}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        try:

            def ours(proc: subprocess.Popen[bytes] = proc, url: str = url) -> str | None:
                if proc.poll() is not None:
                    return "exited"
                try:
                    flags = _get_json(url + "/api/v1/status/flags")
                except OSError:
                    return None
                return "ready" if flags["data"].get("storage.tsdb.path") == str(data) else None

            if wait_until(ours, f"prometheus on port {port}", 30.0) == "ready":
                yield url
                return
            text = log.read_text(errors="replace")
            if "address already in use" not in text.lower():
                raise RuntimeError(f"prometheus exited {proc.returncode}:\n{text}")
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(15)
    raise RuntimeError("prometheus: no free port found")


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def query(prometheus: str, promql: str) -> float | None:
    """The value of an instant query with one result, or None while it has none."""
    doc = _get_json(prometheus + "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    result = doc["data"]["result"]
    return float(result[0]["value"][1]) if len(result) == 1 else None


def test_a_real_prometheus_scrapes_the_declared_metrics(tmp_path: Path) -> None:
    """Prometheus scrapes the adapter; its HTTP API answers the values computed here."""
    write_config(tmp_path, DECLARED)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "app.log").write_bytes(b"".join(line(i) + b"\n" for i in range(777)))
    want = expected(777)
    p = adapter(tmp_path, "--sink", "none", admin="127.0.0.1:0")
    try:
        url = p.admin_url()
        wait_until(lambda: scraped(scrape(url)) == want, "all 777 records counted")
        with run_prometheus(tmp_path, url.removeprefix("http://")) as prom:
            for status, n in want["requests"].items():
                promql = f'http_requests_total{{job="adapter",status="{status}"}}'
                assert wait_until(partial(query, prom, promql), promql, 30.0) == n
            cumulative = 0
            for bound, n in zip([*BOUNDS, "+Inf"], want["buckets"], strict=True):
                cumulative += n
                promql = f'http_request_seconds_bucket{{le="{bound}"}}'
                assert query(prom, promql) == cumulative, promql
            assert query(prom, "http_request_seconds_sum") == want["sum"]
            assert query(prom, "http_error_seconds_total") == want["errors"]
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        p.stop()


def test_a_manifest_config_file_from_a_configmap_is_checked() -> None:
    """The docs' manifest checks read a --config file from a ConfigMap of the same file: a
    bad metric declaration in it is a problem naming the metric."""
    from tests.manifests import document_problems, load_documents

    text = (Path(__file__).parents[1] / "docs" / "adapter-metrics.md").read_text()
    pod = next(b for b in text.split("```yaml\n")[1:] if "kind: Pod" in b).split("```")[0]
    assert document_problems(load_documents(pod))[1] == []
    broken = pod.replace("type: histogram", "type: summary")
    problems = document_problems(load_documents(broken))[1]
    assert len(problems) == 1
    assert "metrics[1] 'http_request_duration_seconds': type: 'summary'" in problems[0]
