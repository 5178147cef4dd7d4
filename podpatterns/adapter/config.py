"""Adapter configuration: one declaration per option, one immutable config object.

Longer than the house's ~500 lines on purpose: it is the one table of the adapter's
options (input, parse and transform, sinks: each flag, environment variable, file key,
default and help, from which --help and the docs are generated) and the validation that
ties them together; split across modules, the table would no longer read as one.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from podpatterns.adapter.l2m import MetricDecl, declarations
from podpatterns.adapter.scrapeconf import ScrapeConfig, scrapes_from_file
from podpatterns.adapter.statsdmap import DEFAULT_BUCKETS, StatsdMapping, mappings_from_file
from podpatterns.errors import ConfigError
from podpatterns.options import (
    HostPort,
    Option,
    parse_bind,
    parse_bool,
    parse_choice,
    parse_duration,
    parse_hostport,
    parse_http_url,
    parse_int,
    parse_optional_duration,
    parse_path,
    parse_size,
    parse_str,
    resolve_entry,
    resolve_with_file,
    takes_off,
)
from podpatterns.runtime import RUNTIME_OPTIONS, RuntimeConfig

PARSERS = ("raw", "json", "logfmt", "regex", "nginx", "apache", "apache_common", "cri", "syslog")
REDACTIONS = ("bearer", "url_password", "email", "ipv4", "credit_card")


_ESCAPES = {"n": b"\n", "r": b"\r", "t": b"\t", "0": b"\0", "\\": b"\\"}


def parse_delimiter(text: str) -> bytes:
    r"""Parse a line delimiter: ``\n`` (default), ``\r\n``, ``\0``, ``\xHH`` or literal
    characters."""
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out += ch.encode()
            i += 1
            continue
        esc = text[i + 1 : i + 2]
        if esc in _ESCAPES:
            out += _ESCAPES[esc]
            i += 2
        elif esc == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", text[i + 2 : i + 4]):
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        else:
            raise ValueError(
                f"has an unknown escape {text[i : i + 4]!r} (use \\n, \\r, \\t, \\0, \\\\ or \\xHH)"
            )
    if not out:
        raise ValueError("is empty (e.g. \\n, \\0, or ';;')")
    return bytes(out)


def parse_regex(text: str) -> re.Pattern[str]:
    """Compile a regular expression (Python syntax)."""
    try:
        return re.compile(text)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression ({exc})") from None


def parse_pair(text: str) -> tuple[str, str]:
    """Parse ``KEY=VALUE``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError("is not KEY=VALUE")
    return key.strip(), value


def parse_filter(text: str) -> tuple[str, re.Pattern[str]]:
    """Parse ``FIELD=REGEX``: keep records whose FIELD matches REGEX."""
    key, value = parse_pair(text)
    return key, parse_regex(value)


def parse_callable_ref(text: str) -> str:
    """Parse ``package.module:function`` (imported when the adapter starts)."""
    mod, sep, func = text.strip().partition(":")
    if not sep or not mod or not func.isidentifier():
        raise ValueError("is not package.module:function")
    return text.strip()


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_env_field(text: str) -> tuple[str, str]:
    """Parse ``FIELD=VARIABLE``, or ``default`` (the usual Downward API variables)."""
    if text.strip() == "default":
        return ("default", "*")
    key, value = parse_pair(text)
    if not _ENV_NAME.match(value.strip()):
        raise ValueError(f"has {value!r}, which is not an environment variable name")
    return key, value.strip()


def parse_fraction(text: str) -> float:
    """Parse a fraction in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("is not a number in (0, 1]") from None
    if not 0 < value <= 1:
        raise ValueError("is out of range (0, 1]")
    return value


@takes_off
def parse_rate(text: str) -> float | None:
    """Parse records per second; ``0`` or ``off`` disables."""
    if text.strip().lower() in ("0", "off", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError("is not a number of records per second") from None
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def parse_local_bind(text: str) -> HostPort:
    """Parse ``HOST:PORT``, or a bare ``PORT`` on 127.0.0.1 (the Pod's loopback)."""
    text = text.strip()
    if text.isascii() and text.isdigit():
        text = f"127.0.0.1:{text}"
    return parse_bind(text)


class FileMode(int):
    """Permission bits, shown in octal (``0666``) in --help and the docs."""

    def __str__(self) -> str:
        return f"0{self:o}"


def parse_file_mode(text: str) -> FileMode:
    """Parse permission bits in octal: ``0666``, ``660``."""
    try:
        value = int(text.strip(), 8)
    except ValueError:
        raise ValueError("is not an octal file mode (e.g. 0666 or 0660)") from None
    if not 0 <= value <= 0o777:
        raise ValueError("is out of range (0000-0777)")
    return FileMode(value)


def parse_buckets(text: str) -> tuple[float, ...]:
    """Comma-separated histogram bounds, ascending: ``0.01,0.1,1``."""
    try:
        bounds = tuple(float(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise ValueError("is not a list of numbers (e.g. 0.01,0.1,1)") from None
    if not bounds or any(b >= c for b, c in itertools.pairwise(bounds)):
        raise ValueError("must be ascending numbers (e.g. 0.01,0.1,1)")
    if not all(math.isfinite(b) for b in bounds):
        raise ValueError("must be finite numbers (+Inf is always added)")
    return bounds


def _a(name: str, parse: Any, default: Any, help: str, **kw: Any) -> Option[Any]:
    return Option(name, parse, default, help, scope="adapter", **kw)


INPUT_OPTIONS: tuple[Option[Any], ...] = (
    _a(
        "path",
        parse_str,
        (),
        "glob of files to tail (** allowed); repeat for several",
        multiple=True,
        metavar="GLOB",
    ),
    _a(
        "read_from",
        parse_choice("beginning", "end"),
        "beginning",
        "where to start in a file seen for the first time at startup",
        metavar="WHERE",
    ),
    _a(
        "checkpoint_dir",
        parse_path,
        None,
        "directory of the crash-safe checkpoint; without it a restart reads by --read-from",
        metavar="DIR",
    ),
    _a(
        "watch",
        parse_choice("auto", "poll"),
        "auto",
        "auto: file events (watchfiles) with polling fallback; poll: polling only",
        metavar="MODE",
    ),
    _a(
        "poll_interval",
        parse_duration,
        0.25,
        "how often files are checked in polling mode",
        metavar="DURATION",
    ),
    _a(
        "reconcile_interval",
        parse_duration,
        1.0,
        "how often every open file is stat'ed and the globs re-expanded",
        metavar="DURATION",
    ),
    _a(
        "rotate_wait",
        parse_duration,
        5.0,
        "a rotated file is closed once read to its end and unchanged this long",
        metavar="DURATION",
    ),
    _a(
        "delimiter",
        parse_delimiter,
        b"\n",
        "line delimiter (escapes such as \\n or \\0 allowed)",
        metavar="BYTES",
    ),
    _a(
        "max_line_bytes",
        parse_size,
        256 * 1024,
        "longer lines are truncated to this and marked truncated",
        metavar="SIZE",
    ),
    _a(
        "flush_partial_after",
        parse_optional_duration,
        None,
        "emit an unterminated last line after the file was idle this long",
        metavar="DURATION",
    ),
    _a("read_chunk", parse_size, 256 * 1024, "bytes read from one file per turn", metavar="SIZE"),
    _a(
        "max_open_files",
        parse_int(1, 1_000_000),
        None,
        "most files open at once (default: the descriptor limit less 64); idle files "
        "are closed and reopened by identity, files waiting are counted",
        metavar="N",
    ),
    _a(
        "queue_max_bytes",
        parse_size,
        8 * 1024 * 1024,
        "bytes of lines read but not yet shipped; reading pauses above it",
        metavar="SIZE",
    ),
    _a("batch_max_records", parse_int(1, 1_000_000), 2000, "records per sink batch", metavar="N"),
    _a("batch_max_bytes", parse_size, 1024 * 1024, "bytes of lines per sink batch", metavar="SIZE"),
)

PUSH_OPTIONS: tuple[Option[Any], ...] = (
    _a(
        "http_listen",
        parse_bind,
        None,
        "serve OTLP/HTTP logs (POST /v1/logs) and NDJSON (POST /v1/logs/ndjson) on "
        "HOST:PORT, e.g. 127.0.0.1:4318 (a non-loopback address is logged as a warning)",
        metavar="HOST:PORT",
    ),
    _a(
        "http_max_body",
        parse_size,
        4 * 1024 * 1024,
        "largest HTTP request body, compressed or not (413 beyond it)",
        metavar="SIZE",
    ),
    _a(
        "tcp_listen",
        parse_bind,
        None,
        "accept newline-delimited records (JSON or text) on HOST:PORT",
        metavar="HOST:PORT",
    ),
    _a(
        "spool_dir",
        parse_path,
        None,
        "directory of the durable spool of pushed records (required with a pushed "
        "input; holds the checkpoint too unless --checkpoint-dir is given)",
        metavar="DIR",
    ),
    _a(
        "spool_max_bytes",
        parse_size,
        256 * 1024 * 1024,
        "most bytes of pushed records spooled and not yet acknowledged; beyond it HTTP "
        "answers 429 and stream inputs stop reading",
        metavar="SIZE",
    ),
    _a(
        "spool_segment_bytes",
        parse_size,
        16 * 1024 * 1024,
        "size at which a spool segment file is closed (deleted once acknowledged)",
        metavar="SIZE",
    ),
    # -- Fluent forward inputs (podpatterns/adapter/inputs/forward.py) --
    _a(
        "forward_listen",
        parse_local_bind,
        None,
        "accept the Fluent forward protocol (fluent-logger, Fluentd, Fluent Bit) on "
        "HOST:PORT, e.g. 127.0.0.1:24224; a bare PORT binds 127.0.0.1 (needs the fluent extra)",
        metavar="HOST:PORT",
    ),
    _a(
        "forward_unix",
        parse_path,
        None,
        "unix stream socket to accept the Fluent forward protocol on (mode 0666)",
        metavar="PATH",
    ),
    _a(
        "forward_max_message",
        parse_size,
        8 * 1024 * 1024,
        "largest forward message, compressed or once decompressed (a larger one closes "
        "its connection); keep Fluentd's chunk_limit_size below it",
        metavar="SIZE",
    ),
    # -- syslog inputs (podpatterns/adapter/inputs/syslog.py) --
    _a(
        "syslog_unix",
        parse_path,
        None,
        "unix datagram socket to receive syslog on (point an app's /dev/log at it)",
        metavar="PATH",
    ),
    _a(
        "syslog_unix_stream",
        parse_path,
        None,
        "unix stream socket to receive syslog on (RFC 6587 framing, backpressure)",
        metavar="PATH",
    ),
    _a(
        "syslog_tcp",
        parse_local_bind,
        None,
        "TCP address to receive syslog on (RFC 6587 framing, backpressure); "
        "a bare PORT binds 127.0.0.1",
        metavar="HOST:PORT",
    ),
    _a(
        "syslog_udp",
        parse_local_bind,
        None,
        "UDP address to receive syslog on (best effort, drops counted); "
        "a bare PORT binds 127.0.0.1",
        metavar="HOST:PORT",
    ),
    _a(
        "syslog_socket_mode",
        parse_file_mode,
        FileMode(0o666),
        "permissions of the syslog unix socket files (octal)",
        metavar="MODE",
    ),
    _a(
        "syslog_max_message",
        parse_size,
        64 * 1024,
        "longer syslog messages are truncated to this and marked truncated",
        metavar="SIZE",
    ),
)

STATSD_OPTIONS: tuple[Option[Any], ...] = (
    _a(
        "statsd_udp",
        parse_bind,
        None,
        "receive StatsD (DogStatsD tags too) on UDP HOST:PORT and expose it on /metrics "
        "(e.g. 127.0.0.1:8125)",
        metavar="HOST:PORT",
    ),
    _a(
        "statsd_tcp",
        parse_bind,
        None,
        "receive StatsD lines over TCP on HOST:PORT and expose them on /metrics",
        metavar="HOST:PORT",
    ),
    _a(
        "statsd_buckets",
        parse_buckets,
        DEFAULT_BUCKETS,
        "histogram bounds of StatsD timers (in seconds) and histograms, ascending",
        metavar="LIST",
    ),
    _a(
        "statsd_max_series",
        parse_int(1),
        1000,
        "label sets kept per StatsD metric; samples of new ones beyond it are dropped and counted",
        metavar="N",
    ),
    _a(
        "statsd_expire_after",
        parse_optional_duration,
        None,
        "remove a StatsD series (a metric's label set) not updated for this long, freeing its "
        "slot under --statsd-max-series; off: never",
        metavar="DURATION",
    ),
)

METRICS_OPTIONS: tuple[Option[Any], ...] = (
    _a(
        "metrics_expire_after",
        parse_optional_duration,
        None,
        "remove a series of a declared metric (metrics: in --config) not updated for this "
        "long, freeing its slot under max_series; a metric's own expire_after wins; off: never",
        metavar="DURATION",
    ),
)

PROCESS_OPTIONS: tuple[Option[Any], ...] = (
    _a(
        "parse",
        parse_choice(*PARSERS),
        "raw",
        f"line format: {', '.join(PARSERS)}",
        metavar="FORMAT",
    ),
    _a("regex", parse_regex, None, "pattern with named groups for --parse regex", metavar="REGEX"),
    _a(
        "multiline",
        parse_choice("off", "python", "java", "go"),
        "off",
        "join multiline records with a preset: python, java or go",
        metavar="PRESET",
    ),
    _a(
        "multiline_start",
        parse_regex,
        None,
        "a line matching REGEX starts a record; other lines continue it",
        metavar="REGEX",
    ),
    _a(
        "multiline_continue",
        parse_regex,
        None,
        "a line matching REGEX continues the previous record",
        metavar="REGEX",
    ),
    _a(
        "multiline_max_lines",
        parse_int(2, 100_000),
        500,
        "most lines in one multiline record",
        metavar="N",
    ),
    _a(
        "multiline_max_bytes",
        parse_size,
        256 * 1024,
        "most bytes in one multiline record",
        metavar="SIZE",
    ),
    _a(
        "multiline_timeout",
        parse_duration,
        1.0,
        "close an open multiline record after the file was idle this long",
        metavar="DURATION",
    ),
    _a(
        "on_parse_error",
        parse_choice("raw", "drop"),
        "raw",
        "a line that fails to parse: raw (pass on, marked parse_error) or drop",
        metavar="ACTION",
    ),
    _a(
        "add_field",
        parse_pair,
        (),
        "set FIELD to VALUE on every record",
        multiple=True,
        metavar="FIELD=VALUE",
    ),
    _a("rename_field", parse_pair, (), "rename field OLD to NEW", multiple=True, metavar="OLD=NEW"),
    _a("drop_field", parse_str, (), "remove FIELD", multiple=True, metavar="FIELD"),
    _a(
        "timestamp_field",
        parse_str,
        None,
        "copy this parsed field to 'timestamp' (ISO 8601 when it parses)",
        metavar="FIELD",
    ),
    _a(
        "redact",
        parse_choice(*REDACTIONS),
        (),
        f"built-in redaction of string fields: {', '.join(REDACTIONS)}",
        multiple=True,
        metavar="KIND",
    ),
    _a(
        "redact_regex",
        parse_regex,
        (),
        "replace matches of REGEX with [REDACTED]",
        multiple=True,
        metavar="REGEX",
    ),
    _a(
        "filter",
        parse_filter,
        (),
        "keep only records whose FIELD matches REGEX",
        multiple=True,
        metavar="FIELD=REGEX",
    ),
    _a(
        "exclude",
        parse_filter,
        (),
        "drop records whose FIELD matches REGEX",
        multiple=True,
        metavar="FIELD=REGEX",
    ),
    _a(
        "sample",
        parse_fraction,
        1,  # an int: shown as "1", not as the duration "1s"
        "keep this fraction of records (deterministic by offset)",
        metavar="FRACTION",
    ),
    _a(
        "rate_limit",
        parse_rate,
        None,
        "records per second kept; the excess is dropped and counted",
        metavar="N",
    ),
    _a(
        "k8s_env_metadata",
        parse_env_field,
        (),
        "add field FIELD from the Downward API variable VARIABLE to every record; "
        "'default': k8s_pod, k8s_namespace, k8s_node, k8s_container from POD_NAME, "
        "POD_NAMESPACE, NODE_NAME, CONTAINER_NAME",
        multiple=True,
        metavar="FIELD=VARIABLE",
    ),
    _a(
        "k8s_metadata_dir",
        parse_path,
        None,
        "downwardAPI volume whose labels and annotations files become k8s_labels and "
        "k8s_annotations on every record (re-read on change)",
        metavar="DIR",
    ),
    _a(
        "transform",
        parse_callable_ref,
        (),
        "Python callable record -> record, list or None; repeat for several",
        multiple=True,
        metavar="MODULE:FUNC",
    ),
)

SINKS = ("stdout", "file", "http", "tcp", "otlp", "loki", "none")
URL_SINKS = ("http", "otlp", "loki")
"""The sinks that POST to ``--sink-url`` (the HTTP sink's machinery)."""

_LABEL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_label(text: str) -> tuple[str, str]:
    """Parse ``LABEL=FIELD``: a Loki label name (``[A-Za-z_][A-Za-z0-9_]*``) and a field."""
    key, value = parse_pair(text)
    if not _LABEL_NAME.match(key):
        raise ValueError(f"has label name {key!r}, which Loki refuses (use [A-Za-z_][A-Za-z0-9_]*)")
    if not value.strip():
        raise ValueError("names no field (LABEL=FIELD)")
    return key, value.strip()


PER_SINK_OPTIONS: tuple[Option[Any], ...] = (
    _a(
        "stdout_max_line",
        parse_size,
        16 * 1024,
        "longest JSON line on stdout (container runtimes split longer ones)",
        metavar="SIZE",
    ),
    _a(
        "stdout_oversize",
        parse_choice("split", "truncate"),
        "split",
        "a longer record is split into parts or truncated (both marked)",
        metavar="ACTION",
    ),
    _a("sink_path", parse_path, None, "file of the file sink (NDJSON, appended)", metavar="FILE"),
    _a("sink_fsync", parse_bool, False, "fsync the file sink before acknowledging", flag=True),
    _a("sink_url", parse_http_url, None, "URL of the http, otlp or loki sink", metavar="URL"),
    _a(
        "sink_format",
        parse_choice("ndjson", "json"),
        "ndjson",
        "HTTP body: ndjson or a json array",
        metavar="FORMAT",
    ),
    _a("sink_gzip", parse_bool, False, "gzip the HTTP body", flag=True),
    _a(
        "sink_header",
        parse_pair,
        (),
        "extra HTTP header NAME=VALUE",
        multiple=True,
        metavar="NAME=VALUE",
    ),
    _a(
        "sink_token_file",
        parse_path,
        None,
        "file holding a bearer token (re-read on every batch)",
        metavar="FILE",
    ),
    _a(
        "sink_ca",
        parse_path,
        None,
        "CA bundle (PEM) to verify the HTTPS sink with, instead of the system's",
        metavar="FILE",
    ),
    _a("sink_address", parse_hostport, None, "HOST:PORT of the TCP sink", metavar="HOST:PORT"),
    _a("sink_timeout", parse_duration, 30.0, "timeout of one sink request", metavar="DURATION"),
    _a("sink_retries", parse_int(0), 0, "retries of one batch; 0 is unlimited", metavar="N"),
    _a(
        "sink_backoff",
        parse_duration,
        0.2,
        "first retry backoff (doubles, jittered)",
        metavar="DURATION",
    ),
    _a("sink_backoff_max", parse_duration, 30.0, "cap of the retry backoff", metavar="DURATION"),
    _a(
        "sink_unready_after",
        parse_optional_duration,
        None,
        "readiness turns 503 once a sink has been failing this long (off by default)",
        metavar="DURATION",
    ),
    _a(
        "otlp_encoding",
        parse_choice("protobuf", "json"),
        "protobuf",
        "OTLP/HTTP body: protobuf or json",
        metavar="ENCODING",
    ),
    _a(
        "otlp_body_field",
        parse_str,
        "message",
        "field that becomes the OTLP log body",
        metavar="FIELD",
    ),
    _a(
        "otlp_severity_field",
        parse_str,
        "level",
        "field that becomes the OTLP severity text (and number, when it names a level)",
        metavar="FIELD",
    ),
    _a(
        "otlp_resource",
        parse_pair,
        (),
        "OTLP resource attribute KEY=VALUE (e.g. service.name=web)",
        multiple=True,
        metavar="KEY=VALUE",
    ),
    _a(
        "loki_label",
        parse_label,
        (),
        "Loki stream label LABEL from record field FIELD",
        multiple=True,
        metavar="LABEL=FIELD",
    ),
    _a(
        "loki_max_label_values",
        parse_int(1, 100_000),
        64,
        "distinct values kept per Loki label; later new values are folded into '_other'",
        metavar="N",
    ),
    _a(
        "loki_line_field",
        parse_str,
        None,
        "field whose value is the Loki log line (default: the record as JSON)",
        metavar="FIELD",
    ),
    _a(
        "loki_metadata",
        parse_label,
        (),
        "Loki structured metadata KEY from record field FIELD",
        multiple=True,
        metavar="KEY=FIELD",
    ),
    _a(
        "loki_tenant",
        parse_str,
        None,
        "Loki tenant, sent as X-Scope-OrgID",
        metavar="TENANT",
    ),
)
"""What each sink takes on its own: flags set them for every sink, and an entry of a
config file's ``sinks:`` list sets them for its sink only."""

SINK_OPTIONS: tuple[Option[Any], ...] = (
    _a(
        "sink",
        parse_choice(*SINKS),
        ("stdout",),
        f"where records go: {', '.join(SINKS)}; repeat for several (each gets every record)",
        multiple=True,
        metavar="SINK",
    ),
    *PER_SINK_OPTIONS,
    _a(
        "dead_letter",
        parse_path,
        None,
        "NDJSON file of rejected records (4xx, failed transforms)",
        metavar="FILE",
    ),
    _a(
        "dead_letter_max_bytes",
        parse_size,
        64 * 1024 * 1024,
        "size cap of the dead-letter file; beyond it records are counted only",
        metavar="SIZE",
    ),
)

ADAPTER_ONLY_OPTIONS = (
    INPUT_OPTIONS + PUSH_OPTIONS + STATSD_OPTIONS + METRICS_OPTIONS + PROCESS_OPTIONS + SINK_OPTIONS
)
ADAPTER_OPTIONS: tuple[Option[Any], ...] = RUNTIME_OPTIONS + ADAPTER_ONLY_OPTIONS


@dataclass(frozen=True, kw_only=True)
class SinkSettings:
    """What each sink takes on its own (the fields of ``PER_SINK_OPTIONS``)."""

    stdout_max_line: int = 16 * 1024
    stdout_oversize: str = "split"
    sink_path: Path | None = None
    sink_fsync: bool = False
    sink_url: str | None = None
    sink_format: str = "ndjson"
    sink_gzip: bool = False
    sink_header: tuple[tuple[str, str], ...] = ()
    sink_token_file: Path | None = None
    sink_ca: Path | None = None
    sink_address: Any = None
    sink_timeout: float = 30.0
    sink_retries: int = 0
    sink_backoff: float = 0.2
    sink_backoff_max: float = 30.0
    sink_unready_after: float | None = None
    otlp_encoding: str = "protobuf"
    otlp_body_field: str = "message"
    otlp_severity_field: str = "level"
    otlp_resource: tuple[tuple[str, str], ...] = ()
    loki_label: tuple[tuple[str, str], ...] = ()
    loki_max_label_values: int = 64
    loki_line_field: str | None = None
    loki_metadata: tuple[tuple[str, str], ...] = ()
    loki_tenant: str | None = None

    def settings(self) -> dict[str, Any]:
        """The per-sink values, by option name."""
        return {o.name: getattr(self, o.name) for o in PER_SINK_OPTIONS}


@dataclass(frozen=True, kw_only=True)
class SinkConfig(SinkSettings):
    """One sink: its kind, the name its metrics and events carry, and its settings.

    Attributes:
        name: unique among the sinks (the kind, unless the config file names it).
        kind: one of ``SINKS``.
    """

    name: str
    kind: str

    def __post_init__(self) -> None:
        where = "" if self.name == self.kind else f"sinks: {self.name!r}: "
        kind = self.kind
        if kind == "file" and self.sink_path is None:
            raise ConfigError(f"{where}--sink-path: missing (--sink file needs a file)")
        if kind in URL_SINKS and self.sink_url is None:
            example = {
                "http": "http://127.0.0.1:8080/logs",
                "otlp": "http://127.0.0.1:4318/v1/logs",
                "loki": "http://loki:3100/loki/api/v1/push",
            }[kind]
            raise ConfigError(
                f"{where}--sink-url: missing (--sink {kind} needs a URL, e.g. {example})"
            )
        if (
            kind in URL_SINKS
            and self.sink_url is not None
            and not self.sink_url.startswith(("http://", "https://"))
        ):
            raise ConfigError(f"{where}--sink-url: {self.sink_url!r} must be an http(s):// URL")
        if kind in URL_SINKS and self.sink_url is not None and _has_userinfo(self.sink_url):
            other = (
                "--sink-token-file"
                if self.sink_token_file is not None
                else "an Authorization --sink-header"
                if any(k.lower() == "authorization" for k, _ in self.sink_header)
                else None
            )
            if other is not None:
                raise ConfigError(
                    f"{where}--sink-url: credentials in the URL (user:password@) cannot be "
                    f"combined with {other}: both set the Authorization header (keep one)"
                )
        if kind == "tcp" and self.sink_address is None:
            raise ConfigError(f"{where}--sink-address: missing (--sink tcp needs HOST:PORT)")
        if self.stdout_max_line < 1024:
            raise ConfigError(f"{where}--stdout-max-line: {self.stdout_max_line} must be >= 1024")
        if kind == "otlp":
            _need_otlp(where)
        if kind == "loki":
            labels = [k for k, _ in self.loki_label]
            dupes = sorted({k for k in labels if labels.count(k) > 1})
            if dupes:
                raise ConfigError(f"{where}--loki-label: label {dupes[0]!r} given twice")


def _has_userinfo(url: str) -> bool:
    """True when ``url`` carries ``user[:password]@`` (HTTP basic authentication)."""
    from urllib.parse import urlsplit

    return "@" in urlsplit(url).netloc


def _installed(module: str) -> bool:
    """True when ``module`` (of an optional extra) can be imported."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _need_otlp(where: str) -> None:
    """The OTLP sink's encoder is an optional extra: say how to install it, at startup."""
    if not _installed("opentelemetry.proto"):
        raise ConfigError(
            f"{where}--sink: otlp needs the opentelemetry-proto package "
            "(pip install 'podpatterns[otlp]')"
        )


def _need_fluent(flag: str) -> None:
    """The forward input's msgpack decoder is an optional extra: say how to install it."""
    if not _installed("msgpack"):
        raise ConfigError(
            f"{flag}: the Fluent forward input needs the msgpack package "
            "(pip install 'podpatterns[fluent]')"
        )


@dataclass(frozen=True, kw_only=True)
class AdapterConfig(SinkSettings):
    """Everything the adapter needs, validated on construction.

    Attributes mirror the options of the same names (see docs/reference.md). The
    per-sink fields are the settings of the sinks ``sink`` names; ``sinks`` is what the
    adapter ships to: built from those when not given (a config file's ``sinks:`` list
    gives each its own).
    """

    path: tuple[str, ...] = ()
    read_from: str = "beginning"
    checkpoint_dir: Path | None = None
    watch: str = "auto"
    poll_interval: float = 0.25
    reconcile_interval: float = 1.0
    rotate_wait: float = 5.0
    delimiter: bytes = b"\n"
    max_line_bytes: int = 256 * 1024
    flush_partial_after: float | None = None
    read_chunk: int = 256 * 1024
    max_open_files: int | None = None
    queue_max_bytes: int = 8 * 1024 * 1024
    batch_max_records: int = 2000
    batch_max_bytes: int = 1024 * 1024
    http_listen: HostPort | None = None
    http_max_body: int = 4 * 1024 * 1024
    tcp_listen: HostPort | None = None
    spool_dir: Path | None = None
    spool_max_bytes: int = 256 * 1024 * 1024
    spool_segment_bytes: int = 16 * 1024 * 1024
    forward_listen: HostPort | None = None
    forward_unix: Path | None = None
    forward_max_message: int = 8 * 1024 * 1024
    syslog_unix: Path | None = None
    syslog_unix_stream: Path | None = None
    syslog_tcp: HostPort | None = None
    syslog_udp: HostPort | None = None
    syslog_socket_mode: int = FileMode(0o666)
    syslog_max_message: int = 64 * 1024
    statsd_udp: HostPort | None = None
    statsd_tcp: HostPort | None = None
    statsd_buckets: tuple[float, ...] = DEFAULT_BUCKETS
    statsd_max_series: int = 1000
    statsd_expire_after: float | None = None
    metrics_expire_after: float | None = None
    statsd_mappings: tuple[StatsdMapping, ...] = ()
    scrape: tuple[ScrapeConfig, ...] = ()
    parse: str = "raw"
    regex: re.Pattern[str] | None = None
    on_parse_error: str = "raw"
    multiline: str = "off"
    multiline_start: re.Pattern[str] | None = None
    multiline_continue: re.Pattern[str] | None = None
    multiline_max_lines: int = 500
    multiline_max_bytes: int = 256 * 1024
    multiline_timeout: float = 1.0
    add_field: tuple[tuple[str, str], ...] = ()
    rename_field: tuple[tuple[str, str], ...] = ()
    drop_field: tuple[str, ...] = ()
    timestamp_field: str | None = None
    redact: tuple[str, ...] = ()
    redact_regex: tuple[re.Pattern[str], ...] = ()
    filter: tuple[tuple[str, re.Pattern[str]], ...] = ()
    exclude: tuple[tuple[str, re.Pattern[str]], ...] = ()
    sample: float = 1.0
    rate_limit: float | None = None
    k8s_env_metadata: tuple[tuple[str, str], ...] = ()
    k8s_metadata_dir: Path | None = None
    transform: tuple[str, ...] = ()
    sink: tuple[str, ...] = ("stdout",)
    dead_letter: Path | None = None
    dead_letter_max_bytes: int = 64 * 1024 * 1024
    sinks: tuple[SinkConfig, ...] = ()
    metrics: tuple[MetricDecl, ...] = ()
    """Logs-to-metrics declarations (a config file's ``metrics:`` list)."""
    sources: tuple[str, ...] = ()
    """Names of inputs given as objects (the Python API's sources): pushed inputs too."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if not self.path and not self.pushed_inputs and not self.statsd and not self.scrape:
            raise ConfigError(
                "--path: missing (give a glob, e.g. --path '/var/log/app/*.log', or an input "
                "over localhost such as --http-listen 127.0.0.1:4318)"
            )
        if self.statsd_mappings and not self.statsd:
            raise ConfigError(
                "statsd_mappings: given without --statsd-udp or --statsd-tcp (add one of them)"
            )
        self._check_spool()
        self._check_syslog()
        self._check_forward()
        if self.parse == "regex" and self.regex is None:
            raise ConfigError("--regex: missing (--parse regex needs a pattern with named groups)")
        if self.regex is not None and not self.regex.groupindex:
            raise ConfigError(f"--regex: {self.regex.pattern!r} has no named group (?P<name>...)")
        chosen = [
            n
            for n, v in (
                ("--multiline", self.multiline != "off"),
                ("--multiline-start", self.multiline_start is not None),
                ("--multiline-continue", self.multiline_continue is not None),
            )
            if v
        ]
        if len(chosen) > 1:
            raise ConfigError(f"{chosen[1]}: cannot be combined with {chosen[0]} (choose one)")
        if chosen and self.parse == "cri":
            raise ConfigError(f"{chosen[0]}: not with --parse cri (CRI partials are merged)")
        if self.read_chunk < 1:
            raise ConfigError(f"--read-chunk: {self.read_chunk} must be >= 1 (e.g. 256KiB)")
        if self.max_line_bytes < 1:
            raise ConfigError("--max-line-bytes: must be >= 1")
        if self.batch_max_bytes > self.queue_max_bytes:
            raise ConfigError(
                f"--queue-max-bytes: {self.queue_max_bytes} must be >= --batch-max-bytes"
            )
        if isinstance(self.sink, str):  # AdapterConfig(sink="file"): one sink
            object.__setattr__(self, "sink", (self.sink,))
        if not self.sinks:
            object.__setattr__(self, "sinks", self._sinks_from_flags())
        names = [s.name for s in self.sinks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"sinks: name {dupes[0]!r} used twice (give each its own name)")
        for s in self.sinks:
            if s.kind == "file":
                self._check_sink_path(s)
            if s.kind == "none" and not (self.metrics or self.statsd or self.scrape):
                raise ConfigError(
                    "--sink: none discards every record; it is for a metrics-only adapter "
                    "(declare metrics: in --config, or choose a sink)"
                )
        self._check_metric_names()
        if self.sink_ca is not None:
            _check_pem(self.sink_ca)
        for s in self.sinks:
            if s.sink_ca is not None and s.sink_ca != self.sink_ca:
                _check_pem(s.sink_ca)

    @property
    def pushed_inputs(self) -> tuple[str, ...]:
        """The flags of the inputs over localhost that are configured."""
        listens = (
            ("--http-listen", self.http_listen),
            ("--tcp-listen", self.tcp_listen),
            ("--syslog-unix", self.syslog_unix),
            ("--syslog-unix-stream", self.syslog_unix_stream),
            ("--syslog-tcp", self.syslog_tcp),
            ("--syslog-udp", self.syslog_udp),
            ("--forward-listen", self.forward_listen),
            ("--forward-unix", self.forward_unix),
        )
        flags = tuple(flag for flag, value in listens if value is not None)
        return flags + tuple(f"source {name!r}" for name in self.sources)

    def _check_metric_names(self) -> None:
        """One name, one family: logs-to-metrics declarations and scraped values may not
        share a name (StatsD refuses the declared names at run time)."""
        seen: dict[str, str] = {}
        named = [(d.name.removesuffix("_total"), "metrics:") for d in self.metrics]
        named += [
            (m.name.removesuffix("_total"), f"scrape: {c.name!r}")
            for c in self.scrape
            for m in c.metrics
        ]
        for name, where in named:
            if name in seen:
                raise ConfigError(
                    f"{where}: metric {name!r} is also declared by {seen[name]} (one name, "
                    "one metric: rename one of them)"
                )
            seen[name] = where

    def declared_metric_names(self) -> frozenset[str]:
        """The names (without ``_total``) of the metrics the config declares."""
        names = {d.name.removesuffix("_total") for d in self.metrics}
        names |= {m.name.removesuffix("_total") for c in self.scrape for m in c.metrics}
        return frozenset(names)

    @property
    def statsd(self) -> bool:
        """True when a StatsD input is configured (it needs no spool: its records are
        metrics)."""
        return self.statsd_udp is not None or self.statsd_tcp is not None

    @property
    def state_dir(self) -> Path | None:
        """Where the checkpoint lives: --checkpoint-dir, else --spool-dir."""
        return self.checkpoint_dir if self.checkpoint_dir is not None else self.spool_dir

    def _check_spool(self) -> None:
        pushed = self.pushed_inputs
        if pushed and self.spool_dir is None:
            raise ConfigError(
                f"--spool-dir: missing ({pushed[0]} needs a directory where accepted records "
                "are kept until shipped, e.g. --spool-dir /var/lib/podpatterns/spool on a volume)"
            )
        if self.spool_max_bytes < 1024 * 1024:
            raise ConfigError(
                f"--spool-max-bytes: {self.spool_max_bytes} must be >= 1MiB (e.g. 256MiB)"
            )
        if self.spool_segment_bytes < 64 * 1024:
            raise ConfigError(
                f"--spool-segment-bytes: {self.spool_segment_bytes} must be >= 64KiB (e.g. 16MiB)"
            )
        if self.http_max_body < 1024:
            raise ConfigError(f"--http-max-body: {self.http_max_body} must be >= 1KiB (e.g. 4MiB)")
        if self.spool_dir is not None:
            segment = str(self.spool_dir / "spool-0000000000000001.ndjson")
            for pattern in self.path:
                if _tailed(segment, pattern):
                    raise ConfigError(
                        f"--spool-dir: {str(self.spool_dir)!r} would be read by --path "
                        f"{pattern!r}: the adapter would tail its own spool (put it elsewhere)"
                    )
        http = self.http_listen
        if http is not None and http.port and http == self.tcp_listen:
            raise ConfigError(
                f"--tcp-listen: {http} is --http-listen's address too (choose another port)"
            )

    def _check_forward(self) -> None:
        if self.forward_listen is None and self.forward_unix is None:
            return
        flag = "--forward-listen" if self.forward_listen is not None else "--forward-unix"
        _need_fluent(flag)
        if not 64 * 1024 <= self.forward_max_message <= 256 * 1024 * 1024:
            raise ConfigError(
                f"--forward-max-message: {self.forward_max_message} is out of range "
                "(64KiB to 256MiB)"
            )
        fwd = self.forward_listen
        for other, value in (
            ("--http-listen", self.http_listen),
            ("--tcp-listen", self.tcp_listen),
            ("--syslog-tcp", self.syslog_tcp),
        ):
            if fwd is not None and fwd.port and fwd == value:
                raise ConfigError(
                    f"--forward-listen: {fwd} is {other}'s address too (choose another port)"
                )

    def _check_syslog(self) -> None:
        if not 480 <= self.syslog_max_message <= 16 * 1024 * 1024:
            raise ConfigError(
                f"--syslog-max-message: {self.syslog_max_message} is out of range "
                "(480 bytes, the least RFC 5424 allows, to 16MiB)"
            )
        if self.syslog_unix is not None and self.syslog_unix == self.syslog_unix_stream:
            raise ConfigError(
                f"--syslog-unix-stream: {str(self.syslog_unix_stream)!r} is also --syslog-unix "
                "(give the two sockets different paths)"
            )

    def _sinks_from_flags(self) -> tuple[SinkConfig, ...]:
        """One sink per ``--sink``, all sharing the per-sink flags."""
        kinds = self.sink or ("stdout",)
        twice = sorted({k for k in kinds if kinds.count(k) > 1})
        if twice:
            raise ConfigError(
                f"--sink: {twice[0]!r} given twice; two sinks of one kind need their own "
                "settings: list them under sinks: in --config"
            )
        urls = [k for k in kinds if k in URL_SINKS]
        if len(urls) > 1:
            raise ConfigError(
                f"--sink: {urls[0]} and {urls[1]} would share --sink-url; list them under "
                "sinks: in --config, each with its own sink_url"
            )
        if not urls and self.sink_url is not None:
            raise ConfigError(
                f"--sink-url: {self.sink_url!r} given with --sink {','.join(kinds)}, which does "
                "not use it (use --sink http, otlp or loki, or remove --sink-url)"
            )
        settings = self.settings()
        return tuple(SinkConfig(name=k, kind=k, **settings) for k in kinds)

    def _check_sink_path(self, sink: SinkConfig) -> None:
        path = sink.sink_path
        assert path is not None  # SinkConfig checked it
        where = "" if sink.name == sink.kind else f"sinks: {sink.name!r}: "
        parent = path.parent
        if not parent.is_dir():
            raise ConfigError(
                f"{where}--sink-path: {str(path)!r}: directory {str(parent)!r} does not exist "
                "(create it, or mount a volume there)"
            )
        for pattern in self.path:
            if _tailed(str(path), pattern):
                raise ConfigError(
                    f"{where}--sink-path: {str(path)!r} would be read by --path {pattern!r}: the "
                    "adapter would tail its own output (write it outside the tailed files)"
                )


def _tailed(path: str, pattern: str) -> bool:
    """True when the adapter would read ``path`` for ``pattern``: the glob matches it, or
    it is named like a rotated generation of a name the glob matches."""
    from podpatterns.adapter.tail import ROTATED_SEPARATORS

    full = os.path.abspath(path)
    directory, name = os.path.split(full)
    names = [name] + [name[:i] for i, ch in enumerate(name) if i and ch in ROTATED_SEPARATORS]
    regex = re.compile(_glob_regex(os.path.abspath(pattern)))
    return any(regex.fullmatch(os.path.join(directory, n)) for n in names)


def _glob_regex(pattern: str) -> str:
    """A regular expression matching what :func:`glob.glob` (recursive) matches."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                out.append(re.escape("["))
                i += 1
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def _check_pem(path: Path) -> None:
    """``--sink-ca`` must be a readable PEM bundle holding a certificate."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"--sink-ca: {str(path)!r}: {exc.strerror or exc} (give a PEM CA bundle)"
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(
            f"--sink-ca: {str(path)!r} is not a PEM CA bundle (no '-----BEGIN CERTIFICATE-----')"
        )


def build(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    file: Mapping[str, Any],
    file_label: str = "config file",
) -> AdapterConfig:
    """Build the config from flags > env > file > defaults.

    A config file may list ``sinks:``: each entry a mapping with ``sink`` (the kind), an
    optional ``name`` (default: the kind) and any per-sink key; per-sink keys set by
    flags, environment or at the top level of the file apply to every entry that does
    not set its own. It may list ``metrics:`` too: the logs-to-metrics declarations
    (:func:`~podpatterns.adapter.l2m.declarations`).

    Raises:
        ConfigError: naming the flag, environment variable or file key at fault.
    """
    file = dict(file)
    sinks_raw = file.pop("sinks", None)
    metrics_raw = file.pop("metrics", None)
    mappings_raw = file.pop("statsd_mappings", None)
    scrape_raw = file.pop("scrape", None)
    values = resolve_with_file(ADAPTER_OPTIONS, flags, env, file, file_label)
    runtime = RuntimeConfig.from_values(values)
    own = {o.name: values[o.name] for o in ADAPTER_ONLY_OPTIONS}
    if sinks_raw is not None:
        if "sink" in flags or "PODPATTERNS_SINK" in env or "sink" in file:
            raise ConfigError(
                "--sink: cannot be combined with sinks: in the config file (list every sink there)"
            )
        own["sinks"] = _sinks_from_file(sinks_raw, values, file_label)
        own["sink"] = tuple(s.kind for s in own["sinks"])
    if metrics_raw is not None:
        own["metrics"] = declarations(metrics_raw, file_label, own["metrics_expire_after"])
    if mappings_raw is not None:
        own["statsd_mappings"] = mappings_from_file(mappings_raw, file_label)
    if scrape_raw is not None:
        own["scrape"] = scrapes_from_file(scrape_raw, file_label)
    return AdapterConfig(**own, runtime=runtime)


def _sinks_from_file(
    raw: Any, values: Mapping[str, Any], file_label: str
) -> tuple[SinkConfig, ...]:
    """The ``sinks:`` list of a config file, each entry over the shared per-sink values."""
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            f"{file_label}: sinks must be a non-empty list of mappings (each with a sink: kind)"
        )
    kind_option = SINK_OPTIONS[0]
    out = []
    for i, entry in enumerate(raw):
        label = f"{file_label}: sinks[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{label}: must be a mapping (e.g. {{sink: loki, sink_url: ...}})")
        entry = dict(entry)
        if "sink" not in entry:
            raise ConfigError(f"{label}: sink: missing (one of {', '.join(SINKS)})")
        kind = kind_option.parse_from(entry.pop("sink"), f"{label}: sink")
        if len(kind) != 1:
            raise ConfigError(f"{label}: sink: one kind per entry, got {len(kind)}")
        name = str(entry.pop("name", kind[0]))
        shared = {o.name: values[o.name] for o in PER_SINK_OPTIONS}
        merged = resolve_entry(entry, PER_SINK_OPTIONS, shared, label)
        try:
            out.append(SinkConfig(name=name, kind=kind[0], **merged))
        except ConfigError as exc:
            # An unnamed entry's error would not say which entry it is about.
            if name != kind[0]:
                raise
            raise ConfigError(f"{label}: {exc}") from None
    return tuple(out)
