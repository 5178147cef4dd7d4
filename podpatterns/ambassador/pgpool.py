"""PostgreSQL connection pooling in the ambassador (``--pg-pool session|transaction``).

Without a pool every app connection costs the ambassador a TCP connect, a TLS handshake
and an authentication exchange with the server. With one, the ambassador answers the
app's startup itself (AuthenticationOk, the server's ParameterStatus set, a
BackendKeyData it issues, ReadyForQuery) and lends the app a server connection it keeps:

* ``session``: one server connection per app connection, for as long as the app stays
  connected; when the app leaves, the server connection is reset (``--pg-pool-reset-query``,
  ``DISCARD ALL`` by default; a ``ROLLBACK`` first when the app left inside a transaction;
  none when the app sent the server nothing) and returned to the pool. A connection the
  app left mid-request is closed, not reused.
* ``transaction``: a server connection only for the length of a transaction; the
  server's ReadyForQuery ``I`` with nothing outstanding returns it. Named prepared
  statements (Parse/Bind/Describe/Close) are tracked per app connection and prepared
  again, under a name of the ambassador's, on whichever server connection serves the
  next transaction (pgbouncer 1.21's ``max_prepared_statements`` design); each server
  connection keeps at most ``--pg-pool-max-prepared`` of them, the least recently used
  closed beyond it.

Server connections are kept per pool key: the app's StartupMessage parameters (user,
database, application_name and the rest), so that two apps with different settings never
share a server session. Each key has at most ``--pg-pool-size`` connections; an app that
finds none free waits at most ``--pg-pool-wait`` and then gets ErrorResponse 53300.

With ``--pg-target-session-attrs`` (:mod:`.pgroles`) the pooled connections follow the
roles. The endpoint is *not* part of the pool key: the app asks for a role, not a
server, so one key's connections may live on several endpoints (the standbys of a
``read-only`` route), one ``--pg-pool-size`` bounds them all, and a failover moves the
pool rather than splitting it. Instead the role is checked where a connection enters or
re-enters the pool:

* a new connection is dialled as an app's session is: to an endpoint of the target role,
  and refused by its own startup when the role changed since the last check; while apps
  wait and no endpoint of the role answers (a failover under way), the open is tried
  again at the next role change or after :data:`ROLE_RETRY`, within their
  ``--pg-pool-wait``, and a wait that runs out is told why instead of 53300;
* when an endpoint's role stops serving the target (:attr:`.pgroles.Roles.on_change`,
  from the health connection or any startup), its idle connections are closed at once,
  and a lent one is closed when it comes back (``role_changed``), never lent again;
* so in transaction mode the app's next transaction runs on the new primary, and in
  session mode the app stays where it is until it leaves, or with
  ``--pg-close-on-role-change`` gets FATAL 57P01 at its next rest.

How an answer from a server is matched to what the app asked: every message the
ambassador sends is answered in order, ParseComplete (``1``) only by a Parse and
CloseComplete (``3``) only by a Close, and after an error the server skips to the next
Sync. So each Parse and Close sent is queued with the Sync group it belongs to; a
ParseComplete for a Parse the ambassador added is dropped, and a CloseComplete for a
stand-in Close (a Close of a statement name no one uses, which PostgreSQL answers without
error) is turned into the ParseComplete the app expects for a statement the server
connection already had. At each ReadyForQuery the entries of its group left unanswered
are dropped.

Reference: https://www.postgresql.org/docs/current/protocol-flow.html,
https://www.pgbouncer.org/config.html#max_prepared_statements.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import socket
import struct
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from podpatterns.ambassador.connection import Connection, reset_socket
from podpatterns.ambassador.deadlines import Deadlines
from podpatterns.ambassador.dial import DialError
from podpatterns.ambassador.pgauth import ServerError, startup_parameters
from podpatterns.ambassador.pgmetrics import (
    ERROR_HEAD,
    TEXT_HEAD,
    QueryCycles,
    QueryMetrics,
    QueryStats,
    SlowQueries,
    parse_text,
)
from podpatterns.ambassador.pgroles import ROLE_CHANGED_MESSAGE, Roles
from podpatterns.ambassador.postgres import (
    KEY_MAX,
    KEY_MIN,
    MAX_MESSAGE,
    PostgresHandler,
    error_response,
)
from podpatterns.ambassador.protocol import Failure, SocketStream, Stream
from podpatterns.ambassador.upstreams import Endpoint
from podpatterns.metrics import (
    LATENCY_BUCKETS,
    Buckets,
    CallbackCollector,
    Family,
    Histogram,
    HistogramSample,
    Sample,
)
from podpatterns.tasks import TaskSet

POOL_MODES = ("off", "session", "transaction")
TOO_MANY_CONNECTIONS = "53300"
CONFIGURATION_LIMIT = "53400"
CONNECTION_FAILURE = "08006"
ADMIN_SHUTDOWN = "57P01"
CANNOT_CONNECT_NOW = "57P03"  # the database system is shutting down, starting up...
RESET_TIMEOUT = 5.0  # seconds a reset (ROLLBACK, DISCARD ALL) may take before the close
MAX_CLIENT_MESSAGE = 64 << 20  # a larger message from the app ends its connection
LIFETIME_JITTER = 0.1  # each server connection lives (1 - U(0, this)) * --pg-pool-max-lifetime
ROLE_RETRY = 0.25  # seconds between opens while no endpoint of the target role answers

_UNPACK = struct.Struct("!i").unpack_from
_AUTH_OK = b"R\0\0\0\x08\0\0\0\0"
_TERMINATE = b"X\0\0\0\x04"
_PARSE_COMPLETE = b"1\0\0\0\x04"
_READY_IDLE = b"Z\0\0\0\x05I"
_NO_STATEMENT = b"podpatterns_none"  # a Close of it is answered, and changes nothing
_Q, _S, _F, _X, _P, _B, _D, _C, _Z, _E = (ord(c) for c in "QSFXPBDCZE")
_ERROR = _E  # from the server, E is an ErrorResponse
_IDLE, _FAILED = ord("I"), ord("E")
_REQUESTS = frozenset((_Q, _S, _F))  # each answered by one ReadyForQuery
_PARSE_DONE, _CLOSE_DONE = ord("1"), ord("3")
_ROLLBACK_DONE = b"C\0\0\0\x0dROLLBACK\0"
_BIND_COMPLETE = b"2\0\0\0\x04"
_CLOSE_COMPLETE = b"3\0\0\0\x04"
_NO_DATA = b"n\0\0\0\x04"
_NO_PARAMETERS = b"t\0\0\0\x06\0\0"  # ParameterDescription: no parameters
# what the server's lexer skips before a statement: white space, -- and /* */ comments
_SKIPPED = rb"(?:\s|--[^\n]*(?:\n|\Z)|/\*.*?\*/)*"
_TRANSACTION_ENDS = re.compile(
    _SKIPPED + rb"(?:rollback|abort|commit|end)\b(?!\s+to\b)", re.I | re.S
)
# COMMIT/ROLLBACK/END/ABORT [WORK|TRANSACTION] AND CHAIN: ends the block and opens the
# next transaction at once (ReadyForQuery T), which a lost transaction cannot do here
_CHAINS = re.compile(
    _SKIPPED
    + rb"(?:rollback|abort|commit|end)\b"
    + _SKIPPED
    + rb"(?:(?:work|transaction)\b"
    + _SKIPPED
    + rb")?and\b"
    + _SKIPPED
    + rb"chain\b",
    re.I | re.S,
)
FEATURE_NOT_SUPPORTED = "0A000"
CHAIN_MESSAGE = (
    "podpatterns ambassador: AND CHAIN cannot open the next transaction here: this "
    "transaction's server connection was lost; the block stays failed until a ROLLBACK "
    "without AND CHAIN"
)
# after the first ";" of a Query whose first statement ends a block: nothing more (else
# the Query goes to a server connection, so that the statements after it run)
_NOTHING_MORE = re.compile(rb"(?:;|" + _SKIPPED[3:-2] + rb")*\0?\Z", re.S)
ABORTED_MESSAGE = "current transaction is aborted, commands ignored until end of transaction block"

# Session state a transaction-mode server connection does not keep for the app: what the
# app's SQL says, checked at the start of each Query and Parse text (issue 14).
_FEATURES = re.compile(
    rb"""\A\s*(?:
        (?P<set>set\s+(?!local\b|transaction\b|constraints\b))
      | (?P<listen>listen\b)
      | (?P<temp_table>create\s+(?:(?:global|local)\s+)?temp(?:orary)?\b)
      | (?P<prepare>prepare\s)
    )
    | (?P<with_hold>\bdeclare\b[^;]*\bwith\s+hold\b)
    | (?P<advisory_lock>\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\()
    """,
    re.I | re.X | re.S,
)


@dataclass(frozen=True)
class PoolSettings:
    """One route's pool settings (the ``--pg-pool*`` options)."""

    mode: str = "session"
    size: int = 20
    min_idle: int = 0
    idle_timeout: float = 60.0
    max_lifetime: float = 3600.0
    wait: float = 5.0
    reset_query: str = "DISCARD ALL"
    connect_timeout: float = 30.0
    max_prepared: int = 200  # per server connection (transaction mode); 0: not tracked
    max_client_prepared: int = 10000  # named statements per app connection


class StatementLimit(Exception):
    """An app connection named more statements than ``--pg-pool-max-client-prepared``."""


class PoolTimeout(Exception):
    """No server connection became free within ``--pg-pool-wait``."""


def query_message(sql: str) -> bytes:
    """A simple-protocol Query message."""
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", len(body) + 4) + body


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _messages(buf: bytes) -> Iterator[tuple[int, bytes]]:
    """The whole messages in ``buf`` (type, body)."""
    pos = 0
    while len(buf) - pos >= 5:
        (length,) = _UNPACK(buf, pos + 1)
        yield buf[pos], buf[pos + 5 : pos + 1 + length]
        pos += 1 + length


async def trust_only(stream: Stream, user: str, endpoint: Endpoint) -> bytes:
    """The server's messages from after the StartupMessage up to ReadyForQuery, when the
    server asks for no password (pg_hba ``trust`` or ``cert``).

    Raises:
        ServerError: the server answered with an ErrorResponse.
        Failure: the server asks for a password, or broke the protocol.
    """
    buf = b""
    while True:
        pos = 0
        while len(buf) - pos >= 5:
            kind = buf[pos]
            (length,) = _UNPACK(buf, pos + 1)
            if not 4 <= length <= MAX_MESSAGE:
                raise Failure("protocol", f"podpatterns ambassador: {endpoint} broke the protocol")
            end = pos + 1 + length
            if end > len(buf):
                break
            if kind == ord("E"):
                raise ServerError(buf[pos:end])
            if kind == ord("R") and buf[pos + 5 : end] != b"\0\0\0\0":
                raise Failure(
                    "protocol",
                    f"podpatterns ambassador: {endpoint} asks user {user!r} for a password; "
                    "pooled server connections are opened by the ambassador, which needs a "
                    "password source for that (see docs/ambassador-postgres.md, Pooling)",
                )
            if kind == _Z:
                return buf[:end]
            pos = end
        data = await stream.read()
        if not data:
            raise Failure(
                "upstream_closed",
                f"podpatterns ambassador: {endpoint} closed the connection during startup",
            )
        buf += data


#: Dials an endpoint of the route (balancing, retries, health), as for any connection.
Dial = Callable[[], Awaitable[tuple[socket.socket, Endpoint]]]


class ServerConn(asyncio.Protocol):
    """One pooled server connection: its transport's protocol for its whole life.

    While lent, what the server sends goes to the app's :class:`ClientSession`; while
    being reset, to the reset's walk; while idle, any message ends it (a server that
    speaks unasked is terminating the session: ``idle_session_timeout``, an admin).
    """

    def __init__(
        self, pool: Pool, endpoint: Endpoint, key: bytes, params: bytes, lifetime: float
    ) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.key = key  # the server's BackendKeyData (process ID, secret key)
        self.params = params  # its ParameterStatus messages, as the startup gave them
        self.transport: Any = None
        self.owner: ClientSession | None = None
        # the ambassador's statement names prepared here, least recently used first
        self.prepared: OrderedDict[bytes, None] = OrderedDict()
        now = time.monotonic()
        self.expires = now + lifetime * (1 - random.uniform(0, LIFETIME_JITTER))
        self.idle_since = now
        self.label = str(endpoint)
        self.closed = False
        # where the pool counts it (neither: being opened, or idle): lost() needs to know
        self.lent = False  # in_use: taken, or granted to a waiter not yet attached
        self.resetting = False
        self._reset_left = 0  # ReadyForQuery still awaited by a reset
        self._reset_ok = True
        self._reset_buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is not None:
            owner.server_data(data)
        elif self._reset_left:
            self._reset_data(data)
        else:
            self.close("server_message")

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        if self.owner is not None and self.owner.transport is not None:
            self.owner.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.owner is not None and self.owner.transport is not None:
            self.owner.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.pools.reset_deadlines.discard(self)
        already = self.closed
        self.closed = True
        if not already:
            self.pool.lost(self, "server_closed" if exc is None else "server_error")
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.server_lost(self)

    def expired(self, now: float) -> bool:
        return now >= self.expires

    def add_statement(self, ours: bytes, limit: int) -> list[bytes]:
        """``ours`` is being prepared here; returns the least recently used statements
        beyond ``limit`` (``--pg-pool-max-prepared``), now to be closed."""
        prepared = self.prepared
        prepared[ours] = None
        self.pool.pools.statement_refs[ours] += 1
        evicted: list[bytes] = []
        while len(prepared) > limit:
            evicted.append(prepared.popitem(last=False)[0])
        return evicted

    def drop_statement(self, ours: bytes) -> None:
        """``ours`` is not prepared here after all (its Parse was skipped or closed)."""
        if ours in self.prepared:
            del self.prepared[ours]
            self.pool.pools.release_statement(ours)

    def close(self, reason: str) -> None:
        """Terminate the session and close, counted under ``reason``."""
        if self.closed:
            return
        self.closed = True
        self.pool.lost(self, reason)
        self.owner = None  # what the server still sends is no app's any more
        self.pool.pools.reset_deadlines.discard(self)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(_TERMINATE)
            transport.close()

    def reset(self, queries: list[bytes]) -> None:
        """Run ``queries`` (Query messages), then return to the pool if all went well."""
        if not queries:
            self.pool.release(self)
            return
        self._reset_left = len(queries)
        self._reset_ok = True
        self._reset_buf = b""
        self.transport.resume_reading()
        self.transport.write(b"".join(queries))
        self.pool.pools.reset_deadlines.add(self)  # closed at RESET_TIMEOUT

    def _reset_data(self, data: bytes) -> None:
        buf = self._reset_buf + data
        pos = 0
        while len(buf) - pos >= 5:
            kind = buf[pos]
            (length,) = _UNPACK(buf, pos + 1)
            if not 4 <= length <= MAX_MESSAGE:
                self.close("protocol_error")
                return
            end = pos + 1 + length
            if end > len(buf):
                break
            if kind == ord("E"):
                self._reset_ok = False
            elif kind == _Z:
                self._reset_left -= 1
                if not self._reset_left:
                    self.pool.pools.reset_deadlines.discard(self)
                    status = buf[pos + 5] if length == 5 else 0
                    if self._reset_ok and status == _IDLE and end == len(buf):
                        self._reset_buf = b""
                        self.pool.release(self)
                    else:
                        self.close("reset_failed")
                    return
            pos = end
        self._reset_buf = buf[pos:]


class Pool:
    """The server connections of one pool key (user, database, startup parameters)."""

    def __init__(self, pools: Pools, startup: bytes) -> None:
        self.pools = pools
        self.settings = pools.settings
        self.startup = startup
        self.user = startup_parameters(startup).get("user", "")
        self.idle: deque[ServerConn] = deque()
        self.in_use = 0
        self.opening = 0
        self.resets: set[ServerConn] = set()  # returned, being reset (ServerConn.reset)
        self.waiters: deque[asyncio.Future[ServerConn]] = deque()
        self.params: bytes | None = None  # ParameterStatus messages of the last connection
        # why the last open failed while apps waited (roles: no endpoint of the target
        # role yet); what a wait that runs out is told instead of 53300
        self.open_error: BaseException | None = None
        self._sweep: asyncio.TimerHandle | None = None  # the idle connections' timeouts
        self.top_up()

    @property
    def resetting(self) -> int:
        """How many server connections are being reset."""
        return len(self.resets)

    def total(self) -> int:
        return len(self.idle) + self.in_use + self.opening + self.resetting

    def take(self) -> ServerConn | None:
        """An idle server connection, now, or None (counted as a wait of 0 s)."""
        now = time.monotonic()
        while self.idle:
            server = self.idle[-1]  # the most recently used: the others may time out
            if server.expired(now):
                server.close("max_lifetime")  # lost() takes it off the idle list
                continue
            self.idle.pop()
            self.in_use += 1
            server.lent = True
            self.pools.observe_wait(0.0)
            return server
        return None

    def wait(self) -> asyncio.Future[ServerConn]:
        """A future server connection: raises :class:`PoolTimeout` after ``--pg-pool-wait``,
        or the error of the connection opened for it."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ServerConn] = loop.create_future()
        started = time.monotonic()
        self.waiters.append(fut)
        timer = loop.call_later(self.settings.wait, self._timed_out, fut)

        def done(f: asyncio.Future[ServerConn]) -> None:
            timer.cancel()
            if f.cancelled() or f.exception() is None:
                self.pools.observe_wait(time.monotonic() - started)
            with contextlib.suppress(ValueError):
                self.waiters.remove(f)

        fut.add_done_callback(done)
        self._open_for_waiters()
        return fut

    def _timed_out(self, fut: asyncio.Future[ServerConn]) -> None:
        if not fut.done():
            if self.open_error is not None:  # the cause, not "none free" (roles)
                fut.set_exception(self.open_error)
                return
            self.pools.wait_timeouts += 1
            fut.set_exception(PoolTimeout())

    def _open_for_waiters(self) -> None:
        live = sum(1 for f in self.waiters if not f.done())
        while self.opening < live and self.total() < self.settings.size:
            self.pools.spawn_open(self)

    def top_up(self) -> None:
        """Open connections until ``--pg-pool-min-idle`` are idle or opening."""
        while (
            len(self.idle) + self.opening < self.settings.min_idle
            and self.total() < self.settings.size
            and not self.pools.closing
        ):
            self.pools.spawn_open(self)

    def has_waiters(self) -> bool:
        """True while an app waits for a server connection of this key."""
        return any(not f.done() for f in self.waiters)

    def opened(self, server: ServerConn) -> None:
        self.opening -= 1
        self.open_error = None
        # the latest: after a failover, the new primary's (in_hot_standby and the rest)
        self.params = server.params
        self._give(server)

    def open_failed(self, exc: BaseException) -> None:
        self.opening -= 1
        for fut in self.waiters:
            if not fut.done():
                fut.set_exception(exc)
                break
        self._open_for_waiters()

    def _give(self, server: ServerConn) -> None:
        """A free server connection: to the first waiter, or idle."""
        for fut in self.waiters:
            if not fut.done():
                self.in_use += 1
                server.lent = True
                fut.set_result(server)
                return
        if self.pools.closing:
            server.close("shutdown")
            return
        server.idle_since = time.monotonic()
        self.idle.append(server)
        if self._sweep is None:
            self._arm_sweep(server.idle_since)

    def _arm_sweep(self, now: float) -> None:
        """One timer per pool for the idle connections' timeouts, not one per lend: a
        transaction-mode pool returns a connection after every transaction."""
        if not self.idle:
            return
        timeout = self.settings.idle_timeout
        due = min(
            s.expires if now - s.idle_since >= timeout else min(s.expires, s.idle_since + timeout)
            for s in self.idle
        )
        loop = asyncio.get_running_loop()
        self._sweep = loop.call_later(max(0.05, due - now), self._sweep_idle)

    def close_idle(self) -> None:
        """Shutdown: close the idle connections, stop the sweep."""
        for server in list(self.idle):
            server.close("shutdown")
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def _sweep_idle(self) -> None:
        """Close the idle connections past their lifetime, and those idle for longer than
        ``--pg-pool-idle-timeout`` beyond ``--pg-pool-min-idle`` (the oldest first)."""
        self._sweep = None
        now = time.monotonic()
        for server in list(self.idle):  # the least recently used first
            if server.expired(now):
                server.close("max_lifetime")
            elif (
                now - server.idle_since >= self.settings.idle_timeout
                and len(self.idle) > self.settings.min_idle
            ):
                server.close("idle_timeout")
        self._arm_sweep(now)
        self.top_up()

    def returning(self, server: ServerConn) -> None:
        """``server`` leaves its app connection, to be reset (:meth:`ServerConn.reset`)."""
        if server.closed:  # counted out when it closed (lost)
            return
        self.in_use -= 1
        self.resets.add(server)
        server.lent, server.resetting = False, True
        server.owner = None

    def release(self, server: ServerConn) -> None:
        """``server`` is free again (after its reset): to a waiter or idle, unless it is
        past its lifetime or its endpoint no longer serves the target role."""
        if server.closed:  # counted out when it closed (lost)
            return
        if server.expired(time.monotonic()):
            server.close("max_lifetime")  # lost() counts it out of resetting
            return
        if self.pools.role_mismatch(server.endpoint):
            server.close("role_changed")
            return
        self.resets.discard(server)
        server.resetting = False
        self._give(server)

    def lost(self, server: ServerConn, reason: str) -> None:
        """``server`` closed (``reason``): count it, and open for who waits."""
        self.pools.closed[reason] += 1
        for ours in server.prepared:
            self.pools.release_statement(ours)
        server.prepared.clear()
        if server in self.idle:
            self.idle.remove(server)
        elif server.lent:  # an app's, or granted to one that has not taken it yet
            self.in_use -= 1
        elif server.resetting:
            self.resets.discard(server)
        # else: closed by its own open (counted as opening until that fails)
        server.lent = server.resetting = False
        if server.endpoint.active > 0:
            server.endpoint.active -= 1
        if not self.pools.closing:
            self._open_for_waiters()
            self.top_up()


class Pools:
    """One route's pools, keyed by the app's StartupMessage parameters.

    Args:
        settings: the route's ``--pg-pool*`` options.
        handler: the route's PostgreSQL handler (its TLS settings for the server side).
        dial: connects to an endpoint of the route.
        route: the route's name, for the metrics.
        log: the route's logger.
        queries: with ``--pg-metrics``, the route's query counts, which the app
            connections add into (per endpoint of the server connection they hold).
        slow_query: with ``--pg-slow-query``, its threshold in seconds.
    """

    def __init__(
        self,
        settings: PoolSettings,
        handler: PostgresHandler,
        dial: Dial,
        *,
        route: str = "default",
        log: Any = None,
        queries: QueryMetrics | None = None,
        slow_query: float | None = None,
    ) -> None:
        self.settings = settings
        self.handler = handler
        self.dial = dial
        self.route = route
        self.log = log if log is not None else handler.log
        self.by_key: dict[bytes, Pool] = {}
        self.clients: dict[bytes, ClientSession] = {}  # by the BackendKeyData we issued
        self.statement_names: dict[bytes, bytes] = {}  # Parse body -> our statement name
        self.statement_bodies: dict[bytes, bytes] = {}  # our statement name -> Parse body
        # users of each of our names: app names for it, server connections that have it
        # (or are closing it); a name is forgotten with its last user
        self.statement_refs: Counter[bytes] = Counter()
        self._last_statement = 0
        self.statements_prepared = 0  # Parses sent under our names (first or again)
        self.statements_evicted = 0  # Closes sent beyond --pg-pool-max-prepared
        self.statements_refused = 0  # app connections ended at --pg-pool-max-client-prepared
        self.closing = False
        # server connections being reset, each closed if its reset takes RESET_TIMEOUT
        self.reset_deadlines: Deadlines[ServerConn] = Deadlines(RESET_TIMEOUT, _reset_timed_out)
        self.reset_message = query_message(settings.reset_query) if settings.reset_query else b""
        self.tasks = TaskSet("ambassador")
        # metrics: plain numbers read at scrape time
        self.opened = 0
        self.closed: Counter[str] = Counter()
        self.open_failures = 0
        self.wait_timeouts = 0
        self.wait_time = Buckets()  # how long apps waited for a server connection
        self.features: Counter[str] = Counter()
        self.lost_transactions = 0  # app transactions lost with their server connection
        # --pg-target-session-attrs: the endpoints' roles (None: any endpoint serves)
        self.roles: Roles | None = handler.roles
        self._role_news: asyncio.Future[None] | None = None  # resolved at a role change
        self._role_epoch = 0  # role changes seen
        self.queries = queries
        self.slow_query = slow_query
        self._meters: dict[str, tuple[QueryStats, SlowQueries | None]] = {}

    def meter(self, server: ServerConn) -> tuple[QueryStats, SlowQueries | None]:
        """``--pg-metrics``: where queries served by ``server`` are counted (and slow ones
        reported), by its endpoint."""
        meter = self._meters.get(server.label)
        if meter is None:
            assert self.queries is not None
            slow = None
            if self.slow_query is not None:
                slow = SlowQueries(self.slow_query, self.log, server.label)
            meter = self._meters[server.label] = (
                self.queries.for_endpoint(server.endpoint),
                slow,
            )
        return meter

    def statement(self, body: bytes) -> bytes:
        """Our statement name for a Parse body (text and parameter types), shared by every
        app connection, with one more user."""
        ours = self.statement_names.get(body)
        if ours is None:
            self._last_statement += 1
            ours = b"podpatterns_%d" % self._last_statement
            self.statement_names[body] = ours
            self.statement_bodies[ours] = body
        self.statement_refs[ours] += 1
        return ours

    def release_statement(self, ours: bytes) -> None:
        """One user of ``ours`` is gone; with the last, the name and its text are forgotten."""
        refs = self.statement_refs
        refs[ours] -= 1
        if refs[ours] <= 0:
            del refs[ours]
            del self.statement_names[self.statement_bodies.pop(ours)]

    def pool_for(self, startup: bytes) -> Pool:
        """The pool of the app's StartupMessage (its parameters are the key)."""
        key = startup[8:]
        pool = self.by_key.get(key)
        if pool is None:
            pool = self.by_key[key] = Pool(self, startup)
        return pool

    def observe_wait(self, seconds: float) -> None:
        self.wait_time.observe(seconds)

    def counts(self) -> tuple[int, int, int, int]:
        """(in use, idle, opening or being reset, waiting apps) over all keys."""
        in_use = idle = other = waiting = 0
        for pool in self.by_key.values():
            in_use += pool.in_use
            idle += len(pool.idle)
            other += pool.opening + pool.resetting
            waiting += sum(1 for f in pool.waiters if not f.done())
        return in_use, idle, other, waiting

    def spawn_open(self, pool: Pool) -> None:
        pool.opening += 1
        self.tasks.spawn(self._open(pool), f"{self.route}/pg_pool_open", may_return=True)

    async def _open(self, pool: Pool) -> None:
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                server = await self._open_for_role(pool)
        except Exception as exc:  # each failure goes to a waiting app
            self.open_failures += 1
            if not isinstance(exc, ServerError | Failure | DialError | OSError | TimeoutError):
                self.log.error("pg_pool_open_bug", error=repr(exc), exc_info=exc)
            else:
                self.log.warning("pg_pool_open_failed", error=_describe(exc))
            pool.open_failed(exc)
            return
        if self.closing:
            pool.opening -= 1
            server.endpoint.active -= 1
            server.closed = True
            server.transport.write(_TERMINATE)
            server.transport.close()
            return
        self.opened += 1
        pool.opened(server)

    async def open_server(self, pool: Pool) -> ServerConn:
        """Dial, TLS as the route says, the StartupMessage, authentication."""
        handler = self.handler
        usock, endpoint = await self.dial()
        try:
            if handler.credentials is not None:  # --pg-password-file, --pg-password-command
                stream, tls, session = await handler.open_server(usock, endpoint, pool.startup)
                messages = session.messages
                stream.take_buffered()  # nothing is read past ReadyForQuery
            else:  # --pg-upstream-trust
                plain = SocketStream(usock)
                tls = None
                if handler.sslmode != "disable":
                    tls = await handler.negotiate_tls(plain, usock, endpoint)
                stream = tls if tls is not None else plain
                await stream.write(pool.startup)
                messages = await trust_only(stream, pool.user, endpoint)
        except BaseException:
            usock.close()
            raise
        params: list[bytes] = []
        key = b""
        pos = 0
        for kind, body in _messages(messages):
            if kind == ord("S"):
                params.append(_message(b"S", body))
            elif kind == ord("K") and KEY_MIN <= len(body) - 4 <= KEY_MAX:
                key = body
            pos += 5 + len(body)
        server = ServerConn(pool, endpoint, key, b"".join(params), self.settings.max_lifetime)
        endpoint.active += 1
        leftover = stream.take_buffered()
        if tls is not None:
            tls.hand_over(server)
        else:
            loop = asyncio.get_running_loop()
            await loop.create_connection(lambda: server, sock=usock)
        if leftover:  # the server speaks unasked: not a session to lend
            server.close("protocol_error")
            raise Failure("protocol", f"podpatterns ambassador: {endpoint} sent data unasked")
        return server

    # -- roles (--pg-target-session-attrs) -------------------------------------------------

    async def _open_for_role(self, pool: Pool) -> ServerConn:
        """:meth:`open_server`; with roles, tried again while apps wait and no endpoint
        of the target role could be had (a failover under way): at once when the roles
        changed meanwhile, else at the next role change or after :data:`ROLE_RETRY`.

        Raises:
            as :meth:`open_server`: the last error, once no app waits any more, or for
            an error roles do not explain (a wrong password, TLS).
        """
        waiting = False
        try:
            while True:
                epoch = self._role_epoch
                try:
                    return await self.open_server(pool)
                except (Failure, DialError, ServerError) as exc:
                    if self.roles is None or not _failover(exc):
                        raise
                    if self.closing or not pool.has_waiters():
                        raise
                    self.open_failures += 1
                    pool.open_error = exc
                    if not waiting:
                        waiting = True
                        self.log.warning(
                            "pg_pool_open_waiting_for_role",
                            target=self.roles.target,
                            error=_describe(exc),
                        )
                if epoch == self._role_epoch:
                    await self._next_role_change(ROLE_RETRY)
        finally:
            pool.open_error = None

    async def _next_role_change(self, within: float) -> None:
        """Return at the next role change, or after ``within`` seconds."""
        if self._role_news is None:
            self._role_news = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await asyncio.shield(self._role_news)  # shared by every open that waits

    def role_mismatch(self, endpoint: Endpoint) -> bool:
        """True when ``endpoint``'s known role does not serve the target: its server
        connections are closed rather than lent again."""
        return self.roles is not None and self.roles.mismatches(endpoint)

    def role_changed(self, endpoint: Endpoint) -> None:
        """``endpoint``'s role was learned or changed (:attr:`.pgroles.Roles.on_change`):
        its idle server connections are closed when it no longer serves the target (those
        lent are closed when returned), and the opens that wait for a role try again."""
        self._role_epoch += 1
        news, self._role_news = self._role_news, None
        if news is not None and not news.done():
            news.set_result(None)
        if not self.role_mismatch(endpoint):
            return
        closed = 0
        for pool in self.by_key.values():
            for server in [s for s in pool.idle if s.endpoint is endpoint]:
                server.close("role_changed")
                closed += 1
        if closed:
            self.log.info("pg_pool_role_changed", upstream=str(endpoint), idle_closed=closed)

    def end_sessions_on(self, endpoint: Endpoint) -> int:
        """``--pg-close-on-role-change`` in session mode: each app connection holding a
        server connection to ``endpoint`` ends at its next rest with FATAL 57P01 (in
        transaction mode no app holds one between transactions: nothing to end).
        Returns how many will end."""
        ended = 0
        for client in list(self.clients.values()):
            server = client.server
            if not client.transaction_mode and server is not None and server.endpoint is endpoint:
                client.drain(ROLE_CHANGED_MESSAGE, "role_changed")
                ended += 1
        return ended

    def cancel_target(self, key: bytes) -> tuple[Endpoint, bytes] | None:
        """The server a CancelRequest with our BackendKeyData ``key`` must reach, and
        that server's own key; None when the app holds no server connection now."""
        client = self.clients.get(key)
        if client is None or client.server is None or not client.server.key:
            return None
        return client.server.endpoint, client.server.key

    def feature_used(self, name: str) -> None:
        self.features[name] += 1

    async def close(self) -> None:
        """Close the server connections no app holds (idle, or being reset); cancel the
        opens under way. Those lent are closed with their app connections, which the
        route ends first."""
        self.closing = True
        for pool in self.by_key.values():
            for fut in pool.waiters:
                if not fut.done():
                    fut.set_exception(PoolTimeout())
            pool.close_idle()
            # A reset still running would only bring its connection back to be closed;
            # left alone, it stays open until the loop stops under it.
            for server in list(pool.resets):
                server.close("shutdown")
        self.reset_deadlines.close()
        await self.tasks.aclose()

    def drain(self) -> None:
        """Draining starts: each app connection ends at its next rest."""
        for client in list(self.clients.values()):
            client.drain()


def _reset_timed_out(server: ServerConn) -> None:
    server.close("reset_timeout")


def _failover(exc: Failure | DialError | ServerError) -> bool:
    """Whether an open failed as it does during a failover: no endpoint of the role,
    none reachable, or a server shutting down or starting up (57P03)."""
    if isinstance(exc, ServerError):
        return exc.sqlstate == CANNOT_CONNECT_NOW
    return isinstance(exc, DialError) or exc.kind == "role"


def _describe(exc: BaseException) -> str:
    if isinstance(exc, Failure):
        return exc.message
    if isinstance(exc, ServerError):
        return "the server refused the connection (ErrorResponse)"
    return str(exc) or type(exc).__name__


def startup_answer(params: bytes, key: bytes) -> bytes:
    """What the ambassador answers an app's StartupMessage with in pool mode."""
    return _AUTH_OK + params + _message(b"K", key) + _READY_IDLE


_KEY_BYTES = 4096  # read from os.urandom at once: one system call per 512 app connections
_key_pool = bytearray()


def issue_key() -> bytes:
    """A BackendKeyData body for an app connection: process ID and secret key.

    The secret comes from ``os.urandom`` (another process on the Pod's loopback must
    not guess it and cancel the app's queries), read in blocks rather than per key.
    """
    if len(_key_pool) < 8:
        _key_pool.extend(os.urandom(_KEY_BYTES))
    key = bytes(_key_pool[-8:])
    del _key_pool[-8:]
    return struct.pack("!i", (int.from_bytes(key[:4]) >> 1) | 1) + key[4:]


class ClientSession(asyncio.Protocol):
    """One app connection in pool mode: its transport's protocol, and the
    connection's :class:`~.connection.Relay`.

    Args:
        pools: the route's pools.
        pool: the pool of the app's startup parameters.
        conn: the connection's accounting.
        server: the server connection lent (session mode), or None (transaction mode).
        key: the BackendKeyData issued to the app.
        greeting: bytes to send the app first (the startup answer).
    """

    def __init__(
        self,
        pools: Pools,
        pool: Pool,
        conn: Connection,
        server: ServerConn | None,
        key: bytes,
        greeting: bytes,
    ) -> None:
        self.pools = pools
        self.pool = pool
        self.conn = conn
        self.transaction_mode = pools.settings.mode == "transaction"
        self.server: ServerConn | None = None
        self.key = key
        self.transport: Any = None
        self._greeting = greeting
        self._inbuf = bytearray()
        self.nbytes_up = 0
        self.nbytes_down = 0
        self.outstanding = 0  # requests sent to the server not yet answered by Z
        self.in_batch = False  # extended-protocol messages sent since the last Sync
        self.status = _IDLE
        self.used = False  # session mode: a message reached the server (its state may differ)
        self._skip = 0  # bytes of the server's current message still to pass
        self._carry = b""  # the start of a server message header split across reads
        self.statements: dict[bytes, bytes] = {}  # the app's statement name -> ours
        self._parses: deque[tuple[int, bytes, bool]] = deque()  # (group, name, to app)
        # (group, what the app gets for the CloseComplete: None the CloseComplete itself,
        # a ParseComplete for a stand-in, b"" for an eviction; the evicted name or b"")
        self._closes: deque[tuple[int, bytes | None, bytes]] = deque()
        self.tracks = self.transaction_mode and pools.settings.max_prepared > 0
        self._sent_groups = 0  # Sync, Query, FunctionCall sent to the current server
        self._done_groups = 0  # their ReadyForQuery received
        self._waiting: asyncio.Future[ServerConn] | None = None
        self._eof_client = False
        self.ended = False
        self.draining = False
        self._drain_message: str | None = None  # None: the shutdown drain's (pgdrain)
        self._drain_reason = "drained"
        self._features: set[str] = set()
        self._server_paused = False
        # the drain's FATAL for an app whose socket was not attached yet when it came
        # (Startup.begin's short way): written by connection_made instead of the greeting
        self._last_words = b""
        # after a lent server connection was lost mid-transaction (transaction mode): the
        # status the app is answered with locally (I or E) until its transaction ends
        self._local: int | None = None
        self._local_error = b""  # the ErrorResponse the next batch answered locally gets
        self._local_errored = False  # the current batch got it
        self._local_ending = False  # the current batch has a ROLLBACK (extended)
        self._local_rolled_back = False  # ...and executed it: Sync answers I
        self._local_owed = False  # the batch under way when the server was lost
        self._local_unnamed = b""  # the last unnamed Parse answered locally (text, types)
        # --pg-metrics: the app's queries, counted from its own messages (pgmetrics)
        self.queries: QueryCycles | None = None
        pools.clients[key] = self
        if server is not None:
            self._attach(server)

    # -- Relay (what the route needs) -------------------------------------------------------

    def counts(self) -> tuple[int, int]:
        return self.nbytes_up, self.nbytes_down

    def half_closed(self) -> bool:
        return False

    def abort(self) -> None:
        self.conn.note_end("proxy", self.conn.reason or "aborted")
        self._end(reuse=False)
        if self.transport is not None and not self.transport.is_closing():
            reset_socket(self.transport.get_extra_info("socket"))
            self.transport.abort()

    def close(self) -> None:
        self.conn.note_end("proxy", self.conn.reason or "closed")
        self._end(reuse=True)
        if self.transport is not None:
            self.transport.close()

    # -- the app's side -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.ended:  # its server connection closed before the app's socket came
            # no greeting: nobody would answer the app's queries; a drain says why
            if self._last_words:
                transport.write(self._last_words)  # type: ignore[attr-defined]
            transport.close()
            return
        transport.set_write_buffer_limits(high=256 * 1024)  # type: ignore[attr-defined]
        transport.write(self._greeting)  # type: ignore[attr-defined]
        self.nbytes_down += len(self._greeting)

    def data_received(self, data: bytes) -> None:
        self.nbytes_up += len(data)
        self._inbuf += data
        try:
            self._pump()
        except StatementLimit:
            self._statement_limit()

    def eof_received(self) -> bool:
        self._eof_client = True
        self.conn.note_end("client", "eof")
        self._end(reuse=True)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.conn.note_end(
                "client", "reset" if isinstance(exc, ConnectionResetError) else "error"
            )
        else:
            self.conn.note_end("client", "closed")
        self._end(reuse=True)
        self.conn.bytes_up = self.nbytes_up
        self.conn.bytes_down = self.nbytes_down
        self.conn.finish()

    def pause_writing(self) -> None:
        server = self.server
        if server is not None and server.transport is not None:
            self._server_paused = True
            server.transport.pause_reading()

    def resume_writing(self) -> None:
        server = self.server
        self._server_paused = False
        if server is not None and server.transport is not None:
            server.transport.resume_reading()

    def _pump(self) -> None:
        """Pass on the app's whole messages (rewritten in transaction mode)."""
        if self.ended or self._waiting is not None:
            return
        buf = self._inbuf
        n = len(buf)
        pos = 0
        sent_from = 0  # the messages before it were answered here (a lost transaction)
        out: list[bytes] = []
        while n - pos >= 5:
            kind = buf[pos]
            (length,) = _UNPACK(buf, pos + 1)
            if not 4 <= length <= MAX_CLIENT_MESSAGE:
                self._fail("08P01", "podpatterns ambassador: invalid message from the client")
                return
            end = pos + 1 + length
            if end > n:
                break
            if kind == _X:
                del buf[:]
                self._flush(out)
                self.conn.note_end("client", "terminate")
                self._end(reuse=True)
                if self.transport is not None:
                    self.transport.close()
                return
            if self._local is not None and self._answer_locally(kind, buf, pos):
                pos = sent_from = end
                if self.ended:  # a drain waited for the lost transaction's end
                    return
                continue
            if self.server is None and kind in b"dcf":
                # COPY data, done or fail with no COPY under way (its server connection
                # was lost): a server ignores them, so no connection is taken for them
                # (nothing would answer, so nothing would return it)
                pos = end
                continue
            if self.server is None and not self._acquire(out):
                del buf[:pos]
                return
            if self.transaction_mode:
                out.append(self._rewrite(kind, bytes(buf[pos:end])))
            else:
                out.append(bytes(buf[pos:end]))
                self.used = True
            if kind in _REQUESTS:
                self.outstanding += 1
                self._sent_groups += 1
                self.in_batch = False
            elif kind not in b"dcf":  # COPY data is not a batch of its own
                self.in_batch = True
            pos = end
        if self.queries is not None:  # after the walk: no cost per message without
            self._count(buf, sent_from, pos)
        del buf[:pos]
        self._flush(out)

    def _flush(self, out: list[bytes]) -> None:
        if out and self.server is not None:
            self.server.transport.write(b"".join(out))
            out.clear()

    def _acquire(self, out: list[bytes]) -> bool:
        """A server connection for the next transaction; False while waiting for one."""
        self._flush(out)
        server = self.pool.take()
        if server is not None:
            self._attach(server)
            return True
        if self.transport is not None:
            self.transport.pause_reading()
        fut = self.pool.wait()
        self._waiting = fut
        fut.add_done_callback(self._granted)
        return False

    def _granted(self, fut: asyncio.Future[ServerConn]) -> None:
        self._waiting = None
        if fut.cancelled():
            return
        exc = fut.exception()
        if self.ended:
            if exc is None:
                server = fut.result()
                self.pool.returning(server)
                self.pool.release(server)
            return
        if isinstance(exc, PoolTimeout):
            self._fail(TOO_MANY_CONNECTIONS, pool_timeout_message(self.pools.settings))
            return
        if isinstance(exc, ServerError):
            self._fail_with(exc.raw)
            return
        if isinstance(exc, Failure):  # no endpoint of the target role (--pg-pool-wait)
            self._fail(CONNECTION_FAILURE, exc.message)
            return
        if exc is not None:
            self._fail(CONNECTION_FAILURE, f"podpatterns ambassador: {_describe(exc)}")
            return
        if fut.result().closed:  # closed after it was granted: wait for another
            self._pump()
            return
        self._attach(fut.result())
        if self.transport is not None:
            self.transport.resume_reading()
        try:
            self._pump()
        except StatementLimit:
            self._statement_limit()

    def _statement_limit(self) -> None:
        """End the connection at ``--pg-pool-max-client-prepared``, telling the app why.

        FATAL 53400 rather than an error for the one Parse: the rest of the app's pipeline
        would have to be skipped as the server does after an error, which the pool cannot
        make the server do. pgbouncer ends a connection that reuses a statement name the
        same way.
        """
        self.pools.statements_refused += 1
        limit = self.pools.settings.max_client_prepared
        self._fail(
            CONFIGURATION_LIMIT,
            f"podpatterns ambassador: more than --pg-pool-max-client-prepared {limit} "
            "named prepared statements on one connection (close those no longer used)",
        )

    def _attach(self, server: ServerConn) -> None:
        server.owner = self
        self.server = server
        self._skip = 0
        self._carry = b""
        self._sent_groups = self._done_groups = 0
        self._parses.clear()
        self._forget_closes()
        if self._server_paused:
            server.transport.pause_reading()
        self.conn.upstream = server.label
        if self.pools.queries is not None:
            self._meter(server)

    # -- --pg-metrics: the app's own messages, as a relayed session's watch sees them -----

    def _meter(self, server: ServerConn) -> None:
        """Count what ``server`` answers under its endpoint (it may change between
        transactions: only when nothing is outstanding)."""
        stats, slow = self.pools.meter(server)
        if self.queries is None:
            self.queries = QueryCycles(stats, slow)
        else:
            self.queries.stats, self.queries.slow = stats, slow

    def _count(self, buf: bytearray, start: int, stop: int) -> None:
        """The app's whole messages in ``buf[start:stop]``, just sent (before any rewrite;
        those a lost transaction left are answered here and not counted)."""
        counts = self.queries
        assert counts is not None
        counts.now = 0.0
        pos = start
        while pos < stop:
            kind = buf[pos]
            end = pos + 1 + _UNPACK(buf, pos + 1)[0]
            if kind == _E:
                counts.execute()
            elif kind == _S:
                counts.sync()
            elif kind in (_Q, _P):
                text = b""
                if counts.slow is not None:  # only then is any text kept
                    text = bytes(buf[pos + 5 : min(end, pos + 5 + TEXT_HEAD)])
                if kind == _Q:
                    counts.query(text)
                elif text:
                    counts.parse(parse_text(text))
            elif kind == _F:
                counts.function_call()
            pos = end

    # -- transaction mode: statements under the ambassador's names ------------------------

    def _rewrite(self, kind: int, msg: bytes) -> bytes:
        """One app message for the current server connection (transaction mode)."""
        if kind == _Q:
            self._detect(msg[5:])
            return msg
        if not self.tracks:  # --pg-pool-max-prepared 0: the app's names, as they are
            if kind == _P:
                self._detect(msg[5:].partition(b"\0")[2])
            return msg
        server = self.server
        assert server is not None
        group = self._sent_groups
        if kind == _P:
            name, _, rest = msg[5:].partition(b"\0")
            self._detect(rest)
            if not name:
                self._parses.append((group, b"", True))
                return msg
            shared = self._name(name, rest)
            if shared in server.prepared:
                server.prepared.move_to_end(shared)
                # a stand-in whose CloseComplete becomes the app's ParseComplete
                self._closes.append((group, _PARSE_COMPLETE, b""))
                return _message(b"C", b"S" + _NO_STATEMENT + b"\0")
            self._parses.append((group, shared, True))
            return _message(b"P", shared + b"\0" + rest) + self._add_statement(shared)
        if kind == _B:
            portal, _, rest = msg[5:].partition(b"\0")
            name, _, tail = rest.partition(b"\0")
            ours = self.statements.get(name) if name else None
            if ours is None:
                return msg
            return self._prepared(ours) + _message(b"B", portal + b"\0" + ours + b"\0" + tail)
        if kind in (_D, _C):
            what, name = msg[5:6], msg[6:-1]
            if what == b"S" and name:
                ours = self.statements.get(name)
                if kind == _C:
                    if ours is not None:
                        del self.statements[name]
                        self.pools.release_statement(ours)
                    self._closes.append((group, None, b""))
                    # shared by every app that prepared the same text: never closed here
                    return _message(b"C", b"S" + _NO_STATEMENT + b"\0")
                if ours is not None:
                    return self._prepared(ours) + _message(b"D", b"S" + ours + b"\0")
            elif kind == _C:
                self._closes.append((group, None, b""))
            return msg
        return msg

    def _name(self, name: bytes, body: bytes) -> bytes:
        """Our name for the app's statement ``name`` (a Parse of ``body``), remembered.

        Raises:
            StatementLimit: a new name beyond ``--pg-pool-max-client-prepared``.
        """
        statements = self.statements
        old = statements.get(name)
        if old is None and len(statements) >= self.pools.settings.max_client_prepared:
            raise StatementLimit
        ours = statements[name] = self.pools.statement(body)
        if old is not None:  # the app parses a name again (PostgreSQL would refuse it)
            self.pools.release_statement(old)
        return ours

    def _add_statement(self, ours: bytes) -> bytes:
        """``ours`` is being prepared on the server connection: Closes of the least
        recently used statements beyond ``--pg-pool-max-prepared`` (not the app's answers)."""
        server = self.server
        assert server is not None
        pools = self.pools
        pools.statements_prepared += 1
        evicted = server.add_statement(ours, pools.settings.max_prepared)
        if not evicted:
            return b""
        pools.statements_evicted += len(evicted)
        group = self._sent_groups
        closes = []
        for old in evicted:
            self._closes.append((group, b"", old))
            closes.append(_message(b"C", b"S" + old + b"\0"))
        return b"".join(closes)

    def _prepared(self, ours: bytes) -> bytes:
        """A Parse of statement ``ours`` when the server connection lacks it (its
        ParseComplete is not the app's), else nothing."""
        server = self.server
        assert server is not None
        if ours in server.prepared:
            server.prepared.move_to_end(ours)
            return b""
        body = self.pools.statement_bodies[ours]
        self._parses.append((self._sent_groups, ours, False))
        return _message(b"P", ours + b"\0" + body) + self._add_statement(ours)

    def _detect(self, text: bytes) -> None:
        """Count and log (once per app connection) session state transaction mode loses."""
        found = _FEATURES.search(text, 0, 4096)
        if found is None or found.lastgroup is None:
            return
        feature = found.lastgroup
        self.pools.feature_used(feature)
        if feature not in self._features:
            self._features.add(feature)
            self.pools.log.warning(
                "pg_pool_session_state",
                conn=self.conn.id,
                client=self.conn.client,
                feature=feature,
                note="--pg-pool transaction: the next transaction may run on another "
                "server connection, without this state",
            )

    # -- the server's side ------------------------------------------------------------------

    def server_data(self, data: bytes) -> None:
        """What the lent server connection sent: to the app, less what was not its."""
        n = len(data)
        self.nbytes_down += n
        if self._carry:
            data = self._carry + data
            n = len(data)
            self._carry = b""
            pos = 0
        else:
            pos = self._skip
            if pos >= n:
                self._skip -= n
                self.transport.write(data)
                return
        cuts: list[tuple[int, bytes]] = []  # (position, replacement) of 5-byte messages
        rest = False
        fatal = -1  # where a FATAL ErrorResponse starts (transaction mode)
        counts = self.queries
        if counts is not None:
            counts.now = 0.0
        while pos < n:
            kind = data[pos]
            if n - pos < (6 if kind == _Z else 5):
                self._carry = data[pos:]
                break
            (length,) = _UNPACK(data, pos + 1)
            if length < 4:
                self._fail(CONNECTION_FAILURE, "podpatterns ambassador: invalid server message")
                return
            if kind == _Z:
                if counts is not None:
                    counts.ready(self.status, data[pos + 5])
                rest = self._ready(data[pos + 5])
            elif kind == _ERROR and self.transaction_mode and length <= MAX_MESSAGE:
                if n - pos < 1 + length:  # read whole: is it the session's end?
                    self._carry = data[pos:]
                    break
                if _ends_session(data[pos + 5 : pos + 1 + length]):
                    fatal = pos  # held back: _server_failed answers the app
                    break
                if counts is not None:
                    counts.error(data[pos + 5 : pos + 5 + min(length - 4, ERROR_HEAD)])
            elif kind == _PARSE_DONE and self._parses:
                _, _, to_app = self._parses.popleft()
                if not to_app:
                    cuts.append((pos, b""))
            elif kind == _CLOSE_DONE and self._closes:
                _, answer, evicted = self._closes.popleft()
                if answer is not None:
                    cuts.append((pos, answer))
                if evicted:
                    self.pools.release_statement(evicted)
            elif counts is not None and kind == _ERROR:
                head = pos + 5 + min(length - 4, ERROR_HEAD)
                if head > n:  # its SQLSTATE comes with the next read (held: bounded)
                    self._carry = data[pos:]
                    break
                counts.error(data[pos + 5 : head])
            pos += 1 + length
        self._skip = pos - n if pos > n and fatal < 0 else 0
        end = fatal if fatal >= 0 else n - len(self._carry)
        if cuts:
            parts: list[bytes] = []
            last = 0
            for at, replacement in cuts:
                parts.append(data[last:at])
                parts.append(replacement)
                last = at + 5
            parts.append(data[last:end])
            out = b"".join(parts)
        else:
            out = data if end == n else data[:end]
        if out and self.transport is not None:
            self.transport.write(out)
        if fatal >= 0:
            self._server_failed(data[fatal:])
            return
        if rest and not self._skip and not self._carry:
            if self.draining:
                self._drained()
            elif self.transaction_mode:
                self._release()

    def _ready(self, status: int) -> bool:
        """A ReadyForQuery: True when the session is at rest (nothing asked, idle)."""
        self.status = status
        self.outstanding -= 1
        group = self._done_groups
        self._done_groups += 1
        # what its group asked and the server skipped after an error
        server = self.server
        while self._parses and self._parses[0][0] <= group:
            _, name, _ = self._parses.popleft()
            if name and server is not None:
                server.drop_statement(name)
        while self._closes and self._closes[0][0] <= group:
            _, _, evicted = self._closes.popleft()
            if evicted:  # skipped after an error: still prepared there, least recent
                self._unevict(evicted)
        return status == _IDLE and self.outstanding <= 0 and not self.in_batch

    def _unevict(self, ours: bytes) -> None:
        """An eviction's Close was skipped: ``ours`` is still prepared on the server."""
        server = self.server
        if server is None or ours in server.prepared:
            self.pools.release_statement(ours)  # its user was the Close
            return
        server.prepared[ours] = None
        server.prepared.move_to_end(ours, last=False)

    def _forget_closes(self) -> None:
        """The server connection goes away with eviction Closes unanswered."""
        for _, _, evicted in self._closes:
            if evicted:
                self.pools.release_statement(evicted)
        self._closes.clear()

    def _forget_statements(self) -> None:
        """The app connection ends: its names no longer use ours."""
        for ours in self.statements.values():
            self.pools.release_statement(ours)
        self.statements.clear()

    def _release(self) -> None:
        server, self.server = self.server, None
        if server is None:
            return
        self.outstanding = 0
        if self._server_paused:
            server.transport.resume_reading()
        self.pool.returning(server)
        self.pool.release(server)

    def server_lost(self, server: ServerConn) -> None:
        """The lent server connection closed: so does the app's (what the server said
        before closing, a FATAL ErrorResponse, was passed on), except in transaction
        mode (:meth:`_server_failed`)."""
        if server is not self.server:
            return
        if self._survives():
            self._server_failed(b"")
            return
        self.server = None
        self._forget_closes()
        self.conn.note_end("upstream", "closed")
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.ended = True
        self.pools.clients.pop(self.key, None)  # as _end does: no drain, no cancel

    # -- a server connection lost mid-transaction (transaction mode) ---------------------------

    def _survives(self) -> bool:
        """Whether the app's connection outlives its lent server connection: in
        transaction mode, when what the app was sent stops at a message boundary."""
        return self.transaction_mode and not self.ended and not self._skip and not self._carry

    def _server_failed(self, fatal: bytes) -> None:
        """The lent server connection ends mid-transaction (a primary stopping for a
        failover sends FATAL 57P01, ``fatal`` here, then closes). In transaction mode only
        the transaction is lost, not the app's connection: each request in flight is
        answered with the server's error as an ERROR, and ReadyForQuery ``I``, or ``E``
        when the app was inside a transaction block, which is then answered here
        (25P02) until the app ends it; its next transaction gets another server
        connection (issue 14: writes follow the primary). Otherwise the FATAL goes on
        and the app's connection closes, as before."""
        server = self.server
        if server is None:
            return
        if not self._survives():
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(fatal)  # the server's own words; its close follows
            return
        if not server.closed:
            server.close("server_closed")  # counted while still lent (Pool.lost)
        self.server = None
        self.pools.lost_transactions += 1
        fields = _error_fields(fatal)
        lost = error_response(
            fields.get("C", CONNECTION_FAILURE),
            f"{fields.get('M', 'the server connection was lost')} (podpatterns ambassador: "
            "this transaction did not complete; the connection goes on, the next "
            "transaction runs on another server connection)",
            "ERROR",
        )
        was = self.status
        status = _IDLE if was == _IDLE else _FAILED
        ready = _message(b"Z", bytes((status,)))
        aborted = error_response("25P02", ABORTED_MESSAGE, "ERROR")
        answers = b"".join(
            (lost if i == 0 else aborted if status == _FAILED else lost) + ready
            for i in range(max(self.outstanding, 0))
        )
        self._local_error = aborted if answers and status == _FAILED else lost
        self._local_errored = False
        self._local_owed = self.in_batch
        if self.in_batch or status == _FAILED:
            self._local = status
        self.outstanding = 0
        self.status = status
        self.pools.log.info(
            "pg_pool_transaction_lost",
            conn=self.conn.id,
            upstream=server.label,
            in_block=status == _FAILED,
        )
        if self.queries is not None:
            self._meter_lost(answers, was)
        if self.transport is not None:
            self.transport.write(answers)
            self.nbytes_down += len(answers)
            self.transport.resume_reading()  # a paused server no longer holds it back
        self._server_paused = False
        if self.draining and self._local is None:
            self._drained()

    def _meter_lost(self, answers: bytes, before: int) -> None:
        """``--pg-metrics``: the requests in flight when the transaction was lost end with
        ``answers`` (their errors and ReadyForQuery); a batch not yet synced is dropped,
        as the messages answered here after it are not counted (:meth:`_count`)."""
        counts = self.queries
        assert counts is not None
        counts.now = 0.0
        for kind, body in _messages(answers):
            if kind == _ERROR:
                counts.error(body[:ERROR_HEAD])
            elif kind == _Z:
                counts.ready(before, body[0])
                before = body[0]
        counts.executes = 0
        counts.cycle_text = b""

    def _answer_locally(self, kind: int, buf: bytearray, pos: int) -> bool:
        """Answer one app message as the server would after the error of a lost
        transaction: the error once per batch (the rest skipped until Sync, COPY data
        ignored), ReadyForQuery at its end; a ROLLBACK (COMMIT, END, ABORT), simple or
        extended, ends the failed block. False when the message is not answered here
        after all (a Query whose ROLLBACK is followed by more statements: the block ends
        and the Query goes to a server connection, which runs them all)."""
        status = self._local
        assert status is not None
        out = b""
        if kind in _REQUESTS:
            owed = self._local_owed and not self._local_errored  # the batch's error
            end = pos + 1 + _UNPACK(buf, pos + 1)[0]
            ending = (
                _TRANSACTION_ENDS.match(buf, pos + 5, end)
                if kind == _Q and status == _FAILED and not owed
                else None
            )
            if ending is not None and _CHAINS.match(buf, pos + 5, end):
                # The server would open the next transaction (T) with characteristics
                # that left with the lost server connection; running the app's next
                # statements outside the block it expects could commit them, so the
                # block stays failed and the app is told why.
                out = error_response(FEATURE_NOT_SUPPORTED, CHAIN_MESSAGE, "ERROR")
                out += _message(b"Z", bytes((status,)))
            elif kind == _S and self._local_rolled_back and not self._local_errored:
                out = _READY_IDLE
                self._local = None
            elif kind == _S:  # the batch's messages were answered (an error skips the rest)
                out = (self._local_error if owed else b"") + _message(b"Z", bytes((status,)))
            elif ending is not None and not _alone(buf, ending.end(), end):
                self._local = None  # the server has no transaction: its ROLLBACK warns
                self._local_errored = self._local_ending = self._local_rolled_back = False
                self._local_owed = False
                self.status = _IDLE
                self.in_batch = False
                return False
            elif ending is not None:
                out = _ROLLBACK_DONE + _READY_IDLE
                self._local = None
            else:  # a Query or FunctionCall: refused, or skipped after the batch's error
                out = b"" if self._local_errored else self._local_error
                out += _message(b"Z", bytes((status,)))
            if status == _IDLE:
                self._local = None
            self._local_errored = self._local_ending = self._local_rolled_back = False
            self._local_owed = False
            self._local_error = error_response("25P02", ABORTED_MESSAGE, "ERROR")
            self.in_batch = False
        elif not self._local_errored and kind not in b"dcf":
            (length,) = _UNPACK(buf, pos + 1)
            body = bytes(buf[pos + 5 : pos + 1 + length])
            reply = self._ending(kind, body) if not self._local_owed else None
            if reply is None:
                out = self._local_error
                self._local_errored = True
                self._local_error = error_response("25P02", ABORTED_MESSAGE, "ERROR")
            else:
                out = reply
            self.in_batch = True
        self.status = _IDLE if self._local is None else status
        if out and self.transport is not None:
            self.transport.write(out)
            self.nbytes_down += len(out)
        if self._local is None and self.draining:
            self._drained()
        return True

    def _ending(self, kind: int, body: bytes) -> bytes | None:
        """The server's answer to an extended-protocol message that ends a failed block
        (Parse, Bind, Describe, Execute of ROLLBACK...; Close; Flush), or None when the
        message does not end it (the server answers 25P02)."""
        if kind == _P:
            name, _, rest = body.partition(b"\0")
            if not self._ends_failed_block(rest.partition(b"\0")[0]):
                return None
            if name:  # the app's statement: prepared on the next server that needs it
                try:
                    self._name(name, rest)
                except StatementLimit:
                    return None  # answered 25P02; the app's next Parse meets the limit
            else:
                self._local_unnamed = rest
            self._local_ending = True
            return _PARSE_COMPLETE
        if kind == _B:
            name = body.partition(b"\0")[2].partition(b"\0")[0]
            ours = self.statements.get(name) if name else None
            text = self.pools.statement_bodies.get(ours, b"") if ours else self._local_unnamed
            if not self._ends_failed_block(text.partition(b"\0")[0]):
                return None
            self._local_ending = True
            return _BIND_COMPLETE
        if kind == _D and self._local_ending:
            return (_NO_PARAMETERS if body[:1] == b"S" else b"") + _NO_DATA
        if kind == ord("E") and self._local_ending:  # Execute
            self._local_rolled_back = True
            return _ROLLBACK_DONE
        if kind == _C:
            if body[:1] == b"S" and len(body) > 2:
                ours = self.statements.pop(body[1:-1], None)
                if ours is not None:
                    self.pools.release_statement(ours)
            return _CLOSE_COMPLETE
        if kind == ord("H"):  # Flush
            return b""
        return None

    def _ends_failed_block(self, text: bytes) -> bool:
        """Whether the statement ``text`` ends the locally answered failed block; for an
        AND CHAIN, which cannot (see :meth:`_answer_locally`), False with the error that
        the batch answers set to say why."""
        if not _TRANSACTION_ENDS.match(text):
            return False
        if _CHAINS.match(text):
            self._local_error = error_response(FEATURE_NOT_SUPPORTED, CHAIN_MESSAGE, "ERROR")
            return False
        return True

    # -- ends ---------------------------------------------------------------------------------

    def _end(self, reuse: bool) -> None:
        """The app connection ends: the server connection goes back (reset) or closes."""
        if self.ended:
            return
        self.ended = True
        self.pools.clients.pop(self.key, None)
        self._forget_statements()
        self._forget_closes()
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
        server, self.server = self.server, None
        if server is None:
            return
        whole = not self._skip and not self._carry and not self.in_batch
        if not reuse or not whole or self.outstanding > 0 or self.pools.closing:
            server.close("client_gone_busy" if reuse else "aborted")
            return
        queries: list[bytes] = []
        if self.status != _IDLE:
            queries.append(query_message("ROLLBACK"))
        # An app that sent the server nothing changed nothing (a connection check, a
        # client that gave up): its server connection goes back without a reset.
        if not self.transaction_mode and self.used and self.pools.reset_message:
            queries.append(self.pools.reset_message)
        if self._server_paused:
            server.transport.resume_reading()
        self.pool.returning(server)
        server.reset(queries)

    def drain(self, message: str | None = None, reason: str = "drained") -> None:
        """End the app's connection at its next rest (FATAL 57P01, as a fast shutdown;
        ``message`` instead of the drain's, ``reason`` for the connection's end)."""
        if not self.draining or message is None:
            self._drain_message, self._drain_reason = message, reason
        self.draining = True
        at_rest = (
            self.status == _IDLE
            and self.outstanding <= 0
            and not self.in_batch
            and not self._skip
            and not self._carry
        )
        if at_rest:
            self._drained()

    def _drained(self) -> None:
        from podpatterns.ambassador.pgdrain import DRAIN_MESSAGE

        self.conn.end_by_proxy(self._drain_reason)
        message = self._drain_message or DRAIN_MESSAGE
        if self.transport is None:  # the app's socket is not attached yet: it is told then
            self._last_words = error_response(ADMIN_SHUTDOWN, message)
        elif not self.transport.is_closing():
            self.transport.write(error_response(ADMIN_SHUTDOWN, message))
        self._end(reuse=True)
        if self.transport is not None:
            self.transport.close()

    def _fail(self, sqlstate: str, message: str) -> None:
        self._fail_with(error_response(sqlstate, message))

    def _fail_with(self, response: bytes) -> None:
        self.conn.end_by_proxy("pool_error")
        self._end(reuse=False)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(response)
            self.transport.close()


def _alone(buf: bytearray, start: int, end: int) -> bool:
    """Whether the Query text in ``buf[start:end]``, the rest of a statement that ends a
    block, holds no other statement (only ``;``, white space, comments)."""
    semicolon = buf.find(b";", start, end)
    return semicolon < 0 or _NOTHING_MORE.match(buf, semicolon, end) is not None


def _ends_session(body: bytes) -> bool:
    """Whether an ErrorResponse's fields say FATAL or PANIC (the non-localized ``V``
    field, PostgreSQL 9.6 and later, or the severity ``S``): the server closes next."""
    return any(item in _SESSION_ENDS for item in body.split(b"\0"))


_SESSION_ENDS = frozenset((b"VFATAL", b"VPANIC", b"SFATAL", b"SPANIC"))


def _error_fields(message: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse (type, length, then code and text pairs), as far
    as ``message`` holds them."""
    fields: dict[str, str] = {}
    for item in message[5:].split(b"\0"):
        if len(item) > 1:
            fields.setdefault(chr(item[0]), item[1:].decode("utf-8", "replace"))
    return fields


def pool_timeout_message(settings: PoolSettings) -> str:
    """What an app that waited ``--pg-pool-wait`` in vain is told (with SQLSTATE 53300)."""
    return (
        f"podpatterns ambassador: no pooled server connection free within --pg-pool-wait "
        f"{settings.wait:g}s (--pg-pool-size {settings.size} in use)"
    )


def pool_collector(routes: Iterable[tuple[str, Pools]]) -> CallbackCollector:
    """The pool metric families of every route with ``--pg-pool``."""
    pairs = tuple(routes)

    def states() -> Iterator[Sample]:
        for name, pools in pairs:
            in_use, idle, other, _ = pools.counts()
            yield (name, "in_use"), float(in_use)
            yield (name, "idle"), float(idle)
            yield (name, "opening_or_reset"), float(other)

    def waiting() -> Iterator[Sample]:
        for name, pools in pairs:
            yield (name,), float(pools.counts()[3])

    def closed() -> Iterator[Sample]:
        for name, pools in pairs:
            for reason, n in pools.closed.items():
                yield (name, reason), float(n)

    def features() -> Iterator[Sample]:
        for name, pools in pairs:
            for feature, n in pools.features.items():
                yield (name, feature), float(n)

    def per_route(attr: str) -> Callable[[], Iterator[Sample]]:
        def samples() -> Iterator[Sample]:
            for name, pools in pairs:
                yield (name,), float(getattr(pools, attr))

        return samples

    def statements() -> Iterator[Sample]:
        for name, pools in pairs:
            yield (name,), float(len(pools.statement_bodies))

    def waits() -> Iterator[HistogramSample]:
        for name, pools in pairs:
            yield (name,), pools.wait_time.counts, pools.wait_time.total

    p = "ambassador_pg_pool_"
    return CallbackCollector(
        [
            Family(
                "gauge",
                p + "connections",
                "pooled server connections (--pg-pool) by state: in_use, idle, opening_or_reset",
                ("route", "state"),
                states,
            ),
            Family(
                "gauge",
                p + "waiting_clients",
                "app connections waiting for a pooled server connection",
                ("route",),
                waiting,
            ),
            Histogram(
                p + "wait_seconds",
                "time an app connection waited for a pooled server connection (0 when "
                "one was idle)",
                ("route",),
                LATENCY_BUCKETS,
                waits,
            ),
            Family(
                "counter",
                p + "server_opened",
                "pooled server connections opened",
                ("route",),
                per_route("opened"),
            ),
            Family(
                "counter",
                p + "server_open_failures",
                "pooled server connections that could not be opened",
                ("route",),
                per_route("open_failures"),
            ),
            Family(
                "counter",
                p + "server_closed",
                "pooled server connections closed, by reason",
                ("route", "reason"),
                closed,
            ),
            Family(
                "counter",
                p + "transactions_lost",
                "app transactions lost with their server connection in transaction mode "
                "(answered with an error; the app's connection goes on)",
                ("route",),
                per_route("lost_transactions"),
            ),
            Family(
                "counter",
                p + "wait_timeouts",
                "app connections refused with 53300 after --pg-pool-wait",
                ("route",),
                per_route("wait_timeouts"),
            ),
            Family(
                "counter",
                p + "statements_prepared",
                "named statements prepared on server connections under the ambassador's "
                "names (--pg-pool transaction): an app's Parse, or again for a Bind or "
                "Describe on a server connection without it",
                ("route",),
                per_route("statements_prepared"),
            ),
            Family(
                "counter",
                p + "statements_evicted",
                "prepared statements closed on a server connection beyond "
                "--pg-pool-max-prepared (least recently used first)",
                ("route",),
                per_route("statements_evicted"),
            ),
            Family(
                "counter",
                p + "statements_refused",
                "app connections ended (FATAL 53400) for naming more statements than "
                "--pg-pool-max-client-prepared",
                ("route",),
                per_route("statements_refused"),
            ),
            Family(
                "gauge",
                p + "statements",
                "distinct statements (text and parameter types) the pool tracks for the "
                "app connections and server connections of a route",
                ("route",),
                statements,
            ),
            Family(
                "counter",
                p + "session_state",
                "statements using session state that --pg-pool transaction does not keep, "
                "by feature",
                ("route", "feature"),
                features,
            ),
        ]
    )
