"""The lifecycle every component shares: start -> ready -> serve -> drain -> stopped.

A :class:`Runtime` owns one or more :class:`Component` objects and, optionally, the admin
HTTP server. It never installs signal handlers and never exits the process: the CLI
(or an embedding application) calls :meth:`Runtime.request_shutdown`.

Shutdown, whatever asked for it (SIGTERM, ``POST /quitquitquit``, ``--exit-with``):

1. readiness turns 503 at once;
2. new work is still accepted for ``shutdown_delay`` (the app may open connections
   during its own shutdown);
3. accepting stops; in-flight work drains for at most ``drain_timeout``, and the
   runtime returns as soon as nothing is left;
4. at the deadline, what is left is cut and counted.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from podpatterns import logs, metrics
from podpatterns.errors import ConfigError
from podpatterns.options import (
    HostPort,
    Option,
    parse_bind,
    parse_choice,
    parse_duration,
    parse_int,
    parse_path,
    parse_str,
)


def _parse_quit_url(text: str) -> str:
    from podpatterns.health.exitwith import parse_quit_url

    return parse_quit_url(text)


def parse_admin(text: str) -> HostPort | None:
    """Parse the admin address; ``off`` disables the admin server."""
    return None if text.strip().lower() == "off" else parse_bind(text)


RUNTIME_OPTIONS: tuple[Option[Any], ...] = (
    Option(
        "config", parse_path, None, "YAML config file (keys are the option names)", metavar="FILE"
    ),
    # The kubelet probes the Pod IP, so the probes cannot be loopback-only by default;
    # /quitquitquit checks its peer and stays loopback-only whatever the bind address.
    Option(
        "admin",
        parse_admin,
        HostPort("0.0.0.0", 9901),
        "admin HTTP server (probes, /metrics, loopback-only /quitquitquit); 'off' disables it",
        metavar="HOST:PORT",
    ),
    Option(
        "drain_timeout",
        parse_duration,
        30.0,
        "longest time in-flight work may take to finish after shutdown starts",
        metavar="DURATION",
    ),
    Option(
        "shutdown_delay",
        parse_duration,
        2.0,
        "after SIGTERM, keep accepting new work this long (readiness is already 503)",
        metavar="DURATION",
    ),
    Option("log_level", parse_choice(*logs.LEVELS), "info", "minimum log level", metavar="LEVEL"),
    Option(
        "log_format",
        parse_choice("auto", "json", "console"),
        "auto",
        "log format on stderr; auto is console on a terminal, JSON otherwise",
        metavar="FORMAT",
    ),
    Option(
        "loop",
        parse_choice("auto", "uvloop", "asyncio"),
        "auto",
        "event loop implementation; auto uses uvloop when installed",
        metavar="LOOP",
    ),
    Option(
        "health_dir",
        parse_path,
        None,
        "shared directory of health records (used with --exit-with)",
        metavar="DIR",
    ),
    Option(
        "exit_with",
        parse_str,
        None,
        "drain and exit when this container's tombstone appears in --health-dir",
        metavar="NAME",
    ),
    Option(
        "exit_with_code",
        parse_int(0, 255),
        0,
        "exit code after an --exit-with shutdown",
        metavar="CODE",
    ),
    Option(
        "exit_with_quit",
        _parse_quit_url,
        (),
        "loopback URL of another sidecar to POST before an --exit-with shutdown "
        "(e.g. http://127.0.0.1:9091/quitquitquit)",
        multiple=True,
        metavar="URL",
    ),
)


@dataclass(frozen=True)
class RuntimeConfig:
    """Settings every component shares. Validated on construction.

    Attributes:
        admin: where the admin server binds, or ``None`` for no admin server.
        drain_timeout: seconds in-flight work may take after accepting stops.
        shutdown_delay: seconds new work is still accepted after shutdown starts.
        log_level: minimum log level (CLI only).
        log_format: ``auto``, ``json`` or ``console`` (CLI only).
        loop: ``auto``, ``uvloop`` or ``asyncio`` (CLI only).
        health_dir: the shared health-record directory.
        exit_with: name of the container whose tombstone ends this process.
        exit_with_code: the exit code after an ``exit_with`` shutdown.
        exit_with_quit: loopback URLs POSTed before an ``exit_with`` shutdown.
    """

    admin: HostPort | None = None
    drain_timeout: float = 30.0
    shutdown_delay: float = 0.0
    log_level: str = "info"
    log_format: str = "auto"
    loop: str = "auto"
    health_dir: Path | None = None
    exit_with: str | None = None
    exit_with_code: int = 0
    exit_with_quit: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.drain_timeout < 0:
            raise ConfigError(f"--drain-timeout: {self.drain_timeout!r} must be >= 0")
        if self.shutdown_delay < 0:
            raise ConfigError(f"--shutdown-delay: {self.shutdown_delay!r} must be >= 0")
        if self.exit_with and self.health_dir is None:
            raise ConfigError(f"--exit-with: {self.exit_with!r} needs --health-dir DIR")
        if self.exit_with_quit and not self.exit_with:
            raise ConfigError("--exit-with-quit: needs --exit-with NAME")

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> RuntimeConfig:
        """Build from resolved option values (see :func:`podpatterns.options.resolve`)."""
        return cls(**{k: values[k] for k in cls.__dataclass_fields__ if k in values})


class Component(Protocol):
    """What the runtime needs from a component (ambassador, adapter, ...)."""

    name: str

    async def start(self) -> None:
        """Bind listeners and open resources; raise BindError/ConfigError on failure."""

    def is_ready(self) -> bool:
        """True when the component can serve right now (after start)."""

    def stop_accepting(self) -> None:
        """Stop taking new work (close listeners); in-flight work goes on."""

    def in_flight(self) -> int:
        """How many units of work (connections, batches) are still open."""

    async def wait_drained(self) -> None:
        """Return once :meth:`in_flight` is zero."""

    def cut(self) -> int:
        """Abort what is left at the drain deadline; return how many were cut."""

    async def close(self) -> None:
        """Release every resource; called once, last."""

    def collectors(self) -> Sequence[Any]:
        """Prometheus collectors to register in the runtime's registry."""


class NothingToDrain:
    """Part of :class:`Component` for components that hold no work a drain must wait
    for (probers, watchers): nothing in flight, nothing to cut."""

    def in_flight(self) -> int:
        """Nothing is ever in flight."""
        return 0

    async def wait_drained(self) -> None:
        """Drained at once."""

    def cut(self) -> int:
        """Nothing to cut."""
        return 0


class Phase(enum.Enum):
    """Where a runtime is in its lifecycle."""

    NEW = "new"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


Trigger = Callable[[], Awaitable[str]]
"""An awaitable that returns (with a reason) when the runtime should shut down."""


class Runtime:
    """Run components through their lifecycle, with an optional admin server.

    Usable inside any running event loop::

        runtime = Runtime(RuntimeConfig(admin=None), [ambassador])
        await runtime.start()        # binds; raises BindError
        ...                          # serve: it runs on the loop already
        await runtime.shutdown()     # graceful: drain, then close

    or ``await runtime.run()``, which starts, waits for :meth:`request_shutdown` (or a
    trigger), then shuts down.
    """

    def __init__(
        self,
        config: RuntimeConfig,
        components: Sequence[Component],
        *,
        triggers: Sequence[Trigger] = (),
    ) -> None:
        self.config = config
        self.components = list(components)
        self.registry: CollectorRegistry = metrics.new_registry()
        self.phase = Phase.NEW
        self.shutdown_reason: str | None = None
        self.cut_total = 0
        self._triggers = list(triggers)
        self._trigger_tasks: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._stopped = asyncio.Event()
        self._admin: Any = None
        self._started_at = time.monotonic()
        self._log = logs.get("runtime")
        self._phase_changes: dict[str, int] = {}
        self.registry.register(
            metrics.CallbackCollector(
                [
                    metrics.Family(
                        "gauge",
                        "runtime_phase",
                        "1 for the current lifecycle phase",
                        ("phase",),
                        lambda: [((p.value,), float(p is self.phase)) for p in Phase],
                    ),
                    metrics.Family(
                        "counter",
                        "drain_cut_total",
                        "units of work cut at the drain deadline",
                        (),
                        lambda: [((), self.cut_total)],
                    ),
                ]
            )
        )
        for comp in self.components:
            for collector in comp.collectors():
                self.registry.register(collector)

    # -- lifecycle --------------------------------------------------------------------

    @property
    def admin_address(self) -> HostPort | None:
        """The bound admin address (with the real port when 0 was asked), or None."""
        return None if self._admin is None else self._admin.address

    async def start(self) -> None:
        """Start every component, then the admin server; ready once all are bound.

        Raises:
            BindError: a listener or the admin server could not bind.
        """
        if self.phase is not Phase.NEW:
            raise RuntimeError("Runtime.start() called twice")
        self._set_phase(Phase.STARTING)
        started: list[Component] = []
        try:
            for comp in self.components:
                await comp.start()
                started.append(comp)
            if self.config.admin is not None:
                from podpatterns.admin import AdminServer

                self._admin = AdminServer(self, self.config.admin)
                await self._admin.start()
        except BaseException:
            for comp in reversed(started):
                await comp.close()
            self._set_phase(Phase.STOPPED)
            self._stopped.set()
            self._ready.set()  # wake waiters: start is over, even though it failed
            raise
        for trigger in self._triggers:
            self._trigger_tasks.append(asyncio.create_task(self._watch_trigger(trigger)))
        self._set_phase(Phase.READY)
        self._ready.set()

    async def wait_started(self) -> None:
        """Return once :meth:`start` has bound everything (for ``run()`` in a task)."""
        await self._ready.wait()

    async def _watch_trigger(self, trigger: Trigger) -> None:
        reason = await trigger()
        self.request_shutdown(reason)

    def request_shutdown(self, reason: str = "requested") -> None:
        """Ask for a graceful shutdown; idempotent and safe from signal handlers."""
        if self._stop.is_set():
            return
        self.shutdown_reason = reason
        self._log.info("shutdown_requested", reason=reason)
        self._stop.set()

    async def wait_stop_requested(self) -> None:
        """Return once a shutdown was requested."""
        await self._stop.wait()

    async def run(self) -> None:
        """Start, serve until a shutdown is requested, then shut down gracefully."""
        await self.start()
        await self._stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Readiness 503 -> accept window -> stop accepting -> bounded drain -> close."""
        if self.phase in (Phase.DRAINING, Phase.STOPPED):
            await self._stopped.wait()
            return
        self.request_shutdown(self.shutdown_reason or "shutdown")
        self._set_phase(Phase.DRAINING)
        for task in self._trigger_tasks:
            task.cancel()
        if self.config.shutdown_delay > 0:
            await asyncio.sleep(self.config.shutdown_delay)
        for comp in self.components:
            comp.stop_accepting()
        left = sum(c.in_flight() for c in self.components)
        self._log.info("drain_started", in_flight=left, timeout=self.config.drain_timeout)
        try:
            async with asyncio.timeout(self.config.drain_timeout):
                await asyncio.gather(*(c.wait_drained() for c in self.components))
        except TimeoutError:
            self.cut_total += sum(c.cut() for c in self.components)
            self._log.warning(
                "drain_deadline_cut", cut=self.cut_total, timeout=self.config.drain_timeout
            )
        else:
            self._log.info("drain_finished")
        for comp in self.components:
            await comp.close()
        if self._admin is not None:
            await self._admin.close()
        await asyncio.gather(*self._trigger_tasks, return_exceptions=True)
        self._set_phase(Phase.STOPPED)
        self._stopped.set()

    # -- probes -----------------------------------------------------------------------

    def is_live(self) -> bool:
        """Liveness: the process answers and has not stopped."""
        return self.phase is not Phase.STOPPED

    def is_started(self) -> bool:
        """Startup: every component has bound."""
        return self.phase in (Phase.READY, Phase.DRAINING)

    def is_ready(self) -> bool:
        """Readiness: started, not draining, and every component says it can serve."""
        return self.phase is Phase.READY and all(c.is_ready() for c in self.components)

    def _set_phase(self, phase: Phase) -> None:
        self.phase = phase
        self._log.info(
            "runtime_phase", phase=phase.value, uptime=round(time.monotonic() - self._started_at, 3)
        )
