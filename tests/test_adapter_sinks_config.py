"""Sink configuration: --sink repeated, a config file's sinks: list, bad values as one-line
errors naming the option."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from podpatterns.adapter import Adapter
from podpatterns.adapter.config import build
from podpatterns.errors import ConfigError
from tests.adapter_harness import SeqWriter, check_delivery, read_ndjson, seqs_of
from tests.proc import run
from tests.waiting import eventually

URL = "http://127.0.0.1:3100/loki/api/v1/push"


def test_sinks_list_gives_each_entry_its_own_settings(tmp_path: Path) -> None:
    """Entries take per-sink keys; top-level and flag values apply where an entry is silent."""
    cfg = build(
        {"path": [str(tmp_path / "*.log")], "sink_timeout": "5s"},
        {"PODPATTERNS_SINK_GZIP": "true"},
        {
            "sink_retries": 3,
            "sinks": [
                {"sink": "loki", "sink_url": URL, "loki_label": ["app=app"]},
                {
                    "sink": "http",
                    "name": "archive",
                    "sink_url": "http://a.example/logs",
                    "sink_gzip": False,
                },
                {"sink": "stdout"},
            ],
        },
    )
    loki, archive, stdout = cfg.sinks
    assert stdout.kind == "stdout" and stdout.sink_url is None
    assert (loki.name, loki.kind, loki.loki_label) == ("loki", "loki", (("app", "app"),))
    assert (archive.name, archive.kind) == ("archive", "http")
    assert loki.sink_gzip and not archive.sink_gzip
    assert loki.sink_retries == archive.sink_retries == 3
    assert loki.sink_timeout == archive.sink_timeout == 5.0
    assert cfg.sink == ("loki", "http", "stdout")


@pytest.mark.parametrize(
    ("flags", "file", "message"),
    [
        ({"sink": ["http", "loki"], "sink_url": URL}, {}, "would share --sink-url"),
        ({"sink": ["file", "file"]}, {}, "'file' given twice"),
        ({"sink": ["stdout"], "sink_url": URL}, {}, "--sink-url: .* does not use it"),
        ({"sink": ["loki"]}, {}, "--sink-url: missing .*loki/api/v1/push"),
        (
            {"sink": ["loki"], "sink_url": URL, "loki_label": ["bad-name=x"]},
            {},
            "--loki-label: 'bad-name=x' has label name 'bad-name'",
        ),
        (
            {"sink": ["loki"], "sink_url": URL, "loki_label": ["a=x", "a=y"]},
            {},
            "--loki-label: label 'a' given twice",
        ),
        (
            {"sink": ["otlp"], "sink_url": URL, "otlp_encoding": "xml"},
            {},
            "--otlp-encoding: 'xml' is not one of protobuf, json",
        ),
        ({"sink": ["stdout"]}, {"sinks": [{"sink": "stdout"}]}, "cannot be combined with sinks"),
        ({}, {"sinks": []}, "sinks must be a non-empty list"),
        ({}, {"sinks": [{"sink_url": URL}]}, r"sinks\[0\]: sink: missing"),
        ({}, {"sinks": [{"sink": "kafka"}]}, r"sinks\[0\]: sink: 'kafka' is not one of"),
        (
            {},
            {"sinks": [{"sink": "stdout", "sink_urll": URL}]},
            r"sinks\[0\]: unknown key 'sink_urll' \(did you mean 'sink_url'\?\)",
        ),
        ({}, {"sinks": [{"sink": "stdout"}, {"sink": "stdout"}]}, "name 'stdout' used twice"),
        ({}, {"sinks": [{"sink": "http", "name": "x"}]}, "sinks: 'x': --sink-url: missing"),
        ({}, {"sinks": [{"sink": "stdout"}, {"sink": "loki"}]}, r"sinks\[1\]: --sink-url: missing"),
        (
            {
                "sink": ["http"],
                "sink_url": "https://bob:pw-SECRET@logs.example/in",
                "sink_token_file": "/run/token",
            },
            {},
            r"--sink-url: credentials in the URL \(user:password@\) cannot be combined with "
            "--sink-token-file",
        ),
        (
            {
                "sink": ["otlp"],
                "sink_url": "https://bob:pw-SECRET@logs.example/v1/logs",
                "sink_header": ["Authorization=Basic eA=="],
            },
            {},
            "cannot be combined with an Authorization --sink-header",
        ),
    ],
)
def test_bad_sink_settings_name_the_option(
    flags: dict[str, Any], file: dict[str, Any], message: str
) -> None:
    """Each mistake is a ConfigError naming the option (and the entry) and the value."""
    with pytest.raises(ConfigError, match=message):
        build({"path": ["/x/*.log"], **flags}, {}, file)


def test_bad_sink_flag_exits_2_with_one_line(tmp_path: Path) -> None:
    """From the command line: exit 2 and one line, no traceback."""
    proc = run(
        "adapter",
        "--path",
        str(tmp_path / "*.log"),
        "--sink",
        "loki",
        "--sink",
        "otlp",
        "--sink-url",
        URL,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--sink: loki and otlp would share --sink-url" in proc.stderr


async def test_two_file_sinks_from_a_config_file_each_get_every_record(tmp_path: Path) -> None:
    """A sinks: list with two file sinks: both files get every record."""
    (tmp_path / "logs").mkdir()
    SeqWriter(tmp_path / "logs" / "app.log").write(500)
    cfg = build(
        {"path": [str(tmp_path / "logs" / "*.log")]},
        {},
        {
            "checkpoint_dir": str(tmp_path / "cp"),
            "sinks": [
                {"sink": "file", "name": "one", "sink_path": str(tmp_path / "one.ndjson")},
                {"sink": "file", "name": "two", "sink_path": str(tmp_path / "two.ndjson")},
            ],
        },
    )
    adapter = Adapter(cfg)
    await adapter.start()
    try:
        await eventually(lambda: len(read_ndjson(tmp_path / "two.ndjson")) >= 500)
    finally:
        adapter.stop_accepting()
        await adapter.wait_drained()
        await adapter.close()
    for name in ("one", "two"):
        got = seqs_of(str(r["message"]) for r in read_ndjson(tmp_path / f"{name}.ndjson"))
        check_delivery(got, 500, 0)
    assert [lane.name for lane in adapter.lanes] == ["one", "two"]
