"""Real subprocesses for tests, followed through their structured (JSON) log events.

:class:`Proc` starts any program -- a ``podpatterns`` command (the default), a Python
script, a binary -- in a session of its own. A reader thread collects its stderr, so a
test waits on the event it needs (``route_listening``, ``wait_blocked``, ...) instead of
sleeping; a wait fails at once, with the log so far, when the process ends first. At
teardown (:meth:`Proc.stop`) it is SIGKILLed by its process group, whose id is the PID
it was started with: nothing else is ever signalled.

:func:`run` and :func:`run_python` run a command to completion instead.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from tests.waiting import TIMEOUT

Event = dict[str, Any]
#: The program :class:`Proc` runs unless told: this interpreter's ``podpatterns``.
PODPATTERNS: tuple[str, ...] = (sys.executable, "-m", "podpatterns")


def clean_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without the developer's ``PODPATTERNS_*`` settings, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PODPATTERNS_")}
    return {**base, **(env or {})}


class Proc:
    """A running subprocess: its log events, its signals, its exit code.

    Args:
        args: the arguments of ``program`` (for podpatterns: the subcommand and its flags).
        env: variables added to the environment (``PODPATTERNS_*`` of the test run's own
            environment are dropped; ``PODPATTERNS_LOG_FORMAT=json`` is set).
        tail: arguments after ``args``. podpatterns commands end in ``--log-format json``
            by default; commands that end in ``-- CMD`` pass ``()`` (the environment
            variable sets the format then). Pass ``()`` for other programs.
        prefix: a command that wraps the process and execs it (``unshare ...``).
        program: what runs, default :data:`PODPATTERNS`; e.g. ``(sys.executable,)`` for a
            script, ``("nginx",)`` for a binary.
        stdout: where stdout goes; a pipe by default (``self.p.stdout``). A process that
            writes much to stdout needs ``subprocess.DEVNULL`` or a file, or a reader.
        preexec_fn: run in the child before exec (e.g. to block a signal).
    """

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        tail: Sequence[str] = ("--log-format", "json"),
        prefix: Sequence[str] = (),
        program: Sequence[str] = PODPATTERNS,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        preexec_fn: Callable[[], object] | None = None,
    ) -> None:
        self.argv = [*prefix, *program, *args, *tail]
        self.p = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=clean_env({"PODPATTERNS_LOG_FORMAT": "json", **(env or {})}),
            preexec_fn=preexec_fn,
            start_new_session=True,
        )
        #: Every stderr line, as written.
        self.lines: list[str] = []
        #: The stderr lines that are JSON objects, parsed.
        self.events: list[Event] = []
        self._changed = threading.Condition()
        self._eof = False
        assert self.p.stderr is not None
        self._reader = threading.Thread(target=self._read, args=(self.p.stderr,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            with self._changed:
                self.lines.append(line)
                if isinstance(event, dict):
                    self.events.append(event)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    # -- events -----------------------------------------------------------------------------

    def mark(self) -> int:
        """A position in :attr:`events`, for ``after`` (events logged from now on)."""
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
        timeout: float = TIMEOUT,
    ) -> int:
        """Wait for an event ``name`` matching ``where``, logged at or after ``after``.

        Returns:
            Its index in :attr:`events`.

        Raises:
            AssertionError: the process closed stderr (exited) or the deadline passed
                first; the message holds the log so far.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                i = self.find(name, where, after)
                if i >= 0:
                    return i
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = "the process exited" if self._eof else f"not within {timeout:g}s"
                    raise AssertionError(f"no {name!r} event: {why}\n{self.log_text()}")
                self._changed.wait(left)

    def wait_event(
        self,
        name: str,
        where: Callable[[Event], bool] | None = None,
        *,
        after: int = 0,
        timeout: float = TIMEOUT,
    ) -> Event:
        """The first event ``name`` matching ``where`` (already logged or to come).

        Raises:
            AssertionError: as :meth:`wait_index`.
        """
        i = self.wait_index(name, where, after=after, timeout=timeout)
        with self._changed:
            return self.events[i]

    def log_text(self, last: int = 60) -> str:
        """The last stderr lines (for failure messages)."""
        with self._changed:
            return "\n".join(self.lines[-last:])

    def listen_port(self) -> int:
        """The TCP port of the (first) route, from its route_listening event."""
        return int(str(self.wait_event("route_listening")["listen"]).rsplit(":", 1)[1])

    def admin_url(self) -> str:
        """The admin server's base URL."""
        return "http://" + str(self.wait_event("admin_listening")["address"])

    # -- lifecycle --------------------------------------------------------------------------

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process (not to its group)."""
        self.p.send_signal(sig)

    def wait(self, timeout: float = TIMEOUT) -> int:
        """Wait for exit and for the end of its stderr; return the exit code."""
        code = self.p.wait(timeout)
        self._reader.join(timeout)
        return code

    def terminate(self, timeout: float = TIMEOUT) -> int:
        """SIGTERM (unless it already exited), then the exit code."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def stop(self) -> None:
        """Teardown: SIGKILL the process and its descendants if it still runs; reap it.

        Descendants in process groups of their own (``podpatterns run`` starts its command
        in one) would outlive a signal to the group and keep stderr open, so they are
        found through ``/proc`` while the process, still unreaped, holds the tree
        together; its PID and theirs cannot name anyone else's processes then.
        """
        if self.p.poll() is None:
            for pid in [*_descendants(self.p.pid), self.p.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait(TIMEOUT)
        self._reader.join(TIMEOUT)
        if self.p.stdout is not None:
            self.p.stdout.close()
        # Closing stderr while the reader thread is blocked reading it would block on
        # the file's lock for as long as someone holds the pipe open: leave it then.
        if self.p.stderr is not None and not self._reader.is_alive():
            self.p.stderr.close()


def _descendants(pid: int) -> list[int]:
    """The PIDs of ``pid``'s children, grandchildren, ... (children first)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            found += children
            todo += children
    return found


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
