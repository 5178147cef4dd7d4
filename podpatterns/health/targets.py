"""Checks: ``ready:NAME``, ``tcp://``, ``http(s)://``, ``grpc://``, ``file:`` and ``exec:``
targets.

``wait`` waits for them, ``run --ready-probe`` gates ``ready`` on one, and ``health``
probes with them.

Each target answers one question per :meth:`Target.check`: is it there now, and if not,
why (the reason is logged while waiting). A peer's tombstone is *fatal*: that peer will
not become ready in this instance, so waiting on makes no sense.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from podpatterns.health.reader import State, Tracker
from podpatterns.health.records import check_name, exit_summary
from podpatterns.options import parse_duration, parse_hostport, parse_http_url
from podpatterns.subproc import run_command

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
        """Check once; never raise for a failed check. Callers bound it in time
        (:func:`check_within`), and a cancelled check cleans up after itself."""


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
        status = await self._tracker.astatus(self.name)
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
            _, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            return Outcome(False, f"connect failed: {exc.strerror or exc}")
        writer.close()
        with contextlib.suppress(OSError):  # a reset after accept: it still listens
            await writer.wait_closed()
        return Outcome(True, "connected")


@dataclass(frozen=True)
class HttpTarget:
    """``http(s)://...``: a GET answers with a status in range (default 200-399, the
    kubelet's rule) and, if a body pattern is set, a body that matches it.

    Redirects are not followed (a 3xx is a status like any other). Options ride in the
    URL fragment, which is never sent:
    ``http://127.0.0.1:8080/healthz#status=200-299&body=ok``.
    """

    url: str
    label: str
    status_min: int = 200
    status_max: int = 399
    body: re.Pattern[str] | None = None

    async def check(self) -> Outcome:
        import aiohttp  # on first use: commands that never probe HTTP do not load it

        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(self.url, allow_redirects=False) as resp,
            ):
                status = resp.status
                text = await resp.text(errors="replace") if self.body is not None else ""
        except aiohttp.ClientError as exc:
            return Outcome(False, f"request failed: {exc or type(exc).__name__}")
        if not self.status_min <= status <= self.status_max:
            return Outcome(False, f"HTTP {status}")
        if self.body is not None and not self.body.search(text):
            return Outcome(False, f"HTTP {status}, body does not match {self.body.pattern!r}")
        return Outcome(True, f"HTTP {status}")


@dataclass(frozen=True)
class GrpcTarget:
    """``grpc://HOST:PORT[?service=NAME]``: ``grpc.health.v1.Health/Check`` answers
    ``SERVING``, like the kubelet's gRPC probe (plaintext, no TLS).

    The empty service (the default) asks for the server's overall health. Any other
    status, or any RPC error (``UNAVAILABLE``, ``UNIMPLEMENTED``, ``NOT_FOUND`` for an
    unknown service, ...), fails. Needs the ``grpc`` extra; grpcio is imported here, on
    first use, so podpatterns works without it.
    """

    host: str
    port: int
    label: str
    service: str = ""

    async def check(self) -> Outcome:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        # Straight to the peer, as the kubelet does: no http_proxy/grpc_proxy. The channel
        # is closed on every path, a cancel (the caller's timeout) included.
        options = [("grpc.enable_http_proxy", 0)]
        async with grpc.aio.insecure_channel(address, options=options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=self.service))
            except grpc.aio.AioRpcError as exc:
                details = exc.details() or ""
                return Outcome(
                    False, f"grpc error {exc.code().name}" + (f": {details}" if details else "")
                )
        status = str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
        return Outcome(
            resp.status == health_pb2.HealthCheckResponse.SERVING, f"grpc status {status}"
        )


def _grpc_available() -> bool:
    """Whether the ``grpc`` extra (grpcio, grpcio-health-checking) is installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("grpc", "grpc_health"))


@dataclass(frozen=True)
class FileTarget:
    """``file:PATH``: the path exists; with ``?max-age=30s`` it was also modified within
    that long (a heartbeat file the app touches)."""

    path: Path
    label: str
    max_age: float | None = None

    async def check(self) -> Outcome:
        # a stat on a hung network volume must not stall the loop
        try:
            st = await asyncio.to_thread(os.stat, self.path)
        except FileNotFoundError:
            return Outcome(False, "does not exist")
        except OSError as exc:
            return Outcome(False, f"cannot stat: {exc.strerror or exc}")
        if self.max_age is not None:
            age = time.time() - st.st_mtime
            if age > self.max_age:
                return Outcome(False, f"modified {age:.1f}s ago (max-age {self.max_age:g}s)")
        return Outcome(True, "exists")


@dataclass(frozen=True)
class ExecTarget:
    """``exec:CMD ARGS``: the command exits 0 within the timeout.

    The command runs in its own session and process group; when the check is cancelled
    (the caller's timeout) the whole group is killed (SIGKILL), so a probe script's
    children cannot pile up.
    """

    argv: tuple[str, ...]
    label: str

    async def check(self) -> Outcome:
        code, err = await run_command(self.argv)
        if code == 0:
            return Outcome(True, "exit 0")
        return Outcome(False, f"exit {code}" + (f": {err}" if err else ""))


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
        return _parse_http(text)
    if scheme == "grpc":
        return _parse_grpc(rest)
    if scheme == "file":
        parts = urlsplit(text)
        path = rest.split("?", 1)[0]
        path = path[2:] if path.startswith("//") else path
        if not path:
            raise ValueError("file: needs a path (e.g. file:/shared/ready)")
        opts = parse_qs(parts.query) if "?" in rest else {}
        unknown = set(opts) - {"max-age"}
        if unknown:
            raise ValueError(f"file: unknown option {sorted(unknown)[0]!r} (known: max-age)")
        max_age = parse_duration(opts["max-age"][-1]) if "max-age" in opts else None
        return FileTarget(Path(path), f"file:{path}", max_age)
    if scheme == "exec":
        argv = tuple(shlex.split(rest))
        if not argv:
            raise ValueError("exec: needs a command (e.g. exec:pg_isready -h 127.0.0.1)")
        return ExecTarget(argv, f"exec:{rest.strip()}")
    raise ValueError(_EXPECTED)


_EXPECTED = (
    "is not a target (ready:NAME, tcp://HOST:PORT, http://URL, https://URL, grpc://HOST:PORT, "
    "file:PATH or exec:CMD)"
)


def _parse_grpc(rest: str) -> GrpcTarget:
    if not rest.startswith("//"):
        raise ValueError(_EXPECTED)
    hostport, sep, query = rest[2:].partition("?")
    hp = parse_hostport(hostport)
    opts = parse_qs(query, keep_blank_values=True) if sep else {}
    unknown = set(opts) - {"service"}
    if unknown:
        raise ValueError(f"grpc: unknown option {sorted(unknown)[0]!r} (known: service)")
    if not _grpc_available():
        raise ValueError("needs the grpc extra (pip install 'podpatterns[grpc]')")
    service = opts["service"][-1] if "service" in opts else ""
    label = f"grpc://{hp}" + (f"?service={service}" if service else "")
    return GrpcTarget(hp.host, hp.port, label, service)


def _parse_http(text: str) -> HttpTarget:
    url, _, fragment = text.partition("#")
    parse_http_url(url)
    opts = parse_qs(fragment) if fragment else {}
    unknown = set(opts) - {"status", "body"}
    if unknown:
        raise ValueError(f"http: unknown option {sorted(unknown)[0]!r} (known: status, body)")
    lo, hi = 200, 399
    if "status" in opts:
        first, _, last = opts["status"][-1].partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise ValueError("http: status must be N or N-M (e.g. status=200-299)") from None
        if not 100 <= lo <= hi <= 599:
            raise ValueError("http: status range must lie within 100-599")
    body = None
    if "body" in opts:
        try:
            body = re.compile(opts["body"][-1])
        except re.error as exc:
            raise ValueError(f"http: body is not a valid regular expression ({exc})") from None
    return HttpTarget(url, text, lo, hi, body)


async def check_within(target: Target, seconds: float) -> Outcome:
    """Check ``target`` once, giving up (a failed check) after ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            return await target.check()
    except TimeoutError:
        return Outcome(False, f"no answer within {seconds:g}s")
