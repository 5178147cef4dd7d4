"""The admin HTTP server: kubelet probes, Prometheus metrics and a loopback-only quit.

| path | answer |
|------|--------|
| ``GET /livez`` | 200 while the process runs |
| ``GET /startupz`` | 200 once every component has bound, 503 before |
| ``GET /readyz`` | 200 when ready to serve, 503 while starting, saturated or draining |
| ``GET /metrics`` | Prometheus text format |
| ``POST /quitquitquit`` | starts a graceful shutdown; loopback peers only (403), POST only (405) |

With ``--health-dir``, the Pod's health (:mod:`podpatterns.health.aggregate`) too:

| path | answer |
|------|--------|
| ``GET /livez/NAME``, ``/readyz/NAME``, ``/startupz/NAME`` | one container's record |
| ``GET /pod/livez``, ``/pod/readyz``, ``/pod/startupz`` | every container's records |

A component whose ``pod_probes`` attribute is true (``podpatterns health``) also answers
``/livez``, ``/readyz`` and ``/startupz`` for the whole Pod (and itself); the names in a
component's ``expected_containers`` count in the Pod's verdicts before their first record.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from podpatterns import logs, metrics
from podpatterns.errors import BindError
from podpatterns.options import HostPort, is_loopback_host

if TYPE_CHECKING:
    from podpatterns.health.aggregate import Aggregate
    from podpatterns.runtime import Runtime


def is_loopback_peer(remote: str | None) -> bool:
    """True when ``remote`` (an aiohttp ``request.remote``) is a loopback address."""
    return is_loopback_host(remote)


class AdminServer:
    """Serve the admin endpoints of one :class:`~podpatterns.runtime.Runtime`."""

    def __init__(self, runtime: Runtime, bind: HostPort) -> None:
        self._runtime = runtime
        self._bind = bind
        self._runner: web.AppRunner | None = None
        self.address: HostPort | None = None
        self.aggregate: Aggregate | None = None
        if runtime.config.health_dir is not None:
            from podpatterns.health.aggregate import Aggregate

            expected = {
                name for c in runtime.components for name in getattr(c, "expected_containers", ())
            }
            self.aggregate = Aggregate(runtime.config.health_dir, expected=expected)
        self._pod_probes = any(getattr(c, "pod_probes", False) for c in runtime.components)
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
        if self.aggregate is not None:
            for check in ("livez", "readyz", "startupz"):
                app.router.add_get(f"/pod/{check}", self._pod_check)
                app.router.add_get(f"/{check}/{{name}}", self._container_check)
        return app

    async def start(self) -> None:
        """Bind and serve.

        Raises:
            BindError: the address is in use or not permitted.
        """
        if self.aggregate is not None:
            await self.aggregate.start()
        self._runner = web.AppRunner(self.app(), handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._bind.host, self._bind.port, backlog=128)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            if self.aggregate is not None:
                await self.aggregate.close()
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
        if self.aggregate is not None:
            await self.aggregate.close()

    def _probe(self, ok: bool, check: str) -> web.Response:
        rt = self._runtime
        pod: dict[str, Any] | None = None
        if self._pod_probes and self.aggregate is not None:
            pod_ok = self.aggregate.pod_ok(check)
            pod = self.aggregate.body(check, pod_ok)
            ok = ok and pod_ok
        body: dict[str, Any] = {
            "status": "ok" if ok else "unavailable",
            "check": check,
            "phase": rt.phase.value,
            "components": {
                c.name: {"ready": c.is_ready(), "in_flight": c.in_flight()} for c in rt.components
            },
        }
        if pod is not None:
            body["containers"] = pod["containers"]
        return web.json_response(body, status=200 if ok else 503)

    async def _pod_check(self, request: web.Request) -> web.Response:
        assert self.aggregate is not None
        check = request.path.rsplit("/", 1)[1]
        ok = self.aggregate.pod_ok(check)
        return web.json_response(self.aggregate.body(check, ok), status=200 if ok else 503)

    async def _container_check(self, request: web.Request) -> web.Response:
        assert self.aggregate is not None
        check = request.path.split("/")[1]
        name = request.match_info["name"]
        ok = self.aggregate.container_ok(check, name)
        body = self.aggregate.body(check, ok, name)
        return web.json_response(body, status=200 if ok else 503)

    async def _livez(self, request: web.Request) -> web.Response:
        return self._probe(self._runtime.is_live(), "livez")

    async def _readyz(self, request: web.Request) -> web.Response:
        return self._probe(self._runtime.is_ready(), "readyz")

    async def _startupz(self, request: web.Request) -> web.Response:
        return self._probe(self._runtime.is_started(), "startupz")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=metrics.exposition(self._runtime.registry),
            headers={"Content-Type": metrics.CONTENT_TYPE},
        )

    async def _quit(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return web.json_response({"error": "use POST"}, status=405, headers={"Allow": "POST"})
        if not is_loopback_peer(request.remote):
            self._log.warning("quit_refused", peer=request.remote)
            return web.json_response({"error": "loopback peers only"}, status=403)
        self._runtime.request_shutdown("quitquitquit")
        return web.json_response({"status": "shutting down"})
