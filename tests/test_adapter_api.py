"""The adapter's Python API: Pipeline(sources, parse, transforms, sinks)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from podpatterns.adapter import (
    Add,
    Drop,
    Emit,
    Exclude,
    Files,
    Keep,
    Multiline,
    Pipeline,
    RateLimit,
    Redact,
    Rename,
    Sample,
    Source,
    Timestamp,
)
from podpatterns.adapter.api import transform_chains
from podpatterns.adapter.config import AdapterConfig, SinkConfig
from podpatterns.adapter.inputs.tcp import TcpInput
from podpatterns.errors import ConfigError
from podpatterns.options import HostPort
from tests.adapter_harness import ListSink, Receiver, read_ndjson
from tests.proc import Proc
from tests.waiting import eventually, wait_until

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "custom-adapter"


async def drain(pipeline: Pipeline) -> None:
    """The graceful stop: no new input, ship what was read, close."""
    pipeline.stop_accepting()
    async with asyncio.timeout(30):
        await pipeline.wait_drained()
    await pipeline.close()


def apply(transforms: list[Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = records
    for chain in transform_chains(transforms):
        out, failed = chain.apply(out)
        assert not failed
    return out


def test_the_typed_stages_default_to_the_options_defaults() -> None:
    """Files and Multiline mirror AdapterConfig's fields: their defaults must agree."""
    defaults = {f.name: f.default for f in fields(AdapterConfig)}
    files = Files(paths=["/x/*.log"], multiline=Multiline(preset="python")).settings()
    for name, value in files.items():
        if name not in ("path", "multiline", "multiline_start", "multiline_continue"):
            assert value == defaults[name], name


# -- transforms, in the order given ------------------------------------------------------


def test_transforms_run_in_the_order_given() -> None:
    """A filter after a rename sees the new name; before it, the old one."""
    rec = {"msg": "boom", "level": "error"}
    assert apply([Rename("msg", "message"), Keep("message", "boom")], [dict(rec)]) == [
        {"message": "boom", "level": "error"}
    ]
    assert apply([Keep("message", "boom"), Rename("msg", "message")], [dict(rec)]) == []
    # a function between built-ins sees what the ones before it did, and only that
    seen: list[dict[str, Any]] = []

    def spy(r: dict[str, Any]) -> dict[str, Any]:
        seen.append(dict(r))
        return r

    out = apply([Add("env", "prod"), spy, Drop("env"), Add("team", "shop")], [dict(rec)])
    assert seen == [{"msg": "boom", "level": "error", "env": "prod"}]
    assert out == [{"msg": "boom", "level": "error", "team": "shop"}]


def test_a_list_in_the_chains_own_order_is_one_chain() -> None:
    """The command line's order costs no extra pass."""
    chains = transform_chains(
        [
            Keep("level", "error"),
            Exclude("path", "^/healthz"),
            Sample(1.0),
            RateLimit(1000),
            Rename("msg", "message"),
            Drop("secret"),
            Add("env", "prod"),
            Timestamp("ts"),
            Redact(kinds=["email"]),
            lambda r: r,
        ]
    )
    assert len(chains) == 1
    assert len(transform_chains([Add("a", "1"), Keep("a", "1")])) == 2
    # one counters object for them all: the metrics see every chain's drops
    two = transform_chains([Keep("a", "x"), Rename("a", "b"), Keep("b", "y")])
    assert len({id(c.counters) for c in two}) == 1


def test_redact_timestamp_and_exclude() -> None:
    out = apply(
        [
            Exclude("path", "^/healthz$"),
            Timestamp("ts"),
            Redact(kinds=["email"], patterns=[r"tok-\w+"]),
        ],
        [
            {"path": "/healthz", "message": "ok"},
            {"path": "/pay", "ts": 0, "message": "ann@example.com paid with tok-abc"},
        ],
    )
    assert out == [
        {
            "path": "/pay",
            "ts": 0,
            "timestamp": "1970-01-01T00:00:00+00:00",
            "message": "[REDACTED] paid with [REDACTED]",
        }
    ]


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        (Keep("level", "("), "Keep('level'): '(' is not a valid regular expression"),
        (Sample(0), "Sample: 0 must be > 0 and <= 1"),
        (RateLimit(-1), "RateLimit: -1 must be > 0"),
        (Redact(kinds=["phone"]), "Redact: 'phone' is not one of"),
        (Redact(), "Redact: give kinds= or patterns="),
        ("json", "transforms: 'json' is neither a built-in transform nor a function"),
    ],
)
def test_a_bad_transform_is_a_config_error(transform: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        transform_chains([transform])


# -- the pipeline's own checks -------------------------------------------------------------


class Numbers(Source):
    """Emits ``count`` records in batches of ``per``."""

    def __init__(self, name: str, count: int, per: int = 10) -> None:
        super().__init__(name)
        self.count = count
        self.per = per

    async def run(self, emit: Emit) -> None:
        for start in range(0, self.count, self.per):
            await emit([{"message": f"n {i}", "n": i} for i in range(start, start + self.per)])


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"sources": []}, "sources: empty"),
        (
            {"sources": [Files(paths=["/a/*.log"]), Files(paths=["/b/*.log"])]},
            "sources: more than one Files",
        ),
        ({"sources": [Files(paths="/a/*.log")]}, "Files: paths='/a/*.log' must be a list"),
        ({"sources": [Numbers("n", 1)]}, "--spool-dir: missing (source 'n' needs a directory"),
        (
            {"sources": [Files(paths=["/a/*.log"])], "parse": "yaml"},
            "parse: 'yaml' is not one of raw, json",
        ),
        (
            {"sources": [Files(paths=["/a/*.log"])], "batch_size": 3},
            "Pipeline: unknown setting 'batch_size'",
        ),
        (
            {"sources": [Files(paths=["/a/*.log"])], "batch_max_bytes": 10**9},
            "--queue-max-bytes: 8388608 must be >= --batch-max-bytes",
        ),
        (
            {"sources": [Files(paths=["/a/*.log"], multiline=Multiline())]},
            "Multiline: give exactly one of preset, start or continue_",
        ),
        (
            {"sources": [Files(paths=["/a/*.log"])], "sinks": [ListSink(), ListSink()]},
            "sinks: name 'list' used twice",
        ),
        (
            {
                "sources": [Files(paths=["/a/*.log"])],
                "sinks": [SinkConfig(name="f", kind="file", sink_path=Path("/nowhere/x"))],
            },
            "sinks: 'f': --sink-path: '/nowhere/x': directory '/nowhere' does not exist",
        ),
    ],
)
def test_a_bad_pipeline_is_a_config_error(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Pipeline(**kw)


# -- running -------------------------------------------------------------------------------


async def test_files_and_sources_reach_every_sink(tmp_path: Path) -> None:
    """A tailed file and a source of our own, parsed by our function, to our sink and the
    built-in file sink; each sink gets every record once."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "app.log").write_text("".join(f"k{i}=v{i} level=info\n" for i in range(50)))

    def kv(line: str) -> dict[str, Any] | None:
        pairs = [p.partition("=") for p in line.split()]
        return {k: v for k, _, v in pairs} if all(sep for _, sep, _ in pairs) else None

    mine = ListSink()
    pipeline = Pipeline(
        sources=[Files(paths=[str(logs / "*.log")]), Numbers("numbers", 200)],
        parse=kv,
        transforms=[Add("env", "test")],
        sinks=[mine, SinkConfig(name="file", kind="file", sink_path=tmp_path / "out.ndjson")],
        spool_dir=tmp_path / "spool",
        batch_max_records=64,
    )
    await pipeline.start()
    try:
        await eventually(lambda: len(mine.records) >= 250, "all 250 records")
        assert (await pipeline.status())["inputs"]["numbers"] == {"records": 200}
    finally:
        await drain(pipeline)
    files = [r for r in mine.records if "file" in r]
    pushed = sorted(r["n"] for r in mine.records if r.get("input") == "numbers")
    assert len(files) == 50 and pushed == list(range(200))
    assert files[0]["k0"] == "v0" and all(r["env"] == "test" for r in mine.records)
    assert len(read_ndjson(tmp_path / "out.ndjson")) == 250


async def test_emitted_records_survive_a_crash(tmp_path: Path) -> None:
    """What emit() returned for is durable: cut with the sink down, closed without an
    acknowledgement, a new pipeline on the same spool ships every record."""
    down = ListSink()
    down.set_down(True)
    first = Pipeline(sources=[Numbers("numbers", 100)], sinks=[down], spool_dir=tmp_path)
    source = first.inputs[0]
    assert isinstance(source, Numbers)
    await first.start()
    await eventually(lambda: source.records == 100, "the source emitted everything")
    first.cut()
    await first.close()
    assert down.records == []

    up = ListSink()
    second = Pipeline(sources=[Numbers("numbers", 0)], sinks=[up], spool_dir=tmp_path)
    await second.start()
    try:
        await eventually(lambda: len(up.records) >= 100, "the spooled records")
    finally:
        await drain(second)
    assert sorted(r["n"] for r in up.records) == list(range(100))


class Flaky:
    """A sink of our own that raises (not an OSError) until told to accept."""

    name = "flaky"

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.refused = 0
        self.accept = asyncio.Event()

    async def start(self) -> None:
        pass

    async def send(self, records: list[dict[str, Any]]) -> None:
        if not self.accept.is_set():
            self.refused += 1
            raise RuntimeError("destination said no")
        self.records += records

    async def close(self) -> None:
        pass

    def collect(self) -> dict[str, float]:
        return {}


async def test_a_sink_of_our_own_that_raises_is_retried(tmp_path: Path) -> None:
    """Raising is "not accepted": the batch is sent again, the other sink goes on, and the
    adapter stays live."""
    flaky, steady = Flaky(), ListSink()
    pipeline = Pipeline(
        sources=[Numbers("numbers", 30)], sinks=[flaky, steady], spool_dir=tmp_path / "spool"
    )
    await pipeline.start()
    try:
        await eventually(lambda: len(steady.records) == 30 and flaky.refused >= 2, "retries")
        assert pipeline.is_live()
        flaky.accept.set()
        await eventually(lambda: len(flaky.records) == 30, "the flaky sink caught up")
    finally:
        await drain(pipeline)
    assert sorted(r["n"] for r in flaky.records) == list(range(30))


async def test_a_source_that_raises_makes_the_adapter_not_live(tmp_path: Path) -> None:
    class Broken(Source):
        async def run(self, emit: Emit) -> None:
            await emit([{"message": "one"}])
            raise ValueError("the app's queue went away")

    sink = ListSink()
    pipeline = Pipeline(sources=[Broken("broken")], sinks=[sink], spool_dir=tmp_path)
    await pipeline.start()
    try:
        await eventually(lambda: not pipeline.is_live(), "liveness off")
        await eventually(lambda: len(sink.records) == 1, "what it emitted is still shipped")
    finally:
        await pipeline.close()


async def test_inputs_over_localhost_are_sources_too(tmp_path: Path) -> None:
    """A built-in input object works as a source: records over TCP to our sink."""
    sink = ListSink()
    tcp = TcpInput(HostPort("127.0.0.1", 0), max_line=1024, name="tcp")
    pipeline = Pipeline(
        sources=[tcp],
        transforms=[Rename("message", "text")],
        sinks=[sink],
        spool_dir=tmp_path,
    )
    await pipeline.start()
    try:
        assert tcp.address is not None
        _, writer = await asyncio.open_connection(*tcp.address)
        writer.write(b'{"message": "hi", "n": 1}\nplain line\n')
        await writer.drain()
        await eventually(lambda: len(sink.records) == 2, "both lines")
        writer.close()
        await writer.wait_closed()
    finally:
        await drain(pipeline)
    assert [r["text"] for r in sink.records] == ["hi", "plain line"]
    assert all(r["input"] == "tcp" for r in sink.records)


async def test_a_regex_parses_lines(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_text("GET /x 200\nnot a request\n")
    sink = ListSink()
    pipeline = Pipeline(
        sources=[Files(paths=[str(tmp_path / "*.log")])],
        parse=re.compile(r"(?P<method>\w+) (?P<path>\S+) (?P<status>\d+)"),
        on_parse_error="drop",
        sinks=[sink],
    )
    await pipeline.start()
    try:
        await eventually(lambda: pipeline.counters.lines == 2, "both lines read")
        await eventually(lambda: len(sink.records) == 1, "the parsed one shipped")
    finally:
        await drain(pipeline)
    assert sink.records[0]["status"] == "200"


# -- the image entrypoint of docs/examples/custom-adapter -----------------------------------


def test_the_custom_adapter_entrypoint_runs_and_stops_on_sigterm(tmp_path: Path) -> None:
    """shop_pipeline (docs/library.md): JSON logs to stdout, errors to the webhook, which
    gets them after being down for a while; SIGTERM drains and exits 0."""
    logs = tmp_path / "logs"
    logs.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    receiver = Receiver()
    receiver.down.set()
    out = (tmp_path / "stdout").open("w")
    (logs / "app.log").write_text(
        json.dumps({"msg": "started", "level": "info"})
        + "\n"
        + json.dumps({"msg": "payment failed", "level": "error"})
        + "\n"
    )
    proc = Proc(
        "-m",
        "shop_pipeline",
        program=(sys.executable,),
        tail=(),
        stdout=out,
        env={
            "PYTHONPATH": str(EXAMPLE),
            "LOGS": str(logs / "*.log"),
            "STATE_DIR": str(state),
            "WEBHOOK_URL": receiver.url,
            "ADMIN_PORT": "0",
        },
    )
    try:
        admin = proc.admin_url()
        proc.wait_event("sink_failing", lambda e: e.get("sink") == "webhook")
        receiver.down.clear()
        wait_until(lambda: receiver.records, "the webhook got the error")
        assert receiver.records == [{"text": f"{logs / 'app.log'}: payment failed"}]

        async def metrics() -> str:
            async with aiohttp.ClientSession() as s, s.get(admin + "/metrics") as resp:
                return await resp.text()

        text = asyncio.run(metrics())
        assert 'sink="webhook"' in text
        assert proc.terminate() == 0
    finally:
        proc.stop()
        receiver.close()
        out.close()
    shipped = read_ndjson(tmp_path / "stdout")
    assert [r["message"] for r in shipped] == ["started", "payment failed"]
