"""The ambassador: a local TCP proxy from a Pod to external services.

Use from Python::

    from podpatterns.ambassador import Ambassador, RouteConfig
    from podpatterns.options import HostPort

    amb = Ambassador([RouteConfig(listen=HostPort("127.0.0.1", 0),
                                  upstream=(HostPort("db.example.com", 5432),))])
    await amb.start()
    print(amb.tcp_address())      # the bound HostPort (the real port when 0 was asked)
    ...
    await amb.close()

or run it under a :class:`~podpatterns.runtime.Runtime` for probes, metrics and a
graceful drain.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import Histogram

from podpatterns.ambassador.config import (
    AMBASSADOR_OPTIONS,
    ROUTE_OPTIONS,
    AmbassadorConfig,
    ListenAddress,
    RouteConfig,
    UnixAddress,
)
from podpatterns.ambassador.pgmetrics import query_collector
from podpatterns.ambassador.protocol import ProtocolHandler
from podpatterns.ambassador.route import Route
from podpatterns.ambassador.upstreams import Resolver, system_resolver
from podpatterns.metrics import LATENCY_BUCKETS, NAMESPACE, CallbackCollector, Family, Sample
from podpatterns.options import HostPort

__all__ = [
    "AMBASSADOR_OPTIONS",
    "ROUTE_OPTIONS",
    "Ambassador",
    "AmbassadorConfig",
    "ProtocolHandler",
    "RouteConfig",
    "UnixAddress",
]

CONNECT_BUCKETS = LATENCY_BUCKETS


class Ambassador:
    """A :class:`~podpatterns.runtime.Component` relaying one or more routes."""

    name = "ambassador"

    def __init__(
        self,
        routes: Sequence[RouteConfig] | AmbassadorConfig,
        *,
        resolver: Resolver = system_resolver,
        handlers: Mapping[str, ProtocolHandler] | None = None,
    ) -> None:
        """Build the routes; nothing is bound before :meth:`start`.

        Args:
            routes: the routes, or a whole :class:`AmbassadorConfig`.
            resolver: name resolution for upstream hosts (default: the system's).
            handlers: a protocol handler of your own per route name, used instead of
                the one ``--protocol`` names (docs/library.md, "Your own protocol").

        Raises:
            LookupError: ``handlers`` names a route that does not exist.
        """
        if isinstance(routes, AmbassadorConfig):
            routes = routes.routes
        handlers = dict(handlers or {})
        unknown = set(handlers) - {r.name for r in routes}
        if unknown:
            raise LookupError(f"handlers: no route named {sorted(unknown)[0]!r}")
        self._connect_seconds = Histogram(
            f"{NAMESPACE}_ambassador_connect_seconds",
            "time to connect to an upstream, retries included",
            ["route"],
            buckets=CONNECT_BUCKETS,
            registry=None,
        )
        self.routes = [
            Route(cfg, self._connect_seconds, resolver, handlers.get(cfg.name)) for cfg in routes
        ]
        self._started: list[Route] = []

    @property
    def addresses(self) -> list[ListenAddress]:
        """The bound listen address of each route (real ports when 0 was asked).

        Each is a :class:`~podpatterns.options.HostPort` or a :class:`UnixAddress`; use
        :meth:`tcp_address` for a route known to listen on TCP.
        """
        return [r.listener.address for r in self.routes if r.listener is not None]

    def tcp_address(self, route: str | None = None) -> HostPort:
        """The bound TCP address of one route, with the real port when 0 was asked.

        Args:
            route: the route's ``name``; may be left out when there is only one route.

        Returns:
            The address clients connect to.

        Raises:
            LookupError: not exactly one route has that name (or ``route`` was left out
                and there are several).
            RuntimeError: the route has not been bound (before :meth:`start`), or it
                listens on a unix socket.
        """
        if route is None:
            if len(self.routes) != 1:
                names = ", ".join(r.cfg.name for r in self.routes)
                raise LookupError(f"tcp_address(): name one of the routes ({names})")
            (found,) = self.routes
        else:
            matches = [r for r in self.routes if r.cfg.name == route]
            if len(matches) != 1:
                raise LookupError(f"tcp_address(): {len(matches)} routes named {route!r}")
            (found,) = matches
        if found.listener is None:
            raise RuntimeError(f"tcp_address(): route {found.cfg.name!r} is not bound")
        address = found.listener.address
        if not isinstance(address, HostPort):
            raise RuntimeError(
                f"tcp_address(): route {found.cfg.name!r} listens on unix:{address.path}"
            )
        return address

    async def start(self) -> None:
        """Bind every route. Raises BindError; routes already bound are closed."""
        try:
            for route in self.routes:
                await route.start()
                self._started.append(route)
        except BaseException:
            await self.close()
            raise

    def is_ready(self) -> bool:
        """Every route is bound, accepting and below its connection cap (and, with
        ``ready_requires_upstream``, has an endpoint up)."""
        return bool(self._started) and all(r.is_ready() for r in self.routes)

    def is_live(self) -> bool:
        """No background loop of any route has died (DNS refresh, active health checks,
        TLS file watch, timeout sweep): each death is logged as ``task_died``."""
        return all(r.is_live() for r in self.routes)

    def stop_accepting(self) -> None:
        """Close every listener; open connections go on."""
        for route in self.routes:
            route.stop_accepting()

    def in_flight(self) -> int:
        """Open client connections over all routes."""
        return sum(r.in_flight() for r in self.routes)

    async def wait_drained(self) -> None:
        """Return once no connection is open on any route."""
        await asyncio.gather(*(r.wait_drained() for r in self.routes))

    def cut(self) -> int:
        """Reset every open connection; return how many there were."""
        return sum(r.cut() for r in self.routes)

    async def close(self) -> None:
        """Close the listeners and reset whatever connections are still open."""
        await asyncio.gather(*(r.close() for r in self._started))
        self._started = []

    def collectors(self) -> list[Any]:
        """The connect-time histogram, the per-route and per-endpoint metrics, and the
        PostgreSQL query metrics of the routes with ``--pg-metrics``."""
        pg = [(r.cfg.name, r.queries) for r in self.routes if r.queries is not None]
        return [self._connect_seconds, CallbackCollector(self._families()), query_collector(pg)]

    def _families(self) -> list[Family]:
        routes = self.routes

        def per_route(fn: Any) -> Any:
            return lambda: [((r.cfg.name,), float(fn(r))) for r in routes]

        def counter_map(attr: str) -> Any:
            def samples() -> list[Sample]:
                return [
                    ((r.cfg.name, *((k,) if isinstance(k, str) else k)), float(v))
                    for r in routes
                    for k, v in getattr(r.stats, attr).items()
                ]

            return samples

        def bytes_samples() -> list[Sample]:
            out: list[Sample] = []
            for r in routes:
                up, down = r.live_bytes()
                out.append(((r.cfg.name, "upstream"), float(r.stats.bytes_up + up)))
                out.append(((r.cfg.name, "downstream"), float(r.stats.bytes_down + down)))
            return out

        def endpoint(fn: Any) -> Any:
            return lambda: [
                ((r.cfg.name, str(e)), float(fn(e))) for r in routes for e in r.pool.endpoints
            ]

        import time

        a = "ambassador_"
        return [
            Family(
                "gauge",
                a + "connections_active",
                "open client connections",
                ("route",),
                per_route(lambda r: r.in_flight()),
            ),
            Family(
                "counter",
                a + "connections_total",
                "client connections accepted",
                ("route",),
                per_route(lambda r: r.stats.accepted),
            ),
            Family(
                "counter",
                a + "connections_refused_total",
                "connections refused before relaying",
                ("route", "reason"),
                counter_map("refused"),
            ),
            Family(
                "counter",
                a + "refusals_unanswered_total",
                "refused connections reset without an answer in the protocol's terms, "
                "because as many refusals as allowed were being answered",
                ("route",),
                per_route(lambda r: r.stats.unanswered),
            ),
            Family(
                "counter",
                a + "connections_failed_total",
                "connections closed because no upstream could be reached",
                ("route", "reason"),
                counter_map("failed"),
            ),
            Family(
                "counter",
                a + "connections_closed_total",
                "finished connections by reason",
                ("route", "reason"),
                counter_map("closed"),
            ),
            Family(
                "counter",
                a + "upstream_connect_failures_total",
                "failed connect attempts per endpoint",
                ("route", "endpoint", "reason"),
                counter_map("connect_failures"),
            ),
            Family(
                "counter",
                a + "bytes_total",
                "bytes relayed; upstream = client to upstream",
                ("route", "direction"),
                bytes_samples,
            ),
            Family(
                "gauge",
                a + "saturated",
                "1 while the connection cap is reached",
                ("route",),
                per_route(lambda r: r.saturated()),
            ),
            Family(
                "gauge",
                a + "endpoint_up",
                "1 when the endpoint is not in cool-down or failing health checks",
                ("route", "endpoint"),
                endpoint(lambda e: e.is_up(time.monotonic())),
            ),
            Family(
                "gauge",
                a + "endpoint_connections_active",
                "open connections per endpoint",
                ("route", "endpoint"),
                endpoint(lambda e: e.active),
            ),
            Family(
                "counter",
                a + "tls_reloads_total",
                "upstream TLS contexts rebuilt from disk",
                ("route",),
                per_route(lambda r: r.tls.reloads if r.tls else 0),
            ),
            Family(
                "counter",
                a + "tls_reload_failures_total",
                "TLS file changes that could not be loaded",
                ("route",),
                per_route(lambda r: r.tls.reload_failures if r.tls else 0),
            ),
        ]
