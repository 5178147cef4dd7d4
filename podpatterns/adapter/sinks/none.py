"""The ``none`` sink: accepts every batch at once and keeps nothing (a metrics-only adapter,
whose declared metrics count each batch as it is acknowledged)."""

from __future__ import annotations

from typing import Any

from podpatterns.adapter.sinks import Record


class NoneSink:
    """Accepts and discards."""

    name = "none"

    async def start(self) -> None:
        """Nothing to open."""

    async def send(self, records: list[Record]) -> None:
        """Accept ``records`` (nothing is kept)."""

    async def close(self) -> None:
        """Nothing to release."""

    def collect(self) -> dict[str, Any]:
        """No counters of its own (the lane counts the records)."""
        return {}
