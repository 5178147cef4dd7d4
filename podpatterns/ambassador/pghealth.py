"""The ambassador's own health connection to each PostgreSQL endpoint (role routing).

With ``--pg-target-session-attrs`` other than ``any``, the route's active health check
(``--health-check-interval``) is not a TCP connect but a PostgreSQL session: TLS as the
route says, authenticated with the route's credentials (:mod:`.pgauth`) as
``--pg-health-user`` on ``--pg-health-database``. Its startup reports the role
(``in_hot_standby``, ``default_transaction_read_only``: PostgreSQL 14 and later); an
older server is asked ``pg_is_in_recovery()``. The session then ends with a Terminate.
An endpoint is healthy when that worked, whatever its role: the role only steers new
sessions (:mod:`.pgroles`).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct

from podpatterns import logs
from podpatterns.ambassador.pgauth import ServerError, startup_message
from podpatterns.ambassador.pgroles import Role, Roles, parse_role_reply, role_query_message
from podpatterns.ambassador.postgres import PostgresHandler
from podpatterns.ambassador.protocol import Failure, Stream, TLSStream
from podpatterns.ambassador.upstreams import Endpoint, UpstreamPool

TERMINATE = b"X\x00\x00\x00\x04"


class RoleCheck:
    """One health check of an endpoint: a PostgreSQL session that learns its role.

    Args:
        handler: the route's postgres handler (TLS settings, credentials).
        pool: the route's endpoints (addresses, resolved names).
        roles: where the roles go.
        user: the role to log in as (``--pg-health-user``).
        database: the database (``--pg-health-database``).
        route: the route's name, for logs.
    """

    def __init__(
        self,
        handler: PostgresHandler,
        pool: UpstreamPool,
        roles: Roles,
        user: str,
        database: str,
        route: str = "default",
    ) -> None:
        self.handler = handler
        self.pool = pool
        self.roles = roles
        self.startup = startup_message(user, database, application_name="podpatterns-health")
        self._log = logs.get("ambassador", route=route)
        self._last_error: dict[Endpoint, str] = {}

    async def __call__(self, ep: Endpoint) -> bool:
        """Check ``ep`` (within the caller's timeout): True when a session could be had."""
        loop = asyncio.get_running_loop()
        error = ""
        try:
            for family, addr in await self.pool.addresses(ep):
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                tls: TLSStream | None = None
                try:
                    await loop.sock_connect(sock, addr)
                    stream, tls, session = await self.handler.open_server(sock, ep, self.startup)
                    role = Role.from_parameters(session.parameters)
                    if role is None:
                        role = await self._ask(stream)
                    await stream.write(TERMINATE)
                    self.roles.update(ep, role, "health_check")
                    self._last_error.pop(ep, None)
                    return True
                except ServerError as exc:
                    error = f"{exc.sqlstate}: {exc.fields.get('M', '')}"
                except Failure as exc:
                    error = exc.message
                except (OSError, ssl.SSLError) as exc:
                    error = str(exc) or type(exc).__name__
                finally:
                    if tls is not None:
                        tls.transport.abort()
                    sock.close()
        except OSError as exc:  # the name did not resolve
            error = str(exc)
        self.roles.forget(ep)
        if self._last_error.get(ep) != error:
            self._last_error[ep] = error
            self._log.warning("pg_health_check_failed", upstream=str(ep), error=error)
        return False

    @staticmethod
    async def _ask(stream: Stream) -> Role:
        """``pg_is_in_recovery()`` of a server that does not report ``in_hot_standby``."""
        await stream.write(role_query_message())
        reply = b""
        while not _ends_with_ready(reply):
            more = await stream.read()
            if not more:
                raise ConnectionResetError("the server closed the health connection")
            reply += more
        role = parse_role_reply(reply)
        if role is None:
            raise ConnectionResetError("no role in the reply to pg_is_in_recovery()")
        return role


def _ends_with_ready(reply: bytes) -> bool:
    """True when ``reply`` is whole messages, the last a ReadyForQuery."""
    pos, last = 0, b""
    while pos + 5 <= len(reply):
        (length,) = struct.unpack_from("!i", reply, pos + 1)
        if pos + 1 + length > len(reply):
            return False
        last = reply[pos : pos + 1]
        pos += 1 + length
    return pos == len(reply) and last == b"Z"
