"""The HTTP(S) sink: batches POSTed as NDJSON or a JSON array, optionally gzip'ed.

Network errors, timeouts, 429 and 5xx are retried with capped exponential backoff and
jitter, honouring Retry-After, without limit by default (the file is the buffer). Any
other 4xx is a rejection for good: the batch goes to the dead-letter file.

The OTLP and Loki sinks are this sink with another body (:meth:`HttpSink.encode`) and,
for OTLP, a look at what a 2xx answer says (:meth:`HttpSink.refused_in`): the
connection, TLS, headers, token, gzip, retries and dead letters are this one piece.
"""

from __future__ import annotations

import asyncio
import gzip
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp

from podpatterns import logs
from podpatterns.adapter.sinks import DeadLetter, Record, json_array, ndjson
from podpatterns.adapter.sinks.retry import Backoff, parse_retry_after
from podpatterns.runtime.status import redact_text


class HttpSink:
    """POST batches to ``url``.

    Args:
        url: http:// or https:// endpoint.
        fmt: ``ndjson`` or ``json`` (an array).
        gzip_body: compress the body (``Content-Encoding: gzip``).
        headers: extra headers.
        token_file: a bearer token, re-read on every batch (rotated secrets work).
        timeout: per request.
        retries: 0 is unlimited.
        backoff: first backoff bound.
        backoff_max: backoff cap.
        dead_letter: where rejected records go.
        ca_file: CA bundle to verify the server with (the system's by default).
    """

    name = "http"

    def __init__(
        self,
        url: str,
        *,
        fmt: str = "ndjson",
        gzip_body: bool = False,
        headers: tuple[tuple[str, str], ...] = (),
        token_file: Path | None = None,
        timeout: float = 30.0,
        retries: int = 0,
        backoff: float = 0.2,
        backoff_max: float = 30.0,
        dead_letter: DeadLetter | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.url = url
        # What logs show: a URL's userinfo (user:password@) never reaches them.
        self.shown_url = redact_text(url)
        self.fmt = fmt
        self.gzip_body = gzip_body
        self.headers = dict(headers)
        self.token_file = token_file
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.dead_letter = dead_letter or DeadLetter(None, 0)
        self.ca_file = ca_file
        self._session: aiohttp.ClientSession | None = None
        self._log = logs.get("adapter", sink=self.name)
        self.requests = 0
        self.retried = 0
        self.rejected = 0
        self.failing_since: float | None = None
        """``time.monotonic()`` of the first failed attempt of the batch being retried."""

    @property
    def failing(self) -> bool:
        """True while a batch is being retried."""
        return self.failing_since is not None

    async def start(self) -> None:
        """Create the client session."""
        # TLS is always verified: against --sink-ca when given, else the system's CAs.
        ssl_ctx = ssl.create_default_context(
            cafile=str(self.ca_file) if self.ca_file is not None else None
        )
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(ssl=ssl_ctx),
        )

    def encode(self, records: list[Record]) -> tuple[bytes, str]:
        """The request body of a batch and its content type."""
        if self.fmt == "json":
            return json_array(records), "application/json"
        return ndjson(records), "application/x-ndjson"

    def refused_in(
        self, records: list[Record], content_type: str, answer: bytes
    ) -> tuple[int, list[tuple[Record, str]]]:
        """What a 2xx ``answer`` says was refused: a count, and dead-letter items.

        The plain HTTP sink takes a 2xx as "all accepted".
        """
        return 0, []

    def _body(self, records: list[Record]) -> tuple[bytes, dict[str, str]]:
        body, ctype = self.encode(records)
        headers = {"Content-Type": ctype, **self.headers}
        if self.gzip_body:
            body = gzip.compress(body, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        if self.token_file is not None:
            try:
                token = self.token_file.read_text().strip()
            except OSError as exc:
                self._log.warning(
                    "sink_token_unreadable", path=str(self.token_file), error=str(exc)
                )
            else:
                headers["Authorization"] = f"Bearer {token}"
        return body, headers

    async def send(self, records: list[Record]) -> None:
        """POST the batch until it is accepted or rejected for good."""
        assert self._session is not None, "start() first"
        body, headers = self._body(records)
        backoff = Backoff(self.backoff, self.backoff_max, self.retries)
        while True:
            retry_after: float | None = None
            try:
                self.requests += 1
                async with self._session.post(self.url, data=body, headers=headers) as resp:
                    answer = await _read_some(resp, _ANSWER_MAX)
                    text = answer[:512].decode(errors="replace")
                    status = resp.status
                    answer_type = resp.headers.get("Content-Type", "")
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                status, text, answer, answer_type = 0, f"{type(exc).__name__}: {exc}", b"", ""
            if 200 <= status < 300:
                if self.failing_since is not None:
                    self.failing_since = None
                    self._log.info(
                        "sink_recovered", url=self.shown_url, attempts=backoff.attempt + 1
                    )
                refused, why = self.refused_in(records, answer_type, answer)
                if refused:
                    self.rejected += refused
                    self._log.warning(
                        "sink_refused_some",
                        url=self.shown_url,
                        refused=refused,
                        records=len(records),
                    )
                    await asyncio.to_thread(
                        self.dead_letter.write, [(r, status, reason) for r, reason in why]
                    )
                return
            if 400 <= status < 500 and status not in (408, 429):
                self.failing_since = None
                self.rejected += len(records)
                self._log.warning(
                    "sink_rejected", url=self.shown_url, status=status, records=len(records)
                )
                items: list[tuple[Record, int | None, str]] = [(r, status, text) for r in records]
                await asyncio.to_thread(self.dead_letter.write, items)
                return
            if backoff.exhausted():
                self.failing_since = None
                self.rejected += len(records)
                self._log.error(
                    "sink_retries_exhausted", url=self.shown_url, **_outcome(status, text)
                )
                items = [(r, status or None, text) for r in records]
                await asyncio.to_thread(self.dead_letter.write, items)
                return
            delay = backoff.next_delay(retry_after)
            if self.failing_since is None:
                self.failing_since = time.monotonic()
                self._log.warning("sink_failing", url=self.shown_url, **_outcome(status, text))
            self.retried += 1
            await asyncio.sleep(delay)

    async def close(self) -> None:
        """Close the session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def collect(self) -> dict[str, Any]:
        """Counters."""
        return {"requests": self.requests, "retries": self.retried, "rejected": self.rejected}


# A 2xx answer is read up to this much (an OTLP partial_success is a few hundred bytes):
# a peer answering a huge body cannot make the sink hold it.
_ANSWER_MAX = 64 * 1024


async def _read_some(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The answer's body up to ``limit`` bytes (the rest is left unread)."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await resp.content.read(limit - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _outcome(status: int, text: str) -> dict[str, object]:
    """What a failed request got: the HTTP status and body, or the network error (a
    request that got no answer has no status)."""
    if status == 0:
        return {"error": text[:200]}
    return {"status": status, "error": text[:200]}
