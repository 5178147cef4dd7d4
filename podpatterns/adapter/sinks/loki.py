"""The Loki sink: records POSTed to Loki's push API (``/loki/api/v1/push``) as JSON.

The body is Loki's documented JSON push format::

    {"streams": [{"stream": {"app": "web"}, "values": [["<ns>", "<line>"], ...]}]}

- **Labels** come from record fields (``--loki-label LABEL=FIELD``); a record without the
  field has no such label. Labels are what Loki indexes, so their values are bounded:
  each label keeps at most ``--loki-max-label-values`` distinct values, and a record
  bringing a new value beyond that, or a value longer than Loki's 2048 characters, gets
  ``_other`` instead (counted in ``labels_folded``).
  Never give a label from a field such as a peer address or an offset.
- **The line** is the record as JSON, or the value of ``--loki-line-field``.
- **The timestamp** is the record's ``timestamp`` field (ISO 8601 or epoch seconds) in
  nanoseconds, as a string, else the time it is sent; values are sorted by it within each
  stream, as Loki requires.
- **Structured metadata** (``--loki-metadata KEY=FIELD``) is the optional third element
  of a value.

Everything else (gzip, the tenant header ``X-Scope-OrgID``, retries on 429 and 5xx, a
400 such as "entry out of order" or "too old" sent to the dead-letter file with Loki's
reason) is the HTTP sink's (:class:`~podpatterns.adapter.sinks.http.HttpSink`).
"""

from __future__ import annotations

import time
from typing import Any

from podpatterns.adapter.sinks import Record, encode_text
from podpatterns.adapter.sinks.http import HttpSink
from podpatterns.adapter.timestamps import unix_nanos

OTHER = "_other"
"""The label value records get once a label has its maximum of distinct values."""


MAX_LABEL_VALUE = 2048
"""Loki's default ``max_label_value_length``: a longer value would have the whole batch
refused (400), so it is folded into :data:`OTHER` instead."""


class LokiSink(HttpSink):
    """POST batches to a Loki push endpoint.

    Args:
        url: e.g. ``http://loki:3100/loki/api/v1/push``.
        labels: ``(label, field)`` pairs.
        max_label_values: distinct values kept per label.
        line_field: the field whose value is the line (default: the record as JSON).
        metadata: ``(key, field)`` pairs of structured metadata.
        tenant: sent as ``X-Scope-OrgID``.
        **http: the :class:`HttpSink` settings (gzip, headers, token file, retries...).
    """

    name = "loki"

    def __init__(
        self,
        url: str,
        *,
        labels: tuple[tuple[str, str], ...] = (),
        max_label_values: int = 64,
        line_field: str | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
        tenant: str | None = None,
        **http: Any,
    ) -> None:
        super().__init__(url, **http)
        if tenant is not None:
            self.headers["X-Scope-OrgID"] = tenant
        self.labels = labels
        self.max_label_values = max_label_values
        self.line_field = line_field
        self.metadata = metadata
        self._seen: dict[str, set[str]] = {label: set() for label, _ in labels}
        self.labels_folded = 0

    def _label_value(self, label: str, value: Any) -> str:
        text = value if isinstance(value, str) else encode_text(value)
        seen = self._seen[label]
        if text in seen:
            return text
        if len(seen) >= self.max_label_values or len(text) > MAX_LABEL_VALUE:
            self.labels_folded += 1
            return OTHER
        seen.add(text)
        return text

    def push(self, records: list[Record]) -> dict[str, Any]:
        """The push request of a batch (a JSON-ready mapping)."""
        streams: dict[tuple[tuple[str, str], ...], list[tuple[int, list[Any]]]] = {}
        now = time.time_ns()
        for rec in records:
            key = tuple(
                (label, self._label_value(label, rec[field]))
                for label, field in self.labels
                if rec.get(field) is not None
            )
            line: Any = rec.get(self.line_field) if self.line_field is not None else None
            if line is None:
                line = encode_text(rec)
            elif not isinstance(line, str):
                line = encode_text(line)
            ts = unix_nanos(rec["timestamp"]) if "timestamp" in rec else None
            if ts is None:
                ts = now
            value: list[Any] = [str(ts), line]
            meta = {
                k: (v if isinstance(v, str) else encode_text(v))
                for k, f in self.metadata
                if (v := rec.get(f)) is not None
            }
            if meta:
                value.append(meta)
            streams.setdefault(key, []).append((ts, value))
        out = []
        for key, values in streams.items():
            # Loki refuses a stream's entries out of time order; sorted() is stable, so
            # records of one timestamp keep the order they were read in.
            values.sort(key=lambda tv: tv[0])
            out.append({"stream": dict(key), "values": [v for _, v in values]})
        return {"streams": out}

    def encode(self, records: list[Record]) -> tuple[bytes, str]:
        """The JSON push body."""
        return encode_text(self.push(records)).encode("utf-8", "backslashreplace"), (
            "application/json"
        )

    def collect(self) -> dict[str, Any]:
        """The HTTP sink's counters, plus label values folded."""
        return {**super().collect(), "labels_folded": self.labels_folded}
