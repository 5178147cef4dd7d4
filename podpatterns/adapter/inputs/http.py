"""The HTTP input: OTLP/HTTP logs and NDJSON, answered only once spooled.

========================  ====================================================================
``POST /v1/logs``         OTLP/HTTP logs: ``application/x-protobuf`` or ``application/json``
                          (an ``ExportLogsServiceRequest``); answered with an
                          ``ExportLogsServiceResponse`` in the same encoding
                          (``partial_success`` when some records were malformed)
``POST /v1/logs/ndjson``  one JSON object per line (``application/x-ndjson``, ``text/plain``,
                          a generic type or none); ``application/json``: an array of objects
                          (or one object)
========================  ====================================================================

Either may be gzip-compressed (``Content-Encoding: gzip``). The answer is 200 only after
the records were appended to the spool (fsync'ed): a 200 means "stored, will be
shipped". 429 with ``Retry-After`` when the spool is full; 413 beyond ``--http-max-body``
(compressed, or once decompressed); 400 with the reason for a body that does not decode
(nothing of it is stored); 415 for another content type; 503 when the disk failed.
OTLP errors carry a ``google.rpc.Status`` body in the request's encoding.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable

from aiohttp import web

from podpatterns import logs
from podpatterns.adapter.inputs import Record, Spool, SpoolFull, listen_warning, otlp
from podpatterns.errors import BindError, ConfigError
from podpatterns.options import HostPort

__all__ = ["HttpInput", "ndjson_records"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OTLP_PATH = "/v1/logs"
NDJSON_PATH = "/v1/logs/ndjson"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
# What generic clients send by default (aiohttp: octet-stream; curl -d: form) is read as
# NDJSON too; a type that says something else (XML, multipart...) is refused.
NDJSON_TYPES = frozenset(
    {
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/x-jsonlines",
        "text/plain",
        "application/octet-stream",
        "application/x-www-form-urlencoded",
        "",
    }
)
# The OTLP/HTTP spec's google.rpc.Code values for the bodies of errors.
INVALID_ARGUMENT = 3
RESOURCE_EXHAUSTED = 8
UNAVAILABLE = 14


def ndjson_records(body: bytes) -> list[Record]:
    """The records of an NDJSON body: one JSON object per non-blank line.

    Raises:
        ValueError: naming the first line that is not a JSON object.
    """
    out: list[Record] = []
    loads = json.loads
    for n, raw in enumerate(body.split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            doc = loads(raw)
        except ValueError as exc:
            raise ValueError(f"line {n}: not JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise ValueError(f"line {n}: not a JSON object")
        out.append(doc)
    return out


def json_array_records(body: bytes) -> list[Record]:
    """The records of a JSON array of objects (or of one object).

    Raises:
        ValueError: not JSON, or an item is not an object.
    """
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    items = doc if isinstance(doc, list) else [doc]
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"item {n}: not a JSON object")
    return items


class HttpInput:
    """Serve ``POST /v1/logs`` (OTLP) and ``POST /v1/logs/ndjson`` on ``bind``.

    Args:
        bind: the address (loopback unless told otherwise).
        max_body: largest body, compressed or once decompressed (413 beyond it).
        name: the ``input`` field of its records (``otlp`` is used for OTLP requests).
        drain_timeout: how long :meth:`close` lets requests in flight finish.

    Raises:
        ConfigError: ``opentelemetry-proto`` (the ``otlp`` extra) is not installed.
    """

    def __init__(
        self,
        bind: HostPort,
        *,
        max_body: int,
        name: str = "http",
        drain_timeout: float = 30.0,
    ) -> None:
        if not otlp.protobuf_available():
            raise ConfigError(
                "--http-listen: OTLP/HTTP needs opentelemetry-proto "
                "(pip install 'podpatterns[otlp]')"
            )
        self.name = name
        self.bind = bind
        self.max_body = max_body
        self.address: tuple[str, int] | None = None
        """The address bound (the port the kernel chose for port 0)."""
        self._drain_timeout = drain_timeout
        self._runner: web.AppRunner | None = None
        self._closing = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._spool: Spool | None = None
        self._status: Counter[str] = Counter()
        self._c = {"records": 0, "records_rejected": 0, "bytes": 0}
        self._log = logs.get("adapter")

    async def start(self, spool: Spool) -> None:
        """Bind and serve.

        Raises:
            BindError: the address is in use or not permitted.
        """
        self._spool = spool
        app = web.Application(client_max_size=self.max_body)
        app.router.add_post(OTLP_PATH, self._guarded(self._otlp))
        app.router.add_post(NDJSON_PATH, self._guarded(self._ndjson))
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=self._drain_timeout
        )
        await runner.setup()
        site = web.TCPSite(runner, self.bind.host, self.bind.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise BindError(
                f"--http-listen: cannot bind {self.bind}: {exc.strerror or exc}"
            ) from None
        self._runner = runner
        sock = runner.addresses[0]
        self.address = (sock[0], sock[1])
        listen_warning(self._log, "http", self.bind)
        self._log.info("input_listening", input=self.name, address=f"{sock[0]}:{sock[1]}")

    async def close(self) -> None:
        """Stop accepting; requests in flight are answered first (within the drain
        timeout).

        The listener closes first; a request already being handled (its body still
        arriving, or waiting for the spool) is read and answered; a new request on a
        kept-alive connection is answered 503 with ``Retry-After``. Only then are the
        connections closed (aiohttp's own shutdown stops reading bodies at once).
        """
        runner = self._runner
        if runner is None:
            return
        self._closing = True
        try:
            for site in list(runner.sites):
                await site.stop()
            async with asyncio.timeout(self._drain_timeout):
                await self._idle.wait()
        except TimeoutError:
            self._log.warning("input_drain_timeout", input=self.name, requests=self._in_flight)
        finally:
            # Also when cancelled (a drain cut short): the connections are closed.
            if self._runner is runner:
                self._runner = None
                await runner.cleanup()

    def _guarded(self, handler: Handler) -> Handler:
        """``handler``, counted in flight; refused with 503 once closing."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            if self._closing:
                resp = self._error(request, 503, "the adapter is shutting down; retry")
                resp.headers["Retry-After"] = "1"
                resp.force_close()
                return resp
            self._in_flight += 1
            self._idle.clear()
            try:
                return await handler(request)
            finally:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.set()

        return guarded

    def is_live(self) -> bool:
        """Always: aiohttp owns each request's task, and a handler that raises is answered
        500 and logged by it, without stopping the input."""
        return True

    def collect(self) -> dict[str, float]:
        """Requests by status (``status_200``...), records accepted and rejected, bytes."""
        out = {f"status_{k}": float(v) for k, v in self._status.items()}
        out.update((k, float(v)) for k, v in self._c.items())
        return out

    # -- handlers --------------------------------------------------------------------------

    async def _body(self, request: web.Request) -> bytes | web.Response:
        """The body, decompressed; or the error response (413, 400)."""
        if request.content_length is not None and request.content_length > self.max_body:
            return self._error(request, 413, f"body larger than {self.max_body} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._error(request, 413, f"body larger than {self.max_body} bytes")
        except Exception as exc:  # a torn or corrupt (gzip) body: the peer's fault
            return self._error(request, 400, f"cannot read the body: {exc}")
        self._c["bytes"] += len(body)
        return body

    async def _ndjson(self, request: web.Request) -> web.StreamResponse:
        ctype = request.content_type if "Content-Type" in request.headers else ""
        if ctype != JSON and ctype not in NDJSON_TYPES:
            return self._error(
                request, 415, f"Content-Type {ctype!r}: send application/x-ndjson or {JSON}"
            )
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        try:
            records = json_array_records(body) if ctype == JSON else ndjson_records(body)
        except ValueError as exc:
            return self._error(request, 400, str(exc))
        stored = await self._store(request, records, self.name)
        if stored is not None:
            return stored
        return self._answer(200, web.json_response({"accepted": len(records)}))

    async def _otlp(self, request: web.Request) -> web.StreamResponse:
        ctype = request.content_type
        if ctype not in (PROTOBUF, JSON):
            return self._error(
                request, 415, f"Content-Type {ctype!r}: OTLP/HTTP is {PROTOBUF} or {JSON}"
            )
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        rejected, reason = 0, ""
        records: list[Record] | int
        try:
            if ctype == PROTOBUF:
                # Checked now, flattened into records when the spool is read back.
                records = otlp.check_protobuf(body)
            else:
                try:
                    doc = json.loads(body)
                except ValueError as exc:
                    raise otlp.BadRequest(f"not JSON ({exc})") from None
                records, rejected, reason = otlp.from_json(doc)
        except otlp.BadRequest as exc:
            return self._error(request, 400, str(exc))
        if isinstance(records, int):
            stored = await self._store(request, records, "otlp", raw=body)
        else:
            stored = await self._store(request, records, "otlp")
        if stored is not None:
            return stored
        self._c["records_rejected"] += rejected
        if ctype == PROTOBUF:
            resp = web.Response(
                body=otlp.response_protobuf(rejected, reason), content_type=PROTOBUF
            )
        elif rejected:
            resp = web.json_response(
                {"partialSuccess": {"rejectedLogRecords": str(rejected), "errorMessage": reason}}
            )
        else:
            resp = web.json_response({})
        return self._answer(200, resp)

    async def _store(
        self,
        request: web.Request,
        records: list[Record] | int,
        source: str,
        raw: bytes = b"",
    ) -> web.Response | None:
        """Append ``records`` to the spool, or ``raw``, an OTLP protobuf body of
        ``records`` log records; None when stored, else the answer (429, 503)."""
        spool = self._spool
        assert spool is not None
        try:
            if isinstance(records, int):
                if not records:  # a valid request without log records: nothing to store
                    return None
                await spool.append_raw(
                    raw,
                    source=source,
                    kind="otlp-protobuf",
                    count=records,
                    decode=otlp.decode_block,
                )
            else:
                await spool.append(records, source=source)
        except SpoolFull as full:
            resp = self._error(request, 429, "the adapter's spool is full; retry later")
            resp.headers["Retry-After"] = str(max(1, round(full.retry_after)))
            return resp
        except OSError as exc:
            resp = self._error(request, 503, f"cannot store the records: {exc.strerror}")
            resp.headers["Retry-After"] = "5"
            return resp
        self._c["records"] += records if isinstance(records, int) else len(records)
        return None

    def _answer(self, status: int, resp: web.Response) -> web.Response:
        self._status[str(status)] += 1
        return resp

    def _error(self, request: web.Request, status: int, reason: str) -> web.Response:
        """An error answer: a google.rpc.Status on the OTLP path, else plain text."""
        if request.path == OTLP_PATH:
            code = {429: RESOURCE_EXHAUSTED, 503: UNAVAILABLE}.get(status, INVALID_ARGUMENT)
            if request.content_type == PROTOBUF:
                resp = web.Response(
                    status=status, body=otlp.status_protobuf(code, reason), content_type=PROTOBUF
                )
            else:
                resp = web.json_response({"code": code, "message": reason}, status=status)
        else:
            resp = web.Response(status=status, text=reason + "\n")
        return self._answer(status, resp)
