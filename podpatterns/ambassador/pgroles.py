"""Role-aware routing for PostgreSQL (``--pg-target-session-attrs``, issue 14).

Over several endpoints (a primary and its standbys), a route sends each new session to
an endpoint whose role matches the target, as libpq's ``target_session_attrs`` does for
one client, but learned ahead of the connection:

* each health interval, the ambassador's own health connection to every endpoint
  (:meth:`.postgres.PostgresHandler.open_server`, authenticated with the route's
  credentials as ``--pg-health-user``) reads the role from the ParameterStatus the server
  sends at startup, ``in_hot_standby`` and ``default_transaction_read_only``
  (PostgreSQL 14 and later), or asks ``pg_is_in_recovery()`` of an older server;
* every app session's own startup reports the same parameters, so a role change is also
  seen at once by the first session that meets it (that session is refused, 08001, and
  the next one routed by the new role);
* when an endpoint's role stops matching the target (the primary demoted, a standby
  promoted under ``standby``), ``--pg-close-on-role-change`` ends the route's sessions on
  it at their next transaction boundary with FATAL 57P01, as a drain does;
* with ``--pg-pool``, the pooled server connections follow the same roles
  (:mod:`.pgpool`): opened on an endpoint of the target role, closed when theirs stops
  serving it.

Readiness does not depend on roles: an endpoint that answers is healthy whatever its role
(``--ready-requires-upstream`` counts it), so a failover never makes the Pod unready.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from podpatterns import logs
from podpatterns.ambassador.upstreams import Endpoint

TARGETS = ("any", "read-write", "read-only", "primary", "standby", "prefer-standby")

#: What a session on an endpoint whose role changed is told (FATAL 57P01).
ROLE_CHANGED_MESSAGE = (
    "terminating connection due to administrator command (podpatterns ambassador: "
    "the server's role changed)"
)

#: The query for a server that does not report ``in_hot_standby`` (before 14).
ROLE_QUERY = b"select pg_is_in_recovery(), current_setting('default_transaction_read_only')"


@dataclass(frozen=True)
class Role:
    """What an endpoint is: a standby (in recovery) or not, read-only by default or not."""

    standby: bool
    read_only: bool

    @property
    def name(self) -> str:
        """``primary``, ``standby`` or ``read-only`` (a primary read-only by default)."""
        if self.standby:
            return "standby"
        return "read-only" if self.read_only else "primary"

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> Role | None:
        """The role the startup's ParameterStatus report, or None when the server does
        not report ``in_hot_standby`` (PostgreSQL 13 and older)."""
        standby = parameters.get("in_hot_standby")
        if standby is None:
            return None
        read_only = parameters.get("default_transaction_read_only", "off") == "on"
        return cls(standby == "on", read_only or standby == "on")


def matches(target: str, role: Role | None) -> bool:
    """Whether an endpoint of ``role`` (None: not known yet) serves ``target``.

    As libpq's ``target_session_attrs``: ``read-write`` is a server neither in hot
    standby nor read-only by default, ``read-only`` the opposite, ``primary`` not in hot
    standby, ``standby`` in hot standby; ``any`` and ``prefer-standby`` take every one.
    """
    if target in ("any", "prefer-standby"):
        return True
    if role is None:
        return False
    if target == "read-write":
        return not role.standby and not role.read_only
    if target == "read-only":
        return role.standby or role.read_only
    if target == "primary":
        return not role.standby
    return role.standby  # standby


def role_query_message() -> bytes:
    """The simple Query that asks an old server for its role."""
    body = ROLE_QUERY + b"\0"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


def parse_role_reply(reply: bytes) -> Role | None:
    """The role from the reply to :func:`role_query_message` (its DataRow), or None."""
    pos = 0
    while pos + 5 <= len(reply):
        kind = reply[pos : pos + 1]
        (length,) = struct.unpack_from("!i", reply, pos + 1)
        if kind == b"D":
            values: list[bytes] = []
            at = pos + 7  # type, length, column count (int16)
            for _ in range(2):
                (n,) = struct.unpack_from("!i", reply, at)
                values.append(reply[at + 4 : at + 4 + max(n, 0)])
                at += 4 + max(n, 0)
            standby = values[0] == b"t"
            return Role(standby, standby or values[1] == b"on")
        pos += 1 + length
    return None


class Roles:
    """The known role of each endpoint of a route, and the order they serve a target in.

    Args:
        target: one of :data:`TARGETS`.
        route: the route's name, for logs.

    Attributes:
        on_mismatch: called with an endpoint whose role stopped matching the target
            (``--pg-close-on-role-change`` ends its sessions), or None.
        on_change: called with an endpoint whose role was learned or changed (a pool
            closes its idle connections to an endpoint that no longer serves the
            target, and tries again to open one), or None.
        changes: role changes seen, by endpoint.
    """

    def __init__(self, target: str, route: str = "default") -> None:
        if target not in TARGETS:
            raise ValueError(f"target {target!r}: not one of {TARGETS}")
        self.target = target
        self.roles: dict[Endpoint, Role] = {}
        self.seen_at: dict[Endpoint, float] = {}
        self.changes: dict[Endpoint, int] = {}
        self.on_mismatch: Callable[[Endpoint], None] | None = None
        self.on_change: Callable[[Endpoint], None] | None = None
        self._log = logs.get("ambassador", route=route)

    def get(self, ep: Endpoint) -> Role | None:
        """The endpoint's last known role, or None."""
        return self.roles.get(ep)

    def update(self, ep: Endpoint, role: Role, source: str) -> None:
        """Record ``ep``'s role (from a health check or a session's startup); log and
        count a change, and report an endpoint that no longer serves the target."""
        self.seen_at[ep] = time.monotonic()
        old = self.roles.get(ep)
        if old == role:
            return
        self.roles[ep] = role
        if old is not None:
            self.changes[ep] = self.changes.get(ep, 0) + 1
        self._log.info(
            "pg_role_changed",
            upstream=str(ep),
            role=role.name,
            previous=old.name if old is not None else None,
            source=source,
            serves_target=matches(self.target, role),
        )
        if self.on_change is not None:
            self.on_change(ep)
        if (
            old is not None
            and matches(self.target, old)
            and not matches(self.target, role)
            and self.on_mismatch is not None
        ):
            self.on_mismatch(ep)

    def mismatches(self, ep: Endpoint) -> bool:
        """True when ``ep``'s role is known and does not serve the target (an unknown
        role is not held against it: its last health check may just have failed)."""
        role = self.roles.get(ep)
        return role is not None and not matches(self.target, role)

    def forget(self, ep: Endpoint) -> None:
        """The endpoint did not answer its health check: its role is unknown now."""
        old = self.roles.pop(ep, None)
        if old is not None:
            self._log.info("pg_role_unknown", upstream=str(ep), previous=old.name)

    def order(self, candidates: Sequence[Endpoint]) -> list[Endpoint]:
        """The endpoints (in the pool's order) that may serve a new session: those whose
        role matches; for ``prefer-standby``, the standbys first, then the others."""
        if self.target == "any":
            return list(candidates)
        if self.target == "prefer-standby":
            standbys = [e for e in candidates if matches("standby", self.roles.get(e))]
            return standbys + [e for e in candidates if e not in standbys]
        found = [e for e in candidates if matches(self.target, self.roles.get(e))]
        # None known to match (at start, or each was just lost): try those of unknown
        # role, as libpq tries each host; the session's own startup tells the role.
        return found or [e for e in candidates if e not in self.roles]

    def describe(self, endpoints: Sequence[Endpoint]) -> str:
        """Each endpoint's role, for an error message."""
        return ", ".join(
            f"{e} {self.roles[e].name if e in self.roles else 'unknown'}" for e in endpoints
        )
