"""The adapter's plain integer counters, shared by its stages and read at scrape time.

Hot paths never touch a metric object (see :mod:`podpatterns.metrics`): each stage counts
into the one :class:`Counters` the wiring hands it, and :mod:`podpatterns.adapter.metrics`
reads them when Prometheus scrapes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Counters:
    """Plain integers the hot path counts into; read at scrape time.

    The field order is the order of the ``adapter_stopped`` event's fields.
    """

    lines: int = 0
    bytes_read: int = 0
    records_shipped: int = 0
    batches: int = 0
    invalid_utf8: int = 0
    parse_errors: int = 0
    parse_dropped: int = 0
    partial_flushed: int = 0
    truncations: int = 0
    truncated_bytes_lost: int = 0
    truncated_bytes_recovered: int = 0
    rotations: int = 0
    replaced: int = 0
    files_opened: int = 0
    files_closed: int = 0
    open_errors: int = 0
    open_deferred: int = 0
    cri_merged: int = 0
    sink_errors: int = 0
