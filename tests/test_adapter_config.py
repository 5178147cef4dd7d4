"""Adapter config (flags, env, file; errors name the option), checkpoint files, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from podpatterns.adapter.checkpoint import NAME, CheckpointStore, Entry
from podpatterns.adapter.config import build
from podpatterns.adapter.lines import LineSplitter
from podpatterns.errors import ConfigError
from tests.proc import outputs, run


def test_flags_env_and_file_make_one_config() -> None:
    """Each option comes from a flag, a PODPATTERNS_* variable or a YAML key (that precedence)."""
    cfg = build(
        {"path": ["/a/*.log"], "parse": "json"},
        {"PODPATTERNS_PARSE": "nginx", "PODPATTERNS_MAX_LINE_BYTES": "1KiB"},
        {"sink": "file", "sink_path": "/tmp/out", "redact": ["email", "ipv4"], "parse": "raw"},
    )
    assert cfg.path == ("/a/*.log",)
    assert cfg.parse == "json"
    assert cfg.max_line_bytes == 1024
    assert cfg.sink == ("file",) and cfg.redact == ("email", "ipv4")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({}, "--path: missing"),
        ({"path": ["x"], "parse": "regex"}, "--regex: missing"),
        ({"path": ["x"], "regex": "(a)"}, "has no named group"),
        ({"path": ["x"], "sink": ["http"]}, "--sink-url"),
        ({"path": ["x"], "sink": ["file"]}, "--sink-path: missing"),
        ({"path": ["x"], "sink": ["tcp"]}, "--sink-address: missing"),
        ({"path": ["x"], "multiline": "python", "multiline_start": "^a"}, "choose one"),
        ({"path": ["x"], "sample": "2"}, "--sample: '2' is out of range"),
        ({"path": ["x"], "transform": ["nocolon"]}, "package.module:function"),
        ({"path": ["x"], "regex": "("}, "not a valid regular expression"),
    ],
)
def test_config_errors_name_the_option(flags: dict[str, object], message: str) -> None:
    """Bad values are ConfigErrors naming the flag and the value."""
    with pytest.raises(ConfigError, match=message):
        build(flags, {}, {})


def test_unknown_file_key_is_rejected() -> None:
    """A typo in the config file is an error with a suggestion."""
    with pytest.raises(ConfigError, match="did you mean 'read_from'"):
        build({"path": ["x"]}, {}, {"read_form": "end"})


def _entry(offset: int) -> Entry:
    return Entry("/x", 1, 2, offset, 3, "h", "t")


def test_checkpoint_keeps_the_previous_generation_and_falls_back(tmp_path: Path) -> None:
    """A corrupt checkpoint falls back to the previous generation, loudly (counted)."""
    store = CheckpointStore(tmp_path)
    store.save({(1, 2): _entry(10)})
    store.save({(1, 2): _entry(20)})
    assert store.load()[(1, 2)].offset == 20
    (tmp_path / NAME).write_bytes(b'{"version":1,"files":[{"path"')  # torn write
    again = CheckpointStore(tmp_path)
    assert again.load()[(1, 2)].offset == 10
    assert again.fallbacks == 1
    (tmp_path / (NAME + ".prev")).write_text(json.dumps({"version": 99}))
    assert CheckpointStore(tmp_path).load() == {}
    assert not (tmp_path / (NAME + ".tmp")).exists()


def test_splitter_crlf_delimiters_and_partial() -> None:
    """CRLF is trimmed for LF delimiters, multi-byte delimiters may span chunks."""
    s = LineSplitter(b"\n", 100)
    assert [x.data for x in s.feed(b"a\r\nb\nc")] == [b"a", b"b"]
    assert s.committed == 5 and s.held == 1
    s = LineSplitter(b"||", 100)
    assert s.feed(b"a|") == []
    assert [(x.data, x.end) for x in s.feed(b"|b||")] == [(b"a", 3), (b"b", 6)]
    s = LineSplitter(b"\r\n", 3)
    assert s.feed(b"abcdef\r") == []
    lines = s.feed(b"\nb\r\n")
    assert [(x.data, x.truncated, x.end) for x in lines] == [(b"abc", True, 8), (b"b", False, 11)]


def test_cli_adapter_config_error_exits_2(tmp_path: Path) -> None:
    """`podpatterns adapter` with a bad option prints one line naming it and exits 2."""
    result = run("adapter", "--path", str(tmp_path / "*.log"), "--parse", "xml")
    assert result.returncode == 2
    assert "--parse: 'xml' is not one of" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_adapter_help_lists_options() -> None:
    """`podpatterns adapter --help` lists every option with its environment variable."""
    result = run("adapter", "--help")
    assert result.returncode == 0
    for text in ("--read-from", "PODPATTERNS_CHECKPOINT_DIR", "--sink-url", "--multiline"):
        assert text in result.stdout


BAD_INPUT = [
    # (extra arguments, text the one stderr line must hold)
    (["--sink", "file", "--sink-path", "/nonexistent-dir/out.ndjson"], "--sink-path"),
    (["--sink", "http", "--sink-url", "https://h/x", "--sink-ca", "/nonexistent.pem"], "--sink-ca"),
    (["--sink", "http", "--sink-url", "https://h/x", "--sink-ca", "{notpem}"], "not a PEM"),
    (["--read-chunk", "0"], "--read-chunk: 0 must be >= 1"),
    (["--sink", "http", "--sink-url", "http://host:99999"], "--sink-url: 'http://host:99999'"),
    (["--sink", "http", "--sink-url", "http://host:abc"], "--sink-url: 'http://host:abc'"),
    (["--delimiter", "\\q"], "--delimiter: '\\\\q' has an unknown escape"),
    (["--delimiter", "\\x"], "--delimiter: '\\\\x' has an unknown escape"),
    (["--sink", "http"], "--sink-url: missing"),
    (["--sink", "stdout", "--sink-url", "http://h/x"], "given with --sink stdout"),
    (["--sink", "file", "--sink-path", "{logs}/app.log.out"], "would be read by --path"),
]


@pytest.mark.parametrize(("extra", "expected"), BAD_INPUT)
def test_bad_adapter_input_is_one_line_and_exit_2(
    tmp_path: Path, extra: list[str], expected: str
) -> None:
    """Bad adapter input: exit 2 and one stderr line naming the option, value and fix."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "notpem").write_text("hello\n")
    args = [a.format(notpem=tmp_path / "notpem", logs=tmp_path / "logs") for a in extra]
    done = run("adapter", "--path", str(tmp_path / "logs" / "app.log"), "--admin", "off", *args)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, outputs(done)
    assert len(lines) == 1, outputs(done)
    assert expected in lines[0], outputs(done)
    assert "Traceback" not in done.stderr


def test_sample_default_is_shown_as_a_fraction() -> None:
    """--help shows --sample's default as 1, not as the duration 1s."""
    from podpatterns.adapter.config import PROCESS_OPTIONS
    from podpatterns.options import show_default

    [sample] = [o for o in PROCESS_OPTIONS if o.name == "sample"]
    assert show_default(sample) == "1"
