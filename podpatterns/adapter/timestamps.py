"""Timestamps of records: epoch seconds, ISO 8601 or the access-log format, read once.

The transform stage writes ``timestamp`` as ISO 8601 (``--timestamp-field``); the OTLP
and Loki sinks need it in nanoseconds since the epoch. Both read it here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

_FORMATS = (None, "%d/%b/%Y:%H:%M:%S %z")  # ISO 8601, then nginx/apache's $time_local


def parse_datetime(value: Any) -> datetime | None:
    """An aware UTC datetime from epoch seconds or an ISO/nginx-style string, else None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(float(value), UTC)
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str):
        return None
    for fmt in _FORMATS:
        try:
            dt = datetime.fromisoformat(value) if fmt is None else datetime.strptime(value, fmt)
        except ValueError:
            continue
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.astimezone(UTC)
    return None


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def unix_nanos(value: Any) -> int | None:
    """Nanoseconds since the epoch of a timestamp :func:`parse_datetime` reads, else None."""
    dt = parse_datetime(value)
    if dt is None:
        return None
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000
