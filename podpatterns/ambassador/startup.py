"""A protocol route's connections from accept to relay: the handler's startup, driven.

A route with a protocol handler (``--protocol postgres``) does not dial on accept: each
connection goes through :meth:`Startup.run`, which runs the handler's client side of the
startup, dials (the route's pool, retries and health, as :mod:`.dial` does for tcp
routes), runs the upstream side, and hands both sockets to the same relays a tcp route
uses (:mod:`.splice`, or :mod:`.relay` with the TLS leg). Whatever fails before the
session exists is counted, logged and answered in the protocol's own terms
(:meth:`~.protocol.ProtocolSession.refuse`) before the connection is closed.

The route composes one :class:`Startup` and owns the tasks that run it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from podpatterns.ambassador import splice
from podpatterns.ambassador.config import VERIFIED_SSLMODES, RouteConfig
from podpatterns.ambassador.connection import Connection, abandon, discard_input
from podpatterns.ambassador.deadlines import Deadlines
from podpatterns.ambassador.dial import Dialer, DialError, DialPolicy
from podpatterns.ambassador.listener import ListenerTLS
from podpatterns.ambassador.pgauth import (
    ClientPassword,
    Credentials,
    PasswordFile,
    SecretError,
    ServerError,
    allowed_methods,
    password_source,
)
from podpatterns.ambassador.pgdrain import DRAIN_MESSAGE, TransactionWatch
from podpatterns.ambassador.pghealth import RoleCheck
from podpatterns.ambassador.pgmetrics import QueryMetrics, SlowQueries
from podpatterns.ambassador.pgpool import (
    ClientSession,
    Pool,
    Pools,
    PoolTimeout,
    ServerConn,
    issue_key,
    pool_timeout_message,
    startup_answer,
)
from podpatterns.ambassador.pgroles import ROLE_CHANGED_MESSAGE, Roles
from podpatterns.ambassador.postgres import (
    MAX_STARTUP_PACKET,
    SQLSTATE,
    PostgresHandler,
    PostgresSession,
    error_response,
)
from podpatterns.ambassador.protocol import (
    Established,
    Failure,
    ProtocolHandler,
    ProtocolSession,
    SessionWatch,
    SocketStream,
    TLSStream,
)
from podpatterns.ambassador.relay import Leg, ProtocolRelay
from podpatterns.ambassador.tls import TLSContextProvider
from podpatterns.ambassador.upstreams import Endpoint, UpstreamPool
from podpatterns.metrics import Buckets

#: What :meth:`Startup.begin` reads at once: a StartupMessage is far smaller.
STARTUP_READ = 4096
_HEAD = struct.Struct("!ii")  # a startup packet's length and protocol code
_LENGTH = struct.Struct("!i")

_DIAL_WORDS = {
    "refused": "connection refused",
    "timeout": "connect timed out",
    "dns": "name not resolved",
    "unreachable": "network unreachable",
}


def refusal(kind: str, cfg: RouteConfig) -> Failure:
    """Why a connection is refused before its startup: ``limit`` (``--max-connections``
    reached with ``--on-limit reject``) or ``shutdown`` (the route drains)."""
    if kind == "limit":
        return Failure(
            "limit",
            f"podpatterns ambassador: too many connections (--max-connections "
            f"{cfg.max_connections} reached on route {cfg.name!r})",
        )
    # what the server itself says on a fast shutdown; pools know it: discard, reconnect
    return Failure("shutdown", DRAIN_MESSAGE)


def unreachable_message(exc: DialError, cfg: RouteConfig) -> str:
    """The message a protocol client gets when no endpoint could be connected."""
    where = exc.endpoint or ", ".join(str(u) for u in cfg.upstream)
    return f"podpatterns ambassador: cannot reach {where} ({_DIAL_WORDS.get(exc.reason, exc)})"


def make_handler(
    cfg: RouteConfig,
    tls: TLSContextProvider | None,
    log: Any,
    queries: QueryMetrics | None = None,
    listen_tls: ListenerTLS | None = None,
) -> ProtocolHandler | None:
    """The handler ``--protocol`` names; None for ``tcp`` (a byte relay from accept).

    Args:
        cfg: the route's configuration.
        tls: the route's upstream TLS contexts (:func:`~.tls.route_tls`), or None.
        log: the route's logger.
        queries: with ``--pg-metrics``, the route's query counts, which sessions add into.
        listen_tls: the listener's TLS server contexts (``--listen-tls-cert``:
            :func:`~.listener.listener_tls`), or None.
    """
    if cfg.protocol == "tcp":
        return None
    if cfg.sslmode == "prefer":
        log.warning(
            "pg_sslmode_prefer",
            note="--pg-sslmode prefer: a server that refuses TLS is used WITHOUT TLS",
        )
    return PostgresHandler(
        (lambda: tls.context) if tls is not None else None,
        sslmode=cfg.sslmode,
        negotiation=cfg.pg_tls_negotiation,
        server_name=cfg.tls_server_name,
        handshake_timeout=cfg.connect_timeout,
        route=cfg.name,
        watch=session_watch(cfg.pg_drain == "transaction", queries, cfg.pg_slow_query, log),
        listen_context=(lambda: listen_tls.context) if listen_tls is not None else None,
        listen_certificate=listen_tls.certificate if listen_tls is not None else None,
        credentials=make_credentials(cfg, log),
        roles=Roles(cfg.pg_target_session_attrs, cfg.name)
        if cfg.pg_target_session_attrs != "any"
        else None,
    )


def make_credentials(cfg: RouteConfig, log: Any) -> Credentials | None:
    """The route's credentials (``--pg-password-file`` or ``--pg-password-command``),
    the files read once now; None when the app authenticates itself (relayed).

    Raises:
        ConfigError: a file cannot be read or is empty, or the command line cannot be
            split (exit 2 at start).
    """
    from podpatterns.errors import ConfigError

    where = "" if cfg.name == "default" else f"route {cfg.name!r}: "
    try:
        secret = password_source(
            cfg.pg_password_file, cfg.pg_password_command, cfg.pg_password_command_ttl
        )
        if secret is None:
            return None
        client = None
        if cfg.pg_client_password_file is not None:
            client = ClientPassword(
                PasswordFile(cfg.pg_client_password_file, "--pg-client-password-file"),
                cfg.pg_client_auth_method,
            )
            client.load()
    except SecretError as exc:
        raise ConfigError(f"{where}{exc}") from None
    verified = cfg.sslmode in VERIFIED_SSLMODES
    methods = allowed_methods(cfg.pg_auth_methods or None, verified)
    if "md5" in methods and not verified:
        log.warning(
            "pg_md5_without_verified_tls",
            note="--pg-auth-methods md5 over a leg that is not verified TLS: a man in the "
            "middle can replay the hash to this server",
        )
    return Credentials(secret, methods, client)


def session_watch(
    drains: bool,
    queries: QueryMetrics | None,
    slow_after: float | None = None,
    log: Any = None,
) -> Callable[[Endpoint], SessionWatch] | None:
    """What makes a postgres session's watch: for ``--pg-drain transaction``, for
    ``--pg-metrics`` (and ``--pg-slow-query``), for both (one framing watch), or None
    (a byte relay)."""
    if queries is not None:

        def watch(endpoint: Endpoint) -> TransactionWatch:
            slow = None
            if slow_after is not None:
                slow = SlowQueries(slow_after, log, str(endpoint))
            return TransactionWatch(queries.for_endpoint(endpoint), drains=drains, slow=slow)

        return watch
    return (lambda _: TransactionWatch()) if drains else None


class Startup:
    """Accept -> client startup -> dial -> upstream startup -> relay, for one route.

    Args:
        cfg: the route's configuration.
        handler: the route's protocol handler.
        pool: the route's upstream pool.
        dial_policy: connect timeout, retries and socket options, as for tcp routes.
        failed: the route's counter of connections that reached no upstream, by reason.
        connect_failed: count one failed connect attempt to an endpoint.
        dial_failed: count and log a dial that reached no endpoint.
        send_proxy_header: write the PROXY protocol header, if the route sends one.
        pipes: the route's splice pipes; None when plaintext legs take the Protocol relay.
        connect_seconds: the route's connect-time histogram.
        log: the route's logger.
        queries: with ``--pg-metrics``, the route's query counts (for its pool's sessions;
            the relayed ones count through ``handler.watch``).
    """

    def __init__(
        self,
        cfg: RouteConfig,
        handler: ProtocolHandler,
        *,
        pool: UpstreamPool,
        dial_policy: DialPolicy,
        failed: Counter[str],
        connect_failed: Callable[[Endpoint, str], None],
        dial_failed: Callable[[Connection, DialError], None],
        send_proxy_header: Callable[[socket.socket, socket.socket, Any], None],
        pipes: splice.PipePool | None,
        connect_seconds: Buckets,
        log: Any,
        queries: QueryMetrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.handler = handler
        self.pool = pool
        self.dial_policy = dial_policy
        self.sessions: dict[Connection, ProtocolSession] = {}
        self.watches: dict[Connection, SessionWatch] = {}
        self.draining = False
        # connections in their startup phase (before the hand-off), with the task running it
        self._starting: dict[Connection, asyncio.Task[Any]] = {}
        self._failed = failed
        self._connect_failed = connect_failed
        self._dial_failed = dial_failed
        self._send_proxy_header = send_proxy_header
        self._pipes = pipes
        self.connect_seconds = connect_seconds
        self._log = log
        # --pg-pool: server connections kept and lent (docs/ambassador-postgres.md, Pooling)
        self.pools: Pools | None = None
        if cfg.pg_pool != "off" and isinstance(handler, PostgresHandler):
            self.pools = Pools(
                cfg.pool_settings(),
                handler,
                self._pool_dial,
                route=cfg.name,
                log=log,
                queries=queries,
                slow_query=cfg.pg_slow_query,
            )
            handler.cancel_target = self.pools.cancel_target
        #: Whether a pooled app's startup may be answered the short way (:meth:`short_way`):
        #: nothing more is asked of the app than its StartupMessage.
        creds = handler.credentials if isinstance(handler, PostgresHandler) else None
        self.short_way_applies = (
            self.pools is not None
            and self.pools.handler.listen_context is None
            and not (creds is not None and creds.client_password)
        )
        # connections a PoolGate still holds, each falling back at --startup-timeout
        self.gates: Deadlines[PoolGate] = Deadlines(cfg.startup_timeout, PoolGate.fall_back)

        #: The route's active health check when it is not a TCP connect: PostgreSQL's
        #: role check (--pg-target-session-attrs), or None.
        self.health_check: RoleCheck | None = None
        self.roles: Roles | None = None
        if isinstance(handler, PostgresHandler) and handler.roles is not None:
            self.roles = handler.roles
            assert cfg.pg_health_user is not None  # RouteConfig checked it
            self.health_check = RoleCheck(
                handler, pool, handler.roles, cfg.pg_health_user, cfg.pg_health_database, cfg.name
            )
            if cfg.pg_close_on_role_change:
                handler.roles.on_mismatch = self.end_sessions_on
            if self.pools is not None:  # pooled connections follow the roles too
                handler.roles.on_change = self.pools.role_changed

    async def close(self) -> None:
        """Close the pooled server connections (``--pg-pool``)."""
        if self.pools is not None:
            await self.pools.close()

    def end_sessions_on(self, ep: Endpoint) -> None:
        """``ep``'s role stopped matching the target (--pg-close-on-role-change): each of
        its sessions ends at its next transaction boundary with FATAL 57P01, pooled ones
        in session mode too (:meth:`.pgpool.Pools.end_sessions_on`); a session relayed
        without a watch (--pg-drain off) is left to the server."""
        ended = 0
        for conn, watch in list(self.watches.items()):
            if conn.endpoint is ep and isinstance(watch, TransactionWatch) and watch.drains:
                watch.message = ROLE_CHANGED_MESSAGE
                watch.end_reason = "role_changed"
                watch.drain()
                ended += 1
        if self.pools is not None:
            ended += self.pools.end_sessions_on(ep)
        self._log.warning("pg_role_sessions_ended", upstream=str(ep), sessions=ended)

    def _check_roles(self) -> None:
        """Raise Failure ``role`` when every endpoint's role is known and none serves
        the target (all standbys, for read-write)."""
        assert self.roles is not None
        if not self._role_candidates():
            raise Failure(
                "role",
                f"podpatterns ambassador: no endpoint is {self.roles.target} "
                f"({self.roles.describe(self.pool.endpoints)})",
            )

    async def _pool_dial(self) -> tuple[socket.socket, Endpoint]:
        """Dial for a pooled server connection: as for an app's session, an endpoint of
        the target role (Failure ``role`` when every role is known and none serves)."""
        if self.roles is not None:
            self._check_roles()
        return await self._dial(None)

    def _role_candidates(self) -> list[Endpoint]:
        """The pool's order, narrowed to the endpoints that serve the target role."""
        assert self.roles is not None
        return self.roles.order(self.pool.candidates())

    def finished(self, conn: Connection) -> None:
        """``conn`` has ended: its session forgets its state."""
        session = self.sessions.pop(conn, None)
        if session is not None:
            session.finished()
        self.watches.pop(conn, None)

    def drain(self) -> None:
        """Draining starts: each watched session ends at its next boundary.

        With ``--pg-drain transaction`` a connection still in its startup is at a
        boundary too (it has no session, so no transaction to lose): its startup is
        cancelled and the client told why (PostgreSQL: FATAL 57P01), as the server's own
        fast shutdown ends a backend still authenticating. With ``--pg-drain off`` it
        goes on, and is told at the drain deadline if it is still starting then.
        """
        if self.draining:
            return
        self.draining = True
        for watch in list(self.watches.values()):
            watch.drain()
        if self.pools is not None:
            self.pools.drain()
        if self.cfg.pg_drain == "transaction":
            for conn, task in list(self._starting.items()):
                conn.end_by_proxy("drained")
                task.cancel()
            self.shut_gates("drained")

    def shut_gates(self, reason: str) -> None:
        """Answer the connections a :class:`PoolGate` still holds as :meth:`run` answers
        a startup it cuts (FATAL 57P01), and close them: the route is draining
        (``--pg-drain transaction``) or closing."""
        for gate in self.gates.items():
            gate.shut(reason)

    async def _dial(self, only: Endpoint | None) -> tuple[socket.socket, Endpoint]:
        """Dial as :meth:`_on_accept` does for tcp routes, awaitable. Raises DialError."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[socket.socket, Endpoint]] = loop.create_future()

        def dialed(
            usock: socket.socket | None, ep: Endpoint | None, exc: BaseException | None
        ) -> None:
            if done.cancelled():
                if usock is not None:
                    loop.remove_writer(usock.fileno())  # before the close (Dialer)
                    usock.close()
            elif usock is not None and ep is not None:
                done.set_result((usock, ep))
            else:
                done.set_exception(exc or DialError("error", "no endpoint"))

        dialer = Dialer(
            loop,
            self.pool,
            self.dial_policy,
            dialed,
            self._connect_failed,
            only,
            self._role_candidates if self.roles is not None else None,
        )
        dialer.start()
        try:
            return await done
        except asyncio.CancelledError:
            dialer.cancel()
            raise

    def begin(self, conn: Connection, csock: socket.socket, peer: Any) -> Coroutine[Any, Any, None]:
        """What the route's task for a new connection runs: :meth:`run`, or with
        ``--pg-pool`` the short way (:meth:`short_way`) when the app's StartupMessage is
        in the socket already; then the task only attaches the app's socket. Otherwise
        what was read goes to :meth:`run`. (A route without a connection cap takes its
        connections through :class:`PoolGate` instead: no socket object, no task.)
        """
        if not self.short_way_applies or self.draining:
            return self.run(conn, csock, peer)
        try:
            ahead = csock.recv(STARTUP_READ)
        except OSError:  # nothing yet (BlockingIOError), or an error run() meets again
            return self.run(conn, csock, peer)
        client = self.short_way(conn, ahead) if ahead else None
        if client is None:
            return self.run(conn, csock, peer, ahead)  # EOF, more, less, not a startup
        return self._pool_attach(conn, csock, client)

    def short_way(self, conn: Connection, ahead: bytes) -> ClientSession | None:
        """The pooled app's :class:`~.pgpool.ClientSession`, its startup answered from the
        pool, when ``ahead`` is exactly a StartupMessage (no SSLRequest, no
        CancelRequest) and a server connection is idle (session mode) or the server's
        parameters are known (transaction mode); else None, and :meth:`run` takes it.

        Issue 14's ``pgbench -C`` target: the work per new connection is what a pool's
        throughput depends on. Only for a route where nothing more is asked of the app
        (:attr:`short_way_applies`: no ``--pg-client-auth``, no ``--listen-tls-cert``),
        and not while draining.
        """
        pools = self.pools
        if pools is None or self.draining or len(ahead) < 8:
            return None
        length, code = _HEAD.unpack_from(ahead)
        if length != len(ahead) or code >> 16 != 3 or length > MAX_STARTUP_PACKET:
            return None
        pool = pools.pool_for(ahead)
        if pools.settings.mode == "transaction":
            if pool.params is None:
                return None
            server, params = None, pool.params
        else:
            server = pool.take()
            if server is None:  # run() waits for one, within --pg-pool-wait
                return None
            params = server.params
        key = issue_key()
        client = ClientSession(pools, pool, conn, server, key, startup_answer(params, key))
        conn.relay = client
        conn.upstream = server.label if server is not None else "pool"
        return client

    def gate_factory(
        self,
        accept: Callable[[socket.socket, Any], None],
        admit: Callable[[Any], Connection],
        start_task: Callable[[Coroutine[Any, Any, None], Connection, socket.socket], None],
    ) -> Callable[[], PoolGate]:
        """The protocol factory of a pooled route's listener (``Listener.serve``).

        Args:
            accept: the route's accept for a socket (the classic way: refusals while
                draining count and answer there).
            admit: count a new connection and make its record.
            start_task: run a connection's startup as an owned task, with the socket
                it takes charge of.
        """
        return lambda: PoolGate(self, accept, admit, start_task)

    async def _pool_attach(
        self, conn: Connection, csock: socket.socket, client: ClientSession
    ) -> None:
        """The short way's end: the app's socket to its :class:`~.pgpool.ClientSession`."""
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: client, csock)
        except BaseException as exc:
            conn.note_end("proxy", "cancelled")
            abandon(conn, csock, None)  # the server connection is closed, not reused
            if not isinstance(exc, OSError | asyncio.CancelledError):
                raise
            return
        if self.draining:
            client.drain()
        self.connect_seconds.observe(time.monotonic() - conn.started)

    async def run(
        self,
        conn: Connection,
        csock: socket.socket,
        peer: Any,
        ahead: bytes = b"",
        deadline: float | None = None,
    ) -> None:
        """Accept -> client startup -> dial -> upstream startup -> the relays.

        ``ahead``: what :meth:`begin` (or a :class:`PoolGate`) read from ``csock``
        already; ``deadline``: the loop time ``--startup-timeout`` ends at, when the
        connection was accepted before this starts.
        """
        session = self.handler.open(SocketStream(csock, ahead=ahead), conn.client)
        self.sessions[conn] = session
        usock: socket.socket | None = None
        upstream_phase = False
        task = asyncio.current_task()
        assert task is not None
        self._starting[conn] = task
        try:
            if self.draining and self.cfg.pg_drain == "transaction":
                raise refusal("shutdown", self.cfg)  # accepted just before draining began
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self.cfg.startup_timeout
            try:
                async with asyncio.timeout_at(deadline):
                    if not await session.accept():
                        conn.note_end("client", "closed")
                        abandon(conn, csock, None, reset=False)
                        return
                    upstream_phase = True
                    if (
                        self.pools is not None
                        and isinstance(session, PostgresSession)
                        and session.cancel is None
                    ):
                        pooled = await self._pool_acquire(conn, session, self.pools)
                        del self._starting[conn]
                        await self._pool_hand_off(conn, csock, session, *pooled)
                        return
                    tries = len(self.pool.endpoints)
                    while True:
                        if self.roles is not None and session.pinned is None:
                            self._check_roles()
                        try:
                            usock, ep = await self._dial(session.pinned)
                        except DialError as exc:
                            self._dial_failed(conn, exc)
                            raise Failure(
                                "unreachable", unreachable_message(exc, self.cfg)
                            ) from exc
                        conn.endpoint = ep
                        conn.upstream = str(ep)
                        ep.active += 1
                        self._send_proxy_header(csock, usock, peer)
                        try:
                            established = await session.connect(usock, ep)
                        except Failure as failure:
                            # the server's role changed since its last check (its own
                            # startup said so; nothing reached the app): dial again
                            tries -= 1
                            if failure.kind != "role" or tries <= 0:
                                raise
                            self._log.info("pg_role_redial", conn=conn.id, upstream=str(ep))
                            usock.close()
                            usock = None
                            ep.active -= 1
                            conn.endpoint = None
                            continue
                        break
                    # no await from here to the relays: a drain no longer cancels this
                    del self._starting[conn]
            except TimeoutError:
                raise Failure(
                    "timeout",
                    f"podpatterns ambassador: no session with {conn.upstream or 'an upstream'} "
                    f"within --startup-timeout {self.cfg.startup_timeout:g}s",
                ) from None
            if established is None:  # complete without a relay (a cancel request, ...)
                conn.note_end("upstream", "eof")
                abandon(conn, csock, usock, reset=False)
                return
            await self._hand_off(conn, csock, established)
        except Failure as failure:
            await self._refuse(conn, session, failure, csock, usock, upstream_phase)
        except ServerError as refused:  # --pg-pool: the server's own words, to the app
            self._failed["refused"] += 1
            conn.note_end("proxy", "upstream_refused")
            try:
                async with asyncio.timeout(self.cfg.startup_timeout):
                    await session.client.write(refused.raw)  # type: ignore[attr-defined]
            except (OSError, TimeoutError):
                pass
            finally:
                abandon(conn, csock, None, reset=False)
        except asyncio.CancelledError:
            # drain(), cut() or close(): the ambassador is shutting down. Tell the client,
            # briefly.
            task.uncancel()
            if conn.relay is None:
                shutdown = refusal("shutdown", self.cfg)
                await self._refuse(conn, session, shutdown, csock, usock, False, budget=1.0)
            else:
                abandon(conn, csock, usock)
        except (OSError, ssl.SSLError) as exc:  # a peer went away, or a socket failed
            conn.note_end("upstream" if upstream_phase else "client", "error")
            self._log.info(
                "startup_failed", conn=conn.id, client=conn.client, error=str(exc) or repr(exc)
            )
            abandon(conn, csock, usock)
        finally:
            self._starting.pop(conn, None)

    async def _pool_acquire(
        self, conn: Connection, session: PostgresSession, pools: Pools
    ) -> tuple[Pool, ServerConn | None, bytes]:
        """The app's pool and, in session mode, the server connection lent to it; the
        ParameterStatus messages to answer its startup with.

        Raises:
            Failure: no server connection (``limit`` after ``--pg-pool-wait``: 53300).
            ServerError: the server refused the connection opened for this app.
        """
        assert session.startup is not None
        pool = pools.pool_for(session.startup)
        transaction = pools.settings.mode == "transaction"
        if transaction and pool.params is not None:
            return pool, None, pool.params
        server = pool.take()
        while server is None or server.closed:  # closed after it was granted: again
            fut = pool.wait()
            try:
                server = await fut
            except PoolTimeout:
                raise Failure("limit", pool_timeout_message(pools.settings)) from None
            except DialError as exc:
                self._dial_failed(conn, exc)
                raise Failure("unreachable", unreachable_message(exc, self.cfg)) from exc
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    lent = fut.result()  # granted just before the cancel: give it back
                    pool.returning(lent)
                    pool.release(lent)
                raise
        if transaction:  # it was needed for the parameters only
            pool.returning(server)
            pool.release(server)
            return pool, None, server.params
        return pool, server, server.params

    async def _pool_hand_off(
        self,
        conn: Connection,
        csock: socket.socket,
        session: PostgresSession,
        pool: Pool,
        server: ServerConn | None,
        params: bytes,
    ) -> None:
        """Answer the app's startup and let its :class:`~.pgpool.ClientSession` run."""
        assert self.pools is not None
        key = issue_key()
        client = ClientSession(self.pools, pool, conn, server, key, startup_answer(params, key))
        conn.relay = client
        conn.upstream = str(server.endpoint) if server is not None else "pool"
        leftover = session.client.take_buffered()
        try:
            if isinstance(session.client, TLSStream):
                session.client.hand_over(client)
            else:
                loop = asyncio.get_running_loop()
                await loop.connect_accepted_socket(lambda: client, csock)
        except BaseException:
            client.abort()
            raise
        if leftover:
            client.data_received(leftover)
        if self.draining:
            client.drain()
        self.connect_seconds.observe(time.monotonic() - conn.started)

    async def _refuse(
        self,
        conn: Connection,
        session: ProtocolSession,
        failure: Failure,
        csock: socket.socket,
        usock: socket.socket | None,
        upstream_phase: bool,
        budget: float | None = None,
    ) -> None:
        """Count and log ``failure``, answer the client through the handler, close."""
        if usock is not None:
            usock.close()  # before answering: the upstream must not wait on us
            usock = None
        if failure.kind == "shutdown":
            conn.note_end("proxy", "drained")  # or drain_cut, closed: noted already
        elif upstream_phase:
            reason = {"upstream_closed": "closed"}.get(failure.kind, failure.kind)
            if failure.kind != "unreachable":  # counted by _dial_failed
                self._failed[reason] += 1
                self._log.warning(
                    "upstream_connect_failed",
                    conn=conn.id,
                    client=conn.client,
                    upstream=conn.upstream,
                    reason=reason,
                    error=failure.message,
                )
                ep = conn.endpoint
                if isinstance(ep, Endpoint) and failure.kind == "tls":
                    self._connect_failed(ep, "tls")
                    self.pool.mark_failure(ep, "tls")
            conn.note_end("proxy", f"upstream_{reason}")
        else:
            conn.note_end("client", "protocol_error")
            self._log.info(
                "client_protocol_error", conn=conn.id, client=conn.client, error=failure.message
            )
        try:
            async with asyncio.timeout(budget or self.cfg.startup_timeout):
                await session.refuse(failure)
        except (OSError, TimeoutError):
            pass  # the client is gone or does not read: closing is all there is
        finally:  # also when cancelled again (close() after a drain): finished once
            abandon(conn, csock, None, reset=False)

    async def refuse(self, csock: socket.socket, client: str, kind: str) -> None:
        """A connection refused before its startup (see :func:`refusal`), in the
        protocol's terms, within ``--startup-timeout``; ``csock`` is closed after."""
        session = self.handler.open(SocketStream(csock), client)
        failure = refusal(kind, self.cfg)
        try:
            async with asyncio.timeout(self.cfg.startup_timeout):
                await session.refuse(failure)
        except (OSError, TimeoutError):
            pass
        finally:
            session.finished()
            discard_input(csock)
            csock.close()

    async def _hand_off(self, conn: Connection, csock: socket.socket, est: Established) -> None:
        """The session exists: give both legs to the relays a tcp route uses.

        A session with a watch (:class:`~.protocol.SessionWatch`) takes the Protocol relay
        with the watch's legs, never splice: the watch must see every byte. So does one
        whose client leg is TLS (``--listen-tls-cert``).
        """
        loop = asyncio.get_running_loop()
        usock = est.upstream
        watch = est.watch
        make_leg = watch.make_leg if watch is not None else Leg
        if watch is not None:
            self.watches[conn] = watch
        if est.tls is not None:
            relay = ProtocolRelay(conn, self.cfg.buffer_size, make_leg)
            # before any await: what the TLS leg receives from now on is the relay's
            to_client = est.to_client + est.tls.take_buffered()
            est.tls.hand_over(relay.upstream)
            if to_client:
                relay.upstream.data_received(to_client)  # held until the client leg exists
            await self._attach_client(relay, csock, est)
            if est.to_upstream:
                relay.client.data_received(est.to_upstream)
        else:
            # sent before any leg reads, so that the order holds; a watch is shown them
            if est.to_client:
                if est.client is not None:
                    await est.client.write(est.to_client)
                else:
                    await loop.sock_sendall(csock, est.to_client)
                if watch is not None:
                    watch.passed("upstream", est.to_client)
            if est.to_upstream:
                await loop.sock_sendall(usock, est.to_upstream)
                if watch is not None:
                    watch.passed("client", est.to_upstream)
            if self._pipes is not None and watch is None and est.client is None:
                splice.SpliceRelay(loop, conn, csock, usock, self._pipes).start()
            else:
                relay = ProtocolRelay(conn, self.cfg.buffer_size, make_leg)
                await loop.create_connection(lambda: relay.upstream, sock=usock)
                await self._attach_client(relay, csock, est)
        if watch is not None and self.draining:  # draining started during the startup
            watch.drain()
        self.connect_seconds.observe(time.monotonic() - conn.started)

    @staticmethod
    async def _attach_client(relay: ProtocolRelay, csock: socket.socket, est: Established) -> None:
        """The relay's client leg: the app's TLS leg, or the plaintext client socket."""
        if est.client is not None:
            est.client.hand_over(relay.client)
        else:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: relay.client, csock)


class PoolGate(asyncio.Protocol):
    """A pooled route's new connection, as the event loop's server accepted it
    (``Listener.serve``), until its StartupMessage decides its way.

    The short way (:meth:`Startup.short_way`) passes the transport to the app's
    :class:`~.pgpool.ClientSession`: no socket object, no task, no coroutine, which is
    what a new connection costs most in Python. Anything else (an SSLRequest, a
    CancelRequest, no idle server connection, draining, ``--startup-timeout`` with
    the startup incomplete) falls back: a duplicate of the socket, with the bytes read
    so far, goes to :meth:`Startup.run` as a connection the classic accept took.
    """

    __slots__ = (
        "_accept",
        "_admit",
        "_buf",
        "_deadline",
        "_start_task",
        "_startup",
        "conn",
        "peer",
        "state",
        "transport",
    )

    PENDING, PASSED, CLOSING = 0, 1, 2  # the transport is passed on, or closing

    def __init__(
        self,
        startup: Startup,
        accept: Callable[[socket.socket, Any], None],
        admit: Callable[[Any], Connection],
        start_task: Callable[[Coroutine[Any, Any, None], Connection, socket.socket], None],
    ) -> None:
        self._startup = startup
        self._deadline = 0.0
        self._accept = accept
        self._admit = admit
        self._start_task = start_task
        self._buf = b""
        self.conn: Connection | None = None
        self.peer: Any = None
        self.state = PoolGate.PENDING
        self.transport: Any = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        startup = self._startup
        if startup.draining:  # the classic accept refuses it, in the protocol's terms
            self.state = PoolGate.PASSED
            sock = self._take_socket()
            if sock is not None:
                self._accept(sock, self.peer)
            return
        self.conn = self._admit(self.peer)
        self._deadline = startup.gates.add(self)  # fall_back() then, unless settled

    def data_received(self, data: bytes) -> None:
        if self.state != PoolGate.PENDING:
            return
        buf = self._buf = self._buf + data if self._buf else data
        if len(buf) < 8:
            return
        (length,) = _LENGTH.unpack_from(buf)
        if 8 <= length <= MAX_STARTUP_PACKET and len(buf) < length:
            return  # the rest of the StartupMessage is on its way
        conn = self.conn
        assert conn is not None
        client = self._startup.short_way(conn, buf[:length]) if length >= 8 else None
        if client is None:
            self.fall_back()
            return
        self._settle(PoolGate.PASSED)
        transport = self.transport
        transport.set_protocol(client)
        client.connection_made(transport)
        if len(buf) > length:  # the app did not wait for the answer
            client.data_received(buf[length:])
        self._startup.connect_seconds.observe(time.monotonic() - conn.started)

    def eof_received(self) -> bool:
        if self.conn is not None:
            self.conn.note_end("client", "closed")
        return False  # the transport closes; connection_lost finishes the record

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == PoolGate.PASSED:
            return  # the transport was closed after its socket went the classic way
        self._settle(PoolGate.CLOSING)
        conn = self.conn
        if conn is not None:
            conn.note_end("client", "closed" if exc is None else "error")
            conn.finish()

    def shut(self, reason: str) -> None:
        """Refuse the app now, as :meth:`Startup.run` refuses a startup it cuts on a
        drain or at close: FATAL 57P01, then a FIN."""
        if self.state != PoolGate.PENDING:
            return
        self._settle(PoolGate.CLOSING)
        conn = self.conn
        assert conn is not None
        conn.end_by_proxy(reason)
        failure = refusal("shutdown", self._startup.cfg)
        transport = self.transport
        if not transport.is_closing():  # else the app closed its end already
            transport.write(error_response(SQLSTATE[failure.kind], failure.message))
        transport.close()  # connection_lost finishes the record

    # -- the way back to the classic startup -------------------------------------------------

    def fall_back(self) -> None:
        """Give the connection to :meth:`Startup.run`: a duplicate of its socket and what
        was read; the transport closes without touching the connection."""
        if self.state != PoolGate.PENDING:
            return
        self._settle(PoolGate.PASSED)
        conn = self.conn
        assert conn is not None
        sock = self._take_socket()
        if sock is None:  # the descriptor is gone: the client's end is all there is
            conn.note_end("client", "error")
            conn.finish()
            return
        run = self._startup.run(conn, sock, self.peer, self._buf, self._deadline)
        self._start_task(run, conn, sock)

    def _settle(self, state: int) -> None:
        self.state = state
        self._startup.gates.discard(self)

    def _take_socket(self) -> socket.socket | None:
        """A socket object of its own for the connection; the transport is closed (the
        connection lives on in the duplicate)."""
        transport = self.transport
        try:
            fd = os.dup(transport.get_extra_info("socket").fileno())
        except OSError:
            transport.abort()
            return None
        transport.abort()  # closes the transport's descriptor only
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        return sock
