"""JSON status to Prometheus: the adapter as a ``json_exporter`` sidecar (issue 15).

Many apps answer their own state as JSON (``/status``, ``/debug/vars``, a queue's
``/stats``). The config file's ``scrape:`` list names such endpoints and the values to
read from them (:mod:`podpatterns.adapter.scrapeconf`); each is fetched on its interval,
with a timeout, and its values are exposed on the adapter's ``/metrics`` beside
``podpatterns_adapter_scrape_up``, ``..._scrape_duration_seconds`` and the errors by
reason. A scrape that failed exposes no values of its endpoint (``up`` 0): an old value
presented as current would hide the outage.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from podpatterns import logs
from podpatterns.adapter.scrapeconf import JsonMetric, ScrapeConfig
from podpatterns.metrics import Family, Sample

__all__ = ["JsonScraper", "extract"]

MAX_BODY = 4 * 1024 * 1024
Labels = tuple[tuple[str, str], ...]


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def extract(doc: Any, metric: JsonMetric) -> tuple[list[tuple[Labels, float]], int]:
    """The samples of ``metric`` in ``doc``, and how many values were missing or not
    numbers."""
    # Each state: the value reached so far, the element the last wildcard stood on and
    # the key it stood on.
    states: list[tuple[Any, Any, str | None]] = [(doc, None, None)]
    for key, each in metric.path:
        nxt: list[tuple[Any, Any, str | None]] = []
        for value, element, at in states:
            if key != "*":
                if not isinstance(value, dict) or key not in value:
                    nxt.append((None, element, at))
                    continue
                value = value[key]
                if not each:
                    nxt.append((value, element, at))
                    continue
            if isinstance(value, list):
                nxt.extend((v, v, str(i)) for i, v in enumerate(value))
            elif isinstance(value, dict):
                nxt.extend((v, v, str(k)) for k, v in value.items())
            else:
                nxt.append((None, element, at))
        states = nxt
    out: list[tuple[Labels, float]] = []
    missing = 0
    for value, element, at in states:
        number = _number(value)
        if number is None:
            missing += 1
            continue
        labels = []
        for name, spec in metric.labels:
            if spec == "@key":
                text = at or ""
            elif spec.startswith("@"):
                field = element.get(spec[1:]) if isinstance(element, dict) else None
                text = "" if field is None else str(field)
            else:
                text = spec
            labels.append((name, text))
        out.append((tuple(labels), number))
    return out, missing


class _Target:
    def __init__(self, config: ScrapeConfig) -> None:
        self.config = config
        self.up = 0.0
        self.duration = 0.0
        self.scrapes = 0
        self.errors: dict[str, int] = {}
        self.missing = 0
        self.samples: dict[str, list[tuple[Labels, float]]] = {}


class JsonScraper(Collector):
    """Fetch every ``scrape:`` endpoint on its interval and expose what it read.

    Its loops run on the adapter's task set (:meth:`run`); :meth:`collect` is the
    collector of the app's values; :meth:`families` the adapter's own metrics about it.
    """

    def __init__(self, configs: Sequence[ScrapeConfig]) -> None:
        self.targets = [_Target(c) for c in configs]
        self._log = logs.get("adapter")

    async def run(self, target: _Target) -> None:
        """Scrape ``target`` every interval until cancelled."""
        import aiohttp  # on first use: an adapter without scrape: never loads the client

        cfg = target.config
        timeout = aiohttp.ClientTimeout(total=cfg.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                started = time.monotonic()
                await self._scrape(session, target)
                await asyncio.sleep(max(0.0, cfg.interval - (time.monotonic() - started)))

    async def _scrape(self, session: Any, target: _Target) -> None:
        import aiohttp

        cfg = target.config
        started = time.monotonic()
        reason: str | None = None
        detail = ""
        doc: Any = None
        try:
            async with session.get(cfg.url, headers={"Accept": "application/json"}) as resp:
                if resp.status != 200:
                    reason, detail = "http_status", f"HTTP {resp.status}"
                else:
                    body = bytearray()
                    async for chunk in resp.content.iter_chunked(65536):
                        body += chunk
                        if len(body) > MAX_BODY:
                            break
                    if len(body) > MAX_BODY:
                        reason, detail = "too_large", f"more than {MAX_BODY} bytes"
                    else:
                        try:
                            doc = json.loads(body)
                        except ValueError as exc:
                            reason, detail = "bad_json", str(exc)
        except TimeoutError:
            reason, detail = "timeout", f"no answer within {cfg.timeout:g}s"
        except aiohttp.ClientError as exc:
            reason, detail = "connect", f"{type(exc).__name__}: {exc}"
        target.scrapes += 1
        target.duration = time.monotonic() - started
        if reason is not None:
            if target.up or not target.errors:  # once per outage, not once per interval
                self._log.warning("scrape_failed", scrape=cfg.name, reason=reason, error=detail)
            target.errors[reason] = target.errors.get(reason, 0) + 1
            target.up = 0.0
            target.samples = {}
            return
        if not target.up and target.errors:
            self._log.info("scrape_recovered", scrape=cfg.name)
        samples = {}
        for metric in cfg.metrics:
            got, missing = extract(doc, metric)
            target.missing += missing
            samples[metric.name] = got
        target.samples = samples
        target.up = 1.0

    def collect(self) -> Iterator[Metric]:
        for target in self.targets:
            for metric in target.config.metrics:
                got = target.samples.get(metric.name)
                if not got:
                    continue
                family = Metric(metric.name, metric.help, metric.kind)
                suffix = "_total" if metric.kind == "counter" else ""
                for labels, value in got:
                    family.add_sample(metric.name + suffix, dict(labels), value)
                yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())  # samples come and go with the app's document

    def families(self) -> list[Family]:
        """The adapter's own metrics about its scrapes."""
        targets = self.targets

        def each(get: Callable[[_Target], float]) -> Callable[[], list[Sample]]:
            return lambda: [((t.config.name,), float(get(t))) for t in targets]

        def errors() -> list[Sample]:
            return [
                ((t.config.name, reason), float(n))
                for t in targets
                for reason, n in t.errors.items()
            ]

        return [
            Family(
                "gauge",
                "adapter_scrape_up",
                "1 if the last scrape of the endpoint "
                "succeeded, else 0 (its values are not exposed then)",
                ("scrape",),
                each(lambda t: t.up),
            ),
            Family(
                "gauge",
                "adapter_scrape_duration_seconds",
                "how long the last scrape of the endpoint took",
                ("scrape",),
                each(lambda t: t.duration),
            ),
            Family(
                "counter",
                "adapter_scrapes",
                "scrapes of the endpoint",
                ("scrape",),
                each(lambda t: t.scrapes),
            ),
            Family(
                "counter",
                "adapter_scrape_errors",
                "failed scrapes, by reason (timeout, connect, http_status, bad_json, too_large)",
                ("scrape", "reason"),
                errors,
            ),
            Family(
                "counter",
                "adapter_scrape_values_missing",
                "declared values absent from the document or not numbers",
                ("scrape",),
                each(lambda t: t.missing),
            ),
        ]
