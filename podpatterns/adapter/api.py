"""The adapter as typed stages: ``Pipeline(sources, parse, transforms, sinks)``.

The command line builds an :class:`~podpatterns.adapter.pipeline.Adapter` from an
:class:`~podpatterns.adapter.config.AdapterConfig`; a :class:`Pipeline` is the same
adapter built from objects instead, so that a Python program can bring its own source,
parser, transforms and sinks. The names of the settings are those of the options
(``read_from`` is ``--read-from``) and every value is checked by the same code: a bad
one raises :class:`~podpatterns.errors.ConfigError` naming it (a string is read as on the
command line: ``queue_max_bytes="16MiB"``). A setting an object stands for (a file
option, a transform's, an input's) is refused as a keyword: give it to the object.

- **sources**: at most one :class:`Files` (globs tailed from a shared volume, with their
  checkpoint), any of the inputs over localhost
  (:class:`~podpatterns.adapter.inputs.http.HttpInput`,
  :class:`~podpatterns.adapter.inputs.tcp.TcpInput`, the syslog inputs), and sources of
  your own: a subclass of :class:`Source` (implement :meth:`Source.run`), or any object
  with the :class:`~podpatterns.adapter.inputs.Input` interface. Everything but files goes
  through the durable spool (``spool_dir``).
- **parse**: how a line of a tailed file becomes a record: a parser's name (``json``,
  ``logfmt``, ``nginx``...), a compiled regex with named groups, or a function
  ``(line) -> dict | None`` (``None``: the line did not parse).
- **transforms**: applied to every record in the order given: the built-ins below and
  plain functions ``(record) -> record | list[record] | None``.
- **sinks**: :class:`~podpatterns.adapter.config.SinkConfig` for the built-in sinks
  (stdout, file, tcp, http, otlp, loki: the ``sinks:`` entries of a config file), or any
  object with the :class:`~podpatterns.adapter.sinks.Sink` interface. Each sink gets every
  record, with its own batching and retry; a batch is acknowledged (and the checkpoint
  moves) once every sink has it.
"""

from __future__ import annotations

import asyncio
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from podpatterns.adapter.config import (
    ADAPTER_ONLY_OPTIONS,
    PARSERS,
    REDACTIONS,
    AdapterConfig,
    SinkConfig,
)
from podpatterns.adapter.inputs import Input, Record, Spool, SpoolFull
from podpatterns.adapter.multiline import PRESETS
from podpatterns.adapter.parse import Parser
from podpatterns.adapter.pipeline import Adapter
from podpatterns.adapter.sinks import Sink
from podpatterns.adapter.transform import Counters, Transform, TransformChain, redactor
from podpatterns.errors import ConfigError
from podpatterns.runtime.config import RuntimeConfig
from podpatterns.tasks import TaskSet

__all__ = [
    "Add",
    "Drop",
    "Emit",
    "Exclude",
    "Files",
    "Keep",
    "Multiline",
    "Pipeline",
    "RateLimit",
    "Redact",
    "Rename",
    "Sample",
    "Source",
    "Timestamp",
]


def _pattern(what: str, value: str | re.Pattern[str]) -> re.Pattern[str]:
    if isinstance(value, re.Pattern):
        return value
    try:
        return re.compile(value)
    except re.error as exc:
        raise ConfigError(f"{what}: {value!r} is not a valid regular expression ({exc})") from None


# -- sources ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Multiline:
    """Join the lines of one record (a stack trace) before parsing: ``--multiline*``.

    Give exactly one of ``preset`` (``python``, ``java``, ``go``...), ``start`` (a line
    matching it starts a record) or ``continue_`` (a line matching it continues one).
    """

    preset: str | None = None
    start: str | re.Pattern[str] | None = None
    continue_: str | re.Pattern[str] | None = None
    max_lines: int = 500
    max_bytes: int = 256 * 1024
    timeout: float = 1.0

    def settings(self) -> dict[str, Any]:
        """The :class:`AdapterConfig` fields this stands for."""
        given = [n for n in ("preset", "start", "continue_") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError(
                f"Multiline: give exactly one of preset, start or continue_ (got {given or 'none'})"
            )
        if self.preset is not None and self.preset not in PRESETS:
            raise ConfigError(
                f"Multiline: preset {self.preset!r} is not one of {', '.join(sorted(PRESETS))}"
            )
        return {
            "multiline": self.preset or "off",
            "multiline_start": None
            if self.start is None
            else _pattern("Multiline start", self.start),
            "multiline_continue": None
            if self.continue_ is None
            else _pattern("Multiline continue_", self.continue_),
            "multiline_max_lines": self.max_lines,
            "multiline_max_bytes": self.max_bytes,
            "multiline_timeout": self.timeout,
        }


@dataclass(frozen=True, kw_only=True)
class Files:
    """Tail the files matching ``paths`` (globs): ``--path`` and the file options.

    A file's records carry ``file``, ``file_id`` and ``offset``; what was read is
    checkpointed in ``Pipeline(checkpoint_dir=...)`` once every sink has it.
    """

    paths: Sequence[str]
    read_from: str = "beginning"
    watch: str = "auto"
    poll_interval: float = 0.25
    reconcile_interval: float = 1.0
    rotate_wait: float = 5.0
    delimiter: bytes = b"\n"
    max_line_bytes: int = 256 * 1024
    flush_partial_after: float | None = None
    read_chunk: int = 256 * 1024
    max_open_files: int | None = None
    multiline: Multiline | None = None

    def settings(self) -> dict[str, Any]:
        """The :class:`AdapterConfig` fields this stands for."""
        if isinstance(self.paths, str):
            raise ConfigError(f"Files: paths={self.paths!r} must be a list of globs")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "multiline"}
        out["path"] = tuple(out.pop("paths"))
        if self.multiline is not None:
            out.update(self.multiline.settings())
        return out


Emit = Callable[[list[Record]], Awaitable[None]]
"""Hands records to the pipeline; returns once they are durable in the spool."""


class Source(ABC):
    """A source of your own: subclass it and implement :meth:`run`.

    ``run`` gets ``emit``, which stores a list of records durably in the spool (waiting
    while the spool is full, so a fast source is paced by the sinks) and returns; from
    then on the records are the pipeline's, shipped at least once even across a crash. It
    raises ``OSError`` when the spool cannot write them (disk full; nothing was stored).
    ``run`` may return (a finite source) or run until the pipeline closes it (it is
    cancelled then). If it raises, the error is logged and the adapter's ``/livez`` turns
    503.

    Args:
        name: the records' ``input`` field and the metrics' ``input`` label.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.records = 0
        """Records emitted so far."""
        self._spool: Spool | None = None
        self._tasks = TaskSet(f"adapter-source-{name}")

    @abstractmethod
    async def run(self, emit: Emit) -> None:
        """Produce records and ``await emit(records)`` for each batch of them."""

    async def start(self, spool: Spool) -> None:
        """Start :meth:`run` (the pipeline calls this)."""
        self._spool = spool
        self._tasks.spawn(self.run(self._emit), f"adapter-source-{self.name}", may_return=True)

    async def _emit(self, records: list[Record]) -> None:
        spool = self._spool
        assert spool is not None  # run() is started by start()
        while True:
            try:
                await spool.append(records, source=self.name)
            except SpoolFull:
                await spool.wait_for_space()
                # A stopping spool refuses at once without waiting: never spin without
                # letting the event loop run (the pipeline cancels us meanwhile).
                await asyncio.sleep(0)
                continue
            self.records += len(records)
            return

    async def close(self) -> None:
        """Cancel :meth:`run` if it still runs (the pipeline calls this)."""
        await self._tasks.aclose()

    def is_live(self) -> bool:
        """False once :meth:`run` raised."""
        return self._tasks.healthy

    def collect(self) -> dict[str, float]:
        """``records``: emitted so far."""
        return {"records": self.records}


# -- transforms ------------------------------------------------------------------------
#
# Each built-in is a setting of a TransformChain, which applies its settings in one fixed
# order (keep, exclude, sample, rate limit, rename, drop, add, timestamp, redact, then the
# functions). A pipeline's list is cut into consecutive chains wherever the list's order
# differs from that one, so the transforms run exactly in the order given while a list in
# the chain's own order (the command line's) stays one chain.

_RANK = {
    "keep": 0,
    "exclude": 1,
    "sample": 2,
    "rate_limit": 3,
    "rename": 4,
    "drop": 5,
    "add": 6,
    "timestamp_field": 7,
    "redact": 8,
    "user": 9,
}
_SINGLE = frozenset({"sample", "rate_limit", "timestamp_field", "redact"})


@dataclass(frozen=True)
class Keep:
    """Keep only records whose ``field`` matches ``pattern`` (``--filter``)."""

    field: str
    pattern: str | re.Pattern[str]

    def setting(self) -> tuple[str, Any]:
        return "keep", (self.field, _pattern(f"Keep({self.field!r})", self.pattern))


@dataclass(frozen=True)
class Exclude:
    """Drop records whose ``field`` matches ``pattern`` (``--exclude``)."""

    field: str
    pattern: str | re.Pattern[str]

    def setting(self) -> tuple[str, Any]:
        return "exclude", (self.field, _pattern(f"Exclude({self.field!r})", self.pattern))


@dataclass(frozen=True)
class Sample:
    """Keep this fraction of the records, chosen by offset (``--sample``).

    The choice is a hash of a file record's ``offset``: a restart keeps the same records,
    and ``Sample(0.5), Sample(0.5)`` keeps a half, not a quarter. Records without an
    integer offset (a :class:`Source`'s, the inputs over localhost's) are chosen by their
    place in the stream.
    """

    fraction: float

    def setting(self) -> tuple[str, Any]:
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"Sample: {self.fraction!r} must be > 0 and <= 1")
        return "sample", self.fraction


@dataclass(frozen=True)
class RateLimit:
    """Keep at most this many records per second (``--rate-limit``)."""

    per_second: float

    def setting(self) -> tuple[str, Any]:
        if not self.per_second > 0:
            raise ConfigError(f"RateLimit: {self.per_second!r} must be > 0")
        return "rate_limit", float(self.per_second)


@dataclass(frozen=True)
class Rename:
    """Rename field ``old`` to ``new`` (``--rename-field``)."""

    old: str
    new: str

    def setting(self) -> tuple[str, Any]:
        return "rename", (self.old, self.new)


@dataclass(frozen=True)
class Drop:
    """Remove a field (``--drop-field``)."""

    field: str

    def setting(self) -> tuple[str, Any]:
        return "drop", self.field


@dataclass(frozen=True)
class Add:
    """Set ``field`` to ``value`` on every record (``--add-field``)."""

    field: str
    value: str

    def setting(self) -> tuple[str, Any]:
        return "add", (self.field, self.value)


@dataclass(frozen=True)
class Timestamp:
    """Copy ``field`` to ``timestamp``, as ISO 8601 when it parses (``--timestamp-field``)."""

    field: str

    def setting(self) -> tuple[str, Any]:
        return "timestamp_field", self.field


@dataclass(frozen=True)
class Redact:
    """Redact built-in kinds and patterns in every top-level string field (``--redact``,
    ``--redact-regex``)."""

    kinds: Sequence[str] = ()
    patterns: Sequence[str | re.Pattern[str]] = field(default=())

    def setting(self) -> tuple[str, Any]:
        unknown = [k for k in self.kinds if k not in REDACTIONS]
        if unknown:
            raise ConfigError(
                f"Redact: {unknown[0]!r} is not one of {', '.join(REDACTIONS)} "
                "(use patterns= for your own)"
            )
        if not self.kinds and not self.patterns:
            raise ConfigError("Redact: give kinds= or patterns=")
        compiled = [_pattern("Redact", p) for p in self.patterns]
        return "redact", redactor(self.kinds, compiled)


BuiltinTransform = Keep | Exclude | Sample | RateLimit | Rename | Drop | Add | Timestamp | Redact


def transform_chains(transforms: Sequence[BuiltinTransform | Transform]) -> list[TransformChain]:
    """The chains that apply ``transforms`` in their order, sharing one set of counters.

    Raises:
        ConfigError: a transform's setting is invalid, or an item is not a transform.
    """
    counters = Counters()
    groups: list[dict[str, Any]] = []
    rank = len(_RANK)  # forces a first group
    for item in transforms:
        if isinstance(
            item, Keep | Exclude | Sample | RateLimit | Rename | Drop | Add | Timestamp | Redact
        ):
            kind, value = item.setting()
        elif callable(item):
            kind, value = "user", item
        else:
            raise ConfigError(
                f"transforms: {item!r} is neither a built-in transform nor a function"
            )
        r = _RANK[kind]
        if r < rank or (r == rank and kind in _SINGLE):
            groups.append({})
        rank = r
        group = groups[-1]
        if kind in _SINGLE:
            group[kind] = value
        else:
            group.setdefault(kind, []).append(value)
    chains = []
    for group in groups:
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in group.items()}
        chains.append(TransformChain(counters=counters, **kw))
    return chains


# -- the pipeline ------------------------------------------------------------------------

# AdapterConfig fields an object of the pipeline stands for: given as settings, they would
# clash with it (Files') or be ignored (the transforms', the inputs').
_OF_FILES = frozenset(Files(paths=()).settings()) | frozenset(Multiline(preset="go").settings())
_TRANSFORMS = frozenset(
    {
        "add_field",
        "rename_field",
        "drop_field",
        "timestamp_field",
        "redact",
        "redact_regex",
        "filter",
        "exclude",
        "sample",
        "rate_limit",
    }
)
_INPUTS = frozenset(
    {
        "http_listen",
        "http_max_body",
        "tcp_listen",
        "syslog_unix",
        "syslog_unix_stream",
        "syslog_tcp",
        "syslog_udp",
        "syslog_socket_mode",
        "syslog_max_message",
    }
)


def _check_settings(settings: dict[str, Any]) -> None:
    """Refuse the settings an object of the pipeline stands for, naming the object."""
    for name in sorted(settings):
        if name in _OF_FILES:
            given = "" if name == "path" else f", {name}=..."
            if name.startswith("multiline"):
                given = ", multiline=Multiline(...)"
            raise ConfigError(f"Pipeline: {name} is a setting of Files (Files(paths=[...]{given}))")
        if name in _TRANSFORMS:
            raise ConfigError(
                f"Pipeline: {name} is a transform (give transforms=[Keep(...), Rename(...), ...])"
            )
        if name in _INPUTS:
            raise ConfigError(
                f"Pipeline: {name} is an input's setting (give the input object in sources, "
                "e.g. HttpInput(...))"
            )
        if name == "regex":
            raise ConfigError("Pipeline: regex: pass the compiled regex as parse=")


_SCALAR_OPTIONS = {o.name: o for o in ADAPTER_ONLY_OPTIONS if not o.multiple}


def _values(owner: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` checked by the options' own parsers (as the command line checks them);
    a string is parsed as on the command line (``"256MiB"``, ``"30s"``).

    Raises:
        ConfigError: ``owner: name: value`` and what is expected.
    """
    out = dict(values)
    for name, value in values.items():
        opt = _SCALAR_OPTIONS.get(name)
        if opt is None or value is None or isinstance(value, bool):
            continue
        where = f"{owner}: {name}"
        if isinstance(value, str | Path | int):
            out[name] = opt.parse_from(str(value), where)
        elif isinstance(value, float) and not value >= 0:
            opt.parse_from(str(value), where)  # negative or NaN: the parser's message
    return out


def _checked(parse: Parser) -> Parser:
    """``parse`` with what is not a dict counted as a parse error (a list from a bug would
    end the sender), named after it; never ``raw``, which would skip it."""

    def parser(line: str) -> dict[str, Any] | None:
        fields = parse(line)
        return fields if isinstance(fields, dict) else None

    name = getattr(parse, "__name__", "custom")
    parser.__name__ = name if name != "raw" else f"{getattr(parse, '__module__', '')}.raw"
    return parser


def _is(obj: object, methods: tuple[str, ...]) -> bool:
    return hasattr(obj, "name") and all(callable(getattr(obj, m, None)) for m in methods)


def _check_items(sources: Sequence[object], sinks: Sequence[object]) -> None:
    """Refuse a source or a sink that is neither of the kinds the pipeline takes."""
    if isinstance(sources, str | Files) or isinstance(sinks, str | SinkConfig):
        raise ConfigError("Pipeline: sources and sinks are lists (sources=[...], sinks=[...])")
    for s in sources:
        if not isinstance(s, Files) and not _is(s, ("start", "close", "is_live", "collect")):
            raise ConfigError(
                f"sources: {s!r} is neither Files, an input nor a Source "
                "(Files(paths=[...]) tails files)"
            )
    for k in sinks:
        if not isinstance(k, SinkConfig) and not _is(k, ("start", "send", "close", "collect")):
            raise ConfigError(
                f"sinks: {k!r} is neither a SinkConfig nor a sink "
                "(SinkConfig(name=..., kind=...) or an object with the Sink methods)"
            )


class Pipeline(Adapter):
    """An adapter built from objects; run it like an ``Adapter`` (a runtime Component).

    Args:
        sources: what to read: at most one :class:`Files`, inputs and sources of your own.
        parse: a parser's name (see ``--parse``), a compiled regex with named groups, or
            a function ``(line: str) -> dict | None``. Applies to lines of files; pushed
            records arrive structured.
        on_parse_error: ``raw`` (ship the line as ``message`` with ``parse_error``) or
            ``drop``.
        transforms: built-ins (:class:`Keep`, :class:`Rename`...) and functions, applied
            in this order.
        sinks: :class:`~podpatterns.adapter.config.SinkConfig` entries and sink objects;
            stdout when empty.
        checkpoint_dir: where the files' checkpoint lives (by default the spool's
            directory; without either, reading starts over after a restart).
        spool_dir: where records of pushed sources wait, durably, until every sink has
            them (needed when there is any source but :class:`Files`).
        runtime: the runtime's settings; only when the pipeline runs under a
            :class:`~podpatterns.runtime.Runtime` built from them.
        **settings: any other :class:`~podpatterns.adapter.config.AdapterConfig` field
            by name (``queue_max_bytes``, ``batch_max_records``, ``spool_max_bytes``,
            ``dead_letter``, ``k8s_env_metadata``, ``sink_unready_after``...).

    Raises:
        ConfigError: a setting is invalid (the message names it).
    """

    def __init__(
        self,
        *,
        sources: Sequence[Files | Input],
        parse: str | re.Pattern[str] | Parser = "raw",
        on_parse_error: str = "raw",
        transforms: Sequence[BuiltinTransform | Transform] = (),
        sinks: Sequence[SinkConfig | Sink] = (),
        checkpoint_dir: Path | None = None,
        spool_dir: Path | None = None,
        runtime: RuntimeConfig | None = None,
        **settings: Any,
    ) -> None:
        _check_items(sources, sinks)
        _check_settings(settings)
        files = [s for s in sources if isinstance(s, Files)]
        inputs: list[Input] = [s for s in sources if not isinstance(s, Files)]
        if len(files) > 1:
            raise ConfigError(
                "sources: more than one Files (give one Files all the globs: paths=[...])"
            )
        if not sources:
            raise ConfigError("sources: empty (give Files(paths=[...]) or an input)")
        names = [i.name for i in inputs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"sources: name {twice[0]!r} used twice (give each its own name)")
        parser: Parser | None = None
        if isinstance(parse, re.Pattern):
            settings.update(parse="regex", regex=parse)
        elif isinstance(parse, str):
            named = [p for p in PARSERS if p != "regex"]
            if parse not in named:
                raise ConfigError(
                    f"parse: {parse!r} is not one of {', '.join(named)} "
                    "(or pass a compiled regex or a function)"
                )
            settings["parse"] = parse
        elif callable(parse):
            parser = _checked(parse)
        else:
            raise ConfigError(
                f"parse: {parse!r} is neither a parser's name, a regex nor a function"
            )
        unknown = sorted(set(settings) - {f.name for f in fields(AdapterConfig)})
        if unknown:
            raise ConfigError(f"Pipeline: unknown setting {unknown[0]!r} (see AdapterConfig)")
        specs = tuple(s for s in sinks if isinstance(s, SinkConfig))
        if specs:
            settings["sinks"] = specs
        config = AdapterConfig(
            **_values("Files", files[0].settings() if files else {}),
            **_values(
                "Pipeline",
                {
                    **settings,
                    "on_parse_error": on_parse_error,
                    "checkpoint_dir": checkpoint_dir,
                    "spool_dir": spool_dir,
                },
            ),
            sources=tuple(names),
            runtime=runtime or RuntimeConfig(),
        )
        super().__init__(
            config,
            sinks=list(sinks) if sinks else None,
            inputs=inputs,
            parser=parser,
            transforms=transform_chains(transforms),
        )
        self._sources = [s for s in inputs if isinstance(s, Source)]

    def cut(self) -> int:
        """Stop reading and shipping now (the sources of your own too); return the batches
        that were left."""
        # With the spool's writer, a Source in emit() must stop: the stopped spool refuses
        # its records at once, for ever.
        for source in self._sources:
            source._tasks.cancel()
        return super().cut()

    async def close(self) -> None:
        """Cancel the sources of your own, then close as an ``Adapter`` does."""
        # First: the adapter's close() stops the spool's writer before it closes the
        # inputs, and a Source still emitting would then retry a refused append for ever.
        for source in self._sources:
            await source.close()
        await super().close()
