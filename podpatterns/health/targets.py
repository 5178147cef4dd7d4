"""What ``wait`` and ``run --ready-probe`` wait for: ``ready:``, ``tcp://``, ``http://``, ``file:``.

Each target answers one question per :meth:`Target.check`: is it there now, and if not,
why (the reason is logged while waiting). A peer's tombstone is *fatal*: that peer will
not become ready in this instance, so waiting on makes no sense.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from podpatterns.health.records import State, Tracker, check_name, exit_summary
from podpatterns.options import parse_hostport

ATTEMPT_TIMEOUT = 2.0
"""Longest single attempt (connect, HTTP request); the overall deadline still applies."""


@dataclass(frozen=True)
class Outcome:
    """The result of one check.

    Attributes:
        ok: the target is there.
        reason: why not (or a short success note).
        fatal: set when waiting on is pointless (a waited-for peer has exited).
    """

    ok: bool
    reason: str = ""
    fatal: bool = False


class Target(Protocol):
    """One thing to wait for."""

    @property
    def label(self) -> str:
        """How logs and errors name the target."""

    async def check(self) -> Outcome:
        """Check once, within :data:`ATTEMPT_TIMEOUT`; never raise for a failed check."""


@dataclass
class ReadyTarget:
    """``ready:NAME``: the peer's record says ready, with a fresh heartbeat."""

    name: str
    health_dir: Path | None = None
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or f"ready:{self.name}"
        self._tracker: Tracker | None = None

    async def check(self) -> Outcome:
        if self.health_dir is None:
            raise RuntimeError("ReadyTarget.check() before health_dir was set")
        if self._tracker is None:
            self._tracker = Tracker(self.health_dir)
        status = self._tracker.status(self.name)
        if status.ready:
            return Outcome(True, "ready")
        if status.state is State.EXITED and status.record is not None:
            return Outcome(False, "exited " + exit_summary(status.record), fatal=True)
        return Outcome(False, status.describe())


@dataclass(frozen=True)
class TcpTarget:
    """``tcp://HOST:PORT``: a TCP connection is accepted."""

    host: str
    port: int
    label: str

    async def check(self) -> Outcome:
        try:
            async with asyncio.timeout(ATTEMPT_TIMEOUT):
                _, writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError:
            return Outcome(False, f"connect timed out after {ATTEMPT_TIMEOUT:g}s")
        except OSError as exc:
            return Outcome(False, f"connect failed: {exc.strerror or exc}")
        writer.close()
        with contextlib.suppress(OSError):  # a reset after accept: it still listens
            await writer.wait_closed()
        return Outcome(True, "connected")


@dataclass(frozen=True)
class HttpTarget:
    """``http(s)://...``: a GET answers with a status in 200-399 (the kubelet's rule)."""

    url: str
    label: str

    async def check(self) -> Outcome:
        timeout = aiohttp.ClientTimeout(total=ATTEMPT_TIMEOUT)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(self.url, allow_redirects=False) as resp,
            ):
                status = resp.status
        except TimeoutError:
            return Outcome(False, f"no answer within {ATTEMPT_TIMEOUT:g}s")
        except aiohttp.ClientError as exc:
            return Outcome(False, f"request failed: {exc or type(exc).__name__}")
        if 200 <= status < 400:
            return Outcome(True, f"HTTP {status}")
        return Outcome(False, f"HTTP {status}")


@dataclass(frozen=True)
class FileTarget:
    """``file:PATH``: the path exists (a file, directory or socket)."""

    path: Path
    label: str

    async def check(self) -> Outcome:
        # a stat on a hung network volume must not stall the loop
        if await asyncio.to_thread(os.path.exists, self.path):
            return Outcome(True, "exists")
        return Outcome(False, "does not exist")


def parse_target(text: str) -> Target:
    """Parse one ``--for`` value.

    Raises:
        ValueError: with what is expected (the caller names the flag).
    """
    text = text.strip()
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if not sep:
        raise ValueError(_EXPECTED)
    if scheme == "ready":
        try:
            return ReadyTarget(check_name(rest))
        except ValueError as exc:
            raise ValueError(f"ready:NAME: {exc}") from None
    if scheme == "tcp":
        if not rest.startswith("//"):
            raise ValueError(_EXPECTED)
        hp = parse_hostport(rest[2:])
        return TcpTarget(hp.host, hp.port, f"tcp://{hp}")
    if scheme in ("http", "https"):
        parts = urlsplit(text)
        if not parts.hostname:
            raise ValueError("is not an HTTP URL (e.g. http://127.0.0.1:8080/healthz)")
        return HttpTarget(text, text)
    if scheme == "file":
        path = rest[2:] if rest.startswith("//") else rest
        if not path:
            raise ValueError("file: needs a path (e.g. file:/shared/ready)")
        return FileTarget(Path(path), f"file:{path}")
    raise ValueError(_EXPECTED)


_EXPECTED = "is not a target (ready:NAME, tcp://HOST:PORT, http://URL, https://URL or file:PATH)"
