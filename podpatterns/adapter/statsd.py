"""StatsD in, Prometheus out: the adapter as a ``statsd_exporter`` sidecar (issue 15).

An app that sends StatsD (``name:value|type``, over UDP or TCP to ``127.0.0.1:8125``, the
way its statsd client library already does) gets its metrics on the adapter's
``/metrics`` instead, without a change to the app:

- ``c`` counters add ``value / sample rate`` and are exposed as Prometheus counters
  (``NAME_total``); a negative increment is invalid (counted, dropped);
- ``g`` gauges are set, or moved by a signed value (``+3``, ``-2``: the StatsD rule);
- ``ms`` timers are observed in seconds (value / 1000), ``h`` histograms and ``d``
  distributions as sent, into a histogram with the configured buckets, each observation
  weighted by ``1 / sample rate``;
- ``s`` sets are exposed as a gauge of the distinct values seen (at most
  :data:`MAX_SET_VALUES` per series).

Tags become labels: DogStatsD (``|#k:v,k2:v2``), InfluxDB (``name,k=v:1|c``) and Librato
(``name#k=v:1|c``) forms. Mappings (the config file's ``statsd_mappings:``) turn dotted
Graphite-style names into a name and labels: ``{match: "shop.*.orders", name:
"shop_orders", labels: {region: "$1"}}``. Names and label names are made valid
Prometheus names (other characters become ``_``).

Bounded: each metric keeps at most ``max_series`` label sets; samples of new ones beyond
it are dropped and counted, as are lines that do not parse and samples whose type
disagrees with the metric's first type. With ``expire_after`` (``--statsd-expire-after``,
off by default), a series not updated for that long is removed and counted, freeing its
slot; a metric left without series is removed too. UDP is best effort (a datagram the
kernel drops is not seen); every drop the adapter makes is counted. Counts start at zero
when the process starts: a restart is a counter reset to Prometheus, as with
statsd_exporter.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from podpatterns import logs
from podpatterns.adapter.expiry import IdleSeries
from podpatterns.adapter.inputs import listen_warning
from podpatterns.adapter.statsdmap import DEFAULT_BUCKETS, StatsdMapping, label_name
from podpatterns.errors import BindError
from podpatterns.options import HostPort

__all__ = [
    "DEFAULT_BUCKETS",
    "BadLine",
    "StatsdMapping",
    "StatsdMetrics",
    "StatsdServer",
    "parse_line",
]

MAX_SET_VALUES = 10_000
MAX_LINE = 64 * 1024
TYPES = {"c": "counter", "g": "gauge", "ms": "histogram", "h": "histogram", "d": "histogram"}
TYPES["s"] = "set"

_INVALID = re.compile(r"[^a-zA-Z0-9_:]")


class BadLine(ValueError):
    """A StatsD line that does not parse; ``reason`` is the metric label it is counted by."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Sample:
    """One parsed value: ``name`` as sent, its type code, value, rate and tags."""

    name: str
    kind: str
    value: float
    text: str  # the value as sent (a set's member)
    relative: bool
    rate: float
    tags: tuple[tuple[str, str], ...]


def _name(raw: str) -> str:
    name = _INVALID.sub("_", raw)
    if not name or name[0].isdigit():
        name = "_" + name
    return name


def _split_tags(text: str, sep: str, kv: str) -> list[tuple[str, str]]:
    out = []
    for item in text.split(sep):
        key, _, value = item.partition(kv)
        if key and value:
            out.append((label_name(key), value))
    return out


def parse_line(line: str) -> list[Sample]:
    """The samples of one StatsD line: ``name:value|type[|@rate][|#tags]``, or several
    ``value|type[|@rate]`` after one name, separated by ``:`` (not with DogStatsD tags,
    whose ``k:v`` use the colon).

    Raises:
        BadLine: the line does not parse (its ``reason`` says why, for the metrics).
    """
    name, colon, rest = line.partition(":")
    if not colon or not name or not rest:
        raise BadLine("malformed", f"no name:value in {line[:80]!r}")
    tags: list[tuple[str, str]] = []
    # InfluxDB (name,k=v,...) and Librato (name#k=v,...) carry the tags in the name.
    for mark in (",", "#"):
        if mark in name:
            name, _, tagtext = name.partition(mark)
            tags += _split_tags(tagtext, ",", "=")
    out = []
    for part in [rest] if "|#" in rest else rest.split(":"):
        fields = part.split("|")
        if len(fields) < 2:
            raise BadLine("malformed", f"no |type in {line[:80]!r}")
        text, code = fields[0], fields[1]
        if code not in TYPES:
            raise BadLine("bad_type", f"type {code[:20]!r} (expected c, g, ms, h, d or s)")
        rate = 1.0
        own = list(tags)
        for ext in fields[2:]:
            if ext.startswith("@"):
                try:
                    rate = float(ext[1:])
                except ValueError:
                    raise BadLine("bad_rate", f"sample rate {ext[:40]!r}") from None
                if not 0 < rate <= 1:
                    raise BadLine("bad_rate", f"sample rate {ext[:40]!r} is not in (0, 1]")
            elif ext.startswith("#"):
                own += _split_tags(ext[1:], ",", ":")
            elif not ext.startswith(("c:", "T", "e:")):
                raise BadLine("malformed", f"unknown field {ext[:40]!r}")
            # DogStatsD's container id (c:), timestamp (T) and external data (e:) are
            # not labels: they would make a series per container or per second.
        relative = False
        value = 0.0
        if code != "s":
            relative = code == "g" and text[:1] in ("+", "-")
            try:
                value = float(text)
            except ValueError:
                raise BadLine("bad_value", f"value {text[:40]!r}") from None
            if not math.isfinite(value):
                raise BadLine("bad_value", f"value {text[:40]!r}")
            if code == "c" and value < 0:
                raise BadLine("negative_counter", f"counter increment {text[:40]!r}")
        out.append(Sample(name, code, value, text, relative, rate, tuple(own)))
    return out


# -- the metrics ---------------------------------------------------------------------------

Labels = tuple[tuple[str, str], ...]


class _Histogram:
    __slots__ = ("buckets", "count", "sum")

    def __init__(self, n: int) -> None:
        self.buckets = [0.0] * n
        self.count = 0.0
        self.sum = 0.0


class _Family:
    __slots__ = ("idle", "kind", "series")

    def __init__(self, kind: str, expire_after: float | None) -> None:
        self.kind = kind  # counter, gauge, histogram or set
        self.series: dict[Labels, Any] = {}
        self.idle: IdleSeries[Labels] | None = IdleSeries(expire_after) if expire_after else None


class StatsdMetrics(Collector):
    """The app's metrics, made from StatsD samples; a Prometheus collector.

    Args:
        mappings: naming rules, first match wins; unmatched names are used as sent.
        buckets: histogram bounds (ascending).
        max_series: label sets kept per metric.
        max_metrics: metrics kept in all.
        expire_after: seconds without a sample after which a series is removed (and
            counted); ``None``: never.
        clock: the clock idleness is judged by (nothing here outlives the process: the
            monotonic clock).
    """

    def __init__(
        self,
        mappings: Sequence[StatsdMapping] = (),
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        max_series: int = 1000,
        max_metrics: int = 1000,
        reserved: frozenset[str] = frozenset(),
        expire_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mappings = tuple(mappings)
        self.reserved = reserved  # names the config declares otherwise (logs, scrapes)
        self.buckets = tuple(buckets)
        self._les = tuple(_le(b) for b in self.buckets)
        self.max_series = max_series
        self.max_metrics = max_metrics
        self.expire_after = expire_after
        self._clock = clock
        self._next_sweep = math.inf  # no series can be idle before this time
        self.families: dict[str, _Family] = {}
        self._names: dict[tuple[str, str], tuple[str, Labels] | None] = {}
        self.events: dict[str, int] = {
            "lines": 0,
            "samples": 0,
            "type_conflicts": 0,
            "series_dropped": 0,
            "metrics_dropped": 0,
            "set_values_dropped": 0,
            "series_expired": 0,
        }
        self.invalid: dict[str, int] = {}
        self._log = logs.get("adapter")

    def feed(self, data: bytes) -> None:
        """Take one datagram, or complete lines of a stream."""
        now = self._clock() if self.expire_after else 0.0
        if now >= self._next_sweep:
            self.expire(now)
        for raw in data.split(b"\n"):
            raw = raw.strip(b"\r\0 ")
            if not raw:
                continue
            self.events["lines"] += 1
            try:
                samples = parse_line(raw.decode())
            except UnicodeDecodeError:
                self.count_invalid("bad_utf8", "not UTF-8")
                continue
            except BadLine as exc:
                self.count_invalid(exc.reason, str(exc))
                continue
            for sample in samples:
                self.observe(sample, now)

    def count_invalid(self, reason: str, detail: str) -> None:
        """Count a dropped line by ``reason``; the first of each reason is logged."""
        first = reason not in self.invalid
        self.invalid[reason] = self.invalid.get(reason, 0) + 1
        if first:  # once per reason: a misbehaving client must not flood the log
            self._log.warning("statsd_invalid", reason=reason, detail=detail)

    def _named(self, name: str, kind: str) -> tuple[str, Labels] | None:
        key = (name, kind)
        if key in self._names:
            return self._names[key]
        found: tuple[str, Labels] | None = None
        for mapping in self.mappings:
            hit = mapping.apply(name)
            if hit is not None:
                found = (_name(hit[0]), tuple(hit[1]))
                break
        else:
            found = (_name(name), ())
        if found[0].startswith(("podpatterns_", "process_")) or (
            found[0].removesuffix("_total") in self.reserved
        ):
            found = None  # the adapter's own namespace, or a metric declared otherwise
        if len(self._names) < 4 * self.max_metrics:  # bounded: names can be unbounded
            self._names[key] = found
        return found

    def expire(self, now: float | None = None) -> int:
        """Remove the series idle for ``expire_after`` (and the metrics left without
        any); how many series."""
        if not self.expire_after:
            return 0
        now = self._clock() if now is None else now
        n = 0
        for name, fam in list(self.families.items()):
            assert fam.idle is not None
            for key in fam.idle.due(now):
                del fam.series[key]
                n += 1
            if not fam.series:
                del self.families[name]
        self.events["series_expired"] += n
        self._next_sweep = min(
            (f.idle.next_due for f in self.families.values() if f.idle is not None),
            default=math.inf,
        )
        return n

    def observe(self, s: Sample, now: float = 0.0) -> None:
        """Apply one sample, received at ``now`` (by the clock given)."""
        named = self._named(s.name, s.kind)
        if named is None:
            self.count_invalid(
                "reserved_name",
                f"{s.name!r} is the adapter's own or a metric the config declares",
            )
            return
        name, fixed = named
        kind = TYPES[s.kind]
        fam = self.families.get(name)
        if fam is None:
            if len(self.families) >= self.max_metrics:
                self.events["metrics_dropped"] += 1
                return
            fam = self.families[name] = _Family(kind, self.expire_after)
            if self.expire_after and self._next_sweep == math.inf:
                self._next_sweep = now + self.expire_after
        elif fam.kind != kind:
            self.events["type_conflicts"] += 1
            return
        labels = dict(s.tags)
        labels.update(fixed)  # the mapping's labels win over the app's tags
        key = tuple(sorted(labels.items()))
        series: Any = fam.series.get(key)
        if series is None:
            if len(fam.series) >= self.max_series:
                self.events["series_dropped"] += 1
                return
            if kind == "histogram":
                series = _Histogram(len(self.buckets))
            elif kind == "set":
                series = set()
            else:
                series = 0.0
            fam.series[key] = series
        if fam.idle is not None:
            fam.idle.touch(key, now)
        self.events["samples"] += 1
        if kind == "counter":
            fam.series[key] = series + s.value / s.rate
        elif kind == "gauge":
            fam.series[key] = series + s.value if s.relative else s.value
        elif kind == "set":
            if len(series) < MAX_SET_VALUES:
                series.add(s.text)
            elif s.text not in series:
                self.events["set_values_dropped"] += 1
        else:
            value = s.value / 1000.0 if s.kind == "ms" else s.value
            weight = 1.0 / s.rate
            series.count += weight
            series.sum += value * weight
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series.buckets[i] += weight

    def collect(self) -> Iterator[Metric]:
        self.expire()
        for name in sorted(self.families):
            fam = self.families[name]
            doc = f"StatsD {fam.kind} {name}, from the app"
            if fam.kind == "counter":
                metric = Metric(name, doc, "counter")
                for key, value in fam.series.items():
                    metric.add_sample(name + "_total", dict(key), value)
            elif fam.kind in ("gauge", "set"):
                metric = Metric(name, doc, "gauge")
                for key, value in fam.series.items():
                    metric.add_sample(
                        name, dict(key), float(len(value)) if fam.kind == "set" else value
                    )
            else:
                metric = Metric(name, doc, "histogram")
                for key, h in fam.series.items():
                    labels = dict(key)
                    for le, count in zip(self._les, h.buckets, strict=True):
                        metric.add_sample(name + "_bucket", {**labels, "le": le}, count)
                    metric.add_sample(name + "_bucket", {**labels, "le": "+Inf"}, h.count)
                    metric.add_sample(name + "_count", labels, h.count)
                    metric.add_sample(name + "_sum", labels, h.sum)
            yield metric

    def describe(self) -> Iterator[Metric]:
        return iter(())  # the families come and go with what the app sends

    def collect_events(self) -> dict[str, float]:
        """The adapter's own counters about StatsD (``adapter_input_events``)."""
        out = {k: float(v) for k, v in self.events.items()}
        out.update({f"invalid_{k}": float(v) for k, v in self.invalid.items()})
        out["metrics"] = float(len(self.families))
        return out


def _le(bound: float) -> str:
    """A bucket bound as Prometheus' clients write it (``1.0``, ``0.25``, ``1e+06``)."""
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return text


def _address(addr: tuple[str, int] | None) -> str | None:
    return None if addr is None else f"{addr[0]}:{addr[1]}"


# -- the server ----------------------------------------------------------------------------


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, metrics: StatsdMetrics) -> None:
        self.metrics = metrics

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.metrics.events.setdefault("datagrams", 0)
        self.metrics.events["datagrams"] += 1
        self.metrics.feed(data)


class StatsdServer:
    """Listen for StatsD on UDP and/or TCP and keep the metrics (an adapter input whose
    records are metrics: it needs no spool).

    Args:
        metrics: where samples go.
        udp: the UDP address, or None.
        tcp: the TCP address (newline-delimited lines), or None.
    """

    name = "statsd"

    def __init__(
        self, metrics: StatsdMetrics, *, udp: HostPort | None, tcp: HostPort | None
    ) -> None:
        self.metrics = metrics
        self.udp = udp
        self.tcp = tcp
        self.udp_address: tuple[str, int] | None = None
        self.tcp_address: tuple[str, int] | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        self._log = logs.get("adapter")

    async def start(self) -> None:
        """Bind.

        Raises:
            BindError: an address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        if self.udp is not None:
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _Datagrams(self.metrics), local_addr=(self.udp.host, self.udp.port)
                )
            except OSError as exc:
                raise BindError(f"--statsd-udp: cannot bind {self.udp}: {exc.strerror}") from None
            self._transport = transport
            self.udp_address = transport.get_extra_info("sockname")[:2]
        if self.tcp is not None:
            try:
                self._server = await asyncio.start_server(
                    self._serve, self.tcp.host, self.tcp.port, limit=MAX_LINE
                )
            except OSError as exc:
                self.close_now()
                raise BindError(f"--statsd-tcp: cannot bind {self.tcp}: {exc.strerror}") from None
            self.tcp_address = self._server.sockets[0].getsockname()[:2]
        self._log.info(
            "statsd_listening",
            udp=_address(self.udp_address),
            tcp=_address(self.tcp_address),
        )
        for flag, bind in (("--statsd-udp", self.udp), ("--statsd-tcp", self.tcp)):
            if bind is not None:
                listen_warning(self._log, flag, bind)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        events = self.metrics.events
        events["connections"] = events.get("connections", 0) + 1
        held = b""
        try:
            while data := await reader.read(65536):
                held += data
                end = held.rfind(b"\n")
                if end < 0:
                    if len(held) > MAX_LINE:
                        self.metrics.count_invalid("line_too_long", f"over {MAX_LINE} bytes")
                        held = b""
                    continue
                self.metrics.feed(held[:end])
                held = held[end + 1 :]
            if held:
                self.metrics.feed(held)  # the last line, without its newline
        except ConnectionError:
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    def close_now(self) -> None:
        """Stop listening and drop the connections."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()

    async def close(self) -> None:
        """Stop listening; connections end."""
        self.close_now()
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def collect(self) -> dict[str, float]:
        """Counters for ``adapter_input_events``."""
        return self.metrics.collect_events()
