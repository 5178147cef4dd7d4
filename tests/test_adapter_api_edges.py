"""The adapter's Python API at its edges (review of issue 12's Pipeline): settings the
objects stand for, sources that never end, stops while a source emits, and the order of
the transforms proved against applying each one alone."""

from __future__ import annotations

import asyncio
import copy
import importlib
import itertools
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from podpatterns.adapter import (
    Add,
    Drop,
    Emit,
    Exclude,
    Files,
    Keep,
    Pipeline,
    Redact,
    Rename,
    Sample,
    Source,
    Timestamp,
)
from podpatterns.adapter.api import BuiltinTransform, transform_chains
from podpatterns.adapter.transform import Transform
from podpatterns.errors import ConfigError
from podpatterns.options import HostPort
from tests.adapter_harness import ListSink
from tests.waiting import eventually

ROOT = Path(__file__).resolve().parent.parent

Record = dict[str, Any]


def apply(transforms: list[Any], records: list[Record]) -> list[Record]:
    out = copy.deepcopy(records)
    for chain in transform_chains(transforms):
        out, failed = chain.apply(out)
        assert not failed
    return out


def one_by_one(transforms: list[Any], records: list[Record]) -> list[Record]:
    """The meaning of "in the order given": each transform alone, in turn."""
    out = copy.deepcopy(records)
    for t in transforms:
        (chain,) = transform_chains([t])
        out, failed = chain.apply(out)
        assert not failed
    return out


# -- settings the objects stand for ------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"read_from": "end"}, "Pipeline: read_from is a setting of Files"),
        ({"path": ("/b/*.log",)}, "Pipeline: path is a setting of Files"),
        ({"multiline_timeout": 2.0}, "Pipeline: multiline_timeout is a setting of Files"),
        ({"rename_field": (("a", "b"),)}, "Pipeline: rename_field is a transform"),
        ({"sample": 0.1}, "Pipeline: sample is a transform"),
        ({"filter": (("level", re.compile("error")),)}, "Pipeline: filter is a transform"),
        ({"http_listen": HostPort("127.0.0.1", 0)}, "Pipeline: http_listen is an input's"),
        ({"syslog_udp": HostPort("127.0.0.1", 0)}, "Pipeline: syslog_udp is an input's"),
        ({"regex": re.compile("(?P<a>.)")}, "Pipeline: regex: pass the compiled regex as parse="),
    ],
)
def test_a_setting_an_object_stands_for_is_a_config_error(
    settings: dict[str, Any], message: str, tmp_path: Path
) -> None:
    """Before: read_from/path raised a TypeError (two values for one field), and the
    transform and input settings were accepted and silently ignored."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        Pipeline(
            sources=[Files(paths=[str(tmp_path / "*.log")])],
            spool_dir=tmp_path / "spool",
            **settings,
        )


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"sources": ["/var/log/app/*.log"]}, "sources: '/var/log/app/*.log' is neither Files"),
        ({"sinks": ["stdout"]}, "sinks: 'stdout' is neither a SinkConfig nor a sink"),
    ],
)
def test_an_item_of_the_wrong_kind_is_a_config_error(
    kw: dict[str, Any], message: str, tmp_path: Path
) -> None:
    """Before: AttributeError ('str' object has no attribute 'name')."""
    kw.setdefault("sources", [Files(paths=[str(tmp_path / "*.log")])])
    with pytest.raises(ConfigError, match=re.escape(message)):
        Pipeline(**kw)


# -- sources of our own: stops and backpressure ------------------------------------------


class Forever(Source):
    """Emits ``count`` records, then waits for ever (an app's queue that stays open)."""

    def __init__(self, name: str, count: int) -> None:
        super().__init__(name)
        self.count = count
        self.cancelled = asyncio.Event()

    async def run(self, emit: Emit) -> None:
        await emit([{"n": i} for i in range(self.count)])
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled.set()


class Stream(Source):
    """Emits numbered records, ``per`` at a time, until ``limit`` (a bound, not a goal)."""

    def __init__(self, name: str, limit: int, per: int = 10, pad: int = 0) -> None:
        super().__init__(name)
        self.limit = limit
        self.per = per
        self.pad = "x" * pad

    async def run(self, emit: Emit) -> None:
        for start in range(0, self.limit, self.per):
            await emit([{"n": n, "pad": self.pad} for n in range(start, start + self.per)])


async def test_a_source_that_never_returns_does_not_hold_the_drain(tmp_path: Path) -> None:
    sink = ListSink()
    source = Forever("forever", 50)
    pipeline = Pipeline(sources=[source], sinks=[sink], spool_dir=tmp_path)
    await pipeline.start()
    try:
        await eventually(lambda: len(sink.records) == 50, "the 50 records")
        pipeline.stop_accepting()
        async with asyncio.timeout(30):
            await pipeline.wait_drained()
        assert source.cancelled.is_set()
    finally:
        await pipeline.close()
    assert pipeline.is_live()


async def test_the_drain_ships_every_record_a_source_emitted(tmp_path: Path) -> None:
    """Stopped while it emits: every record emit() returned for is shipped (and those of
    the emit cut short may be too: at least once)."""
    sink = ListSink()
    source = Stream("stream", limit=1_000_000)
    pipeline = Pipeline(sources=[source], sinks=[sink], spool_dir=tmp_path)
    await pipeline.start()
    try:
        await eventually(lambda: source.records >= 500, "some records emitted")
        pipeline.stop_accepting()
        async with asyncio.timeout(30):
            await pipeline.wait_drained()
    finally:
        await pipeline.close()
    shipped = {r["n"] for r in sink.records}
    assert set(range(source.records)) <= shipped
    assert source.records < 1_000_000  # it was stopped, not finished


async def test_a_full_spool_paces_a_source_until_the_sink_is_back(tmp_path: Path) -> None:
    sink = ListSink()
    sink.set_down(True)
    total = 3000  # ~3 MiB of records through a 1 MiB spool
    source = Stream("stream", limit=total, pad=1000)
    pipeline = Pipeline(
        sources=[source], sinks=[sink], spool_dir=tmp_path, spool_max_bytes=1024 * 1024
    )
    await pipeline.start()
    try:
        spool = pipeline.spool
        assert spool is not None
        await eventually(lambda: spool.counters.full >= 1, "the spool refused an append")
        assert source.records < total
        sink.set_down(False)
        await eventually(lambda: len(sink.records) >= total, "every record once the sink is up")
    finally:
        pipeline.stop_accepting()
        async with asyncio.timeout(30):
            await pipeline.wait_drained()
        await pipeline.close()
    assert sorted(r["n"] for r in sink.records) == list(range(total))


CLOSE_WHILE_EMITTING = textwrap.dedent(
    """
    import asyncio, sys, tempfile
    from pathlib import Path
    from podpatterns import logs
    from podpatterns.adapter import Pipeline, Source
    from tests.adapter_harness import ListSink

    class Endless(Source):
        async def run(self, emit):
            for n in range(10_000_000):
                await emit([{"n": n}])

    async def main(how):
        sink = ListSink()
        sink.set_down(True)
        pipeline = Pipeline(sources=[Endless("e")], sinks=[sink], spool_dir=Path(sys.argv[2]))
        source = pipeline.inputs[0]
        await pipeline.start()
        while source.records < 100:
            await asyncio.sleep(0.01)
        if how == "cut":
            pipeline.cut()
        await pipeline.close()
        print("closed", flush=True)

    logs.configure("warning")
    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.parametrize("how", ["cut", "close"])
def test_a_stop_without_a_drain_while_a_source_emits_ends(how: str, tmp_path: Path) -> None:
    """cut() (a drain cut short) or close() alone (the runtime closing a started component)
    while a source is in emit(): before, emit() spun on the stopped spool's SpoolFull
    without ever yielding, and close() never returned (the event loop was stuck). Run in
    a process: a stuck event loop cannot time itself out."""
    proc = subprocess.run(
        [sys.executable, "-c", CLOSE_WHILE_EMITTING, how, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "closed"


# -- transforms in the order given ---------------------------------------------------------


def upper_level(r: Record) -> Record:
    r["level"] = str(r.get("level", "")).upper()
    return r


def split_in_two(r: Record) -> list[Record]:
    return [dict(r, part=1), dict(r, part=2)]


RECORDS: list[Record] = [
    {"msg": "boom x1", "level": "error", "a": "x1", "ts": 0, "offset": 10},
    {"msg": "fine", "level": "info", "a": "y", "offset": 20},
    {"message": "pay ann@example.com", "level": "warn", "b": "x", "offset": 30},
    {"msg": "REDACTED x", "level": "Error", "offset": 40, "ts": "2026-01-01T00:00:00Z"},
    {"msg": "[REDACTED]", "offset": 55},
    {"offset": 60, "a": "1"},
] + [{"msg": f"n{i}", "level": "info", "offset": 100 + 37 * i} for i in range(20)]

POOL: list[BuiltinTransform | Transform] = [
    Rename("a", "b"),
    Rename("b", "c"),
    Keep("b", "x"),
    Keep("level", "(?i)error"),
    Exclude("a", "1"),
    Add("a", "x1"),
    Add("level", "error"),
    Drop("b"),
    Drop("level"),
    Timestamp("ts"),
    Redact(patterns=["x"]),
    Redact(patterns=[r"REDACTED"]),
    Redact(kinds=["email"]),
    Sample(0.5),
    upper_level,
    split_in_two,
]


def test_every_order_of_transforms_means_each_one_in_turn() -> None:
    """For every ordered choice of 3 transforms of the pool (3360 lists, including two
    renames that chain, Redact then Redact, a function then Keep, Add then Drop...), the
    chains transform_chains makes do exactly what applying each one alone in turn does."""
    for chosen in itertools.permutations(POOL, 3):
        assert apply(list(chosen), RECORDS) == one_by_one(list(chosen), RECORDS), chosen


def test_named_cases_of_the_order() -> None:
    rec: Record = {"msg": "a secret x", "level": "info", "offset": 0}
    # a rename of a rename follows it; the other way round it finds nothing to rename
    assert apply([Rename("msg", "m"), Rename("m", "text")], [rec])[0]["text"] == "a secret x"
    assert "text" not in apply([Rename("m", "text"), Rename("msg", "m")], [rec])[0]
    # the second Redact sees what the first wrote
    twice = apply([Redact(patterns=["secret"]), Redact(patterns=["REDACTED"])], [rec])
    assert twice[0]["msg"] == "a [[REDACTED]] x"
    # a function, then a Keep that sees what the function did
    assert apply([upper_level, Keep("level", "^INFO$")], [rec]) != []
    assert apply([Keep("level", "^INFO$"), upper_level], [rec]) == []
    # Add then Drop of one field: gone; Drop then Add: there
    assert "env" not in apply([Add("env", "p"), Drop("env")], [rec])[0]
    assert apply([Drop("env"), Add("env", "p")], [rec])[0]["env"] == "p"
    # Timestamp then Rename of its field, and Timestamp twice: the last one that parses wins
    both = apply([Timestamp("t1"), Timestamp("t2")], [dict(rec, t1=0, t2=86400)])
    assert both[0]["timestamp"] == "1970-01-02T00:00:00+00:00"


def test_two_samples_in_a_row_keep_the_smaller_fraction() -> None:
    """A sample is chosen by offset (a restart samples the same records), so the second
    Sample keeps every record the first kept when its fraction is not smaller:
    Sample(0.5), Sample(0.5) keeps a half, not a quarter (docs of Sample say so)."""
    records = [{"offset": 80 * i} for i in range(2000)]
    half = apply([Sample(0.5)], records)
    assert apply([Sample(0.5), Sample(0.5)], records) == half
    assert apply([Sample(0.25), Sample(0.5)], records) == apply([Sample(0.25)], records)
    assert 800 < len(half) < 1200


def test_sample_thins_the_records_of_a_source() -> None:
    """A Source's (and every pushed input's) records carry no ``offset``: they are sampled
    by their place in the stream (it used to keep them all)."""
    records = [{"n": i} for i in range(2000)]
    assert len(apply([Sample(0.1)], records)) < 1000


def test_sample_of_a_record_whose_offset_is_not_a_number() -> None:
    """A source may carry its own ``offset`` (a Kafka-like one: a string); it used to raise
    ValueError out of the sender task, which ended the adapter."""
    assert len(apply([Sample(0.5)], [{"offset": "p0-17"}])) <= 1


# -- a parser of our own ---------------------------------------------------------------------


def raw(line: str) -> dict[str, Any] | None:
    """A parser that happens to be called ``raw``."""
    key, _, value = line.partition("=")
    return {key: value} if value else None


def sloppy(line: str) -> Any:
    """A parser with a bug: returns the list it split instead of a dict, for some lines."""
    return line.split() if " " in line else {"word": line}


@pytest.mark.parametrize(
    ("parse", "expect"),
    [
        # before: a function named raw was skipped (every line shipped as message)
        (raw, [{"k": "v"}, {"message": "nope", "parse_error": f"{__name__}.raw"}]),
        # before: a list where a dict belongs killed the sender (TypeError): no liveness
        (sloppy, [{"word": "one"}, {"message": "two words", "parse_error": "sloppy"}]),
    ],
)
async def test_a_parser_of_our_own_is_called_and_its_bad_results_are_parse_errors(
    parse: Any, expect: list[Record], tmp_path: Path
) -> None:
    first = "k=v" if parse is raw else "one"
    second = "nope" if parse is raw else "two words"
    (tmp_path / "a.log").write_text(f"{first}\n{second}\n")
    sink = ListSink()
    pipeline = Pipeline(sources=[Files(paths=[str(tmp_path / "*.log")])], parse=parse, sinks=[sink])
    await pipeline.start()
    try:
        await eventually(lambda: len(sink.records) == 2 or not pipeline.is_live(), "2 records")
        assert pipeline.is_live()
    finally:
        pipeline.stop_accepting()
        async with asyncio.timeout(30):
            await pipeline.wait_drained()
        await pipeline.close()
    strip = ("file", "file_id", "offset")
    assert [{k: v for k, v in r.items() if k not in strip} for r in sink.records] == expect
    assert pipeline.counters.parse_errors == 1


# -- the custom adapter example (docs/examples/custom-adapter) ------------------------------

EXAMPLE = ROOT / "docs" / "examples" / "custom-adapter"


async def test_the_example_webhook_sink_drops_what_the_webhook_refuses_for_good() -> None:
    """A 400 is never taken: counted and acknowledged, or the checkpoint (and then stdout)
    would wait for it for ever; a 503 raises, so the batch is sent again."""
    from aiohttp import web

    sys.path.insert(0, str(EXAMPLE))
    try:
        webhook_sink = importlib.import_module("shop_pipeline").WebhookSink
    finally:
        sys.path.remove(str(EXAMPLE))
    answers = [400, 503, 200]

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=answers.pop(0))

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sink = webhook_sink(f"http://127.0.0.1:{port}/hook")
    await sink.start()
    try:
        batch = [{"level": "error", "message": "payment failed", "file": "/x.log"}]
        await sink.send(batch)  # 400
        assert sink.collect() == {"posted": 0, "rejected": 1}
        with pytest.raises(Exception, match="503"):
            await sink.send(batch)
        await sink.send(batch)  # 200
        assert sink.collect() == {"posted": 1, "rejected": 1}
    finally:
        await sink.close()
        await runner.cleanup()


def test_the_example_without_its_webhook_says_so_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shop_pipeline"],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{EXAMPLE}:{ROOT}", "ADMIN_PORT": "0", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "WEBHOOK_URL: missing" in proc.stderr


# -- values: checked as the command line checks them -----------------------------------------


@pytest.mark.parametrize(
    ("files", "settings", "message"),
    [
        ({"read_from": "middle"}, {}, "Files: read_from: 'middle' is not one of"),
        ({"watch": "inotify"}, {}, "Files: watch: 'inotify' is not one of"),
        ({"poll_interval": -1.0}, {}, "Files: poll_interval: '-1.0' is not a duration"),
        ({}, {"on_parse_error": "skip"}, "Pipeline: on_parse_error: 'skip' is not one of"),
        ({}, {"batch_max_records": 0}, "Pipeline: batch_max_records: '0' is out of range"),
        ({}, {"spool_max_bytes": "lots"}, "Pipeline: spool_max_bytes: 'lots' is not a size"),
        ({}, {"sink_unready_after": -3.0}, "Pipeline: sink_unready_after: '-3.0'"),
    ],
)
def test_a_bad_value_is_a_config_error_as_on_the_command_line(
    files: dict[str, Any], settings: dict[str, Any], message: str
) -> None:
    """Before: accepted (the options' parsers were the only check of these), to fail later
    or never."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        Pipeline(sources=[Files(paths=["/a/*.log"], **files)], **settings)


def test_values_may_be_written_as_on_the_command_line(tmp_path: Path) -> None:
    pipeline = Pipeline(
        sources=[Files(paths=[str(tmp_path / "*.log")], rotate_wait="2m")],  # type: ignore[arg-type]
        queue_max_bytes="16MiB",
        sink_unready_after="30s",
        dead_letter=str(tmp_path / "dead.ndjson"),
    )
    config = pipeline.config
    assert config.rotate_wait == 120.0 and config.queue_max_bytes == 16 * 1024 * 1024
    assert config.sink_unready_after == 30.0 and config.dead_letter == tmp_path / "dead.ndjson"


KILLED_WHILE_EMITTING = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from podpatterns import logs
    from podpatterns.adapter import Pipeline, Source
    from tests.adapter_harness import ListSink

    class Counting(Source):
        async def run(self, emit):
            for n in range(0, 1_000_000, 10):
                await emit([{"n": i} for i in range(n, n + 10)])
                print(n + 10, flush=True)  # emitted: durable from here on

    async def main():
        sink = ListSink()
        sink.set_down(True)
        pipeline = Pipeline(sources=[Counting("c")], sinks=[sink], spool_dir=Path(sys.argv[1]))
        await pipeline.start()
        await asyncio.Event().wait()

    logs.configure("warning")
    asyncio.run(main())
    """
)


async def test_what_emit_returned_for_survives_sigkill(tmp_path: Path) -> None:
    """A real crash (SIGKILL while the source emits, the sink down): a new pipeline on the
    same spool ships every record some emit() had returned for."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILLED_WHILE_EMITTING,
        str(tmp_path),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    emitted = 0
    try:
        async with asyncio.timeout(60):
            while emitted < 500:
                line = await proc.stdout.readline()
                assert line, "the process ended before emitting 500 records"
                emitted = int(line)
    finally:
        proc.kill()
        await proc.wait()
    # what it printed after the last line we read may have been emitted too: at least once
    up = ListSink()
    second = Pipeline(sources=[Forever("c", 0)], sinks=[up], spool_dir=tmp_path)
    await second.start()
    try:
        await eventually(lambda: len(up.records) >= emitted, f"the {emitted} records")
    finally:
        second.stop_accepting()
        async with asyncio.timeout(30):
            await second.wait_drained()
        await second.close()
    assert set(range(emitted)) <= {r["n"] for r in up.records}
