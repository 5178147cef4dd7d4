"""Logs to metrics: counters, gauges and histograms declared in the config file, computed
from the records every sink acknowledged.

The declarations (a config file's ``metrics:`` list) are validated and compiled once
(:func:`declarations`). :class:`MetricState` holds the series; the wiring hands it each
acknowledged batch, in batch order, just before the checkpoint generation that moves past
the batch is written, and that generation carries the state (:meth:`MetricState.dump`,
under the checkpoint's ``metrics`` key). So after a crash the state and the offsets come
from one generation and can never disagree: the records resent after a restart are those
the state has not counted yet.

Idle series may expire (``expire_after``, off by default): a series not updated for that
long, by the wall clock of the acknowledgements that updated it, is removed and counted.
The times are saved with the state, so a restart judges idleness by the same clock: a
series idle before the restart expires on time, a live one does not. It imports no stage.
"""

from __future__ import annotations

import math
import re
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from itertools import pairwise
from operator import add, itemgetter
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from podpatterns import logs
from podpatterns.adapter.expiry import IdleSeries
from podpatterns.errors import ConfigError
from podpatterns.options import Option, parse_optional_duration

Record = dict[str, Any]

KINDS = ("counter", "gauge", "histogram")
MAX_SERIES = 1000
"""Default series per metric (the cardinality cap)."""
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Histogram bounds when a declaration gives none (Prometheus client libraries' default)."""
STATE_VERSION = 1
RESERVED = ("podpatterns_", "process_")
"""Name prefixes of the families the admin server exposes already."""

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_KEYS = (
    "name",
    "type",
    "help",
    "field",
    "labels",
    "match",
    "buckets",
    "max_series",
    "expire_after",
)
_EXPIRE_AFTER = Option(
    "expire_after",
    parse_optional_duration,
    None,
    "remove a series not updated for this long (off: never)",
    scope="adapter",
)


@dataclass(frozen=True, slots=True)
class MetricDecl:
    """One declared metric.

    Attributes:
        name: the exposed name (a counter's gets ``_total`` added when it lacks it).
        kind: ``counter``, ``gauge`` or ``histogram``.
        help: the ``# HELP`` line.
        field: the record field whose value is added (counter), set (gauge) or observed
            (histogram); ``None`` for a counter that counts matching records.
        labels: (label name, record field) pairs; a missing field gives the empty value.
        match: (field, regex) pairs every counted record must match (``re.search``, as
            ``--filter``).
        buckets: a histogram's upper bounds, ascending (``+Inf`` is added).
        max_series: series kept at most; observations of further series are dropped and
            counted.
        expire_after: seconds without an update after which a series is removed and
            counted (its slot under ``max_series`` freed); ``None``: never.
    """

    name: str
    kind: str
    help: str
    field: str | None
    labels: tuple[tuple[str, str], ...]
    match: tuple[tuple[str, re.Pattern[str]], ...]
    buckets: tuple[float, ...]
    max_series: int
    expire_after: float | None = None

    @property
    def exposed(self) -> str:
        """The name as exposed (a counter with ``_total``)."""
        if self.kind == "counter" and not self.name.endswith("_total"):
            return self.name + "_total"
        return self.name

    @property
    def shape(self) -> list[Any]:
        """What stored state must agree with to be reloaded for this declaration."""
        return [self.kind, [k for k, _ in self.labels], list(self.buckets)]


def declarations(
    raw: Any, file_label: str = "config file", expire_after: float | None = None
) -> tuple[MetricDecl, ...]:
    """Validate and compile a config file's ``metrics:`` list.

    Args:
        raw: the list as the YAML file gave it.
        file_label: how errors name the file.
        expire_after: the ``expire_after`` of the metrics that do not set their own
            (``--metrics-expire-after``).

    Raises:
        ConfigError: one line naming the metric, the key and what was expected.
    """
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            f"{file_label}: metrics must be a non-empty list of mappings "
            "(each with name: and type: counter, gauge or histogram)"
        )
    out: list[MetricDecl] = []
    seen: set[str] = set()
    for i, entry in enumerate(raw):
        decl = _declaration(entry, f"{file_label}: metrics[{i}]", expire_after)
        if decl.exposed in seen:
            raise ConfigError(
                f"{file_label}: metrics[{i}] {decl.name!r}: name: declared twice "
                f"(as {decl.exposed!r}; give each metric its own name)"
            )
        seen.add(decl.exposed)
        out.append(decl)
    return tuple(out)


def _declaration(entry: Any, where: str, expire_after: float | None) -> MetricDecl:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a mapping (e.g. {{name: requests, type: counter}})")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"{where}: name: {name!r} is not a Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"
        )
    if name.startswith(RESERVED):
        raise ConfigError(
            f"{where} {name!r}: name: the prefixes {' and '.join(RESERVED)} are the "
            "adapter's own (choose another name)"
        )
    where = f"{where} {name!r}"

    def bad(key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {value!r} {expected}")

    unknown = sorted(set(entry) - set(_KEYS))
    if unknown:
        raise bad(unknown[0], entry[unknown[0]], f"is an unknown key (known: {', '.join(_KEYS)})")
    kind = entry.get("type")
    if kind == "summary":
        # Not built, on purpose: see "Summaries" in docs/adapter-metrics.md.
        raise bad(
            "type",
            kind,
            "is not supported: declare a histogram (type: histogram, with buckets) and take "
            "quantiles with histogram_quantile(), which aggregates across Pods and restarts",
        )
    if kind not in KINDS:
        raise bad("type", kind, "must be one of counter, gauge, histogram")
    help_ = entry.get("help", f"{name} (from log records)")
    if not isinstance(help_, str):
        raise bad("help", help_, "must be a string")
    field = entry.get("field")
    if field is not None and (not isinstance(field, str) or not field):
        raise bad("field", field, "must be a record field name")
    if field is None and kind != "counter":
        raise ConfigError(f"{where}: field: missing (a {kind} takes its value from a field)")
    labels = _labels(entry.get("labels", []), bad)
    if kind == "histogram" and any(k == "le" for k, _ in labels):
        raise bad("labels", "le", "is a histogram's bucket label (choose another label name)")
    match = _match(entry.get("match", {}), bad)
    buckets: tuple[float, ...] = ()
    if kind == "histogram":
        buckets = _buckets(entry.get("buckets", list(DEFAULT_BUCKETS)), bad)
    elif "buckets" in entry:
        raise bad("buckets", entry["buckets"], f"only a histogram has buckets, not a {kind}")
    max_series = entry.get("max_series", MAX_SERIES)
    if isinstance(max_series, bool) or not isinstance(max_series, int) or max_series < 1:
        raise bad("max_series", max_series, "must be an integer >= 1 (default 1000)")
    if "expire_after" in entry:
        expire_after = _EXPIRE_AFTER.parse_from(entry["expire_after"], f"{where}: expire_after")
    return MetricDecl(name, kind, help_, field, labels, match, buckets, max_series, expire_after)


def _labels(raw: Any, bad: Callable[[str, Any, str], ConfigError]) -> tuple[tuple[str, str], ...]:
    """``[field, ...]`` (each label named as its field) or ``{label: field, ...}``."""
    if isinstance(raw, list):
        pairs = [(f, f) for f in raw]
    elif isinstance(raw, dict):
        pairs = list(raw.items())
    else:
        raise bad("labels", raw, "must be a list of fields or a mapping label: field")
    out = []
    for label, field in pairs:
        if not isinstance(label, str) or not _LABEL.fullmatch(label) or label.startswith("__"):
            raise bad("labels", label, "is not a label name ([a-zA-Z_][a-zA-Z0-9_]*, no __)")
        if not isinstance(field, str) or not field:
            raise bad("labels", field, f"must be a record field name (for label {label!r})")
        out.append((label, field))
    names = [k for k, _ in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise bad("labels", twice[0], "is given twice")
    return tuple(out)


def _match(
    raw: Any, bad: Callable[[str, Any, str], ConfigError]
) -> tuple[tuple[str, re.Pattern[str]], ...]:
    """``{field: regex, ...}``: every one must match (``re.search``)."""
    if not isinstance(raw, dict):
        raise bad("match", raw, "must be a mapping field: regex")
    out = []
    for field, pattern in raw.items():
        if not isinstance(pattern, str):
            raise bad("match", pattern, f"must be a regex string (for field {field!r})")
        try:
            out.append((str(field), re.compile(pattern)))
        except re.error as exc:
            raise bad("match", pattern, f"is not a valid regex ({exc})") from None
    return tuple(out)


def _buckets(raw: Any, bad: Callable[[str, Any, str], ConfigError]) -> tuple[float, ...]:
    if not isinstance(raw, list) or not raw:
        raise bad("buckets", raw, "must be a non-empty list of ascending numbers")
    for b in raw:
        if isinstance(b, bool) or not isinstance(b, int | float) or not math.isfinite(b):
            raise bad("buckets", b, "is not a finite number (+Inf is always added)")
    bounds = tuple(float(b) for b in raw)
    if any(a >= b for a, b in pairwise(bounds)):
        raise bad("buckets", raw, "must be strictly ascending")
    return bounds


def _number(value: Any) -> float | None:
    """A field's value as a finite number (ints, floats and numeric strings), else None."""
    if isinstance(value, bool):
        return None
    if not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):  # not a number, or an int too large for a float
        return None
    return number if math.isfinite(number) else None


class _Metric:
    """One declared metric's series and what it dropped.

    A series is a list: ``[value]`` for a counter or a gauge, ``[count per bucket...,
    sum]`` for a histogram, updated in place. A batch is grouped by the raw values of the
    label fields first (most records of a batch fall in a few series), so the label text
    and the cap are looked at once per series and batch, not per record.

    With ``expire_after``, :attr:`idle` holds when each series was last updated (the
    batch's time, set by :meth:`observe`); :meth:`expire` removes the idle ones.
    """

    __slots__ = (
        "_fields",
        "_now",
        "_raw_key",
        "decl",
        "dropped",
        "expired",
        "idle",
        "invalid",
        "series",
    )

    def __init__(self, decl: MetricDecl) -> None:
        self.decl = decl
        self.series: dict[tuple[str, ...], list[Any]] = {}
        self.dropped = 0
        self.invalid = 0
        self.expired = 0
        self.idle: IdleSeries[tuple[str, ...]] | None = (
            IdleSeries(decl.expire_after) if decl.expire_after else None
        )
        self._now = 0.0
        fields = tuple(f for _, f in decl.labels)
        self._fields = fields
        raw_key: Callable[[Record], tuple[Any, ...]]
        if not fields:
            raw_key = _no_labels
        elif len(fields) == 1:
            (a,) = fields
            raw_key = lambda r: (r.get(a),)  # noqa: E731 (the cheapest call per record)
        elif len(fields) == 2:
            a, b = fields
            raw_key = lambda r: (r.get(a), r.get(b))  # noqa: E731
        else:
            raw_key = lambda r: tuple(map(r.get, fields))  # noqa: E731
        self._raw_key = raw_key

    def _groups(self, records: Sequence[Record]) -> Mapping[tuple[Any, ...], int]:
        """Records per label field values, when every record has every label field (the
        common case, counted without a Python call per record).

        Raises:
            KeyError: a record lacks a label field.
            TypeError: a label field's value cannot be hashed.
        """
        fields = self._fields
        if not fields:
            return {(): len(records)}
        if len(fields) == 1:
            return {(v,): n for v, n in Counter(map(itemgetter(fields[0]), records)).items()}
        return Counter(map(itemgetter(*fields), records))

    def _text_key(self, rec: Record) -> tuple[Any, ...]:
        """The label values as text (for field values that cannot be hashed as they are)."""
        return tuple("" if (v := rec.get(f)) is None else str(v) for f in self._fields)

    def _cell(self, raw: tuple[Any, ...]) -> list[Any] | None:
        """The series of these label field values, created if the cap allows (else None),
        marked updated now (called once per series and batch)."""
        key = tuple("" if v is None else str(v) for v in raw)
        cell = self.series.get(key)
        if cell is None:
            if len(self.series) >= self.decl.max_series:
                return None
            hist = self.decl.kind == "histogram"
            cell = self.series[key] = [0] * (len(self.decl.buckets) + 1) + [0.0] if hist else [0.0]
        if self.idle is not None:
            self.idle.touch(key, self._now)
        return cell

    def expire(self, now: float) -> int:
        """Remove the series not updated for ``expire_after`` at ``now``; how many."""
        if self.idle is None:
            return 0
        gone = self.idle.due(now)
        for key in gone:
            del self.series[key]
        self.expired += len(gone)
        return len(gone)

    def _matching(self, records: Sequence[Record]) -> Sequence[Record]:
        match = self.decl.match
        if not match:
            return records
        out = []
        for rec in records:
            for name, pattern in match:
                value = rec.get(name)
                if value is None or not pattern.search(str(value)):
                    break
            else:
                out.append(rec)
        return out

    def observe(self, records: Sequence[Record], now: float = 0.0) -> None:
        """Count a batch (in order) into the series, acknowledged at ``now``."""
        self._now = now
        decl = self.decl
        records = self._matching(records)
        if not records:
            return
        raw_key = self._raw_key
        field = decl.field
        if field is None:  # a counter of records: group them, count per group
            try:
                groups = self._groups(records)
            except (KeyError, TypeError):  # a record lacks a label field, or holds a list
                try:
                    groups = Counter(map(raw_key, records))
                except TypeError:  # a label field holds a list or a mapping: as text
                    groups = Counter(map(self._text_key, records))
            for raw, n in groups.items():
                cell = self._cell(raw)
                if cell is None:
                    self.dropped += n
                else:
                    cell[0] += n
            return
        kind = decl.kind
        values = self._values(records, field)
        if not values:
            return
        if not self._fields:  # no labels: one series for the whole batch
            cell = self._cell(())
            if cell is None:
                self.dropped += len(values)
            elif kind == "histogram":
                _add_to_histogram(cell, decl.buckets, [number for _, number in values])
            elif kind == "counter":
                cell[0] = _running_sum(cell[0], [number for _, number in values])
            else:
                cell[0] = values[-1][1]
            return
        raw_key = self._raw_key
        cells: dict[tuple[Any, ...], list[Any] | None] = {}
        grouped: dict[int, tuple[list[Any], list[float]]] = {}
        for rec, number in values:
            raw = raw_key(rec)
            try:
                cell = cells[raw]
            except KeyError:
                cell = cells[raw] = self._cell(raw)
            except TypeError:  # unhashable label values
                cell = self._cell(self._text_key(rec))
            if cell is None:
                self.dropped += 1
            elif kind == "counter":
                cell[0] += number
            elif kind == "gauge":
                cell[0] = number
            else:
                group = grouped.get(id(cell))
                if group is None:
                    group = grouped[id(cell)] = (cell, [])
                group[1].append(number)
        for cell, numbers in grouped.values():
            _add_to_histogram(cell, decl.buckets, numbers)

    def _values(self, records: Sequence[Record], field: str) -> list[tuple[Record, float]]:
        """The records whose ``field`` is a usable number, with it; the others counted
        ``invalid``."""
        out: list[tuple[Record, float]] = []
        append = out.append
        counter = self.decl.kind == "counter"
        invalid = 0
        for rec in records:
            value = rec.get(field)
            kind = type(value)
            # ints, floats and numeric text (a regex's groups) without a call each
            if kind is float or kind is str or kind is int:
                try:
                    number = float(value)  # type: ignore[arg-type]  # one of those three
                except (ValueError, OverflowError):  # not a number, or an int past floats
                    invalid += 1
                    continue
                if not math.isfinite(number):
                    invalid += 1
                    continue
            else:
                num = _number(value)
                if num is None:
                    invalid += 1
                    continue
                number = num
            if counter and number < 0:
                invalid += 1
                continue
            append((rec, number))
        self.invalid += invalid
        return out

    def family(self) -> Metric:
        """The Prometheus family of the series now."""
        decl = self.decl
        labels = [k for k, _ in decl.labels]
        if decl.kind == "histogram":
            hist = HistogramMetricFamily(decl.name, decl.help, labels=labels)
            names = [repr(b) for b in decl.buckets] + ["+Inf"]
            for key, value in self.series.items():
                cumulative = 0
                buckets = []
                for bound, n in zip(names, value, strict=False):
                    cumulative += n
                    buckets.append((bound, float(cumulative)))
                hist.add_metric(list(key), buckets, value[-1])
            return hist
        family: CounterMetricFamily | GaugeMetricFamily
        if decl.kind == "counter":
            family = CounterMetricFamily(decl.exposed, decl.help, labels=labels)
        else:
            family = GaugeMetricFamily(decl.name, decl.help, labels=labels)
        for key, value in self.series.items():
            family.add_metric(list(key), value[0])
        return family


def _no_labels(rec: Record) -> tuple[Any, ...]:
    return ()


def _add_to_histogram(cell: list[Any], bounds: tuple[float, ...], numbers: list[float]) -> None:
    """Count ``numbers`` into a histogram series ``[count per bucket..., sum]``."""
    if not numbers:
        return
    for i, n in Counter(bisect_left(bounds, x) for x in numbers).items():
        cell[i] += n
    cell[-1] = _running_sum(cell[-1], numbers)


def _running_sum(start: float, numbers: list[float]) -> float:
    """``start`` plus each number in turn: the float a record-at-a-time sum gives, whatever
    the batches (so the sum after a restart is the one a run without it gives)."""
    return reduce(add, numbers, start)


class MetricState(Collector):
    """The declared metrics' series: advanced by acknowledged batches, saved with the
    checkpoint, exposed as a Prometheus collector.

    Idle series expire (the metrics with ``expire_after``) whenever the state is looked
    at: before a batch is counted (so an expired series comes back from zero and frees
    its slot under the cap first), at each scrape, when the state is saved and when it
    is restored.

    Args:
        decls: the compiled declarations.
        clock: the wall clock (seconds since the epoch) idleness is judged by; saved
            with the state, so it must mean the same after a restart.
    """

    def __init__(self, decls: Sequence[MetricDecl], clock: Callable[[], float] = time.time) -> None:
        self.metrics = [_Metric(d) for d in decls]
        self._clock = clock
        self._log = logs.get("adapter")

    def observe(self, records: Sequence[Record]) -> None:
        """Count an acknowledged batch into every metric."""
        now = self._clock()
        self.expire(now)
        for m in self.metrics:
            m.observe(records, now)

    def expire(self, now: float | None = None) -> int:
        """Remove the idle series of every metric at ``now`` (default: the clock's now);
        how many."""
        if now is None:
            now = self._clock()
        n = 0
        for m in self.metrics:
            gone = m.expire(now)
            if gone:
                self._log.debug("metric_series_expired", metric=m.decl.exposed, series=gone)
            n += gone
        return n

    def fields(self) -> frozenset[str]:
        """Every record field a declared metric reads (labels, value, match)."""
        out: set[str] = set()
        for m in self.metrics:
            decl = m.decl
            out.update(f for _, f in decl.labels)
            out.update(f for f, _ in decl.match)
            if decl.field is not None:
                out.add(decl.field)
        return frozenset(out)

    def dropped(self) -> list[tuple[str, int]]:
        """Per metric, observations dropped by the series cap."""
        return [(m.decl.exposed, m.dropped) for m in self.metrics]

    def invalid(self) -> list[tuple[str, int]]:
        """Per metric, matching records whose value field was missing or not a number."""
        return [(m.decl.exposed, m.invalid) for m in self.metrics]

    def expired(self) -> list[tuple[str, int]]:
        """Per metric, series removed because they were idle for ``expire_after``."""
        self.expire()
        return [(m.decl.exposed, m.expired) for m in self.metrics]

    def series_count(self) -> list[tuple[str, int]]:
        """Per metric, the series kept now."""
        self.expire()
        return [(m.decl.exposed, len(m.series)) for m in self.metrics]

    def dump(self) -> dict[str, Any]:
        """A JSON-able copy of the state (taken on the event loop: the checkpoint writes
        it from a worker thread while batches go on being counted).

        Idle series expire first. With ``expire_after``, ``touched`` holds each series'
        last update (wall clock, in the order of ``series``): a key of its own, which a
        version without expiry ignores.
        """
        self.expire()
        out: dict[str, Any] = {}
        for m in self.metrics:
            hist = m.decl.kind == "histogram"
            entry: dict[str, Any] = {
                "shape": m.decl.shape,
                "series": [[list(k), list(v) if hist else v[0]] for k, v in m.series.items()],
                "dropped": m.dropped,
                "invalid": m.invalid,
                "expired": m.expired,
            }
            if m.idle is not None:
                touched = m.idle.touched
                entry["touched"] = [round(touched[k], 3) for k in m.series]
            out[m.decl.exposed] = entry
        return {"version": STATE_VERSION, "metrics": out}

    def restore(self, doc: Mapping[str, Any] | None) -> None:
        """Go on from a state :meth:`dump` made (loaded with the checkpoint).

        A metric whose declaration changed shape (type, label names, buckets) since, or
        that was not saved, starts from zero, logged. With ``expire_after``, each series
        goes on from its saved last update (one saved without it, by a version or a
        declaration without expiry, from now), and those idle for ``expire_after``
        already are removed and counted now.
        """
        if not doc:
            return
        if doc.get("version") != STATE_VERSION:
            self._log.warning("metric_state_discarded", reason="unknown version")
            return
        saved = doc.get("metrics", {})
        for m in self.metrics:
            entry = saved.get(m.decl.exposed)
            if entry is None:
                continue
            if entry.get("shape") != m.decl.shape:
                self._log.warning(
                    "metric_state_discarded", metric=m.decl.exposed, reason="declaration changed"
                )
                continue
            hist = m.decl.kind == "histogram"
            m.series = {
                tuple(k): (list(v) if hist else [float(v)]) for k, v in entry.get("series", [])
            }
            m.dropped = int(entry.get("dropped", 0))
            m.invalid = int(entry.get("invalid", 0))
            m.expired = int(entry.get("expired", 0))
            if m.idle is not None:
                self._restore_times(m, entry.get("touched"))
        gone = self.expire()
        if gone:
            self._log.info("metric_series_expired_at_start", series=gone)

    def _restore_times(self, m: _Metric, saved: Any) -> None:
        assert m.idle is not None
        now = self._clock()
        if not isinstance(saved, list) or len(saved) != len(m.series):
            saved = [now] * len(m.series)
        for key, t in zip(m.series, saved, strict=True):
            ok = isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)
            m.idle.restore(key, float(t) if ok else now, now)

    def collect(self) -> Iterator[Metric]:
        self.expire()
        for m in self.metrics:
            yield m.family()

    def describe(self) -> Iterator[Metric]:
        return iter(())
