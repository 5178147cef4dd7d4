"""One route: a listener, its upstream pool, and the connections between them.

Data flows one way: listener (accept) -> dial (upstream socket) -> relay (bytes) ->
finish (accounting, access event). The route owns every task it starts: its background
loops (DNS refresh, active health checks, TLS file watch, the timeout sweep) belong to a
:class:`~podpatterns.tasks.TaskSet` that logs and remembers a loop that dies (see
:meth:`Route.is_live`); the per-connection setup tasks are units of work whose expected
errors end that connection only, and whose bugs are logged with their traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import socket
import ssl
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any

from podpatterns import logs
from podpatterns.ambassador import proxy_protocol, splice, tlsleg
from podpatterns.ambassador.config import RouteConfig, UnixAddress
from podpatterns.ambassador.connection import Connection, abandon, peer_label, reset_socket
from podpatterns.ambassador.dial import Dialer, DialError, DialPolicy, classify, tune
from podpatterns.ambassador.listener import Listener, bind, listener_tls
from podpatterns.ambassador.pgmetrics import QueryMetrics
from podpatterns.ambassador.protocol import ProtocolHandler
from podpatterns.ambassador.relay import ProtocolRelay
from podpatterns.ambassador.startup import Startup, make_handler
from podpatterns.ambassador.tls import route_tls
from podpatterns.ambassador.upstreams import Endpoint, UpstreamPool, system_resolver
from podpatterns.metrics import Buckets
from podpatterns.tasks import TaskSet

# Which relay "--splice auto" picks for plaintext legs; set from bench/ambassador.py
# measurements (docs/benchmarks.md).
SPLICE_BY_DEFAULT = True

HEALTH_LOOP = "health"  # the name of the active health checks' task, after the route's

#: Refused connections a protocol route answers at once (``--on-limit reject`` at the
#: cap, new connections while it drains): each answer holds a socket for at most
#: ``--startup-timeout``. Past this many, a refused connection is reset without an
#: answer and counted, so that a flood cannot pile up tasks and file descriptors.
MAX_REFUSING = 64
#: Seconds :meth:`Route.close` lets refusals in progress finish before cancelling them.
REFUSAL_GRACE = 1.0


class RouteStats:
    """Plain counters, read by the metrics collector at scrape time."""

    def __init__(self) -> None:
        self.accepted = 0
        self.refused: Counter[str] = Counter()  # reason
        self.failed: Counter[str] = Counter()  # no upstream reached, by last reason
        self.connect_failures: Counter[tuple[str, str]] = Counter()  # (endpoint, reason)
        self.closed: Counter[str] = Counter()  # reason
        self.bytes_up = 0  # closed connections; live ones are added at scrape time
        self.bytes_down = 0
        self.cut = 0
        self.unanswered = 0  # refused without an answer: MAX_REFUSING were in progress


class Route:
    """Accept on one address and relay each connection to one of the upstreams."""

    def __init__(
        self,
        cfg: RouteConfig,
        resolver: Any = system_resolver,
        handler: ProtocolHandler | None = None,
    ) -> None:
        self.cfg = cfg
        self._log = logs.get("ambassador", route=cfg.name)  # before _make_handler logs
        # the per-connection access event (connection_closed): its fields are gathered
        # only when info events are emitted
        self._log_closed = logs.enabled(self._log, "info")
        self.stats = RouteStats()
        self.pool = UpstreamPool(
            cfg.upstream,
            policy=cfg.balance,
            dns_refresh=cfg.dns_refresh,
            fail_cooldown=cfg.fail_cooldown,
            resolver=resolver,
            route=cfg.name,
            active_checks=bool(cfg.health_check_interval),
        )
        self.tls = route_tls(cfg)
        self.listen_tls = listener_tls(cfg)  # --listen-tls-cert: the app's TLS ends here
        # None for --protocol tcp: the byte relay starts at accept, with no startup phase.
        # --pg-metrics: the query counts its sessions add into, read at scrape time
        self.queries = QueryMetrics() if cfg.pg_metrics else None
        self.handler: ProtocolHandler | None = handler or make_handler(
            cfg, self.tls, self._log, self.queries, self.listen_tls
        )
        self.use_splice = (
            not cfg.upstream_tls
            and splice.available()
            and (cfg.splice == "on" or (cfg.splice == "auto" and SPLICE_BY_DEFAULT))
        )
        if cfg.splice == "on" and not splice.available():
            from podpatterns.errors import ConfigError

            raise ConfigError("--splice: 'on' needs Linux os.splice (use auto or off)")
        self.dial_policy = DialPolicy(
            cfg.connect_timeout,
            cfg.connect_retries,
            cfg.retry_backoff,
            cfg.retry_backoff_max,
            cfg.tcp_keepalive,
            cfg.tcp_nodelay,
        )
        self.listener: Listener | None = None
        self.connections: dict[Connection, None] = {}  # insertion-ordered set
        self._dialing: dict[Connection, tuple[Dialer, socket.socket]] = {}  # conn: dialer, csock
        self._connecting: set[asyncio.Task[None]] = set()  # protocol relays being attached
        # refusals in the protocol's terms, outside the connection count (MAX_REFUSING)
        self._refusing: set[asyncio.Task[None]] = set()
        self._refusals_full = False
        self._tasks = TaskSet("ambassador", on_death=self._loop_died)
        self._drained = asyncio.Event()
        self._drained.set()
        self._stopping = False
        self._pipes = splice.PipePool(cfg.buffer_size) if self.use_splice else None
        #: connect time (accept to relay, retries and TLS included), for the histogram
        #: ``podpatterns_ambassador_connect_seconds``
        self.connect_seconds = Buckets()
        # protocol routes: the handler's startup runs between accept and relay
        self._startup: Startup | None = None
        if self.handler is not None:
            self._startup = Startup(
                cfg,
                self.handler,
                pool=self.pool,
                dial_policy=self.dial_policy,
                failed=self.stats.failed,
                connect_failed=self._connect_failed,
                dial_failed=self._dial_failed,
                send_proxy_header=self._send_proxy_header,
                pipes=self._pipes,
                connect_seconds=self.connect_seconds,
                log=self._log,
                queries=self.queries,
            )
        # --pg-pool: the route's pooled server connections, for the metrics
        self.pg_pools = self._startup.pools if self._startup is not None else None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the listener and start background tasks. Raises BindError."""
        self._loop = asyncio.get_running_loop()
        listen = self.cfg.listen
        sock = bind(listen)
        # Accepted sockets inherit TCP_NODELAY and SO_KEEPALIVE from the listening one
        # (Linux): set once here, not twice per connection.
        tune(sock, sock.family, self.cfg.tcp_keepalive, self.cfg.tcp_nodelay)
        self.listener = Listener(
            sock,
            self._on_accept,
            can_resume=self._can_accept,
            unix=listen if isinstance(listen, UnixAddress) else None,
        )
        startup = self._startup
        if startup is not None and startup.short_way_applies and not self.cfg.max_connections:
            # the loop's server accepts, each app born a transport with a PoolGate; a
            # connection cap keeps the reader callback, which can leave the excess in
            # the kernel backlog
            await self.listener.serve(
                startup.gate_factory(self._on_accept, self._admit, self._start_task)
            )
        else:
            self.listener.resume()
        addr = self.listener.address
        if hasattr(addr, "is_loopback") and not addr.is_loopback:
            self._log.warning(
                "listen_not_loopback",
                listen=str(addr),
                note="other hosts can reach this port unless a NetworkPolicy blocks it",
            )
        self._log.info(
            "route_listening",
            listen=str(addr),
            upstreams=[str(u) for u in self.cfg.upstream],
            relay="splice" if self.use_splice else "protocol",
            tls=self.cfg.upstream_tls,
            listen_tls=self.listen_tls is not None,
            protocol=self.cfg.protocol,
        )
        if self.pool.has_names():
            self._spawn(self.pool.refresh_loop(), "refresh")
        cfg = self.cfg
        if cfg.health_check_interval:
            # a protocol's own check when it has one (PostgreSQL roles), else TCP
            check = self._startup.health_check if self._startup is not None else None
            checks = self.pool.health_loop(
                cfg.health_check_interval, cfg.health_check_timeout, check
            )
            self._spawn(checks, HEALTH_LOOP)
        if self.tls is not None and self.tls.watched_dirs():
            self._spawn(self.tls.watch(), "tls_watch")
        if self.listen_tls is not None:
            self._spawn(self.listen_tls.watch(), "listen_tls_watch")
        timeouts = [
            t
            for t in (self.cfg.idle_timeout, self.cfg.half_close_timeout, self.cfg.max_lifetime)
            if t
        ]
        if timeouts:
            self._spawn(self._sweep(max(0.05, min(1.0, min(timeouts) / 4))), "sweep")

    def _spawn(self, coro: Coroutine[Any, Any, None], loop_name: str) -> None:
        self._tasks.spawn(coro, f"{self.cfg.name}/{loop_name}")

    def _loop_died(self, task_name: str, exc: BaseException | None) -> None:
        """A background loop died (already logged by the TaskSet).

        Only the health loop's death changes what the route reports: its verdicts would
        otherwise stay frozen, and ``ready_requires_upstream`` would keep trusting an
        endpoint nobody checks any more. The endpoints go back to "no active verdict"
        (routed on passive health alone, never proof of readiness), so such a route
        turns unready, and :meth:`is_live` is False for every death.
        """
        if task_name == f"{self.cfg.name}/{HEALTH_LOOP}":
            self.pool.forget_health()

    def stop_accepting(self) -> None:
        """Stop taking new connections; open connections go on.

        A tcp route closes its listener. A protocol route keeps listening until
        :meth:`close`, to answer each new connection in the protocol's terms (PostgreSQL:
        FATAL 57P01) rather than leave the app a bare "connection refused"; its sessions
        end at their next boundary, and connections still in their startup at once
        (``--pg-drain transaction``).
        """
        self._stopping = True
        if self.listener is None:
            return
        if self._startup is None:
            self.listener.close()
        else:
            self.listener.resume()  # paused at the cap, perhaps: the backlog is refused too
            self._startup.drain()

    def in_flight(self) -> int:
        return len(self.connections)

    async def wait_drained(self) -> None:
        await self._drained.wait()

    def cut(self) -> int:
        """End every connection still open (the drain deadline) as ``--drain-close``
        says: a reset, or a FIN; return how many."""
        n = self._abort_all("drain_cut", fin=self.cfg.drain_close == "fin")
        self.stats.cut += n
        return n

    def _abort_all(self, reason: str, fin: bool = False) -> int:
        n = len(self.connections)
        for task in list(self._connecting):
            task.cancel()
        if self._startup is not None:
            self._startup.shut_gates(reason)
        for conn in list(self.connections):
            conn.end_by_proxy(reason)
            if conn.relay is not None:
                if fin:
                    conn.relay.close()
                else:
                    conn.relay.abort()
        for conn, (dialer, csock) in list(self._dialing.items()):
            del self._dialing[conn]
            dialer.cancel()
            csock.close()
            conn.note_end("proxy", "cancelled")  # a no-op after end_by_proxy above
            conn.finish()
        return n

    async def close(self) -> None:
        """Stop everything this route started."""
        self.stop_accepting()
        if self.listener is not None:
            self.listener.close()
        self._abort_all("closed")  # cancels the connection setups too
        await self._tasks.aclose()
        if self._startup is not None:
            await self._startup.close()
        if self._refusing:  # a moment to finish answering, then cancelled
            await asyncio.wait(list(self._refusing), timeout=REFUSAL_GRACE)
            for task in self._refusing:
                task.cancel()
        pending = [*self._connecting, *self._refusing]
        if pending:
            await asyncio.wait(pending)
        if self._pipes is not None:
            self._pipes.close()

    def _can_accept(self) -> bool:
        if self._stopping:  # a protocol route refuses in its terms until close()
            return self._startup is not None and self.listener is not None
        return not self.saturated()

    def saturated(self) -> bool:
        cap = self.cfg.max_connections
        return bool(cap) and len(self.connections) >= cap

    def is_ready(self) -> bool:
        """Bound, accepting, below the cap and, with ``ready_requires_upstream``, an
        endpoint whose last active check passed (never after the health loop died: see
        :meth:`_loop_died`)."""
        if self.listener is None or self._stopping or self.saturated():
            return False
        return not self.cfg.ready_requires_upstream or self.pool.any_healthy()

    def is_live(self) -> bool:
        """True while none of the route's background loops has died."""
        return self._tasks.healthy

    # -- per connection ------------------------------------------------------------------

    def _on_accept(self, csock: socket.socket, peer: Any) -> None:
        cfg = self.cfg
        if self._stopping:  # a protocol route draining (a tcp route closed its listener)
            self.stats.refused["draining"] += 1
            self._refuse(csock, peer, "shutdown")
            return
        if cfg.max_connections and len(self.connections) >= cfg.max_connections:
            if cfg.on_limit == "reject":
                self.stats.refused["limit"] += 1
                self._refuse(csock, peer, "limit")
                return
            assert self.listener is not None
            self.listener.pause()  # the rest wait in the kernel backlog
        conn = self._admit(peer)
        if cfg.on_limit == "wait" and self.saturated():
            assert self.listener is not None
            self.listener.pause()
        if self._startup is not None:
            self._start_task(self._startup.begin(conn, csock, peer), conn, csock)
            return
        dialer = Dialer(
            self._loop,
            self.pool,
            self.dial_policy,
            functools.partial(self._dialed, conn, csock, peer),
            self._connect_failed,
        )
        self._dialing[conn] = (dialer, csock)
        dialer.start()

    def _admit(self, peer: Any) -> Connection:
        """Count a new connection and make its record (the route's, until it finishes)."""
        cfg = self.cfg
        self.stats.accepted += 1
        conn = Connection(None, self._finished, peer)
        if cfg.max_lifetime:
            conn.expires_at = (
                conn.started + cfg.max_lifetime + random.uniform(0, cfg.max_lifetime_jitter)
            )
        self.connections[conn] = None
        self._drained.clear()
        return conn

    def _dialed(
        self,
        conn: Connection,
        csock: socket.socket,
        peer: Any,
        usock: socket.socket | None,
        ep: Endpoint | None,
        exc: BaseException | None,
    ) -> None:
        """The dial is over: start the relay, or end the connection."""
        del self._dialing[conn]
        if usock is None or ep is None:
            assert exc is not None
            if not isinstance(exc, DialError):  # a bug
                csock.close()
                conn.note_end("proxy", "cancelled")
                conn.finish()
                raise exc
            self._dial_failed(conn, exc)
            reset_socket(csock)
            csock.close()
            conn.finish()
            return
        conn.endpoint = ep
        conn.upstream = str(ep)
        ep.active += 1
        if not self.use_splice:
            self._start_task(self._attach(conn, csock, usock, ep, peer), conn, csock, usock)
            return
        # No task: the splice relay starts here, inside the dialer's writability callback,
        # so its reader on usock reuses the dialer's poll handle (see Dialer).
        try:
            self._send_proxy_header(csock, usock, peer)
            assert self._pipes is not None
            splice.SpliceRelay(self._loop, conn, csock, usock, self._pipes).start()
        except BaseException as exc:
            self._loop.remove_writer(usock.fileno())  # before any close (Dialer)
            self._setup_failed(conn, csock, usock, ep, exc)
            return
        self.connect_seconds.observe(time.monotonic() - conn.started)

    def _dial_failed(self, conn: Connection, exc: DialError) -> None:
        self.stats.failed[exc.reason] += 1
        self._log.warning(
            "upstream_connect_failed",
            conn=conn.id,
            client=conn.client,
            reason=exc.reason,
            error=str(exc),
        )
        conn.note_end("proxy", f"upstream_{exc.reason}")

    def _send_proxy_header(self, csock: socket.socket, usock: socket.socket, peer: Any) -> None:
        mode = self.cfg.proxy_protocol
        if mode != "off":
            local = csock.getsockname() if csock.family != socket.AF_UNIX else None
            proxy_protocol.send_all(usock, proxy_protocol.header(mode, peer, local))

    def _setup_failed(
        self,
        conn: Connection,
        csock: socket.socket,
        usock: socket.socket,
        ep: Endpoint,
        exc: BaseException,
    ) -> None:
        """The upstream was reached but the relay could not start; re-raises bugs."""
        if not isinstance(exc, (OSError, ssl.SSLError, TimeoutError)):
            conn.note_end("proxy", "cancelled")
            abandon(conn, csock, usock)
            raise exc
        reason = "tls" if isinstance(exc, ssl.SSLError) else classify(exc)
        self.stats.failed[reason] += 1
        self._connect_failed(ep, reason)
        # a TLS-broken endpoint is skipped for the cool-down like an unreachable one
        self.pool.mark_failure(ep, reason)
        self._log.warning(
            "upstream_connect_failed",
            conn=conn.id,
            client=conn.client,
            upstream=str(ep),
            reason=reason,
            error=str(exc),
        )
        conn.note_end("proxy", f"upstream_{reason}")
        abandon(conn, csock, usock)

    async def _attach(
        self, conn: Connection, csock: socket.socket, usock: socket.socket, ep: Endpoint, peer: Any
    ) -> None:
        """Start the Protocol relay (and the TLS leg): these steps need awaiting."""
        loop = self._loop
        try:
            self._send_proxy_header(csock, usock, peer)
            if self.tls is not None:
                # tlsleg, not create_connection(ssl=...): asyncio's SSL transport cannot
                # half-close (docs/ambassador-tls.md). The relay is made after the
                # handshake so that a failed handshake leaves conn.relay None for
                # _abandon to close usock.
                leg = await tlsleg.connect(
                    usock,
                    self.tls.context,
                    server_hostname=self.cfg.tls_server_name or ep.address.host,
                    handshake_timeout=self.cfg.connect_timeout,
                )
                relay = ProtocolRelay(conn, self.cfg.buffer_size)
                leg.attach(relay.upstream)
            else:
                relay = ProtocolRelay(conn, self.cfg.buffer_size)
                await loop.create_connection(lambda: relay.upstream, sock=usock)
            await loop.connect_accepted_socket(lambda: relay.client, csock)
        except BaseException as exc:
            self._setup_failed(conn, csock, usock, ep, exc)
            return
        # connect time includes the TLS handshake: it is what the client waited for
        self.connect_seconds.observe(time.monotonic() - conn.started)

    # -- protocol routes: the handler owns the connection until the session exists -------

    def _start_task(
        self,
        coro: Coroutine[Any, Any, None],
        conn: Connection,
        csock: socket.socket,
        usock: socket.socket | None = None,
    ) -> None:
        """Run a connection's setup (a startup, :meth:`_attach`) as an owned task; the
        sockets are the ones it takes charge of."""
        task = self._loop.create_task(coro)
        self._connecting.add(task)
        task.add_done_callback(
            functools.partial(self._attached, self._connecting, conn, csock, usock)
        )

    def _refuse(self, csock: socket.socket, peer: Any, kind: str) -> None:
        """Refuse a connection outside the connection count: a protocol route answers in
        its terms (an owned task, bounded in number by :data:`MAX_REFUSING` and in time
        by ``--startup-timeout``); a tcp route, or one with too many answers in
        progress, resets it."""
        if self._startup is not None and len(self._refusing) < MAX_REFUSING:
            self._refusals_full = False
            task = self._loop.create_task(self._startup.refuse(csock, peer_label(peer), kind))
            self._refusing.add(task)
            task.add_done_callback(
                functools.partial(self._attached, self._refusing, None, csock, None)
            )
            return
        if self._startup is not None:
            self.stats.unanswered += 1
            if not self._refusals_full:  # a state change, logged once, not per connection
                self._refusals_full = True
                self._log.warning("refusals_full", refusing=len(self._refusing), reason=kind)
        reset_socket(csock)
        csock.close()

    def _attached(
        self,
        tasks: set[asyncio.Task[None]],
        conn: Connection | None,
        csock: socket.socket,
        usock: socket.socket | None,
        task: asyncio.Task[None],
    ) -> None:
        """A connection's setup (:meth:`_attach`, a startup) or a refusal ended: a bug
        it re-raised is logged, never dropped.

        The connection was already ended and counted by :meth:`_setup_failed`; only the
        exception is left, and nobody awaits these tasks. A task cancelled before its
        first step (:meth:`cut` or :meth:`close` in the loop turn of its accept) never
        ran its coroutine, nor the cleanup that the coroutine owns: its sockets are
        closed and its connection finished here, or they would be left to the GC (and
        the connection open in :attr:`connections` for ever).
        """
        tasks.discard(task)
        if task.cancelled():
            if conn is not None and conn.on_finish is not None:  # not finished
                conn.note_end("proxy", "cancelled")
                abandon(conn, csock, usock)  # a relay made before the task (pool) too
            elif conn is None and csock.fileno() >= 0:  # a refusal that never ran
                reset_socket(csock)
                csock.close()
            return
        exc = task.exception()
        if exc is not None:
            self._log.error(
                "connection_setup_bug",
                conn=conn.id if conn is not None else None,
                client=conn.client if conn is not None else None,
                error=str(exc) or type(exc).__name__,
                exc_info=exc,
            )

    def _connect_failed(self, ep: Endpoint, reason: str) -> None:
        self.stats.connect_failures[(str(ep), reason)] += 1

    def _finished(self, conn: Connection) -> None:
        self.connections.pop(conn, None)
        if self._startup is not None:
            self._startup.finished(conn)
        ep = conn.endpoint
        if isinstance(ep, Endpoint):
            ep.active -= 1
        stats = self.stats
        stats.bytes_up += conn.bytes_up
        stats.bytes_down += conn.bytes_down
        stats.closed[conn.reason or "closed"] += 1
        if self._log_closed:
            self._log.info(
                "connection_closed",
                conn=conn.id,
                client=conn.client,
                upstream=conn.upstream,
                duration=round(time.monotonic() - conn.started, 6),
                bytes_up=conn.bytes_up,
                bytes_down=conn.bytes_down,
                closed_by=conn.closed_by or "proxy",
                reason=conn.reason or "closed",
            )
        if not self.connections:
            self._drained.set()
        listener = self.listener
        if listener is not None and not listener.accepting and self._can_accept():
            listener.resume()

    async def _sweep(self, period: float) -> None:
        """Close connections past their idle, half-close or lifetime limits."""
        cfg = self.cfg
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for conn in list(self.connections):
                relay = conn.relay
                if relay is None:
                    continue
                up, down = relay.counts()
                mark = up + down
                if mark != conn.idle_mark:
                    conn.idle_mark = mark
                    conn.idle_since = now
                idle = now - conn.idle_since
                reason = ""
                if conn.expires_at is not None and now >= conn.expires_at:
                    reason = "max_lifetime"
                elif cfg.idle_timeout and idle >= cfg.idle_timeout:
                    reason = "idle_timeout"
                elif (
                    cfg.half_close_timeout
                    and relay.half_closed()
                    and idle >= cfg.half_close_timeout
                ):
                    reason = "half_close_timeout"
                if reason:
                    conn.end_by_proxy(reason)
                    with contextlib.suppress(OSError):
                        relay.abort()

    def live_bytes(self) -> tuple[int, int]:
        """Bytes moved by connections still open: (up, down)."""
        up = down = 0
        for conn in self.connections:
            if conn.relay is not None:
                u, d = conn.relay.counts()
                up += u
                down += d
        return up, down
