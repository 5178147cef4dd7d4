"""podpatterns.metrics: histograms counted in plain numbers, exposed at scrape time."""

from __future__ import annotations

from podpatterns.metrics import (
    Buckets,
    CallbackCollector,
    Histogram,
    exposition,
    new_registry,
)


def test_buckets_expose_as_a_prometheus_histogram() -> None:
    """A value on a bound counts in that bound's bucket (``le``), one above the last bound
    only in +Inf; buckets are cumulative in the exposition, with _count and _sum."""
    seconds = Buckets((0.001, 0.01))
    for value in (0.0005, 0.001, 0.002, 0.01, 3.0):
        seconds.observe(value)
    assert seconds.counts == [2, 2, 1]
    registry = new_registry()
    registry.register(
        CallbackCollector(
            [
                Histogram(
                    "test_seconds",
                    "a test",
                    ("route",),
                    seconds.bounds,
                    lambda: [(("r",), seconds.counts, seconds.total)],
                )
            ]
        )
    )
    text = exposition(registry).decode()
    assert 'podpatterns_test_seconds_bucket{le="0.001",route="r"} 2.0' in text, text
    assert 'podpatterns_test_seconds_bucket{le="0.01",route="r"} 4.0' in text, text
    assert 'podpatterns_test_seconds_bucket{le="+Inf",route="r"} 5.0' in text, text
    assert 'podpatterns_test_seconds_count{route="r"} 5.0' in text, text
    assert 'podpatterns_test_seconds_sum{route="r"} 3.0135' in text, text
