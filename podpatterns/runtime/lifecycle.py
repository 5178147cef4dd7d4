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
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry

from podpatterns import logs, metrics
from podpatterns.options import HostPort
from podpatterns.runtime.config import RuntimeConfig
from podpatterns.tasks import TaskSet

if TYPE_CHECKING:
    # aiohttp loads only when an admin server is made: a command's parser and a
    # component without one stay lighter (the idle-RSS test in tests/test_cli.py).
    from podpatterns.runtime.admin import AdminServer, PodView


class Shutdown(str):
    """Why a runtime shut down, and the exit code the process should end with.

    It is the reason's text (``SIGTERM``, ``quitquitquit``, ``exit-with:NAME``...), so it
    compares, logs and prints as that text, and carries :attr:`exit_code` beside it
    (cloud-sql-proxy's ``exitError`` is the model): the process entry returns the code
    the shutdown carries instead of working it out from the reason's wording.
    """

    exit_code: int
    """The process exit code for this shutdown (0 for a graceful stop)."""

    def __new__(cls, reason: str, exit_code: int = 0) -> Shutdown:
        """Args:
        reason: what asked for the shutdown.
        exit_code: the process exit code for it (0 for a graceful stop).
        """
        self = super().__new__(cls, reason)
        self.exit_code = exit_code
        return self

    @property
    def reason(self) -> str:
        """The reason as a plain string."""
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Shutdown({self.reason!r}, exit_code={self.exit_code})"


class Component(Protocol):
    """What the runtime needs from a component (ambassador, adapter, ...).

    Optionally, ``async def status(self) -> dict``: the component's live state and
    effective config for ``GET /status``, secrets redacted, with a ``not_ready`` list
    saying why it is not ready (:class:`~podpatterns.runtime.admin.StatusReporter`). A
    component without one is shown by its readiness, liveness and work in flight.
    """

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

    def is_live(self) -> bool:
        """False once something the component cannot recover from happened (a background
        task died); ``/livez`` turns 503 and the kubelet restarts the container."""

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


Trigger = Callable[[], Awaitable[str | Shutdown]]
"""An awaitable that returns (with a reason, or a :class:`Shutdown` carrying an exit code)
when the runtime should shut down."""


class Runtime:
    """Run components through their lifecycle, with an optional admin server.

    Usable inside any running event loop::

        runtime = Runtime(RuntimeConfig(admin=None), [ambassador])
        await runtime.start()        # binds; raises BindError
        ...                          # serve: it runs on the loop already
        await runtime.shutdown()     # graceful: drain, then close

    or ``await runtime.run()``, which starts, waits for :meth:`request_shutdown` (or a
    trigger), then shuts down.

    Args:
        config: the shared settings.
        components: what it runs, started in order and stopped together.
        triggers: async callables started once everything is bound; the first to
            return asks for the shutdown (with its reason or :class:`Shutdown`).
        collectors: more Prometheus collectors for :attr:`registry` (a trigger's).
        pod: the Pod's health records, for the admin server's ``/pod/*`` and
            ``/{check}/NAME`` endpoints (:func:`podpatterns.health.pod_runtime` makes it).
        pod_probes: the plain probes answer for the whole Pod too (``podpatterns health``).
    """

    def __init__(
        self,
        config: RuntimeConfig,
        components: Sequence[Component],
        *,
        triggers: Sequence[Trigger] = (),
        collectors: Sequence[Any] = (),
        pod: PodView | None = None,
        pod_probes: bool = False,
    ) -> None:
        self.config = config
        self.components = list(components)
        self.registry: CollectorRegistry = metrics.new_registry()
        self.phase = Phase.NEW
        self.shutdown_request: Shutdown | None = None
        self.cut_total = 0
        self.pod = pod
        self.pod_probes = pod_probes
        self._triggers = list(triggers)
        self._trigger_tasks = TaskSet("runtime")
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._stopped = asyncio.Event()
        self._admin: AdminServer | None = None
        self._started_at = time.monotonic()
        self._log = logs.get("runtime")
        self.collectors: list[Any] = [
            metrics.CallbackCollector(
                [
                    metrics.Family(
                        "gauge",
                        "runtime_phase",
                        "1 for the current lifecycle phase",
                        ("phase",),
                        lambda: [((p.value,), float(p is self.phase)) for p in Phase],
                    ),
                    metrics.counter(
                        "drain_cut",
                        "units of work cut at the drain deadline",
                        lambda: self.cut_total,
                    ),
                ]
            ),
            *(c for comp in self.components for c in comp.collectors()),
            *collectors,
        ]
        """Every collector registered in :attr:`registry` (besides the process metrics)."""
        for collector in self.collectors:
            self.registry.register(collector)

    # -- lifecycle --------------------------------------------------------------------

    @property
    def admin_address(self) -> HostPort | None:
        """The bound admin address (with the real port when 0 was asked), or None."""
        return None if self._admin is None else self._admin.address

    def admin_server(self, bind: HostPort) -> AdminServer:
        """The admin server of this runtime on ``bind`` (:meth:`start` makes and starts
        one when ``config.admin`` is set; a test or a program can serve its app)."""
        from podpatterns.runtime.admin import AdminServer

        return AdminServer(self, bind, pod=self.pod, pod_probes=self.pod_probes)

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
                self._admin = self.admin_server(self.config.admin)
                await self._admin.start()
        except BaseException:
            for comp in reversed(started):
                await comp.close()
            self._set_phase(Phase.STOPPED)
            self._stopped.set()
            self._ready.set()  # wake waiters: start is over, even though it failed
            raise
        for n, trigger in enumerate(self._triggers):
            self._trigger_tasks.spawn(self._watch_trigger(trigger), f"trigger-{n}", may_return=True)
        self._set_phase(Phase.READY)
        self._ready.set()

    async def wait_started(self) -> None:
        """Return once :meth:`start` has bound everything (for ``run()`` in a task)."""
        await self._ready.wait()

    async def _watch_trigger(self, trigger: Trigger) -> None:
        self.request_shutdown(await trigger())

    @property
    def shutdown_reason(self) -> str | None:
        """The reason of the requested shutdown as text, or ``None`` while none was."""
        return None if self.shutdown_request is None else self.shutdown_request.reason

    def request_shutdown(self, reason: str | Shutdown = "requested") -> None:
        """Ask for a graceful shutdown; idempotent and safe from signal handlers.

        Args:
            reason: a text (exit code 0) or a :class:`Shutdown` with its exit code.
        """
        if self._stop.is_set():
            return
        self.shutdown_request = reason if isinstance(reason, Shutdown) else Shutdown(reason)
        self._log.info(
            "shutdown_requested",
            reason=self.shutdown_request.reason,
            exit_code=self.shutdown_request.exit_code,
        )
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
        self.request_shutdown(self.shutdown_request or "shutdown")
        self._set_phase(Phase.DRAINING)
        self._trigger_tasks.cancel()
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
        await self._trigger_tasks.aclose()
        self._set_phase(Phase.STOPPED)
        self._stopped.set()

    # -- probes -----------------------------------------------------------------------

    def is_live(self) -> bool:
        """Liveness: not stopped, no trigger died, and every component is live."""
        return (
            self.phase is not Phase.STOPPED
            and self._trigger_tasks.healthy
            and (self.pod is None or self.pod.is_live())
            and all(c.is_live() for c in self.components)
        )

    @property
    def phase_name(self) -> str:
        """The lifecycle phase as text (for probe bodies)."""
        return self.phase.value

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
