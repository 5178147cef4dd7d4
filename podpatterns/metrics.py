"""Prometheus metrics: one registry per runtime, so several runtimes can share a process.

Hot paths never touch a metric object: they count into plain integers that a collector
reads at scrape time (see :class:`CallbackCollector`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal, NamedTuple

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NAMESPACE = "podpatterns"


def new_registry() -> CollectorRegistry:
    """A registry with the process collector (CPU seconds, RSS, open fds)."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    return registry


OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def exposition(registry: CollectorRegistry) -> bytes:
    """Render ``registry`` in the Prometheus text format."""
    return generate_latest(registry)


def negotiate(registry: CollectorRegistry, accept: str) -> tuple[bytes, str]:
    """The exposition a scraper asked for with ``Accept``, and its content type:
    OpenMetrics when it accepts ``application/openmetrics-text`` (Prometheus does,
    first), else the Prometheus text format."""
    if "application/openmetrics-text" in accept:
        from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

        body: bytes = openmetrics(registry)  # type: ignore[no-untyped-call]
        return body, OPENMETRICS_CONTENT_TYPE
    return generate_latest(registry), CONTENT_TYPE


LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Histogram bounds, in seconds, for the package's latencies (an upstream connect, a
database query): from a loopback round trip to a timeout."""

Sample = tuple[tuple[str, ...], float]
"""One sample: its label values (in the family's label order) and its value."""


class Family(NamedTuple):
    """The declaration of one metric family whose samples a callback produces at scrape time.

    Attributes:
        kind: ``counter`` or ``gauge``.
        name: the name without the ``podpatterns_`` namespace (counters without ``_total``:
            the exposition adds it).
        help: one line for ``# HELP`` and the generated reference.
        labels: the label names.
        samples: returns the samples; called once per scrape.
    """

    kind: Literal["counter", "gauge"]
    name: str
    help: str
    labels: tuple[str, ...]
    samples: Callable[[], Iterable[Sample]]

    @property
    def full_name(self) -> str:
        """The exposed name, ``podpatterns_<name>`` (plus ``_total`` for a counter)."""
        name = f"{NAMESPACE}_{self.name}"
        if self.kind == "counter" and not name.endswith("_total"):
            name += "_total"
        return name


HistogramSample = tuple[tuple[str, ...], Sequence[int], float]
"""One histogram series: its label values, the count in each bucket (not cumulative; one
more than the bounds, the last for ``+Inf``) and the sum of the observed values."""


class Buckets:
    """Observed values counted per bucket of ``bounds``, and their sum: the series of a
    :class:`Histogram` declaration, in plain numbers (no lock, no label lookup per
    observation; a prometheus_client histogram takes a lock twice per observation).

    Args:
        bounds: the upper bounds of the buckets, ascending (``+Inf`` is added).
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # not cumulative; the last for +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: a value on a bound is in
        self.total += value


class Histogram(NamedTuple):
    """The declaration of a histogram family whose series a callback produces at scrape
    time (hot paths count into plain integers per bucket; nothing is touched per event).

    Attributes:
        name: the name without the ``podpatterns_`` namespace.
        help: one line for ``# HELP`` and the generated reference.
        labels: the label names.
        bounds: the upper bounds of the buckets, ascending (``+Inf`` is added).
        samples: returns the series; called once per scrape.
    """

    name: str
    help: str
    labels: tuple[str, ...]
    bounds: tuple[float, ...]
    samples: Callable[[], Iterable[HistogramSample]]

    kind: Literal["histogram"] = "histogram"

    @property
    def full_name(self) -> str:
        """The exposed name, ``podpatterns_<name>``."""
        return f"{NAMESPACE}_{self.name}"


def counter(name: str, help: str, get: Callable[[], float]) -> Family:
    """A counter without labels whose value ``get()`` returns."""
    return Family("counter", name, help, (), lambda: [((), float(get()))])


def gauge(name: str, help: str, get: Callable[[], float]) -> Family:
    """A gauge without labels whose value ``get()`` returns."""
    return Family("gauge", name, help, (), lambda: [((), float(get()))])


class CallbackCollector(Collector):
    """A collector whose families are declared up front and sampled at scrape time.

    Args:
        families: the declarations; :attr:`families` keeps them for the generated
            reference (docs/reference.md), so what is documented is what is exposed.
    """

    def __init__(self, families: Iterable[Family | Histogram]) -> None:
        self.families: tuple[Family | Histogram, ...] = tuple(families)

    def collect(self) -> Iterator[Metric]:
        for declared in self.families:
            if isinstance(declared, Histogram):
                yield _histogram(declared)
                continue
            kind, name, doc, labels, callback = declared
            family: CounterMetricFamily | GaugeMetricFamily
            full = f"{NAMESPACE}_{name}"
            if kind == "counter":
                family = CounterMetricFamily(full, doc, labels=labels)
            else:
                family = GaugeMetricFamily(full, doc, labels=labels)
            for label_values, value in callback():
                family.add_metric(list(label_values), value)
            yield family

    def describe(self) -> Iterator[Metric]:
        return self.collect()


def _histogram(declared: Histogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(declared.full_name, declared.help, labels=declared.labels)
    bounds = [*("+Inf" if b == float("inf") else repr(float(b)) for b in declared.bounds), "+Inf"]
    for label_values, counts, total in declared.samples():
        cumulative = 0
        buckets = []
        for bound, n in zip(bounds, counts, strict=True):
            cumulative += n
            buckets.append((bound, float(cumulative)))
        family.add_metric(list(label_values), buckets, total)
    return family
