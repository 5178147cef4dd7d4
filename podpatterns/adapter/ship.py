"""The sink stage: send a batch of records until the sink accepts it.

A sink retries what it knows how to retry inside its own ``send`` (HTTP 5xx, a dropped
connection); an ``OSError`` that escapes it (disk full, EPIPE) is retried here with
backoff, without limit: the files are the buffer, and the checkpoint does not move until
the batch is accepted. Records a transform failed on go to the dead-letter file.
"""

from __future__ import annotations

import asyncio

from podpatterns import logs
from podpatterns.adapter.config import AdapterConfig
from podpatterns.adapter.counters import Counters
from podpatterns.adapter.sinks import DeadLetter, Record, Sink
from podpatterns.adapter.sinks.retry import Backoff


class Shipper:
    """Ships batches of records to a sink, retrying OS errors.

    Args:
        sink: where records go.
        dead_letter: where records a transform failed on go.
        counters: ``sink_errors`` and ``records_shipped``.
    """

    def __init__(self, sink: Sink, dead_letter: DeadLetter, counters: Counters) -> None:
        self.sink = sink
        self.dead_letter = dead_letter
        self._counters = counters
        self._log = logs.get("adapter")

    async def ship(self, records: list[Record], failed: list[tuple[Record, str]]) -> None:
        """Dead-letter ``failed``, then send ``records`` until the sink accepts them."""
        if failed:
            await asyncio.to_thread(
                self.dead_letter.write, [(r, None, reason) for r, reason in failed]
            )
        if records:
            await self._send(records)
            self._counters.records_shipped += len(records)

    async def _send(self, records: list[Record]) -> None:
        """Send until the sink accepts; an OSError (disk full, EPIPE) is retried, not fatal."""
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                await self.sink.send(records)
            except OSError as exc:
                if backoff.attempt == 0:
                    self._log.warning("sink_failing", sink=self.sink.name, error=str(exc))
                self._counters.sink_errors += 1
                await asyncio.sleep(backoff.next_delay())
                continue
            if backoff.attempt:
                self._log.info("sink_recovered", sink=self.sink.name, attempts=backoff.attempt)
            return


def build_sink(config: AdapterConfig, dead_letter: DeadLetter) -> Sink:
    """The sink ``config`` asks for (its module imported on first use)."""
    if config.sink == "file":
        from podpatterns.adapter.sinks.file import FileSink

        assert config.sink_path is not None
        return FileSink(config.sink_path, config.sink_fsync)
    if config.sink == "http":
        from podpatterns.adapter.sinks.http import HttpSink

        assert config.sink_url is not None
        return HttpSink(
            config.sink_url,
            fmt=config.sink_format,
            gzip_body=config.sink_gzip,
            headers=config.sink_header,
            token_file=config.sink_token_file,
            timeout=config.sink_timeout,
            retries=config.sink_retries,
            backoff=config.sink_backoff,
            backoff_max=config.sink_backoff_max,
            dead_letter=dead_letter,
            ca_file=config.sink_ca,
        )
    if config.sink == "tcp":
        from podpatterns.adapter.sinks.tcp import TcpSink

        return TcpSink(
            config.sink_address, config.sink_timeout, config.sink_backoff, config.sink_backoff_max
        )
    from podpatterns.adapter.sinks.stdout import StdoutSink

    return StdoutSink(config.stdout_max_line, config.stdout_oversize)
