"""StatsD mappings: the config file's ``statsd_mappings:`` rules and the StatsD input's
option values, without the server (the options are declared wherever the adapter's are)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from podpatterns.errors import ConfigError

__all__ = ["DEFAULT_BUCKETS", "StatsdMapping", "label_name", "mappings_from_file"]

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Histogram bounds for timers (seconds) and histograms: Prometheus' client default."""

_INVALID_LABEL = re.compile(r"[^a-zA-Z0-9_]")


def label_name(raw: str) -> str:
    """``raw`` as a valid Prometheus label name (other characters become ``_``)."""
    name = _INVALID_LABEL.sub("_", raw)
    if not name or name[0].isdigit():
        name = "_" + name
    return name


# -- mappings ------------------------------------------------------------------------------

_GROUP = re.compile(r"\$(\d)|\$\{(\d+)\}")


@dataclass(frozen=True)
class StatsdMapping:
    """A rule that names a metric: ``match`` is a dotted glob (``*`` is one segment),
    ``name`` and the label values may use ``$1``... for the segments ``*`` matched."""

    match: str
    name: str
    labels: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        parts = ["([^.]+)" if seg == "*" else re.escape(seg) for seg in self.match.split(".")]
        object.__setattr__(self, "_regex", re.compile(r"\.".join(parts)))
        stars = self.match.split(".").count("*")
        for text in (self.name, *(v for _, v in self.labels)):
            for m in _GROUP.finditer(text):
                n = int(m.group(1) or m.group(2))
                if not 1 <= n <= stars:
                    raise ConfigError(
                        f"statsd_mappings: {self.match!r}: ${n} in {text!r}, but the match "
                        f"has {stars} '*'"
                    )
        for key, _ in self.labels:
            if label_name(key) != key:
                raise ConfigError(
                    f"statsd_mappings: {self.match!r}: label {key!r} is not a valid "
                    "Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"
                )

    def apply(self, name: str) -> tuple[str, list[tuple[str, str]]] | None:
        """The metric name and labels for ``name``, or None if it does not match."""
        m: re.Match[str] | None = self._regex.fullmatch(name)  # type: ignore[attr-defined]
        if m is None:
            return None

        def expand(text: str) -> str:
            return _GROUP.sub(lambda g: m.group(int(g.group(1) or g.group(2))), text)

        return expand(self.name), [(k, expand(v)) for k, v in self.labels]


def mappings_from_file(raw: Any, file_label: str = "config file") -> tuple[StatsdMapping, ...]:
    """The ``statsd_mappings:`` list of a config file.

    Raises:
        ConfigError: naming the entry and what is wrong with it.
    """
    if not isinstance(raw, list):
        raise ConfigError(
            f"{file_label}: statsd_mappings must be a list of mappings (each with match: and name:)"
        )
    out = []
    for i, entry in enumerate(raw):
        where = f"{file_label}: statsd_mappings[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: must be a mapping (e.g. {{match: a.*.b, name: a_b}})")
        unknown = sorted(set(entry) - {"match", "name", "labels"})
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (match, name, labels)")
        match, name, labels = entry.get("match"), entry.get("name"), entry.get("labels", {})
        if not isinstance(match, str) or not match:
            raise ConfigError(f"{where}: match: missing (a dotted glob such as shop.*.orders)")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: name: missing (the Prometheus metric name)")
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str | int) for k, v in labels.items()
        ):
            raise ConfigError(f"{where}: labels: must map label names to strings")
        try:
            out.append(StatsdMapping(match, name, tuple((k, str(v)) for k, v in labels.items())))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}".replace("statsd_mappings: ", "")) from None
    return tuple(out)
