"""Prometheus metrics: one registry per runtime, so several runtimes can share a process.

Hot paths never touch a metric object: they count into plain integers that a collector
reads at scrape time (see :class:`CallbackCollector`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NAMESPACE = "podpatterns"


def new_registry() -> CollectorRegistry:
    """A registry with the process collector (CPU seconds, RSS, open fds)."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """Render ``registry`` in the Prometheus text format."""
    return generate_latest(registry)


Sample = tuple[tuple[str, ...], float]


class CallbackCollector(Collector):
    """A collector whose families are produced by callbacks at scrape time.

    Each entry is ``(kind, name, help, label_names, callback)`` where ``callback``
    returns ``(label_values, value)`` samples; ``kind`` is ``counter`` or ``gauge``.
    """

    def __init__(
        self,
        families: Iterable[tuple[str, str, str, tuple[str, ...], Callable[[], Iterable[Sample]]]],
    ) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        for kind, name, doc, labels, callback in self._families:
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
