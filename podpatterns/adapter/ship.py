"""The sink stage: every sink ships every batch, on its own lane, until it accepts it.

Each sink gets a :class:`Lane`: its own FIFO of batches, its own task and retries, its
own counters. A batch (a :class:`Shipment`) is handed to every lane; a lane ships its
batches in order and reports each one it acknowledged. The wiring acknowledges a batch
(moves the checkpoint) only once every lane has, and in batch order, so a checkpoint
never passes a record some sink has not acknowledged; a sink that is down holds back
only the batches it has not acknowledged, while the others go on, until the bytes held
reach ``--queue-max-bytes`` and reading pauses.

A sink retries what it knows how to retry inside its own ``send`` (HTTP 5xx, a dropped
connection); an ``OSError`` that escapes it (disk full, EPIPE) is retried here with
backoff, without limit: the files are the buffer, and the checkpoint does not move until
the batch is accepted. A sink of the application's own (the Python API) has any
exception retried that way: raising is how it says "not accepted"; a built-in sink's
other exceptions are bugs, which end the lane (and make the adapter not live).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from podpatterns import logs
from podpatterns.adapter.config import SinkConfig
from podpatterns.adapter.counters import Counters
from podpatterns.adapter.sinks import DeadLetter, Record, Sink
from podpatterns.adapter.sinks.retry import Backoff


@dataclass(eq=False, slots=True)
class Shipment:
    """A batch on its way to the sinks.

    Attributes:
        records: what every sink is sent.
        nbytes: what the batch counts against ``--queue-max-bytes``.
        read_bytes: the bytes of the lines it was made of.
        waiting: how many sinks have not acknowledged it yet.
        batch: what the wiring acknowledges once every sink has (opaque here).
    """

    records: list[Record]
    nbytes: int
    read_bytes: int
    waiting: int
    batch: Any = None


class Lane:
    """One sink's way: a FIFO of shipments, shipped in order by :meth:`run`.

    Args:
        name: the sink's name (its metrics' ``sink`` label).
        sink: where records go.
        counters: the adapter's counters (``sink_errors``).
        unready_after: seconds of failing after which :meth:`down_for` makes the adapter
            unready; ``None``: never.
        retry_any: retry every exception of ``sink.send``, not only ``OSError`` (a sink
            of the application's own).
    """

    def __init__(
        self,
        name: str,
        sink: Sink,
        counters: Counters,
        unready_after: float | None = None,
        *,
        retry_any: bool = False,
    ) -> None:
        self.name = name
        self.sink = sink
        self.unready_after = unready_after
        self._retried: type[BaseException] = Exception if retry_any else OSError
        self._counters = counters
        self._items: deque[Shipment | None] = deque()
        self._wake = asyncio.Event()
        self.records = 0
        self.bytes = 0
        self.batches = 0
        self.os_errors = 0
        self.pending_bytes = 0
        self._failing_since: float | None = None
        self._log = logs.get("adapter", sink=name)

    def put(self, item: Shipment) -> None:
        """Queue a shipment (the wiring bounds what is queued, in bytes)."""
        self._items.append(item)
        self.pending_bytes += item.nbytes
        self._wake.set()

    def end(self) -> None:
        """No more shipments: :meth:`run` returns once the queued ones are shipped."""
        self._items.append(None)
        self._wake.set()

    @property
    def queued(self) -> int:
        """Shipments queued and not yet acknowledged by this sink."""
        return len(self._items) - (1 if self._items and self._items[-1] is None else 0)

    async def run(self, acked: Callable[[Shipment], Awaitable[None]]) -> None:
        """Ship the queued shipments in order; ``acked`` is awaited after each."""
        while True:
            while not self._items:
                self._wake.clear()
                await self._wake.wait()
            item = self._items[0]
            if item is None:
                return
            if item.records:
                await self._send(item.records)
            self._items.popleft()
            self.pending_bytes -= item.nbytes
            self.records += len(item.records)
            self.bytes += item.read_bytes
            self.batches += 1
            await acked(item)

    async def _send(self, records: list[Record]) -> None:
        """Send until the sink accepts; an OSError (disk full, EPIPE), or with ``retry_any``
        any exception, is retried, not fatal."""
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                await self.sink.send(records)
            except self._retried as exc:
                if backoff.attempt == 0:
                    self._failing_since = time.monotonic()
                    self._log.warning(
                        "sink_failing", sink=self.name, error=f"{type(exc).__name__}: {exc}"
                    )
                self.os_errors += 1
                self._counters.sink_errors += 1
                await asyncio.sleep(backoff.next_delay())
                continue
            if backoff.attempt:
                self._failing_since = None
                self._log.info("sink_recovered", sink=self.name, attempts=backoff.attempt)
            return

    @property
    def errors(self) -> int:
        """Failed attempts: OS errors retried here plus the sink's own retries."""
        return self.os_errors + int(getattr(self.sink, "retried", 0))

    def failing_since(self) -> float | None:
        """``time.monotonic()`` since which the sink has been failing, or ``None``."""
        own = self._failing_since
        theirs: float | None = getattr(self.sink, "failing_since", None)
        if own is None:
            return theirs
        return own if theirs is None else min(own, theirs)

    def down_for(self, now: float) -> float:
        """Seconds the sink has been failing (0 while it is not)."""
        since = self.failing_since()
        return 0.0 if since is None else now - since


async def dead_letter_failed(dead_letter: DeadLetter, failed: list[tuple[Record, str]]) -> None:
    """Records a transform failed on go to the dead-letter file (once, whatever the sinks)."""
    if failed:
        await asyncio.to_thread(dead_letter.write, [(r, None, reason) for r, reason in failed])


def build_sink(config: SinkConfig, dead_letter: DeadLetter) -> Sink:
    """The sink ``config`` asks for (its module imported on first use)."""
    kind = config.kind
    if kind == "file":
        from podpatterns.adapter.sinks.file import FileSink

        assert config.sink_path is not None
        return FileSink(config.sink_path, config.sink_fsync)
    if kind in ("http", "otlp", "loki"):
        assert config.sink_url is not None
        http: dict[str, Any] = {
            "gzip_body": config.sink_gzip,
            "headers": config.sink_header,
            "token_file": config.sink_token_file,
            "timeout": config.sink_timeout,
            "retries": config.sink_retries,
            "backoff": config.sink_backoff,
            "backoff_max": config.sink_backoff_max,
            "dead_letter": dead_letter,
            "ca_file": config.sink_ca,
        }
        if kind == "otlp":
            from podpatterns.adapter.sinks.otlp import OtlpSink

            return OtlpSink(
                config.sink_url,
                encoding=config.otlp_encoding,
                body_field=config.otlp_body_field,
                severity_field=config.otlp_severity_field,
                resource=config.otlp_resource,
                **http,
            )
        if kind == "loki":
            from podpatterns.adapter.sinks.loki import LokiSink

            return LokiSink(
                config.sink_url,
                labels=config.loki_label,
                max_label_values=config.loki_max_label_values,
                line_field=config.loki_line_field,
                metadata=config.loki_metadata,
                tenant=config.loki_tenant,
                **http,
            )
        from podpatterns.adapter.sinks.http import HttpSink

        return HttpSink(config.sink_url, fmt=config.sink_format, **http)
    if kind == "none":
        from podpatterns.adapter.sinks.none import NoneSink

        return NoneSink()
    if kind == "tcp":
        from podpatterns.adapter.sinks.tcp import TcpSink

        return TcpSink(
            config.sink_address, config.sink_timeout, config.sink_backoff, config.sink_backoff_max
        )
    from podpatterns.adapter.sinks.stdout import StdoutSink

    return StdoutSink(config.stdout_max_line, config.stdout_oversize)
