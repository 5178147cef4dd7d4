"""Upstream endpoints: name resolution that expires, balancing, and health.

* DNS names are re-resolved every ``dns_refresh`` seconds in the background and at once
  after a connect failure, so an address change is followed (never cached forever).
* Passive health: an endpoint whose connect failed is skipped for ``fail_cooldown``.
* Active health (optional): a TCP connect to every endpoint each interval.
* Endpoints that are down are still tried last: when everything looks down, trying beats
  refusing.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from podpatterns import logs
from podpatterns.options import HostPort

SockAddr = tuple[Any, ...]
Resolver = Callable[[str, int], Awaitable[list[tuple[int, SockAddr]]]]


async def system_resolver(host: str, port: int) -> list[tuple[int, SockAddr]]:
    """Resolve with the system resolver (getaddrinfo), TCP addresses only."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[tuple[int, SockAddr]] = []
    for family, _, _, _, addr in infos:
        if (family, addr) not in seen:
            seen.append((family, addr))
    return seen


def _literal(host: str, port: int) -> list[tuple[int, SockAddr]] | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 6:
        return [(socket.AF_INET6, (host, port, 0, 0))]
    return [(socket.AF_INET, (host, port))]


class Endpoint:
    """One configured upstream with its resolved addresses and health."""

    __slots__ = (
        "active",
        "address",
        "addrs",
        "connects",
        "down_until",
        "failures",
        "healthy",
        "resolved_at",
    )

    def __init__(self, address: HostPort, *, checked: bool = False) -> None:
        self.address = address
        self.addrs: list[tuple[int, SockAddr]] = _literal(address.host, address.port) or []
        self.resolved_at = time.monotonic() if self.addrs else 0.0
        self.down_until = 0.0  # passive: skipped until then
        # The last active check's verdict: True when checks are off; None while they are
        # on but none has answered yet (routable, but not proof for readiness).
        self.healthy: bool | None = None if checked else True
        self.active = 0  # open connections through it
        self.connects = 0
        self.failures = 0

    @property
    def is_literal(self) -> bool:
        return _literal(self.address.host, self.address.port) is not None

    def is_up(self, now: float) -> bool:
        """Routable now: not failed by an active check, not in a passive cooldown."""
        return self.healthy is not False and now >= self.down_until

    def __str__(self) -> str:
        return str(self.address)


class UpstreamPool:
    """The endpoints of one route, ordered for each new connection by the policy."""

    def __init__(
        self,
        addresses: Sequence[HostPort],
        *,
        policy: str = "failover",
        dns_refresh: float = 30.0,
        fail_cooldown: float = 10.0,
        resolver: Resolver = system_resolver,
        route: str = "default",
        active_checks: bool = False,
    ) -> None:
        self.endpoints = [Endpoint(a, checked=active_checks) for a in addresses]
        self.policy = policy
        self.dns_refresh = dns_refresh
        self.fail_cooldown = fail_cooldown
        self.resolver = resolver
        self._rr = -1  # the first connection goes to the first endpoint
        self._log = logs.get("ambassador", route=route)
        self._resolving: dict[Endpoint, asyncio.Future[None]] = {}

    def candidates(self) -> list[Endpoint]:
        """Endpoints in the order to try: healthy ones by policy, then the rest."""
        now = time.monotonic()
        eps = self.endpoints
        if self.policy == "round_robin":
            self._rr = (self._rr + 1) % len(eps)
            eps = eps[self._rr :] + eps[: self._rr]
        elif self.policy == "least_conn":
            eps = sorted(eps, key=lambda e: e.active)  # stable: ties keep config order
        up = [e for e in eps if e.is_up(now)]
        return up + [e for e in eps if not e.is_up(now)] if len(up) < len(eps) else up

    def has_names(self) -> bool:
        """True when some endpoint is a DNS name (:meth:`refresh_loop` has work to do)."""
        return any(not e.is_literal for e in self.endpoints)

    def forget_health(self) -> None:
        """Drop every active-check verdict (the checks stopped): endpoints are routed on
        passive health alone and none counts for :meth:`any_healthy` any more."""
        for ep in self.endpoints:
            ep.healthy = None

    def any_healthy(self) -> bool:
        """True when at least one endpoint is up (for ``--ready-requires-upstream``).

        With active checks, only an endpoint whose last check passed counts: readiness
        is never granted on a guess between start and the first answer.
        """
        now = time.monotonic()
        return any(e.healthy is True and e.is_up(now) for e in self.endpoints)

    async def addresses(self, ep: Endpoint) -> list[tuple[int, SockAddr]]:
        """The endpoint's socket addresses, resolving when none are cached.

        Raises:
            OSError: resolution failed (socket.gaierror).
        """
        if not ep.addrs:
            await self.resolve(ep)
        return ep.addrs

    async def resolve(self, ep: Endpoint) -> None:
        """Re-resolve one endpoint now; concurrent callers share one lookup."""
        if ep.is_literal:
            return
        pending = self._resolving.get(ep)
        if pending is not None:
            await asyncio.shield(pending)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._resolving[ep] = fut
        try:
            addrs = await self.resolver(ep.address.host, ep.address.port)
        except OSError as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: the caller gets it below
            raise
        else:
            if addrs != ep.addrs:
                self._log.info(
                    "upstream_resolved",
                    upstream=str(ep),
                    addresses=[a[1][0] for a in addrs],
                    previous=[a[1][0] for a in ep.addrs],
                )
            ep.addrs = addrs
            ep.resolved_at = time.monotonic()
            fut.set_result(None)
        finally:
            del self._resolving[ep]

    def mark_failure(self, ep: Endpoint, reason: str) -> None:
        """Passive health: skip ``ep`` for the cool-down and re-resolve its name."""
        ep.failures += 1
        was_up = ep.is_up(time.monotonic())
        ep.down_until = time.monotonic() + self.fail_cooldown
        if not ep.is_literal:
            ep.addrs = []  # resolve again on next use
        if was_up:
            self._log.warning(
                "upstream_down", upstream=str(ep), reason=reason, cooldown=self.fail_cooldown
            )

    def mark_success(self, ep: Endpoint) -> None:
        """A connect succeeded: the endpoint is up again."""
        ep.connects += 1
        if ep.down_until:
            ep.down_until = 0.0
            self._log.info("upstream_up", upstream=str(ep))

    async def refresh_loop(self) -> None:
        """Re-resolve every name each ``dns_refresh`` seconds (runs until cancelled).

        Returns at once when every endpoint is an IP literal (see :meth:`has_names`).
        """
        names = [e for e in self.endpoints if not e.is_literal]
        if not names:
            return
        while True:
            await asyncio.sleep(self.dns_refresh)
            for ep in names:
                try:
                    await self.resolve(ep)
                except OSError as exc:
                    # keep the previous addresses: a resolver hiccup is not a new answer
                    self._log.warning("upstream_resolve_failed", upstream=str(ep), error=str(exc))

    async def health_loop(
        self,
        interval: float,
        check_timeout: float,
        check: Callable[[Endpoint], Awaitable[bool]] | None = None,
    ) -> None:
        """Active health checks of every endpoint (runs until cancelled): a TCP connect,
        or ``check`` (a protocol's own: PostgreSQL's role check, :mod:`.pghealth`).

        Build the pool with ``active_checks=True`` when this runs: its endpoints then
        start unchecked (see :meth:`any_healthy`), and the first verdict is always logged.

        A check that fails with anything but a network error or its timeout is a bug: it
        cancels the round's other checks (so no verdict lands after the loop ended) and
        ends the loop with it, for the owner to notice.
        """
        while True:
            async with asyncio.TaskGroup() as round_:
                for ep in self.endpoints:
                    round_.create_task(self._check(ep, check_timeout, check or self._tcp))
            await asyncio.sleep(interval)

    async def _tcp(self, ep: Endpoint) -> bool:
        """The TCP check: some address of ``ep`` takes a connection."""
        for family, addr in await self.addresses(ep):
            try:
                _, writer = await asyncio.open_connection(addr[0], addr[1], family=family)
            except OSError:
                continue
            writer.close()
            return True
        return False

    async def _check(
        self, ep: Endpoint, check_timeout: float, check: Callable[[Endpoint], Awaitable[bool]]
    ) -> None:
        ok = False
        try:
            async with asyncio.timeout(check_timeout):
                ok = await check(ep)
        except (OSError, TimeoutError):
            ok = False
        if ok != ep.healthy:
            ep.healthy = ok
            log = self._log.info if ok else self._log.warning
            log("upstream_health_changed", upstream=str(ep), healthy=ok)
