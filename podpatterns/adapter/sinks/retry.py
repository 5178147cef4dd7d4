"""Capped exponential backoff with full jitter, shared by the network sinks."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


class Backoff:
    """Delays for successive retries: ``uniform(0, min(cap, first * 2**n))``.

    Args:
        first: the first delay's upper bound in seconds.
        cap: the largest upper bound.
        retries: how many retries are allowed; 0 means unlimited.
    """

    def __init__(self, first: float, cap: float, retries: int = 0) -> None:
        self.first = first
        self.cap = cap
        self.retries = retries
        self.attempt = 0

    def exhausted(self) -> bool:
        """True when no retry is left."""
        return self.retries > 0 and self.attempt >= self.retries

    def next_delay(self, retry_after: float | None = None) -> float:
        """The delay before the next attempt; a server's Retry-After wins (capped)."""
        self.attempt += 1
        if retry_after is not None:
            return min(max(0.0, retry_after), self.cap)
        bound = min(self.cap, self.first * 2 ** min(self.attempt - 1, 30))
        return random.uniform(0, bound)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
