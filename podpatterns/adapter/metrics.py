"""The adapter's metric families, declared once (docs/reference.md is generated from them).

The stages count into plain integers (:class:`~podpatterns.adapter.counters.Counters`,
the transform chain's and the sink's own); these declarations read them at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Protocol

from podpatterns.adapter.checkpoint import CheckpointStore
from podpatterns.adapter.counters import Counters
from podpatterns.adapter.l2m import MetricState
from podpatterns.adapter.lines import LineSplitter
from podpatterns.adapter.ship import Lane
from podpatterns.adapter.sinks import DeadLetter
from podpatterns.adapter.spool import Spool, SpoolCounters
from podpatterns.adapter.transform import Counters as TransformCounters
from podpatterns.metrics import Family, Sample, counter, gauge


class Counted(Protocol):
    """An input as the metrics see it: its name and its counters."""

    name: str

    def collect(self) -> dict[str, float]:
        """Counters (name -> value)."""


def families(
    *,
    counters: Counters,
    transforms: TransformCounters,
    lanes: Sequence[Lane],
    dead_letter: DeadLetter,
    splitters: Callable[[], Collection[LineSplitter]],
    mode: Callable[[], str],
    queue_bytes: Callable[[], int],
    lag_bytes: Callable[[], int],
    store: CheckpointStore | None,
    spool: Spool | None = None,
    inputs: Sequence[Counted] = (),
    metric_state: MetricState | None = None,
) -> list[Family]:
    """The adapter's families.

    Args:
        counters: the pipeline's counters.
        transforms: the transform chain's counters.
        lanes: the sinks' lanes (each sink's ``collect()`` becomes ``adapter_sink_events``).
        dead_letter: the dead-letter file.
        splitters: the line splitters of the open files (one per file).
        mode: ``watch`` or ``poll``.
        queue_bytes: bytes read and not yet acknowledged.
        lag_bytes: bytes in open files not yet acknowledged.
        store: the checkpoint store, if any.
        spool: the spool of pushed records, if any.
        inputs: the pushed inputs (each one's ``collect()`` becomes
            ``adapter_input_events``).
        metric_state: the logs-to-metrics state, if metrics are declared.

    Returns:
        The declarations, in the order they are exposed and documented.
    """
    c = counters
    chain = transforms

    def sink_samples() -> list[Sample]:
        return [
            ((lane.name, k), float(v)) for lane in lanes for k, v in lane.sink.collect().items()
        ]

    def per_sink(get: Callable[[Lane], float]) -> Callable[[], list[Sample]]:
        return lambda: [((lane.name,), float(get(lane))) for lane in lanes]

    def input_samples() -> list[Sample]:
        return [((i.name, k), float(v)) for i in inputs for k, v in i.collect().items()]

    sc = spool.counters if spool is not None else SpoolCounters()
    l2m = metric_state

    def per_metric(get: Callable[[MetricState], list[tuple[str, int]]]) -> list[Sample]:
        return [((name,), float(n)) for name, n in get(l2m)] if l2m is not None else []

    return [
        counter("adapter_lines", "lines read and handed to parsing", lambda: c.lines),
        counter("adapter_bytes_read", "bytes read from files", lambda: c.bytes_read),
        counter(
            "adapter_records_shipped",
            "records every sink acknowledged",
            lambda: c.records_shipped,
        ),
        counter(
            "adapter_batches",
            "batches every sink acknowledged (and checkpointed)",
            lambda: c.batches,
        ),
        Family(
            "counter",
            "adapter_sink_records",
            "records a sink acknowledged",
            ("sink",),
            per_sink(lambda lane: lane.records),
        ),
        Family(
            "counter",
            "adapter_sink_bytes",
            "bytes of the lines whose records a sink acknowledged",
            ("sink",),
            per_sink(lambda lane: lane.bytes),
        ),
        Family(
            "counter",
            "adapter_sink_failures",
            "failed attempts to send a batch to a sink (each retried)",
            ("sink",),
            per_sink(lambda lane: lane.errors),
        ),
        Family(
            "gauge",
            "adapter_sink_failing",
            "1 while a sink is failing (its batch being retried)",
            ("sink",),
            per_sink(lambda lane: lane.failing_since() is not None),
        ),
        Family(
            "gauge",
            "adapter_sink_queue_bytes",
            "bytes of batches handed to a sink and not yet acknowledged by it",
            ("sink",),
            per_sink(lambda lane: lane.pending_bytes),
        ),
        counter(
            "adapter_lines_truncated",
            "lines longer than --max-line-bytes (cut and marked)",
            lambda: sum(s.truncated_lines for s in splitters()),
        ),
        counter(
            "adapter_invalid_utf8", "lines with invalid UTF-8 (replaced)", lambda: c.invalid_utf8
        ),
        counter("adapter_parse_errors", "lines the parser could not parse", lambda: c.parse_errors),
        counter(
            "adapter_partial_flushed",
            "unterminated lines emitted (--flush-partial-after, truncation, rotation)",
            lambda: c.partial_flushed,
        ),
        counter(
            "adapter_truncations",
            "truncations detected (copytruncate, truncate, rewrite)",
            lambda: c.truncations,
        ),
        counter(
            "adapter_truncated_bytes_lost",
            "bytes known to be lost to a truncation",
            lambda: c.truncated_bytes_lost,
        ),
        counter(
            "adapter_truncated_bytes_recovered",
            "bytes read back from a copytruncate copy",
            lambda: c.truncated_bytes_recovered,
        ),
        counter(
            "adapter_rotations", "files seen rotated away (renamed or deleted)", lambda: c.rotations
        ),
        counter(
            "adapter_files_replaced",
            "files whose inode was reused by another file",
            lambda: c.replaced,
        ),
        counter(
            "adapter_cri_partials_merged",
            "CRI partial lines merged into their full line",
            lambda: c.cri_merged,
        ),
        counter(
            "adapter_file_open_errors", "files that could not be opened", lambda: c.open_errors
        ),
        counter(
            "adapter_files_open_deferred",
            "times a file waited for a descriptor (--max-open-files or the fd limit reached)",
            lambda: c.open_deferred,
        ),
        counter(
            "adapter_sink_errors",
            "sink sends that failed with an OS error and were retried",
            lambda: c.sink_errors,
        ),
        Family(
            "counter",
            "adapter_records_dropped",
            "records dropped by transforms, by reason",
            ("reason",),
            lambda: [
                (("filter",), chain.filtered),
                (("sample",), chain.sampled_out),
                (("rate_limit",), chain.rate_limited),
                (("parse_error",), c.parse_dropped),
            ],
        ),
        counter(
            "adapter_transform_failures",
            "records a user transform raised on (dead-lettered)",
            lambda: chain.failed,
        ),
        Family(
            "counter",
            "adapter_dead_letter_records",
            "records sent to the dead-letter file",
            ("outcome",),
            lambda: [
                (("written",), dead_letter.written),
                (("dropped",), dead_letter.dropped),
            ],
        ),
        gauge("adapter_files_open", "files open for reading", lambda: len(splitters())),
        Family(
            "gauge",
            "adapter_watch_mode",
            "1 for the file-change detection in use",
            ("mode",),
            lambda: [
                (("watch",), float(mode() == "watch")),
                (("poll",), float(mode() == "poll")),
            ],
        ),
        gauge("adapter_queue_bytes", "bytes read and not yet acknowledged", queue_bytes),
        gauge("adapter_lag_bytes", "bytes in open files not yet acknowledged", lag_bytes),
        counter(
            "adapter_checkpoint_writes",
            "checkpoint generations written",
            lambda: store.writes if store else 0,
        ),
        counter(
            "adapter_checkpoint_fallbacks",
            "corrupt checkpoint generations skipped",
            lambda: store.fallbacks if store else 0,
        ),
        Family(
            "counter",
            "adapter_sink_events",
            "sink counters (requests, retries, rejected, ...)",
            ("sink", "event"),
            sink_samples,
        ),
        Family(
            "counter",
            "adapter_input_events",
            "pushed-input counters (requests by status, records, bytes, connections, ...)",
            ("input", "event"),
            input_samples,
        ),
        counter(
            "adapter_spool_appends",
            "appends made durable in the spool (one per request or chunk)",
            lambda: sc.appends,
        ),
        counter(
            "adapter_spool_syncs",
            "fdatasync calls of the spool (appends per sync: the group commit)",
            lambda: sc.syncs,
        ),
        counter(
            "adapter_spool_records", "records appended to the spool", lambda: sc.records_appended
        ),
        counter("adapter_spool_bytes", "bytes appended to the spool", lambda: sc.bytes_appended),
        counter(
            "adapter_spool_full",
            "appends refused because the spool was full (HTTP 429, stream paused)",
            lambda: sc.full,
        ),
        counter(
            "adapter_spool_write_errors", "spool writes that failed (disk)", lambda: sc.write_errors
        ),
        counter(
            "adapter_spool_torn_tails",
            "segments found ending in a torn record after a crash (cut off)",
            lambda: sc.torn_tails,
        ),
        counter(
            "adapter_spool_corrupt_records",
            "spool lines that did not decode (skipped)",
            lambda: sc.corrupt_records,
        ),
        gauge(
            "adapter_spool_unacked_bytes",
            "bytes spooled and not yet acknowledged by the sink",
            lambda: spool.unacknowledged_bytes if spool is not None else 0,
        ),
        gauge(
            "adapter_spool_segments",
            "spool segment files",
            lambda: spool.segments() if spool is not None else 0,
        ),
        Family(
            "counter",
            "adapter_metric_series_dropped",
            "observations of a declared metric dropped: their series was over its max_series",
            ("metric",),
            lambda: per_metric(MetricState.dropped),
        ),
        Family(
            "counter",
            "adapter_metric_values_invalid",
            "matching records a declared metric skipped: value field missing or not a number",
            ("metric",),
            lambda: per_metric(MetricState.invalid),
        ),
        Family(
            "counter",
            "adapter_metric_series_expired",
            "series of a declared metric removed: not updated for its expire_after",
            ("metric",),
            lambda: per_metric(MetricState.expired),
        ),
        Family(
            "gauge",
            "adapter_metric_series",
            "series a declared metric keeps now (at most its max_series)",
            ("metric",),
            lambda: per_metric(MetricState.series_count),
        ),
    ]
