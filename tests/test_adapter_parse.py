"""Parsers on real-world samples, fuzzed; multiline and CRI joining; transforms and redaction."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podpatterns.adapter.config import PARSERS
from podpatterns.adapter.lines import Line, LineSplitter
from podpatterns.adapter.multiline import PRESETS, Grouper
from podpatterns.adapter.parse import get_parser
from podpatterns.adapter.transform import TransformChain, luhn_ok, parse_timestamp, redactor
from tests.adapter_harness import ListSink, config, running
from tests.waiting import eventually

NGINX = (
    '93.180.71.3 - - [17/May/2015:08:05:32 +0000] "GET /downloads/product_1 HTTP/1.1" 304 0 '
    '"-" "Debian APT-HTTP/1.3 (0.8.16~exp12ubuntu10.21)"'
)


def test_nginx_combined() -> None:
    """nginx's combined format parses into typed fields."""
    rec = get_parser("nginx")(NGINX)
    assert rec is not None
    assert rec["remote_addr"] == "93.180.71.3"
    assert rec["status"] == 304 and rec["bytes"] == 0
    assert rec["path"] == "/downloads/product_1"
    assert rec["user_agent"].startswith("Debian APT")


def test_apache_common_and_combined() -> None:
    """Apache common and combined formats parse; a common line is not combined."""
    common = '127.0.0.1 - frank [10/Oct/2000:13:55:36 -0700] "GET /apache_pb.gif HTTP/1.0" 200 2326'
    rec = get_parser("apache_common")(common)
    assert rec is not None and rec["remote_user"] == "frank" and rec["bytes"] == 2326
    assert get_parser("apache")(common) is None
    assert get_parser("apache")(common + ' "http://x/" "curl/8"') is not None


def test_json_logfmt_regex() -> None:
    """JSON objects, logfmt pairs and regex named groups become fields."""
    assert get_parser("json")('{"level":"info","n":1}') == {"level": "info", "n": 1}
    assert get_parser("json")("[1]") is None
    assert get_parser("logfmt")('level=info msg="hello world" ok') == {
        "level": "info",
        "msg": "hello world",
        "ok": True,
    }
    regex = get_parser("regex", re.compile(r"^(?P<level>\w+): (?P<msg>.*)$"))
    assert regex("WARN: disk") == {"level": "WARN", "msg": "disk"}
    assert regex("nope") is None


def test_syslog_5424_and_3164() -> None:
    """Syslog RFC 5424 and RFC 3164 lines parse; facility and severity come from PRI."""
    r5424 = get_parser("syslog")(
        "<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 "
        '[exampleSDID@32473 iut="3"] An application event'
    )
    assert r5424 is not None
    assert (r5424["facility"], r5424["severity"]) == (20, 5)
    assert r5424["appname"] == "evntslog" and r5424["message"] == "An application event"
    r3164 = get_parser("syslog")("<34>Oct 11 22:14:15 mymachine su[99]: 'su root' failed")
    assert r3164 is not None
    assert r3164["tag"] == "su" and r3164["procid"] == "99" and r3164["severity"] == 2


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_no_parser_crashes_on_any_text(text: str) -> None:
    """Every parser returns a dict or None for any input; none raises."""
    for name in PARSERS:
        parser = get_parser(name, re.compile(r"(?P<a>\w+)"))
        result = parser(text)
        assert result is None or isinstance(result, dict)


def _loads_object(text: str) -> Any:
    """What ``json.loads`` makes of ``text`` when it is an object, else None."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


JSON_EDGES = ['{"a":1}', '{"a":1} \t\r\n', ' {"a":1}', '{"a":1} x', '{"a":1}\x0b', "{}{}",
              "{", "[1]", "1", "", "\ufeff{}", '{"a":{"b":[1,2,{"c":null}]}}', '{"a":1,}',
              '{"a":' * 5000]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.sampled_from(JSON_EDGES),
        st.text(max_size=60).map(lambda t: "{" + t),
        st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8)).map(json.dumps),
    )
)
def test_json_parser_accepts_what_json_loads_does(text: str) -> None:
    """The JSON parser gives what ``json.loads`` gives for an object and None for anything
    else: whitespace around the value, extra data, a BOM, deep nesting."""
    assert get_parser("json")(text) == _loads_object(text)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab: =x\n", max_size=30), st.sets(st.sampled_from("abcz"), max_size=4))
def test_regex_parser_keeps_only_the_fields_asked_for(text: str, fields: set[str]) -> None:
    """Given the fields a metrics-only pipeline reads, the regex parser gives the full
    parser's fields restricted to those (unmatched groups left out the same way)."""
    pattern = re.compile(r"(?P<a>a+)?:(?P<b>b*)(?: (?P<c>\w+))?")
    full = get_parser("regex", pattern)(text)
    some = get_parser("regex", pattern, fields)(text)
    if full is None:
        assert some is None
    else:
        assert some == {k: v for k, v in full.items() if k in fields}


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab\r\n", max_size=200), st.integers(1, 12))
def test_splitter_lines_of_one_chunk(text: str, limit: int) -> None:
    """One chunk gives every complete line: CR before LF stripped, cut at the limit and
    marked truncated, offsets and ends in the file (with or without CRs and long lines)."""
    data = text.encode()
    want = []
    pos = 0
    for part in data.split(b"\n")[:-1]:
        end = pos + len(part) + 1
        part = part[:-1] if part.endswith(b"\r") else part
        want.append((part[:limit], pos, end, len(part) > limit))
        pos = end
    got = LineSplitter(b"\n", limit).feed(data)
    assert [(ln.data, ln.offset, ln.end, ln.truncated) for ln in got] == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=50), max_size=20), st.integers(1, 64))
def test_splitter_keeps_every_byte_accounted(chunks: list[bytes], limit: int) -> None:
    """Fed any chunks, the splitter's lines tile the input: offsets are contiguous."""
    s = LineSplitter(b"\n", limit)
    lines: list[Line] = []
    for c in chunks:
        lines.extend(s.feed(c))
    pos = 0
    for line in lines:
        assert line.offset == pos
        assert len(line.data) <= limit
        pos = line.end
    assert s.committed == pos
    assert pos + sum(map(len, chunks)) - pos >= 0
    assert s.position == sum(map(len, chunks))


async def test_parse_errors_are_marked_or_dropped(tmp_path: Path) -> None:
    """A line that fails to parse is passed raw with parse_error, or dropped and counted."""
    (tmp_path / "app.log").write_bytes(b'{"a":1}\nnot json\n')
    sink = ListSink()
    async with running(config(tmp_path, "*.log", parse="json"), sink) as adapter:
        await eventually(lambda: len(sink.records) >= 2)
    assert sink.records[0]["a"] == 1
    assert sink.records[1]["parse_error"] == "json"
    assert adapter.counters.parse_errors == 1
    sink = ListSink()
    cfg = config(tmp_path / "x", "*.log", parse="json", on_parse_error="drop")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "app.log").write_bytes(b'not json\n{"a":2}\n')
    async with running(cfg, sink):
        await eventually(lambda: len(sink.records) >= 1)
    assert [r["a"] for r in sink.records] == [2]


async def test_cri_partials_are_merged(tmp_path: Path) -> None:
    """CRI P lines are merged into the F line that ends them; offset is the first line's."""
    data = (
        b"2024-01-01T00:00:00Z stdout P hello \n"
        b"2024-01-01T00:00:00Z stdout P big \n"
        b"2024-01-01T00:00:01Z stdout F world\n"
        b"2024-01-01T00:00:02Z stderr F other\n"
        b"2024-01-01T00:00:03Z stdout P open"
        b"\n"
    )
    (tmp_path / "c.log").write_bytes(data)
    sink = ListSink()
    async with running(config(tmp_path, "*.log", parse="cri"), sink) as adapter:
        await eventually(lambda: len(sink.records) >= 2)
        # The open P group keeps the checkpoint at its first line.
        await eventually(lambda: next(iter(adapter.acked.values())).offset > 0)
        assert next(iter(adapter.acked.values())).offset == data.index(b"2024-01-01T00:00:03Z")
    assert sink.records[0]["message"] == "hello big world"
    assert sink.records[0]["offset"] == 0
    assert sink.records[1]["stream"] == "stderr"


PY_TRACE = b"""2024 ERROR boom
Traceback (most recent call last):
  File "x.py", line 1, in <module>
    f()
ValueError: bad
2024 INFO next
"""

JAVA_TRACE = b"""Exception in thread "main" java.lang.IllegalStateException: x
\tat com.example.A.b(A.java:10)
\tat com.example.A.main(A.java:5)
Caused by: java.lang.NullPointerException
\t... 2 more
INFO after
"""

GO_PANIC = b"""panic: runtime error: index out of range

goroutine 1 [running]:
main.main()
\t/tmp/x.go:5 +0x1d
exit status 2
INFO after
"""


@pytest.mark.parametrize(
    ("preset", "data", "lines"),
    [("python", PY_TRACE, 5), ("java", JAVA_TRACE, 5), ("go", GO_PANIC, 6)],
)
def test_multiline_presets(preset: str, data: bytes, lines: int) -> None:
    """Each preset joins its stack trace into one record; the next line starts a new one."""
    mode, pattern = PRESETS[preset]
    g = Grouper(mode, re.compile(pattern), 500, 1 << 20)
    s = LineSplitter()
    out = g.feed(s.feed(data))
    assert len(out) == 1
    assert out[0].data.count(b"\n") == lines - 1
    assert len(g.held) == 1  # the next record is open


async def test_multiline_never_checkpoints_inside_an_open_group(tmp_path: Path) -> None:
    """While a group is open the checkpoint stays at its first line; the timeout closes it."""
    (tmp_path / "app.log").write_bytes(PY_TRACE[:-15])  # the traceback, still open
    sink = ListSink()
    cfg = config(tmp_path, "*.log", multiline="python", multiline_timeout=0.5)
    async with running(cfg, sink) as adapter:
        await eventually(lambda: len(sink.records) >= 1)
        entry = next(iter(adapter.acked.values()))
        assert entry.offset == len(PY_TRACE) - 15
    assert sink.records[0]["message"].endswith("ValueError: bad")


def test_redaction_catalogue() -> None:
    """Built-in redactions: bearer tokens, URL passwords, e-mails, IPv4, Luhn-valid cards."""
    r = redactor(["bearer", "url_password", "email", "ipv4", "credit_card"], [re.compile("k-\\d+")])
    text = (
        "Authorization: Bearer eyJhbGciOi.J9 db=postgres://app:hunter2@db:5432/x "
        "by ann@example.org from 10.1.2.3 card 4111-1111-1111-1111 order 4111111111111112 key k-42"
    )
    out = r(text)
    for secret in ("eyJhbGciOi", "hunter2", "ann@example.org", "10.1.2.3", "4111-1111", "k-42"):
        assert secret not in out
    assert "4111111111111112" in out  # fails the Luhn check: an order number, kept
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")


# The IPv4 pattern as first written: the fast path (three-dot pre-check, digit lookahead)
# must redact exactly what it did.
_IPV4_REFERENCE = re.compile(
    r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"
)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789.. :-_/abZ@\u00e9\u0663", max_size=60))
def test_ipv4_redaction_fast_path_matches_the_plain_regex(text: str) -> None:
    """The ipv4 redactor changes exactly what a plain scan of the original pattern would."""
    assert redactor(["ipv4"], [])(text) == _IPV4_REFERENCE.sub("[REDACTED]", text)


def test_ipv4_redaction_skips_timestamps_but_not_addresses() -> None:
    """A timestamp with fractional seconds is kept; addresses anywhere are redacted."""
    r = redactor(["ipv4"], [])
    assert r("2024-05-01T12:00:00.123Z") == "2024-05-01T12:00:00.123Z"
    assert r("from 10.1.2.3, to 255.255.255.255.") == "from [REDACTED], to [REDACTED]."
    assert r("v1.2.3.4567 1.2.3") == "v1.2.3.4567 1.2.3"


def test_transform_chain_fields_filter_sample_and_timestamp() -> None:
    """add/rename/drop, timestamp, filter/exclude and sample are applied per record."""
    chain = TransformChain(
        add=(("env", "prod"),),
        rename=(("msg", "message"),),
        drop=("secret",),
        timestamp_field="time",
        keep=(("level", re.compile("^(info|error)$")),),
        exclude=(("msg", re.compile("healthz")),),  # filters see fields before renames
    )
    recs: list[dict[str, Any]] = [
        {"msg": "a", "secret": 1, "level": "info", "time": "10/Oct/2000:13:55:36 -0700"},
        {"msg": "b", "level": "debug"},
        {"msg": "GET /healthz", "level": "info"},
    ]
    out, failed = chain.apply(recs)
    assert out == [
        {
            "message": "a",
            "level": "info",
            "time": "10/Oct/2000:13:55:36 -0700",
            "env": "prod",
            "timestamp": "2000-10-10T20:55:36+00:00",
        }
    ]
    assert not failed and chain.counters.filtered == 2
    sampled = TransformChain(sample=0.5)
    kept, _ = sampled.apply([{"offset": i} for i in range(1000)])
    assert 350 < len(kept) < 650
    assert parse_timestamp(0) == "1970-01-01T00:00:00+00:00"


def boom(rec: dict[str, Any]) -> Any:
    """A user transform: drops 'drop', fans out 'two', raises on 'bad'."""
    if rec["message"] == "bad":
        raise ValueError("cannot")
    if rec["message"] == "drop":
        return None
    if rec["message"] == "two":
        return [rec, {**rec, "copy": True}]
    return {**rec, "seen": True}


async def test_user_transform_and_dead_letter(tmp_path: Path) -> None:
    """A user callable can keep, drop or fan out; one that raises dead-letters the record."""
    (tmp_path / "app.log").write_bytes(b"ok\ndrop\ntwo\nbad\nlast\n")
    sink = ListSink()
    sys.modules.setdefault("tests.test_adapter_parse", sys.modules[__name__])
    cfg = config(
        tmp_path,
        "*.log",
        transform=("tests.test_adapter_parse:boom",),
        dead_letter=tmp_path / "dead.ndjson",
    )
    async with running(cfg, sink) as adapter:
        await eventually(lambda: len(sink.records) >= 4)
    assert [r["message"] for r in sink.records] == ["ok", "two", "two", "last"]
    assert adapter._transform_counters.failed == 1
    dead = (tmp_path / "dead.ndjson").read_text()
    assert '"message":"bad"' in dead and "ValueError: cannot" in dead


def test_rate_limit_drops_the_excess() -> None:
    """--rate-limit keeps about N records per second and counts the rest."""
    chain = TransformChain(rate_limit=100.0)
    chain._tokens = 100.0
    out, _ = chain.apply([{"offset": i} for i in range(1000)])
    assert 100 <= len(out) <= 101
    assert chain.counters.rate_limited == 1000 - len(out)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(max_size=120), min_size=1, max_size=30),
    st.sampled_from(PARSERS),
)
def test_no_line_crashes_the_processing_stage(raws: list[bytes], parser: str) -> None:
    """Any bytes through any parser and the built-in transforms: one record each, no raise."""
    from podpatterns.adapter import Adapter
    from podpatterns.adapter.batch import Batch
    from podpatterns.adapter.config import AdapterConfig

    cfg = AdapterConfig(
        path=("/nonexistent/*.log",),
        parse=parser,
        regex=re.compile(r"(?P<word>\w+)"),
        redact=("bearer", "url_password", "email", "ipv4", "credit_card"),
        rename_field=(("message", "msg"),),
        timestamp_field="time",
        add_field=(("k", "v"),),
    )
    adapter = Adapter(cfg)
    batch = Batch()
    offset = 0
    for raw in raws:
        data = raw.replace(b"\n", b" ")
        batch.lines.append(("/f.log", "1:2", Line(data, offset, offset + len(data) + 1)))
        offset += len(data) + 1
    records, failed = adapter._process(batch)
    assert len(records) == len(raws) and not failed
    assert [r["offset"] for r in records] == [ln.offset for _, _, ln in batch.lines]
