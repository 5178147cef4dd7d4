"""The TCP sink: newline-delimited JSON over one connection, reconnecting on failure.

A batch counts as accepted once written and drained to the kernel; on any error the
connection is dropped and the whole batch is sent again on a new one (at least once).
A connection the peer has closed is noticed before the next batch and replaced; what the
kernel had accepted on it just before the peer closed cannot be known (TCP has no
application-level acknowledgement): use the HTTP sink where that matters.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from podpatterns import logs
from podpatterns.adapter.sinks import Record, ndjson
from podpatterns.adapter.sinks.retry import Backoff
from podpatterns.options import HostPort


class TcpSink:
    """Send JSON lines to ``address``.

    Args:
        address: HOST:PORT.
        timeout: connect and write timeout.
        backoff: first reconnect backoff bound.
        backoff_max: reconnect backoff cap.
    """

    name = "tcp"

    def __init__(
        self,
        address: HostPort,
        timeout: float = 30.0,
        backoff: float = 0.2,
        backoff_max: float = 30.0,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._log = logs.get("adapter", sink="tcp")
        self.connects = 0
        self.retried = 0

    async def start(self) -> None:
        """Nothing: the connection is made by the first send."""

    async def send(self, records: list[Record]) -> None:
        """Write the batch; reconnect and resend until it is written."""
        data = ndjson(records)
        backoff = Backoff(self.backoff, self.backoff_max)
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    if self.peer_closed():
                        self._drop()
                    if self._writer is None:
                        self._reader, self._writer = await asyncio.open_connection(
                            self.address.host, self.address.port
                        )
                        self.connects += 1
                        self._log.info("sink_connected", address=str(self.address))
                    self._writer.write(data)
                    await self._writer.drain()
                return
            except (OSError, TimeoutError) as exc:
                self._drop()
                self.retried += 1
                if backoff.attempt == 0:
                    self._log.warning("sink_failing", address=str(self.address), error=str(exc))
                await asyncio.sleep(backoff.next_delay())

    def peer_closed(self) -> bool:
        """True when the connection exists and the peer has closed its side."""
        return self._reader is not None and (
            self._reader.at_eof() or self._writer is None or self._writer.is_closing()
        )

    def _drop(self) -> None:
        if self._writer is not None:
            self._writer.transport.abort()
            self._writer = None
        self._reader = None

    async def close(self) -> None:
        """Close the connection."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None

    def collect(self) -> dict[str, Any]:
        """Counters."""
        return {"connects": self.connects, "retries": self.retried}
