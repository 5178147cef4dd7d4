"""The config file's ``scrape:`` list: JSON status endpoints of the app, turned into metrics.

Kept apart from the scraper (:mod:`podpatterns.adapter.scrape`) so that declaring the
adapter's configuration imports no HTTP client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from podpatterns.adapter.statsdmap import label_name
from podpatterns.errors import ConfigError
from podpatterns.options import parse_duration

__all__ = ["JsonMetric", "ScrapeConfig", "scrapes_from_file"]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_STEP = re.compile(r"^(?P<key>[^.\[\]]+|\*)(?P<each>\[\*\])?$")


@dataclass(frozen=True)
class JsonMetric:
    """One metric read from the document.

    Attributes:
        name: the Prometheus name (a counter is exposed with ``_total``).
        kind: ``gauge`` or ``counter``.
        path: where its value is: keys separated by dots; ``key[*]`` is every element of
            the list at ``key``, ``*`` every value of an object; one sample per element.
        labels: label name -> a literal, or ``@field`` (that field of the element the last
            ``[*]``/``*`` stands on) or ``@key`` (the object key ``*`` stands on).
        help: the ``# HELP`` text.
    """

    name: str
    kind: str
    path: tuple[tuple[str, bool], ...]
    labels: tuple[tuple[str, str], ...]
    help: str


@dataclass(frozen=True)
class ScrapeConfig:
    """One endpoint: fetched every ``interval`` seconds, given up after ``timeout``."""

    url: str
    name: str
    interval: float
    timeout: float
    metrics: tuple[JsonMetric, ...]


def parse_path(text: str, where: str) -> tuple[tuple[str, bool], ...]:
    """``a.b[*].c`` -> ``(("a", False), ("b", True), ("c", False))``; ``*`` is ``("*", True)``."""
    steps = []
    for part in text.split("."):
        m = _STEP.match(part)
        if m is None:
            raise ConfigError(
                f"{where}: path: {text!r} is not keys separated by dots (e.g. queue.depth or "
                "workers[*].busy)"
            )
        key = m.group("key")
        steps.append((key, key == "*" or bool(m.group("each"))))
    return tuple(steps)


def _metric(raw: Any, where: str) -> JsonMetric:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping (e.g. {{name: app_queue, path: queue}})")
    unknown = sorted(set(raw) - {"name", "type", "path", "labels", "help"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (name, type, path, labels, help)")
    name, kind, path = raw.get("name"), raw.get("type", "gauge"), raw.get("path")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.startswith("podpatterns_"):
        raise ConfigError(
            f"{where}: name: {name!r} is not a Prometheus metric name of the app's own "
            "([a-zA-Z_:][a-zA-Z0-9_:]*, not podpatterns_...)"
        )
    if kind not in ("gauge", "counter"):
        raise ConfigError(f"{where}: type: {kind!r} is not gauge or counter")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}: path: missing (where the value is, e.g. queue.depth)")
    steps = parse_path(path, where)
    labels = raw.get("labels", {})
    if not isinstance(labels, dict):
        raise ConfigError(f"{where}: labels: must map label names to values or @fields")
    for key, value in labels.items():
        if not isinstance(key, str) or label_name(key) != key:
            raise ConfigError(f"{where}: labels: {key!r} is not a Prometheus label name")
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: labels: {key}: {value!r} is not a string")
        if isinstance(value, str) and value.startswith("@") and not any(e for _, e in steps):
            raise ConfigError(
                f"{where}: labels: {key}: {value!r} needs a [*] or * in the path to stand on"
            )
    return JsonMetric(
        name,
        kind,
        steps,
        tuple((k, str(v)) for k, v in labels.items()),
        str(raw.get("help", f"{name}, read from the app's JSON status")),
    )


def scrapes_from_file(raw: Any, file_label: str = "config file") -> tuple[ScrapeConfig, ...]:
    """The ``scrape:`` list of a config file.

    Raises:
        ConfigError: naming the entry and the key at fault.
    """
    if not isinstance(raw, list) or not raw:
        raise ConfigError(
            f"{file_label}: scrape must be a non-empty list of mappings (each with url: "
            "and metrics:)"
        )
    out = []
    names: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"{file_label}: scrape[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a mapping (url:, metrics:)")
        unknown = sorted(set(entry) - {"url", "name", "interval", "timeout", "metrics"})
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r} (url, name, interval, timeout, metrics)"
            )
        url = entry.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: url: {url!r} must be an http(s):// URL")
        name = str(entry.get("name") or url.split("/")[2])
        if name in names:
            raise ConfigError(f"{where}: name: {name!r} used twice (give each its own name)")
        names.add(name)
        try:
            interval = parse_duration(str(entry.get("interval", "15s")))
            timeout = parse_duration(str(entry.get("timeout", min(interval, 5.0))))
        except ValueError as exc:
            raise ConfigError(f"{where}: interval/timeout: {exc}") from None
        if interval <= 0 or not 0 < timeout <= interval:
            raise ConfigError(
                f"{where}: timeout: must be > 0 and <= interval ({interval:g}s), got {timeout:g}s"
            )
        metrics = entry.get("metrics")
        if not isinstance(metrics, list) or not metrics:
            raise ConfigError(f"{where}: metrics: missing (a list of {{name, path}})")
        decls = tuple(_metric(m, f"{where}: metrics[{j}]") for j, m in enumerate(metrics))
        out.append(ScrapeConfig(url, name, interval, timeout, decls))
    return tuple(out)
