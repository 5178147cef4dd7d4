"""Run a podpatterns command as a real subprocess and follow its JSON log events."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class Proc:
    """A ``python -m podpatterns ...`` subprocess with its stderr events parsed."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        tail: Sequence[str] = ("--log-format", "json"),
        prefix: Sequence[str] = (),
        preexec_fn: Callable[[], object] | None = None,
    ) -> None:
        # ``tail`` follows ARGS; commands that end in ``-- CMD`` pass () and set
        # PODPATTERNS_LOG_FORMAT instead. ``prefix`` wraps the process (e.g. unshare).
        full_env = {**os.environ, "PODPATTERNS_LOG_FORMAT": "json", **(env or {})}
        self.p = subprocess.Popen(
            [*prefix, sys.executable, "-m", "podpatterns", *args, *tail],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            preexec_fn=preexec_fn,
        )
        self.events: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.p.stderr is not None
        for raw in self.p.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                self.events.append(event)
                self._q.put(event)
        self._q.put(None)

    def wait_event(self, name: str, timeout: float = 10.0) -> dict[str, Any]:
        """Return the first event called ``name`` (past or future); fail after timeout."""
        for event in self.events:
            if event.get("event") == name:
                return event
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self._q.get(timeout=left)
            except queue.Empty:
                break
            if item is None:
                break
            if item.get("event") == name:
                return item
        raise AssertionError(f"no {name!r} event; stderr so far:\n" + "\n".join(self.lines))

    def listen_port(self) -> int:
        """The TCP port of the (first) route, from its route_listening event."""
        return int(str(self.wait_event("route_listening")["listen"]).rsplit(":", 1)[1])

    def admin_url(self) -> str:
        """The admin server's base URL."""
        return "http://" + str(self.wait_event("admin_listening")["address"])

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process."""
        self.p.send_signal(sig)

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for exit and return the code."""
        code = self.p.wait(timeout)
        self._reader.join(timeout)
        return code

    def stop(self) -> None:
        """Kill the process if it still runs (test teardown)."""
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)
        self._reader.join(5)
        for stream in (self.p.stdout, self.p.stderr):
            if stream is not None:
                stream.close()


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m podpatterns ARGS`` to completion."""
    return run_python("-m", "podpatterns", *args, env=env, timeout=timeout)


def run_python(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """Run this interpreter with ARGS to completion, capturing its output as text."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )


def outputs(proc: subprocess.CompletedProcess[str]) -> str:
    """A finished process's stdout and stderr, labelled, for an assertion message."""
    return f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"


def sigterm_and_wait(proc: Proc, timeout: float = 10.0) -> int:
    """SIGTERM, then the exit code."""
    proc.signal(signal.SIGTERM)
    return proc.wait(timeout)
