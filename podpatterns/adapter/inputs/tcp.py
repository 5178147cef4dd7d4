"""The TCP input: newline-delimited records over a stream, with backpressure.

Each line is a record: a JSON object when it parses as one, else ``{"message": line}``.
A connection is read a chunk at a time and the chunk's lines are appended to the spool
before the next chunk is read; while the spool is full the input waits for space and
reads nothing, so the kernel's socket buffers fill and the application's writes block
(backpressure through TCP, nothing dropped). TCP has no acknowledgement: a line is safe
once appended, and what the app wrote but the adapter had not read when it died is the
app's to resend (documented in docs/adapter.md).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, fields
from typing import Any

from podpatterns.adapter.inputs import Record, Spool
from podpatterns.adapter.inputs.stream import Connection, StreamServer
from podpatterns.adapter.lines import Line, LineSplitter
from podpatterns.options import HostPort

__all__ = ["TcpCounters", "TcpInput", "line_record"]

READ_CHUNK = 64 * 1024


def line_record(line: Line) -> Record:
    """The record of one received line: its JSON object, or ``{"message": text}``."""
    data = line.data
    if data[:1] == b"{" and not line.truncated:
        try:
            doc: Any = json.loads(data)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            return doc
    rec: Record = {"message": data.decode("utf-8", "replace")}
    if line.truncated:
        rec["truncated"] = True
    return rec


@dataclass
class TcpCounters:
    """Plain integers counted by the TCP input, read at scrape time."""

    connections: int = 0
    connections_open: int = 0
    records: int = 0
    bytes: int = 0
    lines_truncated: int = 0
    paused: int = 0
    records_dropped: int = 0
    connection_errors: int = 0


class TcpInput:
    """Accept connections on ``bind`` and spool their lines.

    Args:
        bind: the address (loopback unless told otherwise).
        max_line: longer lines are cut to this and marked ``truncated``.
        name: the ``input`` field of its records.
    """

    def __init__(self, bind: HostPort, *, max_line: int, name: str = "tcp") -> None:
        self.name = name
        self.bind = bind
        self.max_line = max_line
        self.counters = TcpCounters()
        self._server = StreamServer(
            name, "--tcp-listen", bind, self._serve, self.counters, read_chunk=READ_CHUNK
        )

    @property
    def address(self) -> tuple[str, int] | None:
        """The address bound (the port the kernel chose for port 0); ``None`` before
        :meth:`start`."""
        bound = self._server.address
        return (bound.host, bound.port) if isinstance(bound, HostPort) else None

    async def start(self, spool: Spool) -> None:
        """Bind and start accepting.

        Raises:
            BindError: the address is in use or not permitted.
        """
        await self._server.start(spool)

    async def _serve(self, conn: Connection) -> None:
        server = self._server
        c = self.counters
        splitter = LineSplitter(b"\n", self.max_line)
        while not server.closing:
            data = await conn.read()
            if data is None:
                return
            lines = splitter.feed(data) if data else []
            if not data:
                last = splitter.flush()  # the app closed after an unterminated line
                if last is not None:
                    lines.append(last)
            if lines:
                c.bytes += sum(len(ln.data) for ln in lines)
                records = [line_record(ln) for ln in lines]
                append = functools.partial(server.spool.append, records, source=self.name)
                if await server.append(append):
                    c.records += len(records)
                else:
                    # Shutting down with the sink down: nothing will make room.
                    c.records_dropped += len(records)
            if splitter.truncated_lines:
                c.lines_truncated += splitter.truncated_lines
                splitter.truncated_lines = 0
            if not data:
                return

    async def close(self) -> None:
        """Stop accepting; connections waiting for data are closed, those appending
        finish their append first."""
        await self._server.close()

    def is_live(self) -> bool:
        """False once a connection's task died of a bug (logged as ``task_died``)."""
        return self._server.is_live()

    def collect(self) -> dict[str, float]:
        """Connections, records and bytes received, lines truncated, pauses."""
        c = self.counters
        return {f.name: float(getattr(c, f.name)) for f in fields(c)}
