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

from podpatterns.ambassador.config import (
    AMBASSADOR_OPTIONS,
    ROUTE_OPTIONS,
    AmbassadorConfig,
    ListenAddress,
    RouteConfig,
    UnixAddress,
)
from podpatterns.ambassador.pgmetrics import query_collector
from podpatterns.ambassador.pgpool import pool_collector
from podpatterns.ambassador.protocol import ProtocolHandler
from podpatterns.ambassador.route import Route
from podpatterns.ambassador.upstreams import Resolver, system_resolver
from podpatterns.metrics import (
    LATENCY_BUCKETS,
    CallbackCollector,
    Family,
    Histogram,
    HistogramSample,
    Sample,
)
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
        self.routes = [Route(cfg, resolver, handlers.get(cfg.name)) for cfg in routes]
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
        pools = [(r.cfg.name, r.pg_pools) for r in self.routes if r.pg_pools is not None]
        return [
            CallbackCollector(self._families()),
            query_collector(pg),
            pool_collector(pools),
        ]

    def _families(self) -> list[Family | Histogram]:
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

        def connect_seconds() -> list[HistogramSample]:
            return [
                ((r.cfg.name,), r.connect_seconds.counts, r.connect_seconds.total) for r in routes
            ]

        a = "ambassador_"
        return [
            Histogram(
                a + "connect_seconds",
                "time to connect to an upstream, retries included",
                ("route",),
                CONNECT_BUCKETS,
                connect_seconds,
            ),
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
            *_credential_families(routes),
            *_role_families(routes),
        ]

    async def status(self) -> dict[str, Any]:
        """What ``GET /status`` shows: per route, its endpoints with their state and
        cool-downs, connections against the cap, connect failures by reason, the expiry
        of its configured TLS certificates, and its effective config (redacted).

        The same counters the metrics read (:meth:`collectors`); the certificate files
        are read on a worker thread.
        """
        import time

        from podpatterns.ambassador.certinfo import expiry
        from podpatterns.runtime.status import shown_config

        now = time.monotonic()
        routes: list[dict[str, Any]] = []
        reasons = [] if self._started else ["not started"]
        for r in self.routes:
            cfg = r.cfg
            tls_files = [p for p in (cfg.tls_ca, cfg.tls_cert) if p is not None]
            certs = [await asyncio.to_thread(expiry, p) for p in tls_files]
            failures: dict[str, int] = {}
            by_endpoint: dict[str, dict[str, int]] = {}
            for (endpoint, reason), n in r.stats.connect_failures.items():
                failures[reason] = failures.get(reason, 0) + n
                by_endpoint.setdefault(endpoint, {})[reason] = n
            not_ready = _route_not_ready(r)
            reasons += [f"route {cfg.name}: {why}" for why in not_ready]
            routes.append(
                {
                    "name": cfg.name,
                    "listen": str(r.listener.address) if r.listener is not None else None,
                    "protocol": cfg.protocol,
                    "relay": "splice" if r.use_splice else "protocol",
                    "ready": r.is_ready(),
                    "not_ready": not_ready,
                    "connections": {
                        "active": r.in_flight(),
                        "cap": cfg.max_connections or None,
                        "saturated": r.saturated(),
                        "accepted": r.stats.accepted,
                        "refused": dict(r.stats.refused),
                        "failed": dict(r.stats.failed),
                        "closed": dict(r.stats.closed),
                    },
                    "connect_failures": failures,
                    "endpoints": [
                        _endpoint_status(e, now, by_endpoint.get(str(e), {}))
                        for e in r.pool.endpoints
                    ],
                    "tls": None
                    if r.tls is None
                    else {
                        "verify": r.tls.verify,
                        "reloads": r.tls.reloads,
                        "reload_failures": r.tls.reload_failures,
                        "certificates": dict(
                            zip(
                                [n for n, p in (("ca", cfg.tls_ca), ("cert", cfg.tls_cert)) if p],
                                certs,
                                strict=True,
                            )
                        ),
                        "upstream": [
                            _peer_expiry(name, der, seen)
                            for name, (der, seen) in r.tls.peers.items()
                        ],
                    },
                    "config": shown_config(cfg),
                }
            )
        return {"routes": routes, "not_ready": reasons, "warnings": _warnings(routes)}


def _credential_families(routes: list[Route]) -> list[Family]:
    """The metrics of the routes whose app holds no password (``--pg-password-*``)."""

    def creds(r: Route) -> Any:
        return getattr(r.handler, "credentials", None)

    def auths() -> list[Sample]:
        return [
            ((r.cfg.name, method, result), float(n))
            for r in routes
            if creds(r) is not None
            for (method, result), n in creds(r).auths.items()
        ]

    def per_route(fn: Any) -> Any:
        return lambda: [((r.cfg.name,), float(fn(creds(r)))) for r in routes if creds(r)]

    def client_auths() -> list[Sample]:
        return [
            ((r.cfg.name, method), float(n))
            for r in routes
            if creds(r) is not None and creds(r).client_password is not None
            for method, n in creds(r).client_password.ok.items()
        ]

    a = "ambassador_pg_"
    return [
        Family(
            "counter",
            a + "upstream_auth_total",
            "authentications to the server with the ambassador's secret, by method "
            "(scram-sha-256-plus, scram-sha-256, md5, password, trust; server, none when "
            "there was none) and result (ok, rejected by the server, failed here)",
            ("route", "method", "result"),
            auths,
        ),
        Family(
            "counter",
            a + "password_rotations_total",
            "changes of --pg-password-file's content seen (applied to new server connections)",
            ("route",),
            per_route(lambda c: c.rotations),
        ),
        Family(
            "counter",
            a + "password_command_runs_total",
            "runs of --pg-password-command",
            ("route",),
            per_route(lambda c: c.command_runs[0]),
        ),
        Family(
            "counter",
            a + "password_command_failures_total",
            "runs of --pg-password-command that gave no token",
            ("route",),
            per_route(lambda c: c.command_runs[1]),
        ),
        Family(
            "counter",
            a + "client_auth_failures_total",
            "app connections refused for a wrong password (--pg-client-auth password-file)",
            ("route",),
            per_route(lambda c: c.client_rejected),
        ),
        Family(
            "counter",
            a + "client_auth_total",
            "app connections that proved their password (--pg-client-auth password-file), "
            "by method: scram-sha-256-plus, scram-sha-256 or password (cleartext)",
            ("route", "method"),
            client_auths,
        ),
    ]


def _role_families(routes: list[Route]) -> list[Family]:
    """The metrics of role-aware routing (``--pg-target-session-attrs``)."""

    def roles(r: Route) -> Any:
        return getattr(r.handler, "roles", None)

    def role_samples() -> list[Sample]:
        return [
            ((r.cfg.name, str(e), roles(r).roles[e].name), 1.0)
            for r in routes
            if roles(r) is not None
            for e in r.pool.endpoints
            if e in roles(r).roles
        ]

    def changes() -> list[Sample]:
        return [
            ((r.cfg.name, str(e)), float(roles(r).changes.get(e, 0)))
            for r in routes
            if roles(r) is not None
            for e in r.pool.endpoints
        ]

    a = "ambassador_pg_"
    return [
        Family(
            "gauge",
            a + "endpoint_role",
            "1 for the role each endpoint last reported (primary, standby, read-only); "
            "no sample while it is not known",
            ("route", "endpoint", "role"),
            role_samples,
        ),
        Family(
            "counter",
            a + "role_changes_total",
            "role changes seen per endpoint (a promotion, a demotion)",
            ("route", "endpoint"),
            changes,
        ),
    ]


CERT_WARNING = 7 * 24 * 3600.0
"""A configured certificate that expires within this many seconds is a warning."""


def _warnings(routes: list[dict[str, Any]]) -> list[str]:
    """What is wrong although the routes serve: endpoints down, certificates that
    expire soon or did."""
    out = []
    for r in routes:
        where = f"route {r['name']}"
        for e in r["endpoints"]:
            if e["state"] in ("cooldown", "unhealthy"):
                out.append(f"{where}: endpoint {e['address']} is {e['state']}")
        tls = r["tls"] or {}
        certs = [(f"{w} {c['path']}", c) for w, c in (tls.get("certificates") or {}).items()]
        certs += [
            (f"upstream {c['server_name']}'s certificate", c) for c in tls.get("upstream", [])
        ]
        for what, cert in certs:
            left = cert.get("expires_in")
            if cert.get("error"):
                out.append(f"{where}: {what}: {cert['error']}")
            elif left is not None and left < CERT_WARNING:
                state = "expired" if left <= 0 else f"expires in {left / 3600:.0f}h"
                out.append(f"{where}: {what} {state}")
    return out


def _endpoint_status(e: Any, now: float, failures: dict[str, int]) -> dict[str, Any]:
    """One endpoint as ``/status`` shows it: ``up``, ``cooldown`` (passive: a connect
    failed), ``unhealthy`` (the last active check failed) or ``unchecked`` (active
    checks on, none answered yet)."""
    if e.healthy is False:
        state = "unhealthy"
    elif now < e.down_until:
        state = "cooldown"
    elif e.healthy is None:
        state = "unchecked"
    else:
        state = "up"
    return {
        "address": str(e),
        "state": state,
        "cooldown_left": round(max(0.0, e.down_until - now), 3),
        "active": e.active,
        "connects": e.connects,
        "failures": e.failures,
        "connect_failures": failures,
        "resolved": [str(a[1][0]) for a in e.addrs],
        "resolved_age": round(now - e.resolved_at, 3) if e.resolved_at else None,
    }


def _peer_expiry(name: str, der: bytes, seen: float) -> dict[str, Any]:
    """When the certificate an upstream last presented expires."""
    import time

    from podpatterns.ambassador.certinfo import not_after

    out: dict[str, Any] = {"server_name": name, "seen_at": seen}
    try:
        out["not_after"] = not_after(der)
    except (ValueError, IndexError, UnicodeDecodeError):
        out["error"] = "certificate not understood"
        return out
    out["expires_in"] = round(out["not_after"] - time.time(), 1)
    return out


def _route_not_ready(r: Route) -> list[str]:
    """Why a route is not ready (the conditions of :meth:`Route.is_ready`), or nothing."""
    if r.is_ready():
        return []
    if r.listener is None:
        return ["not bound"]
    if r.saturated():
        return [f"saturated: {r.in_flight()}/{r.cfg.max_connections} connections"]
    if r.cfg.ready_requires_upstream and not r.pool.any_healthy():
        return ["no endpoint passed its last health check (--ready-requires-upstream)"]
    return ["stopped accepting (draining)"]
