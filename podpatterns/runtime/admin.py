"""The admin HTTP server: kubelet probes, Prometheus metrics and a loopback-only quit.

| path | answer |
|------|--------|
| ``GET /livez`` | 200 while the process runs |
| ``GET /startupz`` | 200 once every component has bound, 503 before |
| ``GET /readyz`` | 200 when ready to serve, 503 while starting, saturated or draining |
| ``GET /metrics`` | Prometheus text format, or OpenMetrics when the scraper accepts it |
| ``POST /quitquitquit`` | starts a graceful shutdown; loopback peers only (403), POST only (405) |
| ``GET /status`` | live state and config as JSON, secrets redacted; loopback peers only (403) |

Given a :class:`PodView` (``--health-dir``; :mod:`podpatterns.health.aggregate` is the
implementation), the Pod's health too:

| path | answer |
|------|--------|
| ``GET /livez/NAME``, ``/readyz/NAME``, ``/startupz/NAME`` | one container's record |
| ``GET /pod/livez``, ``/pod/readyz``, ``/pod/startupz`` | every container's records |

With ``pod_probes`` (``podpatterns health``), ``/livez``, ``/readyz`` and ``/startupz``
answer for the whole Pod (and this process) too.

The server knows the runtime and the Pod only through the small Protocols below, so it
imports nothing of the runtime's lifecycle or of any feature.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry

from podpatterns import logs, metrics
from podpatterns.errors import BindError
from podpatterns.options import HostPort, is_loopback_host


class ComponentView(Protocol):
    """What a probe body shows of one component."""

    @property
    def name(self) -> str:
        """The component's name."""

    def is_ready(self) -> bool:
        """Whether it can serve now."""

    def in_flight(self) -> int:
        """Units of work open."""

    def is_live(self) -> bool:
        """False once a background task of it died."""


class StatusReporter(Protocol):
    """The optional part of a component: what ``GET /status`` shows of it.

    ``status()`` returns JSON-ready data with secrets redacted
    (:mod:`podpatterns.runtime.status`); a ``not_ready`` list in it says why the component
    is not ready, and a ``warnings`` list what is wrong although it serves (a failing
    sink, an endpoint in cool-down, a certificate about to expire). It is awaited on the
    event loop, so it reads files in a thread.
    """

    async def status(self) -> dict[str, Any]:
        """Live state and effective config of the component."""


async def component_status(component: ComponentView) -> dict[str, Any]:
    """What ``GET /status`` shows of one component: its readiness, liveness and work in
    flight, plus whatever its own ``status()`` adds (nothing for a component without)."""
    body: dict[str, Any] = {
        "ready": component.is_ready(),
        "live": component.is_live(),
        "in_flight": component.in_flight(),
    }
    status = getattr(component, "status", None)
    if callable(status):
        body.update(await status())
    if not body["ready"] and not body.get("not_ready"):
        body["not_ready"] = [f"{component.name} reports not ready"]
    return body


def _component_body(c: ComponentView) -> dict[str, Any]:
    """A component in a probe body; with ``reason`` when it says why it is not ready
    (an optional ``unready_reason()`` method: the adapter's sinks use it)."""
    body: dict[str, Any] = {"ready": c.is_ready(), "in_flight": c.in_flight()}
    why = getattr(c, "unready_reason", None)
    reason = why() if callable(why) else None
    if reason is not None:
        body["reason"] = str(reason)
    return body


class Probes(Protocol):
    """What the admin server reads of the runtime it serves."""

    @property
    def registry(self) -> CollectorRegistry:
        """The metrics registry."""

    @property
    def components(self) -> Sequence[ComponentView]:
        """The components, for the probe bodies."""

    @property
    def phase_name(self) -> str:
        """The lifecycle phase (``ready``, ``draining``...)."""

    @property
    def config(self) -> Any:
        """The runtime's settings (a dataclass; ``/status`` shows it redacted)."""

    def is_live(self) -> bool:
        """``/livez``."""

    def is_ready(self) -> bool:
        """``/readyz``."""

    def is_started(self) -> bool:
        """``/startupz``."""

    def request_shutdown(self, reason: str) -> None:
        """Start a graceful shutdown (``/quitquitquit``)."""


class PodView(Protocol):
    """The Pod's health as the records in the shared directory tell it."""

    async def start(self) -> None:
        """Read once and keep following the directory."""

    async def close(self) -> None:
        """Stop following."""

    def is_live(self) -> bool:
        """False once following the directory failed for good (its task died)."""

    def pod_ok(self, check: str) -> bool:
        """The Pod's verdict for ``livez``, ``readyz`` or ``startupz``."""

    def container_ok(self, check: str, name: str) -> bool:
        """One container's verdict."""

    def body(self, check: str, ok: bool, name: str | None = None) -> dict[str, Any]:
        """The JSON body of a verdict."""


STATUS_SCHEMA = 1
"""The version of the ``GET /status`` body (``podpatterns inspect`` reads it)."""


def is_loopback_peer(remote: str | None) -> bool:
    """True when ``remote`` (an aiohttp ``request.remote``) is a loopback address."""
    return is_loopback_host(remote)


class AdminServer:
    """Serve the admin endpoints of one :class:`~podpatterns.runtime.Runtime`.

    Args:
        runtime: what the probes, ``/metrics`` and ``/quitquitquit`` act on.
        bind: the address to listen on.
        pod: the Pod's health records, for ``/pod/*`` and ``/{check}/NAME``.
        pod_probes: the plain probes answer for the whole Pod too.
    """

    def __init__(
        self,
        runtime: Probes,
        bind: HostPort,
        *,
        pod: PodView | None = None,
        pod_probes: bool = False,
    ) -> None:
        self._runtime = runtime
        self._bind = bind
        self._runner: web.AppRunner | None = None
        self.address: HostPort | None = None
        self.pod = pod
        self._pod_probes = pod_probes and pod is not None
        self._log = logs.get("admin")
        if not bind.is_loopback:
            self._log.info(
                "admin_not_loopback",
                address=str(bind),
                note="probes and /metrics are reachable; /quitquitquit stays loopback-only",
            )

    def app(self) -> web.Application:
        """The aiohttp application (exposed for embedding and tests)."""
        app = web.Application()
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/startupz", self._startupz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_route("*", "/quitquitquit", self._quit)
        app.router.add_get("/status", self._status)
        if self.pod is not None:
            for check in ("livez", "readyz", "startupz"):
                app.router.add_get(f"/pod/{check}", self._pod_check)
                app.router.add_get(f"/{check}/{{name}}", self._container_check)
        return app

    async def start(self) -> None:
        """Bind and serve.

        Raises:
            BindError: the address is in use or not permitted.
        """
        if self.pod is not None:
            await self.pod.start()
        self._runner = web.AppRunner(self.app(), handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._bind.host, self._bind.port, backlog=128)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            if self.pod is not None:
                await self.pod.close()
            raise BindError(f"--admin: cannot bind {self._bind}: {exc.strerror or exc}") from None
        server = site._server
        assert server is not None
        sockname = server.sockets[0].getsockname()  # type: ignore[attr-defined]
        self.address = HostPort(self._bind.host, sockname[1])
        self._log.info("admin_listening", address=str(self.address))

    async def close(self) -> None:
        """Stop serving; in-flight probe requests get a short grace."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.pod is not None:
            await self.pod.close()

    def _probe(self, ok: bool, check: str) -> web.Response:
        rt = self._runtime
        pod: dict[str, Any] | None = None
        if self._pod_probes and self.pod is not None:
            pod_ok = self.pod.pod_ok(check)
            pod = self.pod.body(check, pod_ok)
            ok = ok and pod_ok
        body: dict[str, Any] = {
            "status": "ok" if ok else "unavailable",
            "check": check,
            "phase": rt.phase_name,
            "components": {c.name: _component_body(c) for c in rt.components},
        }
        if pod is not None:
            body["containers"] = pod["containers"]
        return web.json_response(body, status=200 if ok else 503)

    async def _pod_check(self, request: web.Request) -> web.Response:
        assert self.pod is not None
        check = request.path.rsplit("/", 1)[1]
        ok = self.pod.pod_ok(check)
        return web.json_response(self.pod.body(check, ok), status=200 if ok else 503)

    async def _container_check(self, request: web.Request) -> web.Response:
        assert self.pod is not None
        check = request.path.split("/")[1]
        name = request.match_info["name"]
        ok = self.pod.container_ok(check, name)
        body = self.pod.body(check, ok, name)
        return web.json_response(body, status=200 if ok else 503)

    async def _livez(self, request: web.Request) -> web.Response:
        return self._probe(self._runtime.is_live(), "livez")

    async def _readyz(self, request: web.Request) -> web.Response:
        return self._probe(self._runtime.is_ready(), "readyz")

    async def _startupz(self, request: web.Request) -> web.Response:
        return self._probe(self._runtime.is_started(), "startupz")

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = metrics.negotiate(
            self._runtime.registry, request.headers.get("Accept", "")
        )
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def status(self) -> dict[str, Any]:
        """The body of ``GET /status``: the runtime's phase and probes, why it is not
        ready, each component's :func:`component_status`, the effective runtime config
        (redacted) and, with a :class:`PodView`, every container's record."""
        from podpatterns.runtime.status import shown, shown_config

        rt = self._runtime
        components = {c.name: await component_status(c) for c in rt.components}
        not_ready: list[str] = []
        if rt.phase_name != "ready":
            not_ready.append(f"runtime phase is {rt.phase_name}")
        for name, comp in components.items():
            if not comp["ready"]:
                not_ready += [f"{name}: {why}" for why in comp["not_ready"]]
        body: dict[str, Any] = {
            "schema": STATUS_SCHEMA,
            "pid": os.getpid(),
            "time": time.time(),
            "phase": rt.phase_name,
            "live": rt.is_live(),
            "ready": rt.is_ready(),
            "started": rt.is_started(),
            "not_ready": not_ready,
            "admin": str(self.address) if self.address is not None else None,
            "components": components,
            "config": shown_config(rt.config),
        }
        if self.pod is not None:
            pod = self.pod.body("readyz", self.pod.pod_ok("readyz"))
            body["containers"] = pod["containers"]
        # Components redact their own config; this pass catches a URL with userinfo or
        # an authorization value in any other string (a probe's message, a reason).
        result: dict[str, Any] = shown(body)
        return result

    async def _status(self, request: web.Request) -> web.Response:
        if not is_loopback_peer(request.remote):
            self._log.warning("status_refused", peer=request.remote)
            return web.json_response({"error": "loopback peers only"}, status=403)
        return web.json_response(await self.status())

    async def _quit(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return web.json_response({"error": "use POST"}, status=405, headers={"Allow": "POST"})
        if not is_loopback_peer(request.remote):
            self._log.warning("quit_refused", peer=request.remote)
            return web.json_response({"error": "loopback peers only"}, status=403)
        self._runtime.request_shutdown("quitquitquit")
        return web.json_response({"status": "shutting down"})
