"""``podpatterns run -- CMD``: supervise the main process and keep its health record.

The supervisor writes ``starting``, starts the command in its own process group, writes
``ready`` (at once, or when ``--ready-probe`` passes), heartbeats, and when the command
ends writes the tombstone and reports the exit code the shell would: the child's status,
or 128 + the signal that killed it (never -1, never a generic 1).

This module holds the mechanics (spawn, forward, reap, records). The signal *mask and
wait loop* that feeds it lives on the CLI side (:mod:`podpatterns.commands.run`): it
blocks every forwarded signal before anything else, so a signal that arrives before the
child exists stays pending and still ends in a tombstone, and none is lost to a handler
race. See docs/health.md#run.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from podpatterns import logs
from podpatterns.errors import ConfigError
from podpatterns.health.options import NAME_OPTION
from podpatterns.health.records import Check
from podpatterns.health.targets import (
    ATTEMPT_TIMEOUT,
    ExecTarget,
    ReadyTarget,
    Target,
    check_within,
    parse_target,
)
from podpatterns.health.writer import Writer
from podpatterns.options import Option, parse_choice, parse_duration

# Synchronous faults concern the supervisor itself; SIGKILL/SIGSTOP cannot be caught;
# SIGCHLD is how the supervisor learns about children. Everything else is forwarded.
_NOT_FORWARDED = {
    signal.SIGKILL,
    signal.SIGSTOP,
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGTRAP,
    signal.SIGSYS,
    signal.SIGCHLD,
}
FORWARDED: frozenset[signal.Signals] = frozenset(
    s for s in signal.Signals if s not in _NOT_FORWARDED
)
"""Every catchable signal the supervisor passes on to the command (real-time signals
between SIGRTMIN and SIGRTMAX excepted)."""

STOPPING = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT})
"""Signals that mean "shut down": the record turns ``draining`` when one is forwarded,
and one pending before the command started ends the supervisor with a tombstone."""

_PR_SET_CHILD_SUBREAPER = 36


def _probe(value: str) -> Target:
    target = parse_target(value)
    if isinstance(target, ExecTarget):
        # run reaps every child with waitpid(-1) (it may be PID 1), which would steal
        # the exit status of an exec probe from its own waiter.
        raise ValueError(
            "exec: is not supported as a --ready-probe (use tcp://, http://, grpc:// or file:)"
        )
    return target


RUN_OPTIONS: tuple[Option[Any], ...] = (
    NAME_OPTION,
    Option(
        "ready_probe",
        _probe,
        None,
        "write ready only once this target answers (tcp://, http://, grpc://, file:); "
        "default: ready as soon as the command started",
        metavar="TARGET",
        scope="run",
    ),
    Option(
        "heartbeat",
        parse_duration,
        5.0,
        "rewrite the record this often; readers judge it stale after 3 missed heartbeats",
        metavar="DURATION",
        scope="run",
    ),
    Option(
        "signal_target",
        parse_choice("group", "child"),
        "group",
        "forward signals to the command's process group (group) or to the command only",
        metavar="TARGET",
        scope="run",
    ),
)


@dataclass(frozen=True)
class RunConfig:
    """Validated settings of ``podpatterns run``.

    Attributes:
        health_dir: the shared directory (must exist).
        name: this container's name.
        command: the program and its arguments.
        ready_probe: the target that gates ``ready``, or ``None``.
        heartbeat: seconds between record rewrites.
        signal_target: ``group`` or ``child``.
    """

    health_dir: Path
    name: str
    command: tuple[str, ...]
    ready_probe: Target | None = None
    heartbeat: float = 5.0
    signal_target: str = "group"

    def __post_init__(self) -> None:
        if not self.command:
            raise ConfigError("run: no command (use: podpatterns run ... -- CMD ARGS...)")
        if not self.health_dir.is_dir():
            raise ConfigError(f"--health-dir: {str(self.health_dir)!r} is not a directory")
        if self.heartbeat <= 0:
            raise ConfigError(f"--heartbeat: {self.heartbeat!r} must be > 0")

    @classmethod
    def from_values(cls, values: dict[str, Any], command: tuple[str, ...]) -> RunConfig:
        """Build from resolved option values; name the missing required flags."""
        for required in ("health_dir", "name"):
            if values.get(required) is None:
                flag = "--" + required.replace("_", "-")
                raise ConfigError(f"{flag}: required by podpatterns run")
        return cls(
            health_dir=Path(values["health_dir"]),
            name=values["name"],
            command=command,
            ready_probe=values["ready_probe"],
            heartbeat=values["heartbeat"],
            signal_target=values["signal_target"],
        )


def exit_status_code(status: int) -> tuple[int, int | None, int | None]:
    """Map a ``waitpid`` status to ``(shell exit code, exit_code, signal)``."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return 128 + sig, None, sig
    code = os.waitstatus_to_exitcode(status)
    return code, code, None


def become_subreaper() -> bool:
    """Ask Linux to re-parent orphaned descendants to this process (so it reaps them).

    PID 1 of a PID namespace is the reaper anyway; elsewhere this is what keeps orphans
    of the command from lingering as zombies. Returns False where it is not supported.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class Supervisor:
    """Spawn the command, forward signals, reap children, keep the record.

    Not thread-safe except :meth:`probe_passed`; the CLI loop calls the rest.

    Args:
        config: the settings.
    """

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.writer = Writer(config.health_dir, config.name, interval=config.heartbeat)
        self.pid: int | None = None
        self.exit_code: int | None = None
        self.reaped_orphans = 0
        self.forwarded = 0
        self._probe_ok = threading.Event()
        self._check_changed = threading.Event()  # the probe's verdict or reason changed
        self._written = time.monotonic()  # last write of the record, on this clock
        self._log = logs.get("run", container=config.name)

    def write_starting(self) -> None:
        """The first record of this instance.

        Raises:
            ConfigError: the record cannot be written (the directory is not writable).
        """
        try:
            self.writer.set_starting()
        except OSError as exc:
            raise ConfigError(
                f"--health-dir: cannot write {self.config.name}.json in "
                f"{str(self.config.health_dir)!r}: {exc.strerror or exc}"
            ) from None
        self._log.info("run_starting", command=list(self.config.command), pid=os.getpid())

    def spawn(self) -> int | None:
        """Start the command in its own process group with default signal dispositions.

        Returns:
            ``None`` when it runs; otherwise the exit code (126 or 127 as a shell would:
            not executable / not found) after writing the tombstone.
        """
        cmd = self.config.command
        try:
            self.pid = os.posix_spawnp(
                cmd[0],
                list(cmd),
                os.environ,
                setpgroup=0,
                setsigmask=(),  # the supervisor blocks signals; the command must not
                setsigdef=FORWARDED,
            )
        except OSError as exc:
            code = 127 if exc.errno in (errno.ENOENT, errno.ENOTDIR) else 126
            reason = f"cannot execute {cmd[0]!r}: {exc.strerror or exc}"
            self._log.error("run_exec_failed", error=reason, exit_code=code)
            self._write_tombstone(code, None, reason)
            return code
        self._log.info("run_spawned", child_pid=self.pid)
        if self.config.ready_probe is None:
            self.set_ready()
        else:
            self._start_probe(self.config.ready_probe)
        return None

    def set_ready(self) -> None:
        """Write ``ready`` (once; later calls and calls while stopping do nothing)."""
        if self.writer.record.phase.value == "starting":
            self.writer.set_ready()
            self._written = time.monotonic()
            self._log.info("run_ready")

    def probe_passed(self) -> bool:
        """True once the ready probe has passed (thread-safe)."""
        return self._probe_ok.is_set()

    def _start_probe(self, target: Target) -> None:
        import asyncio

        if isinstance(target, ReadyTarget):
            target.health_dir = self.config.health_dir

        async def probe() -> None:
            delay = 0.05
            last: tuple[bool, str] | None = None
            while True:
                outcome = await check_within(target, ATTEMPT_TIMEOUT)
                at = time.time()
                self.writer.set_check(Check(target.label, outcome.ok, outcome.reason, at))
                if (outcome.ok, outcome.reason) != last:
                    last = (outcome.ok, outcome.reason)
                    self._check_changed.set()
                if outcome.ok:
                    self._probe_ok.set()
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

        # A daemon thread with its own loop: the CLI loop must never block on a probe
        # while a signal waits to be forwarded. It inherits the blocked signal mask.
        threading.Thread(target=asyncio.run, args=(probe(),), daemon=True).start()

    def tick(self) -> None:
        """Periodic work: ready when the probe passed; else a write when the probe's
        result changed or a heartbeat is due, and nothing otherwise (the CLI loop ticks
        every 50 ms while probing; the record must not be rewritten that often)."""
        starting = self.writer.record.phase.value == "starting"
        probing = starting and self.config.ready_probe is not None
        try:
            if self._probe_ok.is_set() and starting:
                self.set_ready()
            elif (
                not probing  # the loop ticks once per heartbeat then
                or self._check_changed.is_set()
                or time.monotonic() - self._written >= self.config.heartbeat
            ):
                self._check_changed.clear()
                self.writer.heartbeat()
                self._written = time.monotonic()
        except OSError as exc:
            # A full or read-only volume must not take the command down with it;
            # readers will see the record go stale, which is the truth.
            self._log.warning("record_write_failed", error=str(exc))

    def forward(self, sig: int) -> None:
        """Pass ``sig`` on to the command (its process group, by default)."""
        if self.pid is None or self.exit_code is not None:
            return
        self.forwarded += 1
        # The record says draining before the command sees the signal: a reader that
        # learns of the shutdown from the command (its logs, a closed port) must never
        # still find the record ready.
        if sig in STOPPING and self.writer.record.phase.value in ("starting", "ready"):
            try:
                self.writer.set_draining(f"{signal.Signals(sig).name} forwarded")
            except OSError as exc:
                self._log.warning("record_write_failed", error=str(exc), phase="draining")
        try:
            if self.config.signal_target == "group":
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)
        except ProcessLookupError:
            return  # already gone: its exit status is on the way
        self._log.info("run_signal_forwarded", signal=signal.Signals(sig).name)

    def reap(self) -> int | None:
        """Reap every exited child (orphans too); return the exit code once the command ended."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == self.pid:
                return self._finish(status)
            self.reaped_orphans += 1
            self._log.debug("run_orphan_reaped", pid=pid)
        return None

    def _finish(self, status: int) -> int:
        code, exit_code, sig = exit_status_code(status)
        self.exit_code = code
        reason = f"killed by {signal.Signals(sig).name}" if sig else f"exited with code {code}"
        self._write_tombstone(exit_code, sig, reason)
        self._log.info(
            "run_exited",
            exit_code=code,
            signal=sig,
            child_pid=self.pid,
            orphans_reaped=self.reaped_orphans,
            signals_forwarded=self.forwarded,
        )
        return code

    def stopped_before_start(self, sig: int) -> int:
        """A stopping signal arrived before the command started: tombstone, 128 + sig."""
        name = signal.Signals(sig).name
        self._write_tombstone(None, sig, f"{name} before the command started")
        self._log.info("run_exited", exit_code=128 + sig, signal=sig, child_pid=None)
        return 128 + sig

    def _write_tombstone(self, exit_code: int | None, sig: int | None, reason: str) -> None:
        try:
            self.writer.mark_exited(exit_code, signal=sig, reason=reason)
        except OSError as exc:
            self._log.error("record_write_failed", error=str(exc), phase="exited")
