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

import asyncio
import json
from typing import Any

from podpatterns import logs
from podpatterns.adapter.inputs import Record, Spool, SpoolFull, listen_warning
from podpatterns.adapter.lines import Line, LineSplitter
from podpatterns.errors import BindError
from podpatterns.options import HostPort

__all__ = ["TcpInput", "line_record"]

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
        self.address: tuple[str, int] | None = None
        """The address bound (the port the kernel chose for port 0)."""
        self._server: asyncio.Server | None = None
        self._spool: Spool | None = None
        self._conns: dict[asyncio.Task[Any], bool] = {}  # task -> reading (not appending)
        self._closing = False
        self._died = False
        self._c = {
            "connections": 0,
            "connections_open": 0,
            "records": 0,
            "bytes": 0,
            "lines_truncated": 0,
            "paused": 0,
            "records_dropped": 0,
            "connection_errors": 0,
        }
        self._log = logs.get("adapter")

    async def start(self, spool: Spool) -> None:
        """Bind and start accepting.

        Raises:
            BindError: the address is in use or not permitted.
        """
        self._spool = spool
        try:
            self._server = await asyncio.start_server(
                self._serve, self.bind.host, self.bind.port, reuse_address=True
            )
        except OSError as exc:
            raise BindError(
                f"--tcp-listen: cannot bind {self.bind}: {exc.strerror or exc}"
            ) from None
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        listen_warning(self._log, "tcp", self.bind)
        self._log.info("input_listening", input=self.name, address=f"{sock[0]}:{sock[1]}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns[task] = True
        c = self._c
        c["connections"] += 1
        c["connections_open"] += 1
        try:
            await self._read(reader, task)
        except asyncio.CancelledError:
            if not self._closing:
                raise
        except (OSError, asyncio.IncompleteReadError) as exc:
            # One connection failing is counted and logged; it never stops the input.
            c["connection_errors"] += 1
            self._log.warning("input_connection_failed", input=self.name, error=str(exc))
        except Exception:
            # A bug: the connection's task is asyncio's, so its death is noticed here.
            self._died = True
            self._log.exception("task_died", task=f"{self.name}-conn")
        finally:
            c["connections_open"] -= 1
            self._conns.pop(task, None)
            writer.close()

    async def _read(self, reader: asyncio.StreamReader, task: asyncio.Task[Any]) -> None:
        splitter = LineSplitter(b"\n", self.max_line)
        while True:
            self._conns[task] = True
            data = await reader.read(READ_CHUNK)
            self._conns[task] = False
            lines = splitter.feed(data) if data else []
            if not data:
                last = splitter.flush()  # the app closed after an unterminated line
                if last is not None:
                    lines.append(last)
            if lines:
                self._c["bytes"] += sum(len(ln.data) for ln in lines)
                await self._append([line_record(ln) for ln in lines])
            if splitter.truncated_lines:
                self._c["lines_truncated"] += splitter.truncated_lines
                splitter.truncated_lines = 0
            if not data or self._closing:
                return

    async def _append(self, records: list[Record]) -> None:
        """Append until the spool takes them: a full spool pauses this connection."""
        spool = self._spool
        assert spool is not None
        delay = 0.05
        while True:
            try:
                await spool.append(records, source=self.name)
            except SpoolFull:
                if self._closing:
                    # Shutting down with the sink down: nothing will make room.
                    self._c["records_dropped"] += len(records)
                    return
                self._c["paused"] += 1
                await spool.wait_for_space()
                continue
            except OSError:
                # The disk failed: keep the records and try again; reading stays paused.
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._c["records"] += len(records)
            return

    async def close(self) -> None:
        """Stop accepting; connections waiting for data are closed, those appending
        finish their append first."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task, reading in list(self._conns.items()):
            if reading:
                task.cancel()
        if self._conns:
            _, pending = await asyncio.wait(list(self._conns), timeout=10)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._server is not None:
            await self._server.wait_closed()

    def is_live(self) -> bool:
        """False once a connection's task died of a bug (logged as ``task_died``)."""
        return not self._died

    def collect(self) -> dict[str, float]:
        """Connections, records and bytes received, lines truncated, pauses."""
        return {k: float(v) for k, v in self._c.items()}
