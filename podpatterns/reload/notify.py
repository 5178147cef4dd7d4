"""How ``reload`` tells the app: an HTTP POST, a signal to a pid, or a command.

Each notifier is one awaitable attempt that raises :class:`NotifyError` on failure;
retries, backoff and coalescing are the reloader's (:mod:`podpatterns.reload.reloader`).
"""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from podpatterns.runtime.status import redact_text
from podpatterns.subproc import run_command


class NotifyError(Exception):
    """One notification attempt failed (the message says how)."""


class Notifier(Protocol):
    """One way to tell the app that its configuration changed."""

    @property
    def label(self) -> str:
        """How logs and metrics name the target."""

    async def notify(self) -> None:
        """Tell the app once. Raises NotifyError; a cancelled attempt cleans up."""


@dataclass(frozen=True)
class HttpPost:
    """POST to a URL; any 2xx is success."""

    url: str

    @property
    def label(self) -> str:
        return f"http-post {redact_text(self.url)}"  # logs and metrics: no user:password@

    async def notify(self) -> None:
        import aiohttp  # on first use: other notifiers, and other commands, do without it

        try:
            async with aiohttp.ClientSession() as session, session.post(self.url) as resp:
                status = resp.status
        except aiohttp.ClientError as exc:
            reason = redact_text(str(exc) or type(exc).__name__)
            raise NotifyError(f"POST {redact_text(self.url)}: {reason}") from None
        if not 200 <= status < 300:
            raise NotifyError(f"POST {redact_text(self.url)}: HTTP {status}")


@dataclass(frozen=True)
class SignalPid:
    """Send a signal to the pid read from a pid file (read afresh every time)."""

    signum: signal.Signals
    pid_file: Path

    @property
    def label(self) -> str:
        return f"signal {self.signum.name} to {self.pid_file}"

    async def notify(self) -> None:
        try:
            text = await asyncio.to_thread(self.pid_file.read_text)
            pid = int(text.strip())
        except (OSError, ValueError) as exc:
            raise NotifyError(f"pid file {self.pid_file}: {exc}") from None
        if pid <= 1:
            raise NotifyError(f"pid file {self.pid_file}: refusing pid {pid}")
        try:
            os.kill(pid, self.signum)
        except OSError as exc:
            raise NotifyError(f"kill {self.signum.name} {pid}: {exc.strerror}") from None


@dataclass(frozen=True)
class Exec:
    """Run a command; exit 0 is success."""

    argv: tuple[str, ...]

    @property
    def label(self) -> str:
        return redact_text("exec " + " ".join(self.argv))

    async def notify(self) -> None:
        code, err = await run_command(self.argv)
        if code != 0:
            raise NotifyError(f"{self.argv[0]} exited {code}" + (f": {err}" if err else ""))
