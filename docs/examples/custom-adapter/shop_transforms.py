"""A transform for `podpatterns adapter --transform shop_transforms:enrich`.

It takes one record (a dict) and returns a dict, a list of dicts, or None to drop the
record. A transform that raises sends the record to the dead-letter file; the pipeline
goes on.
"""

from __future__ import annotations

from typing import Any


def enrich(record: dict[str, Any]) -> dict[str, Any] | None:
    """Drop health-check noise; turn integer cents into a display amount."""
    if record.get("path") == "/healthz":
        return None
    cents = record.get("cents")
    if isinstance(cents, int):
        record["amount"] = f"{cents // 100}.{cents % 100:02d} EUR"
    return record
