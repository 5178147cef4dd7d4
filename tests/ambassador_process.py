"""``python -m podpatterns ambassador`` as a real child process, observed through its logs.

The process logs JSON events on stderr; a reader thread collects them so tests wait on
events (``route_listening``, ``upstream_resolved``, ...) instead of sleeping. The listen
and admin ports are 0 and read back from ``route_listening`` and ``admin_listening``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any

from prometheus_client.parser import text_string_to_metric_families

from podpatterns.options import HostPort, parse_hostport

Event = dict[str, Any]
START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0


class AmbassadorProcess:
    """A running ambassador: its events, its addresses, its metrics and its exit code."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.events: list[Event] = []
        self._changed = threading.Condition()
        self._eof = False
        assert proc.stderr is not None
        self._reader = threading.Thread(target=self._read, args=(proc.stderr,), daemon=True)
        self._reader.start()
        self.listen = HostPort("", 0)
        self.admin = HostPort("", 0)

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                event = {"event": "<stderr>", "line": line}
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def mark(self) -> int:
        """A position in :attr:`events`, for :meth:`wait_for` ``after``."""
        with self._changed:
            return len(self.events)

    def find(self, name: str, where: Callable[[Event], bool] | None = None, after: int = 0) -> int:
        """Index of the first event ``name`` at or after ``after`` matching ``where``, or -1."""
        with self._changed:
            for i in range(after, len(self.events)):
                ev = self.events[i]
                if ev.get("event") == name and (where is None or where(ev)):
                    return i
        return -1

    def wait_index(
        self,
        name: str,
        where: Callable[[Event], bool] | None = None,
        *,
        after: int = 0,
        timeout: float = 10.0,
    ) -> int:
        """Wait for an event ``name`` matching ``where``, logged at or after ``after``.

        Returns:
            Its index in :attr:`events`.

        Raises:
            AssertionError: the process ended or the deadline passed first; the message
                holds the log so far.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                i = self.find(name, where, after)
                if i >= 0:
                    return i
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = "the ambassador exited" if self._eof else f"not within {timeout}s"
                    raise AssertionError(f"no {name!r} event: {why}\n{self.log_text()}")
                self._changed.wait(left)

    def wait_for(
        self,
        name: str,
        where: Callable[[Event], bool] | None = None,
        *,
        after: int = 0,
        timeout: float = 10.0,
    ) -> Event:
        """The event :meth:`wait_index` finds."""
        i = self.wait_index(name, where, after=after, timeout=timeout)
        with self._changed:
            return self.events[i]

    def log_text(self, last: int = 40) -> str:
        """The last events, one JSON object a line (for failure messages)."""
        with self._changed:
            return "\n".join(json.dumps(ev) for ev in self.events[-last:])

    # -- admin endpoints ------------------------------------------------------------------

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """Every sample of ``GET /metrics``: (name, labels, value)."""
        url = f"http://{self.admin}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        return [
            (s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples named ``name`` whose labels include ``labels``."""
        return sum(
            value
            for sample, have, value in self.metrics()
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        )

    def wait_metric(
        self, name: str, ok: Callable[[float], bool], what: str, timeout: float = 10.0
    ) -> float:
        """Poll ``GET /metrics`` until the sum of ``name`` satisfies ``ok``; return it."""
        deadline = time.monotonic() + timeout
        while not ok(value := self.metric(name)):
            if time.monotonic() >= deadline:
                raise AssertionError(f"{name} = {value:g}: not {what} within {timeout}s")
            time.sleep(0.02)
        return value

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Return once no connection is open through the ambassador."""
        active = "podpatterns_ambassador_connections_active"
        self.wait_metric(active, lambda n: n == 0, "0", timeout)

    # -- lifecycle --------------------------------------------------------------------------

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """Send SIGTERM, wait for the exit and return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout)
        return code

    def kill(self) -> None:
        """SIGKILL the process if it still runs, reap it and close its stderr pipe."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)
        self._reader.join(STOP_TIMEOUT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def ambassador_argv(upstreams: Sequence[str], *extra: str) -> list[str]:
    """The command line: listen and admin on 127.0.0.1 port 0, JSON logs, no delay."""
    argv = [sys.executable, "-m", "podpatterns", "ambassador", "--listen", "127.0.0.1:0"]
    for upstream in upstreams:
        argv += ["--upstream", upstream]
    return [
        *argv,
        "--admin",
        "127.0.0.1:0",
        "--shutdown-delay",
        "0",
        "--log-format",
        "json",
        *extra,
    ]


@contextlib.contextmanager
def run_ambassador(
    upstreams: Sequence[str], *extra: str, prefix: Sequence[str] = ()
) -> Iterator[AmbassadorProcess]:
    """Start the ambassador and yield it once it listens.

    Args:
        upstreams: ``HOST:PORT`` of each ``--upstream``.
        extra: more command-line arguments.
        prefix: a command that execs the rest (``unshare ...``).

    On exit it is SIGKILLed if the test did not stop it already.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PODPATTERNS_")}
    proc = subprocess.Popen(
        [*prefix, *ambassador_argv(upstreams, *extra)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    amb = AmbassadorProcess(proc)
    try:
        amb.listen = parse_hostport(
            amb.wait_for("route_listening", timeout=START_TIMEOUT)["listen"]
        )
        amb.admin = parse_hostport(
            amb.wait_for("admin_listening", timeout=START_TIMEOUT)["address"]
        )
        yield amb
    finally:
        amb.kill()
