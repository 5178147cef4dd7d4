"""``--pg-pool session|transaction`` in front of a real PostgreSQL 15 that takes only TLS.

The server (tests/peer_fixtures.py ``postgres_tls_trust``) runs with ``ssl = on`` and a
``hostssl``-only pg_hba: the role ``pooler`` is trusted over TLS, which is how the
ambassador opens its pooled server connections here (``--pg-upstream-trust``). The apps
(psql, pgbench, psycopg 3, asyncpg) connect in plaintext to the ambassador with no
password, as an app in the Pod does. Server connection reuse is shown by the backend's
process ID (``pg_backend_pid()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

import asyncpg
import psycopg
import pytest

from podpatterns.ambassador.connection import Connection
from podpatterns.ambassador.dial import DialError
from podpatterns.ambassador.pgauth import startup_message
from podpatterns.ambassador.pgpool import (
    ClientSession,
    Pools,
    PoolSettings,
    ServerConn,
    issue_key,
    startup_answer,
)
from podpatterns.ambassador.postgres import PostgresHandler
from podpatterns.ambassador.upstreams import Endpoint
from podpatterns.options import HostPort
from tests.ambassador_process import AmbassadorProcess, run_ambassador
from tests.peers import PG_SERVER_NAME, POOL_USER, PostgresServer, need, pgbench_connect_each
from tests.proc import run
from tests.servers import ambassador, port_of
from tests.test_ambassador_postgres import (
    ADMIN_SHUTDOWN_TEXT,
    closed_reasons,
    read_error_response,
)
from tests.waiting import eventually, wait_until

pytest_plugins = ("tests.peer_fixtures",)
pytestmark = pytest.mark.peer

CLIENT_TIMEOUT = 60.0
POOL = "podpatterns_ambassador_pg_pool_"


@pytest.fixture
def server(postgres_tls_trust: PostgresServer) -> PostgresServer:
    """The server, seen as the pooled role (no password: the ambassador logs in)."""
    return replace(postgres_tls_trust, user=POOL_USER, password=None)


def pool_args(server: PostgresServer, ca: Path, mode: str, *extra: str) -> list[str]:
    """The flags of a verified postgres route with a pool."""
    return [
        "--protocol",
        "postgres",
        "--upstream-tls",
        "--tls-ca",
        str(ca),
        "--tls-server-name",
        PG_SERVER_NAME,
        "--pg-pool",
        mode,
        "--pg-upstream-trust",
        *extra,
    ]


def psql(
    server: PostgresServer, port: int, *sql: str, host: str | None = None
) -> subprocess.CompletedProcess[str]:
    """psql -c SQL ... against the ambassador (unaligned, tuples only, no password);
    ``host``: a unix socket directory instead of 127.0.0.1."""
    env = server.env(port)
    env.update(PGSSLMODE="disable")
    if host is not None:
        env["PGHOST"] = host
    env.pop("PGPASSWORD", None)
    commands = [arg for command in sql for arg in ("-c", command)]
    return subprocess.run(
        [server.tool("psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", *commands],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )


def connect(server: PostgresServer, port: int, **kw: object) -> psycopg.Connection:
    """A psycopg 3 connection through the ambassador, without a password."""
    return psycopg.connect(
        host="127.0.0.1",
        port=port,
        user=server.user,
        dbname="postgres",
        sslmode="disable",
        connect_timeout=10,
        **kw,  # type: ignore[arg-type]
    )


def idle_is(amb: AmbassadorProcess, n: int) -> None:
    """Wait until ``n`` pooled server connections are idle (a returned one was reset)."""
    wait_until(lambda: amb.metric(POOL + "connections", state="idle") == n, f"{n} idle connections")


def pid_and(server: PostgresServer, port: int, sql: str) -> tuple[str, str]:
    """The backend's process ID and the answer to ``sql``, in one psql session."""
    done = psql(server, port, "select pg_backend_pid()", sql)
    assert done.returncode == 0, done.stderr
    pid, answer = done.stdout.split()[:2]
    return pid, answer


async def app_connect(server: PostgresServer, port: int, **kw: object) -> asyncpg.Connection:
    """An asyncpg connection through the ambassador, without a password."""
    return await asyncpg.connect(
        host="127.0.0.1",
        port=port,
        user=server.user,
        database="postgres",
        ssl=False,
        timeout=10,
        **kw,
    )


# -- session mode ----------------------------------------------------------------------------


def test_session_pool_reuses_the_server_connection_over_tls(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """Two psql sessions one after the other get the same TLS server backend, opened once."""
    with run_ambassador(
        [f"{server.host}:{server.port}"], *pool_args(server, pg_ca_file, "session")
    ) as amb:
        port = amb.listen.port
        first = pid_and(server, port, "select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        idle_is(amb, 1)
        second = pid_and(server, port, "select ssl from pg_stat_ssl where pid = pg_backend_pid()")
        assert first == second
        assert first[1] == "t"
        assert amb.metric(POOL + "server_opened_total") == 1
        assert amb.terminate() == 0, amb.log_text()


def test_discard_all_keeps_a_set_from_leaking_to_the_next_app(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """A SET of one app is reset (DISCARD ALL) before the next app gets the backend."""
    with run_ambassador(
        [f"{server.host}:{server.port}"], *pool_args(server, pg_ca_file, "session")
    ) as amb:
        port = amb.listen.port
        first, default = pid_and(server, port, "show work_mem")
        done = psql(server, port, "set work_mem = '7MB'", "prepare p as select 1")
        assert done.returncode == 0, done.stderr
        idle_is(amb, 1)
        again = psql(
            server,
            port,
            "select pg_backend_pid()",
            "show work_mem",
            "select count(*) from pg_prepared_statements",
        )
        assert again.returncode == 0, again.stderr
        assert again.stdout.split() == [first, default, "0"]
        assert default != "7MB"


def raw_session(port: int, user: str, app: str, *queries: str) -> None:
    """One app session on a bare socket: StartupMessage (``application_name`` ``app``),
    up to ReadyForQuery, each query in turn up to its ReadyForQuery, Terminate."""
    params = b"".join(
        k + b"\0" + v.encode() + b"\0"
        for k, v in ((b"user", user), (b"database", "postgres"), (b"application_name", app))
    )
    body = struct.pack("!i", 3 << 16) + params + b"\0"
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(struct.pack("!i", 4 + len(body)) + body)
        for sql in (None, *queries):
            if sql is not None:
                text = sql.encode() + b"\0"
                sock.sendall(b"Q" + struct.pack("!i", 4 + len(text)) + text)
            got = b""
            while not got.endswith(b"Z\0\0\0\x05I"):
                data = sock.recv(65536)
                assert data, f"closed before ReadyForQuery: {got!r}"
                got += data
            assert not got.startswith(b"E"), got
        sock.sendall(b"X\0\0\0\x04")


def test_session_that_sent_nothing_is_not_reset(server: PostgresServer, pg_ca_file: Path) -> None:
    """An app that leaves without sending the server anything returns its backend with
    no DISCARD ALL; one that ran a query has its backend reset."""
    with run_ambassador(
        [f"{server.host}:{server.port}"], *pool_args(server, pg_ca_file, "session")
    ) as amb:
        port = amb.listen.port
        last = "select query from pg_stat_activity where application_name = 'pp-reset'"
        raw_session(port, server.user, "pp-reset")
        idle_is(amb, 1)
        assert server.query(last) == ""  # the backend never ran a statement
        raw_session(port, server.user, "pp-reset", "select 1")
        idle_is(amb, 1)
        assert server.query(last) == "DISCARD ALL"
        assert amb.metric(POOL + "server_opened_total") == 1
        assert amb.terminate() == 0, amb.log_text()


def test_reset_that_takes_too_long_closes_the_server_connection(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """A reset still running after RESET_TIMEOUT (5 s; here a reset query that sleeps)
    closes its server connection (``reason="reset_timeout"``) rather than lend it; the
    next app gets a new one."""
    sleepy = ("--pg-pool-reset-query", "select pg_sleep(60)")
    with run_ambassador(
        [f"{server.host}:{server.port}"], *pool_args(server, pg_ca_file, "session", *sleepy)
    ) as amb:
        port = amb.listen.port
        first, _ = pid_and(server, port, "select 1")
        closed = POOL + "server_closed_total"
        amb.wait_metric(closed, lambda n: n == 1, "1: the reset timed out")
        assert amb.metric(closed, reason="reset_timeout") == 1
        second, _ = pid_and(server, port, "select 1")
        assert second != first
        assert amb.metric(POOL + "server_opened_total") == 2


def test_app_leaving_inside_a_transaction_is_rolled_back_and_reused(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """An app that leaves inside BEGIN: its work is rolled back, the backend reused."""
    with run_ambassador(
        [f"{server.host}:{server.port}"], *pool_args(server, pg_ca_file, "session")
    ) as amb:
        port = amb.listen.port
        with connect(server, port, autocommit=True) as conn:
            conn.execute("create table if not exists left_open (n int)")
        idle_is(amb, 1)
        with connect(server, port) as conn:  # not autocommit: BEGIN is implicit
            row = conn.execute("select pg_backend_pid()").fetchone()
            conn.execute("insert into left_open values (1)")
            # psycopg's close on leaving sends a Terminate without COMMIT
            conn.close()
        assert row is not None
        idle_is(amb, 1)
        with connect(server, port) as conn:
            again = conn.execute("select pg_backend_pid(), count(*) from left_open").fetchone()
        assert again == (row[0], 0)


def test_exhausted_pool_answers_53300_after_the_wait(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """With --pg-pool-size 1 held, the next app gets 53300 after --pg-pool-wait."""
    args = pool_args(
        server, pg_ca_file, "session", "--pg-pool-size", "1", "--pg-pool-wait", "300ms"
    )
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        port = amb.listen.port

        async def apps() -> None:
            # the same client library for both: the pool key is the startup parameters
            held = await app_connect(server, port)
            try:
                with pytest.raises(asyncpg.TooManyConnectionsError) as err:  # SQLSTATE 53300
                    await app_connect(server, port)
                assert err.value.sqlstate == "53300"
                assert "--pg-pool-wait" in str(err.value)
            finally:
                await held.close()
            # the held connection is back: the next app gets it
            again = await app_connect(server, port)
            assert await again.fetchval("select 1") == 1
            await again.close()

        asyncio.run(apps())
        assert amb.metric(POOL + "wait_timeouts_total") == 1


def test_waiting_app_gets_the_connection_an_app_returns(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """An app waiting for the only server connection gets it when the holder leaves."""
    args = pool_args(server, pg_ca_file, "session", "--pg-pool-size", "1", "--pg-pool-wait", "20s")
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        port = amb.listen.port
        held = connect(server, port, autocommit=True)
        pid = held.execute("select pg_backend_pid()").fetchone()
        result: list[object] = []

        def wait() -> None:
            with connect(server, port, autocommit=True) as conn:
                result.append(conn.execute("select pg_backend_pid()").fetchone())

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        amb.wait_metric(POOL + "waiting_clients", lambda n: n == 1, "1")
        held.close()
        waiter.join(CLIENT_TIMEOUT)
        assert pid is not None
        assert result == [pid]


def test_idle_timeout_closes_beyond_min_idle(server: PostgresServer, pg_ca_file: Path) -> None:
    """Idle past --pg-pool-idle-timeout: closed, except --pg-pool-min-idle of them."""
    args = pool_args(
        server,
        pg_ca_file,
        "session",
        "--pg-pool-size",
        "3",
        "--pg-pool-min-idle",
        "1",
        "--pg-pool-idle-timeout",
        "300ms",
    )
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        conns = [connect(server, amb.listen.port) for _ in range(3)]
        pids = {c.execute("select pg_backend_pid()").fetchone() for c in conns}
        assert len(pids) == 3
        for c in conns:
            c.close()
        amb.wait_metric(POOL + "server_closed_total", lambda n: n == 2, "2")
        assert amb.metric(POOL + "server_closed_total", reason="idle_timeout") == 2
        idle_is(amb, 1)
        assert amb.metric(POOL + "server_opened_total") == 3


def test_cancel_request_reaches_the_pooled_backend(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """psycopg's cancel (our BackendKeyData) cancels the query on the pooled backend."""
    with (
        run_ambassador(
            [f"{server.host}:{server.port}"], *pool_args(server, pg_ca_file, "session")
        ) as amb,
        connect(server, amb.listen.port, autocommit=True) as conn,
    ):
        pid = conn.execute("select pg_backend_pid()").fetchone()
        assert pid is not None
        assert conn.info.backend_pid != pid[0]  # the key the app got is ours

        def running() -> bool:
            state = server.query(f"select state from pg_stat_activity where pid = {pid[0]}")
            return state == "active"

        def cancel() -> None:
            wait_until(running, "the sleep to run")
            conn.cancel()

        canceller = threading.Thread(target=cancel, daemon=True)
        canceller.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(60)")
        canceller.join(CLIENT_TIMEOUT)
        assert conn.execute("select pg_backend_pid()").fetchone() == pid


def test_backend_terminated_by_the_server_is_not_reused(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """pg_terminate_backend on a lent backend: the app gets the server's FATAL, the pool
    counts the close and opens a new backend for the next app."""
    with run_ambassador(
        [f"{server.host}:{server.port}"], *pool_args(server, pg_ca_file, "session")
    ) as amb:
        port = amb.listen.port
        with connect(server, port, autocommit=True) as conn:
            row = conn.execute("select pg_backend_pid()").fetchone()
            assert row is not None
            assert server.query(f"select pg_terminate_backend({row[0]})") == "t"
            with pytest.raises(psycopg.OperationalError) as err:
                conn.execute("select 1")
            assert "terminating connection" in str(err.value), err.value
        amb.wait_metric(POOL + "server_closed_total", lambda n: n == 1, "1")
        with connect(server, port, autocommit=True) as conn:
            again = conn.execute("select pg_backend_pid()").fetchone()
        assert again is not None and again != row
        assert amb.metric(POOL + "server_opened_total") == 2


def test_server_closed_before_the_app_attached_closes_the_app() -> None:
    """On socket pairs, no server: the startup's short way (Startup.begin) lends an idle
    server connection, which the server closes before the app's socket is attached. The
    app is closed, not greeted with a session nobody serves (it would wait forever for
    the answer to its first query), and the pool forgets the app's BackendKeyData (no
    ClientSession left behind for drains and cancels, as for any app whose server
    connection closed under it)."""
    endpoint = Endpoint(HostPort("127.0.0.1", 1))

    async def dial() -> tuple[socket.socket, Endpoint]:
        raise AssertionError("no server connection is opened here")

    class Watched(ServerConn):
        gone = asyncio.Event()

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            self.gone.set()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pools = Pools(PoolSettings(), PostgresHandler(None), dial)
        pool = pools.pool_for(startup_message("app", "postgres"))
        ours, the_server = socket.socketpair()
        server = Watched(pool, endpoint, b"", b"", 60.0)
        endpoint.active += 1
        pool.opening += 1
        await loop.create_connection(lambda: server, sock=ours)
        pool.opened(server)  # idle
        lent = pool.take()
        assert lent is server
        ended = asyncio.Event()
        conn = Connection("app", lambda _: ended.set())
        key = issue_key()
        client = ClientSession(pools, pool, conn, lent, key, startup_answer(lent.params, key))
        the_server.close()  # before the app's socket is attached
        async with asyncio.timeout(CLIENT_TIMEOUT):
            await server.gone.wait()
        app, the_app = socket.socketpair()
        the_app.setblocking(False)
        await loop.connect_accepted_socket(lambda: client, app)
        async with asyncio.timeout(CLIENT_TIMEOUT):
            got = await loop.sock_recv(the_app, 4096)
        assert got == b"", got  # closed, no AuthenticationOk/ReadyForQuery
        async with asyncio.timeout(CLIENT_TIMEOUT):
            await ended.wait()  # the app's connection finished
        assert pools.clients == {}
        assert (pool.in_use, len(pool.idle), pool.resetting, pool.opening) == (0, 0, 0, 0)
        assert endpoint.active == 0
        the_app.close()

    asyncio.run(scenario())


def test_server_closed_after_it_was_granted_is_not_attached() -> None:
    """On socket pairs, no server: transaction mode, an app waits for a server
    connection; one is granted to it, and closes (the server spoke unasked, or went)
    before the app's callback takes it. The pool's counts stay true (it was in use, not
    being reset), and the app is not attached to the closed connection, where its query
    would wait for ever: it waits again (here the next open fails, and it is told)."""
    endpoint = Endpoint(HostPort("127.0.0.1", 1))

    async def dial() -> tuple[socket.socket, Endpoint]:
        raise DialError("refused", "connection refused", str(endpoint))

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pools = Pools(PoolSettings(mode="transaction"), PostgresHandler(None), dial)
        pool = pools.pool_for(startup_message("app", "postgres"))
        pool.params = b""
        ours, the_server = socket.socketpair()
        server = ServerConn(pool, endpoint, b"", b"", 60.0)
        endpoint.active += 1
        pool.opening += 1  # being opened: the app's wait opens no other
        await loop.create_connection(lambda: server, sock=ours)
        ended = asyncio.Event()
        conn = Connection("app", lambda _: ended.set())
        key = issue_key()
        client = ClientSession(pools, pool, conn, None, key, startup_answer(b"", key))
        app, the_app = socket.socketpair()
        the_app.setblocking(False)
        await loop.connect_accepted_socket(lambda: client, app)
        client.data_received(b"Q\0\0\0\x0dselect 1\0")  # waits for a server connection
        pool.opened(server)  # granted to the app...
        server.close("server_message")  # ...and closed before the app took it
        assert (pool.in_use, pool.resetting, len(pool.idle)) == (0, 0, 0)
        async with asyncio.timeout(CLIENT_TIMEOUT):
            await ended.wait()  # told, and closed: not left waiting on a dead server
        got = b""
        async with asyncio.timeout(CLIENT_TIMEOUT):
            while chunk := await loop.sock_recv(the_app, 65536):
                got += chunk
        assert b"C08006" in got and b"connection refused" in got, got
        assert client.server is None
        assert (pool.in_use, pool.resetting, len(pool.idle), pool.opening) == (0, 0, 0, 0)
        the_server.close()
        the_app.close()
        await pools.close()

    asyncio.run(scenario())


def test_close_ends_the_server_connections_being_reset(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """A real server connection whose reset still runs when the pool closes (its reset
    query waits for an advisory lock the test holds): Pools.close() closes it (Terminate,
    counted as shutdown) rather than leave it open, with its reset timer, to whoever
    stops the loop; the server ends that session once the query returns."""
    ctx = ssl.create_default_context(cafile=str(pg_ca_file))
    handler = PostgresHandler(lambda: ctx, sslmode="verify-full", server_name=PG_SERVER_NAME)
    endpoint = Endpoint(HostPort(server.host, server.port))
    reset = "select pg_advisory_lock(4242) /* podpatterns reset */"
    in_reset = f"select count(*) from pg_stat_activity where query = '{reset}'"

    async def dial() -> tuple[socket.socket, Endpoint]:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, (server.host, server.port))
        except BaseException:
            sock.close()
            raise
        return sock, endpoint

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pools = Pools(PoolSettings(reset_query=reset), handler, dial)
        pool = pools.pool_for(startup_message(POOL_USER, "postgres"))
        async with asyncio.timeout(CLIENT_TIMEOUT):
            lent = await pool.wait()
        ended = asyncio.Event()
        conn = Connection("app", lambda _: ended.set())
        key = issue_key()
        client = ClientSession(pools, pool, conn, lent, key, startup_answer(lent.params, key))
        app, the_app = socket.socketpair()
        the_app.settimeout(CLIENT_TIMEOUT)  # read in a thread, beside the loop
        await loop.connect_accepted_socket(lambda: client, app)
        greeting = await asyncio.to_thread(read_messages, the_app, b"Z")
        assert greeting[-1] == (b"Z", b"I"), greeting
        the_app.sendall(b"Q\0\0\0\x0dselect 1\0")
        answer = await asyncio.to_thread(read_messages, the_app, b"Z")
        assert (b"D", b"\0\x01\0\0\0\x011") in answer, answer
        the_app.close()  # the app leaves: its server connection is reset
        async with asyncio.timeout(CLIENT_TIMEOUT):
            await ended.wait()
        assert pool.resetting == 1
        await eventually(lambda: server.query(in_reset) == "1", "the reset waits for the lock")
        await pools.close()
        assert lent.closed and pools.closed == {"shutdown": 1}, pools.closed
        assert (pool.total(), endpoint.active) == (0, 0)
        await eventually(lambda: lent.transport.is_closing(), "the transport closing")

    with psycopg.connect(
        host=server.host, port=server.port, user=POOL_USER, dbname="postgres", sslmode="require"
    ) as holder:
        holder.execute("select pg_advisory_lock(4242)")
        asyncio.run(scenario())
        holder.execute("select pg_advisory_unlock(4242)")
    wait_until(lambda: server.query(in_reset) == "0", "the reset's session ended")


@pytest.mark.parametrize("how", ["cut", "drain"])
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_short_way_ended_before_its_first_step(
    server: PostgresServer, pg_ca_file: Path, mode: str, how: str
) -> None:
    """An app taken by the startup's short way (Startup.begin: its StartupMessage in the
    socket at accept, a server connection idle or the parameters known), ended in the
    loop turn of its accept, before the task attaching its socket ran a step. A cut (the
    drain deadline; close() does the same) cancels that task: the app's socket is reset
    and closed, its connection finished (not left open in the route, the socket to the
    GC), the server connection taken for it closed (session mode). A drain tells the
    app FATAL 57P01, as the full startup does, instead of closing it without a word,
    and its unused server connection goes back idle. The route's own accept is called
    here: no timing from outside can place the end between the accept and that step."""
    upstream = HostPort(server.host, server.port)
    route_args: dict[str, object] = {
        "protocol": "postgres",
        "upstream_tls": True,
        "tls_ca": pg_ca_file,
        "tls_server_name": PG_SERVER_NAME,
        "pg_pool": mode,
        "pg_upstream_trust": True,
    }

    async def scenario() -> None:
        async with ambassador([upstream], **route_args) as amb:
            route = amb.routes[0]
            port = port_of(amb)

            def first_app() -> None:  # the pool learns the parameters; its server idles
                app = RawApp(port, server.user)
                app.query("select 1")
                app.sock.close()

            await asyncio.to_thread(first_app)
            assert route._startup is not None and route._startup.pools is not None
            pools = route._startup.pools
            (pool,) = pools.by_key.values()
            await eventually(lambda: len(pool.idle) == 1 and not route.connections, "at rest")
            with socket.create_server(("127.0.0.1", 0)) as listener:
                app = socket.create_connection(listener.getsockname(), timeout=CLIENT_TIMEOUT)
                csock, peer = listener.accept()
            with app:
                app.sendall(startup_message(server.user, "postgres"))
                await eventually(lambda: select.select([csock], [], [], 0)[0], "the startup")
                csock.setblocking(False)
                route._on_accept(csock, peer)
                assert len(route.connections) == 1
                if how == "cut":
                    assert route.cut() == 1
                else:
                    route.stop_accepting()
                await eventually(lambda: not route.connections, "the app's connection ended")
                assert csock.fileno() == -1
                got = b""
                with contextlib.suppress(ConnectionResetError):
                    while chunk := app.recv(65536):
                        got += chunk
            assert not pools.clients and (pool.in_use, pool.resetting) == (0, 0)
            if how == "drain":
                assert got[:1] == b"E" and b"C57P01" in got, got
                assert b"R\0\0\0\x08" not in got, got  # no greeting before it
                assert len(pool.idle) == 1 and not pools.closed
            else:
                assert got == b"", got
                closed = {"aborted": 1} if mode == "session" else {}
                assert pools.closed == closed and len(pool.idle) == 1 - len(closed)
            reason = "drained" if how == "drain" else "drain_cut"
            assert route.stats.closed[reason] == 1, route.stats.closed

    asyncio.run(scenario())


ACTIVE = "podpatterns_ambassador_connections_active"


def read_messages(sock: socket.socket, last: bytes, count: int = 1) -> list[tuple[bytes, bytes]]:
    """The backend messages on ``sock`` up to the ``count``-th of type ``last``: (type,
    body). Call it again only for messages the peer sends after this one's last."""
    data = b""
    out: list[tuple[bytes, bytes]] = []
    while sum(1 for kind, _ in out if kind == last) < count:
        chunk = sock.recv(65536)
        assert chunk, (data, out)
        data += chunk
        while len(data) >= 5 and len(data) >= 1 + struct.unpack("!i", data[1:5])[0]:
            end = 1 + struct.unpack("!i", data[1:5])[0]
            out.append((data[:1], data[5:end]))
            data = data[end:]
    return out


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_startup_sent_after_accept_takes_the_pool(
    server: PostgresServer, pg_ca_file: Path, mode: str
) -> None:
    """An app whose StartupMessage arrives after the ambassador accepted it (nothing to
    read at accept: Startup.begin's short way does not apply, about a third of
    ``pgbench -C`` connections) is answered by the pool: AuthenticationOk,
    BackendKeyData, ReadyForQuery, and its query runs on a pooled server connection.
    Pins the behaviour any faster accept path for pooled routes must keep."""
    args = pool_args(server, pg_ca_file, mode)
    with run_ambassador([f"127.0.0.1:{server.port}"], *args) as amb:
        done = psql(server, amb.listen.port, "select 1")  # the pool has a server connection
        assert done.returncode == 0, done.stderr
        idle_is(amb, 1)
        amb.wait_idle()
        raw = socket.create_connection(("127.0.0.1", amb.listen.port))
        raw.settimeout(CLIENT_TIMEOUT)
        amb.wait_metric(ACTIVE, lambda n: n == 1, "the app accepted")
        raw.sendall(startup_message(server.user, "postgres"))
        kinds = [kind for kind, _ in read_messages(raw, b"Z")]
        assert kinds[0] == b"R" and b"K" in kinds, kinds
        raw.sendall(b"Q\0\0\0\x0dselect 7\0")
        answer = read_messages(raw, b"Z")
        assert (b"D", b"\0\x01\0\0\0\x017") in answer, answer
        raw.sendall(b"X\0\0\0\x04")
        assert raw.recv(1) == b""
        raw.close()
        amb.wait_idle()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_startup_in_pieces_with_a_query_behind_it(
    server: PostgresServer, pg_ca_file: Path, mode: str, loop: str
) -> None:
    """A pooled route without a connection cap accepts through the event loop's server
    (route.py, PoolGate): a StartupMessage that comes in pieces is put together, and a
    Query the app sent right behind it, without waiting for the answer, is run on the
    pooled server connection, on uvloop and on asyncio's own loop. The connection is
    counted and timed as any other."""
    args = pool_args(server, pg_ca_file, mode, "--loop", loop)
    startup = startup_message(server.user, "postgres")
    query = b"Q\0\0\0\x0dselect 8\0"
    with run_ambassador([f"127.0.0.1:{server.port}"], *args) as amb:
        done = psql(server, amb.listen.port, "select 1")  # the pool has a server connection
        assert done.returncode == 0, done.stderr
        idle_is(amb, 1)
        amb.wait_idle()
        with socket.create_connection(("127.0.0.1", amb.listen.port)) as raw:
            raw.settimeout(CLIENT_TIMEOUT)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.sendall(startup[:3])  # not even the length's four bytes
            amb.wait_metric(ACTIVE, lambda n: n == 1, "the app accepted")
            raw.sendall(startup[3:9])
            raw.sendall(startup[9:] + query)
            # the greeting and the query's answer: they may come in one read
            messages = read_messages(raw, b"Z", 2)
            kinds = [kind for kind, _ in messages]
            greeting, answer = messages[: kinds.index(b"Z") + 1], messages[kinds.index(b"Z") + 1 :]
            assert kinds[0] == b"R" and b"K" in kinds[: len(greeting)], greeting
            assert (b"D", b"\0\x01\0\0\0\x018") in answer, answer
            raw.sendall(b"X\0\0\0\x04")
            assert raw.recv(1) == b""
        amb.wait_idle()
        assert amb.metric("podpatterns_ambassador_connections_total") == 2
        connect = "podpatterns_ambassador_connect_seconds_count"
        assert amb.metric(connect) == 2, amb.log_text()
        wait_until(lambda: closed_reasons(amb) == ["terminate", "terminate"], "two closed")


def test_pooled_route_on_a_unix_socket(server: PostgresServer, pg_ca_file: Path) -> None:
    """The loop's server accepts on a unix socket too: psql -h DIR -p 5432 through a
    session pool at DIR/.s.PGSQL.5432 (twice, on one server connection)."""
    with tempfile.TemporaryDirectory(prefix="podpatterns-pgsock-") as tmp:
        listen = f"unix:{tmp}/.s.PGSQL.5432"
        args = pool_args(server, pg_ca_file, "session")
        with run_ambassador([f"127.0.0.1:{server.port}"], *args, listen=listen) as amb:
            pids = set()
            for _ in range(2):
                done = psql(server, 5432, "select pg_backend_pid()", host=tmp)
                assert done.returncode == 0, done.stderr
                pids.add(done.stdout.strip())
                idle_is(amb, 1)
            assert len(pids) == 1, pids
            assert amb.terminate() == 0, amb.log_text()
        assert not (Path(tmp) / ".s.PGSQL.5432").exists()


def keepalive_timer(port: int, client_port: int) -> bool:
    """Whether the ambassador's socket of the connection from ``client_port`` has a
    keepalive timer (``ss -o``: SO_KEEPALIVE is on)."""
    argv = [need("ss"), "-tnoH", "state", "established", f"( sport = :{port} )"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    lines = [line for line in done.stdout.splitlines() if f":{client_port} " in line + " "]
    assert len(lines) == 1, done.stdout
    return "timer:(keepalive" in lines[0]


@pytest.mark.parametrize("keepalive", ["--tcp-keepalive", "--no-tcp-keepalive"])
@pytest.mark.parametrize("route", ["tcp", "pool"])
def test_accepted_sockets_take_keepalive_from_the_listener(
    server: PostgresServer, pg_ca_file: Path, route: str, keepalive: str
) -> None:
    """SO_KEEPALIVE is set once on the listening socket, and the app's connections have
    it (Linux copies it to accepted sockets) whichever way they were accepted: by the
    route's own accept loop (tcp) or the event loop's server (a pool's gate)."""
    args = pool_args(server, pg_ca_file, "session") if route == "pool" else []
    with run_ambassador([f"127.0.0.1:{server.port}"], *args, keepalive) as amb:
        with socket.create_connection(("127.0.0.1", amb.listen.port)) as raw:
            amb.wait_metric(ACTIVE, lambda n: n == 1, "the app accepted")
            has = keepalive_timer(amb.listen.port, raw.getsockname()[1])
        assert has == (keepalive == "--tcp-keepalive")


def test_ssl_request_sent_after_accept_is_answered_by_the_full_startup(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """An SSLRequest sent after the accept, without --listen-tls-cert, on a pooled route:
    answered N, then the StartupMessage sent in plaintext is served by the pool."""
    args = pool_args(server, pg_ca_file, "session")
    with (
        run_ambassador([f"127.0.0.1:{server.port}"], *args) as amb,
        socket.create_connection(("127.0.0.1", amb.listen.port)) as raw,
    ):
        raw.settimeout(CLIENT_TIMEOUT)
        amb.wait_metric(ACTIVE, lambda n: n == 1, "the app accepted")
        raw.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest
        assert raw.recv(1) == b"N"
        raw.sendall(startup_message(server.user, "postgres"))
        kinds = [kind for kind, _ in read_messages(raw, b"Z")]
        assert kinds[0] == b"R" and b"K" in kinds, kinds


def test_silent_app_gets_the_startup_timeout(server: PostgresServer, pg_ca_file: Path) -> None:
    """An app that connects and sends nothing is told, after --startup-timeout, as
    without a pool: FATAL 08P01 naming the timeout, then a FIN."""
    args = pool_args(
        server, pg_ca_file, "session", "--startup-timeout", "300ms", "--pg-pool-wait", "100ms"
    )
    with (
        run_ambassador([f"127.0.0.1:{server.port}"], *args) as amb,
        socket.create_connection(("127.0.0.1", amb.listen.port)) as raw,
    ):
        raw.settimeout(CLIENT_TIMEOUT)
        fields = read_error_response(raw)
        amb.wait_idle()
    assert "--startup-timeout 0.3s" in fields["M"], fields
    assert closed_reasons(amb) == ["protocol_error"], amb.log_text()


@pytest.mark.parametrize("pg_drain", ["transaction", "off"])
def test_app_waiting_to_send_its_startup_gets_admin_shutdown_on_drain(
    server: PostgresServer, pg_ca_file: Path, pg_drain: str
) -> None:
    """On a pooled route, an app accepted and not yet heard from gets FATAL 57P01 and a
    FIN on drain, at once: when draining starts (--pg-drain transaction), at the
    deadline (off)."""
    extra = ("--pg-drain", pg_drain, "--drain-timeout", "200ms")
    args = pool_args(server, pg_ca_file, "session", *extra)
    with (
        run_ambassador([f"127.0.0.1:{server.port}"], *args) as amb,
        socket.create_connection(("127.0.0.1", amb.listen.port)) as raw,
    ):
        raw.settimeout(CLIENT_TIMEOUT)
        amb.wait_metric(ACTIVE, lambda n: n == 1, "the app accepted")
        amb.signal(signal.SIGTERM)
        fields = read_error_response(raw)
        assert amb.wait() == 0, amb.log_text()
    assert fields["C"] == "57P01" and fields["S"] == "FATAL", fields
    assert fields["M"].startswith(ADMIN_SHUTDOWN_TEXT), fields
    assert closed_reasons(amb) == ["drained" if pg_drain == "transaction" else "drain_cut"]


def test_app_waiting_to_send_its_startup_counts_toward_the_limit(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """--max-connections 1 --on-limit reject: an app accepted and not yet heard from holds
    the one connection; the next app is refused with 53300 as without a pool, and the
    first is then served."""
    extra = ("--max-connections", "1", "--on-limit", "reject")
    args = pool_args(server, pg_ca_file, "session", *extra)
    with (
        run_ambassador([f"127.0.0.1:{server.port}"], *args) as amb,
        socket.create_connection(("127.0.0.1", amb.listen.port)) as first,
    ):
        first.settimeout(CLIENT_TIMEOUT)
        amb.wait_metric(ACTIVE, lambda n: n == 1, "the first app accepted")
        with socket.create_connection(("127.0.0.1", amb.listen.port)) as second:
            second.settimeout(CLIENT_TIMEOUT)
            second.sendall(startup_message(server.user, "postgres"))
            fields = read_error_response(second)
        assert fields["C"] == "53300", fields
        assert amb.metric("podpatterns_ambassador_connections_refused_total", reason="limit") == 1
        first.sendall(startup_message(server.user, "postgres"))
        kinds = [kind for kind, _ in read_messages(first, b"Z")]
        assert kinds[0] == b"R" and b"K" in kinds, kinds


def test_psycopg_asyncpg_and_pgbench_through_a_session_pool(
    server: PostgresServer, pg_ca_file: Path, tmp_path: Path
) -> None:
    """psycopg, asyncpg and pgbench -C through a session pool (a pool key per library)."""
    args = pool_args(server, pg_ca_file, "session", "--pg-pool-size", "2")
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        port = amb.listen.port
        with connect(server, port) as conn:
            big = conn.execute("select repeat('x', 1000000)").fetchone()
            assert big is not None and len(big[0]) == 1000000

        async def with_asyncpg() -> object:
            conn = await app_connect(server, port)
            try:
                return await conn.fetchval("select $1::int + 1", 41)
            finally:
                await conn.close()

        assert asyncio.run(with_asyncpg()) == 42
        assert amb.metric(POOL + "server_opened_total") == 2  # one per client library
        pgbench_connect_each(server, port, tmp_path, transactions=50)
        # 100 pgbench connections, at most --pg-pool-size 2 server connections for them
        assert amb.metric(POOL + "server_opened_total") <= 4
        assert amb.terminate() == 0, amb.log_text()


def scram_args(ca: Path, password_file: Path, mode: str, *extra: str) -> list[str]:
    """A verified postgres route whose pool logs in with SCRAM from ``password_file``."""
    return [
        "--protocol",
        "postgres",
        "--upstream-tls",
        "--tls-ca",
        str(ca),
        "--tls-server-name",
        PG_SERVER_NAME,
        "--pg-pool",
        mode,
        "--pg-password-file",
        str(password_file),
        *extra,
    ]


def test_session_pool_logs_in_with_scram_once_for_many_apps(
    postgres_tls: PostgresServer, pg_ca_file: Path, tmp_path: Path
) -> None:
    """With --pg-password-file the pool logs in with SCRAM once; apps hold no password."""
    secret = tmp_path / "password"
    assert postgres_tls.password is not None
    secret.write_text(postgres_tls.password)
    app = replace(postgres_tls, password=None)
    args = scram_args(pg_ca_file, secret, "session")
    with run_ambassador([f"{app.host}:{app.port}"], *args) as amb:
        pids = {pid_and(app, amb.listen.port, "select 1")[0] for _ in range(3)}
        assert len(pids) == 1
        assert amb.metric(POOL + "server_opened_total") == 1
        assert amb.terminate() == 0, amb.log_text()


def test_wrong_password_reaches_the_app_as_28p01(
    postgres_tls: PostgresServer, pg_ca_file: Path, tmp_path: Path
) -> None:
    """A wrong secret: the app gets the server's own FATAL 28P01; nothing is pooled."""
    secret = tmp_path / "password"
    secret.write_text("not-the-password")
    app = replace(postgres_tls, password=None)
    args = scram_args(pg_ca_file, secret, "session")
    with run_ambassador([f"{app.host}:{app.port}"], *args) as amb:
        done = psql(app, amb.listen.port, "select 1")
        assert done.returncode != 0
        assert "password authentication failed" in done.stderr, done.stderr
        assert "not-the-password" not in amb.log_text(500)
        assert amb.metric(POOL + "server_opened_total") == 0
        assert amb.metric(POOL + "server_open_failures_total") == 1


# -- transaction mode ------------------------------------------------------------------------


def test_transaction_mode_shares_backends_between_apps(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """Three apps inside their transactions need three backends; between them, one."""
    args = pool_args(server, pg_ca_file, "transaction", "--pg-pool-size", "3")
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        port = amb.listen.port
        conns = [connect(server, port) for _ in range(3)]
        try:
            pids = {c.execute("select pg_backend_pid()").fetchone() for c in conns}  # in BEGIN
            assert len(pids) == 3
            for c in conns:
                c.commit()
            amb.wait_metric(POOL + "connections", lambda n: n == 3, "3")
            assert amb.metric(POOL + "connections", state="idle") == 3
            # autocommit statements one after the other reuse the most recent backend
            for c in conns:
                c.autocommit = True
            after = {c.execute("select pg_backend_pid()").fetchone() for c in conns}
            assert len(after) == 1
        finally:
            for c in conns:
                c.close()


def test_transaction_mode_prepared_statements_of_asyncpg(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """asyncpg's statement cache works while its queries move between backends."""
    args = pool_args(server, pg_ca_file, "transaction", "--pg-pool-size", "2")
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        port = amb.listen.port

        async def app(n: int) -> tuple[list[int], set[int]]:
            conn = await app_connect(server, port)
            try:
                answers: list[int] = []
                pids: set[int] = set()
                for i in range(40):  # the same statements again: asyncpg's cache
                    answers.append(await conn.fetchval("select $1::int * 2", i + n))
                    pids.add(await conn.fetchval("select pg_backend_pid()"))
                    async with conn.transaction():
                        await conn.execute("select $1::text", str(i))
                return answers, pids
            finally:
                await conn.close()

        async def apps() -> list[tuple[list[int], set[int]]]:
            return await asyncio.gather(*(app(n * 1000) for n in range(4)))

        results = asyncio.run(apps())
        for n, (answers, _) in enumerate(results):
            assert answers == [(i + n * 1000) * 2 for i in range(40)]
        seen = set().union(*(pids for _, pids in results))
        assert 1 <= len(seen) <= 2
        assert amb.metric(POOL + "server_opened_total") <= 2
        assert amb.terminate() == 0, amb.log_text()


def test_transaction_mode_prepared_statements_of_psycopg(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """psycopg 3 with prepare_threshold=0 (every query prepared) across backends."""
    args = pool_args(server, pg_ca_file, "transaction", "--pg-pool-size", "2")
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        port = amb.listen.port
        a = connect(server, port, autocommit=True, prepare_threshold=0)
        b = connect(server, port, autocommit=True, prepare_threshold=0)
        try:
            hold = connect(server, port)  # in a transaction: holds one backend
            hold.execute("select 1")
            for i in range(20):
                conn = a if i % 2 else b
                row = conn.execute("select %s::int + 1, pg_backend_pid()", (i,)).fetchone()
                assert row is not None and row[0] == i + 1
            hold.rollback()
            hold.close()
            # now two backends are free; the statements are prepared again where needed
            pids = set()
            for i in range(20):
                row = a.execute("select %s::int + 1, pg_backend_pid()", (i,)).fetchone()
                assert row is not None and row[0] == i + 1
                pids.add(row[1])
        finally:
            a.close()
            b.close()
        assert amb.terminate() == 0, amb.log_text()


class RawApp:
    """An app on a bare socket (simple Query protocol): each answer up to ReadyForQuery,
    as (kind, body) messages."""

    def __init__(self, port: int, user: str) -> None:
        params = b"user\0" + user.encode() + b"\0database\0postgres\0\0"
        body = struct.pack("!i", 3 << 16) + params
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
        self.sock.sendall(struct.pack("!i", 4 + len(body)) + body)
        self.buf = b""
        self.answer()

    def answer(self) -> list[tuple[str, bytes]]:
        got: list[tuple[str, bytes]] = []
        while True:
            while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack_from("!i", self.buf, 1)[0]:
                data = self.sock.recv(65536)
                assert data, f"closed: {got!r} {self.buf!r}"
                self.buf += data
            end = 1 + struct.unpack_from("!i", self.buf, 1)[0]
            got.append((chr(self.buf[0]), self.buf[5:end]))
            self.buf = self.buf[end:]
            if got[-1][0] == "Z":
                return got

    def query(self, sql: str) -> list[tuple[str, bytes]]:
        text = sql.encode() + b"\0"
        self.sock.sendall(b"Q" + struct.pack("!i", 4 + len(text)) + text)
        return self.answer()


def sqlstate(message: bytes) -> str:
    """The C field of an ErrorResponse body."""
    return next(f[1:].decode() for f in message.split(b"\0") if f[:1] == b"C")


def test_transaction_mode_failed_block_ends_as_the_server_would(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """The block's server connection terminated (pg_terminate_backend): the block is
    answered by the ambassador until it ends. A ROLLBACK behind a comment ends it, as on
    the server; a ROLLBACK followed by more statements in one Query runs those statements
    (on another server connection), never answers them with ROLLBACK's tag alone."""
    with run_ambassador(
        [f"{server.host}:{server.port}"], *pool_args(server, pg_ca_file, "transaction")
    ) as amb:
        port = amb.listen.port
        app = RawApp(port, server.user)
        for ends in ("/* app: x */ rollback", "-- why\n rollback", "rollback; select 42"):
            assert app.query("begin")[-1] == ("Z", b"T")
            pid = next(b for k, b in app.query("select pg_backend_pid()") if k == "D")
            assert server.query(f"select pg_terminate_backend({int(pid[6:])})") == "t"
            lost = app.query("select 1")
            assert [k for k, _ in lost] == ["E", "Z"] and lost[-1] == ("Z", b"E"), lost
            refused = app.query("select 2")
            assert sqlstate(refused[0][1]) == "25P02" and refused[-1] == ("Z", b"E"), refused
            ended = app.query(ends)
            assert ("C", b"ROLLBACK\0") in ended, (ends, ended)
            assert ended[-1] == ("Z", b"I"), (ends, ended)
            if "42" in ends:
                assert ("D", b"\0\x01\0\0\0\x0242") in ended, ended
        app.sock.close()
        assert amb.metric(POOL + "transactions_lost_total") == 3
        assert amb.terminate() == 0, amb.log_text()


def extended(sql: str, name: bytes = b"") -> bytes:
    """Parse, Bind, Execute and Sync of ``sql`` (no parameters), as one batch."""

    def msg(kind: bytes, body: bytes) -> bytes:
        return kind + struct.pack("!i", 4 + len(body)) + body

    parse = msg(b"P", name + b"\0" + sql.encode() + b"\0\0\0")
    bind = msg(b"B", b"\0" + name + b"\0" + b"\0\0" + b"\0\0" + b"\0\0")
    return parse + bind + msg(b"E", b"\0\0\0\0\0") + msg(b"S", b"")


def test_transaction_mode_and_chain_after_a_lost_transaction_is_refused(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """ROLLBACK AND CHAIN ends a failed block and opens the next transaction on the
    server (ReadyForQuery T). After a lost transaction the ambassador cannot open it as
    the server would (its characteristics were lost with the server connection), so
    COMMIT/ROLLBACK AND CHAIN, simple or extended, alone or followed by more statements,
    get ERROR 0A000 and the block stays failed (E): nothing the app meant for the chained
    transaction runs outside it. A plain ROLLBACK then ends the block."""
    with run_ambassador(
        [f"{server.host}:{server.port}"], *pool_args(server, pg_ca_file, "transaction")
    ) as amb:
        port = amb.listen.port
        app = RawApp(port, server.user)
        # the server's own answer, relayed while its server connection lives
        assert app.query("begin")[-1] == ("Z", b"T")
        assert app.query("select 1/0")[-1] == ("Z", b"E")
        chained = app.query("rollback and chain")
        assert chained == [("C", b"ROLLBACK\0"), ("Z", b"T")], chained
        assert app.query("rollback")[-1] == ("Z", b"I")
        # a lost transaction
        assert app.query("begin")[-1] == ("Z", b"T")
        pid = next(b for k, b in app.query("select pg_backend_pid()") if k == "D")
        assert server.query(f"select pg_terminate_backend({int(pid[6:])})") == "t"
        lost = app.query("select 1")
        assert [k for k, _ in lost] == ["E", "Z"] and lost[-1] == ("Z", b"E"), lost
        for sql in (
            "rollback and chain",
            "COMMIT /* c */ WORK AND CHAIN",
            "end and chain; select 42",
        ):
            refused = app.query(sql)
            assert [k for k, _ in refused] == ["E", "Z"], (sql, refused)
            assert sqlstate(refused[0][1]) == "0A000" and refused[-1] == ("Z", b"E"), refused
            assert b"AND CHAIN" in refused[0][1], refused
        for name in (b"", b"chain"):
            app.sock.sendall(extended("rollback and chain", name))
            refused = app.answer()
            assert [k for k, _ in refused] == ["E", "Z"], (name, refused)
            assert sqlstate(refused[0][1]) == "0A000" and refused[-1] == ("Z", b"E"), refused
        still = app.query("select 2")
        assert sqlstate(still[0][1]) == "25P02" and still[-1] == ("Z", b"E"), still
        assert app.query("rollback and no chain") == [("C", b"ROLLBACK\0"), ("Z", b"I")]
        after = app.query("select 42")
        assert ("D", b"\0\x01\0\0\0\x0242") in after and after[-1] == ("Z", b"I"), after
        app.sock.close()
        assert amb.metric(POOL + "transactions_lost_total") == 1
        assert amb.terminate() == 0, amb.log_text()


def test_transaction_mode_copy_lost_with_its_server_holds_no_server_connection(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """COPY FROM STDIN whose server connection is terminated: the app is told (ERROR,
    ReadyForQuery), and the CopyData and CopyDone it sends after that, which a server
    ignores outside a COPY, do not take a server connection that nothing would return
    (with --pg-pool-size 1, the next app's query would wait in vain: 53300)."""
    made = server.query(
        "create table if not exists copy_lost (n int); grant all on copy_lost to pooler"
    )
    assert made is not None
    args = pool_args(
        server, pg_ca_file, "transaction", "--pg-pool-size", "1", "--pg-pool-wait", "2s"
    )
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        port = amb.listen.port
        app = RawApp(port, server.user)
        pid = next(b for k, b in app.query("select pg_backend_pid()") if k == "D")
        text = b"copy copy_lost from stdin\0"
        app.sock.sendall(b"Q" + struct.pack("!i", 4 + len(text)) + text)
        while len(app.buf) < 1 or app.buf[:1] != b"G":  # CopyInResponse
            data = app.sock.recv(65536)
            assert data, app.buf
            app.buf += data
        app.buf = app.buf[1 + struct.unpack_from("!i", app.buf, 1)[0] :]
        assert server.query(f"select pg_terminate_backend({int(pid[6:])})") == "t"
        lost = app.answer()
        assert [k for k, _ in lost] == ["E", "Z"] and lost[-1] == ("Z", b"I"), lost
        app.sock.sendall(b"d\0\0\0\x061\n" + b"c\0\0\0\x04")  # the app's COPY goes on
        with connect(server, port, autocommit=True) as other:
            assert other.execute("select 1").fetchone() == (1,)
        assert app.query("select 2")[-1] == ("Z", b"I")
        app.sock.close()
        assert amb.metric(POOL + "wait_timeouts_total") == 0
        assert amb.terminate() == 0, amb.log_text()


def test_transaction_mode_statement_named_commit(server: PostgresServer, pg_ca_file: Path) -> None:
    """A statement named ``commit`` (a libpq prepare) is kept apart from SQL COMMIT."""
    args = pool_args(server, pg_ca_file, "transaction", "--pg-pool-size", "2")
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        with connect(server, amb.listen.port, autocommit=True) as conn:
            pgconn = conn.pgconn
            result = pgconn.prepare(b"commit", b"select 40 + $1::int")
            assert result.error_message == b""
            result = pgconn.prepare(b"COMMIT", b"commit")
            assert result.error_message == b""
            for i in range(3):
                result = pgconn.exec_prepared(b"commit", [str(i).encode()])
                assert result.get_value(0, 0) == str(40 + i).encode()
            result = pgconn.exec_(b"begin")
            result = pgconn.exec_prepared(b"commit", [b"2"])
            assert result.get_value(0, 0) == b"42"
            result = pgconn.exec_prepared(b"COMMIT", [])  # the SQL COMMIT, prepared
            assert result.error_message == b"", result.error_message
            assert conn.execute("select 1").fetchone() == (1,)
        assert amb.terminate() == 0, amb.log_text()


def test_transaction_mode_pgbench_prepared(
    server: PostgresServer, pg_ca_file: Path, tmp_path: Path
) -> None:
    """pgbench -M prepared with more clients than backends: no failed transaction.

    ``-j 6``: pgbench 15 prepares a statement synchronously (PQprepare); on one thread
    that blocks the others' transactions, which hold the backends it waits for.
    """
    pgbench = need(server.tool("pgbench"))
    args = pool_args(server, pg_ca_file, "transaction", "--pg-pool-size", "2")
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        script = tmp_path / "tx.sql"
        script.write_text("\\set n random(1, 1000)\nbegin;\nselect :n + 1;\nselect :n;\nend;\n")
        env = server.env(amb.listen.port)
        env["PGSSLMODE"] = "disable"
        done = subprocess.run(
            [pgbench, "-n", "-M", "prepared", "-c", "6", "-j", "6", "-t", "100", "-f", str(script)],
            env=env,
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "number of failed transactions: 0" in done.stdout, done.stdout
        closed = [
            (labels, v) for n, labels, v in amb.metrics() if n == POOL + "server_closed_total"
        ]
        assert amb.metric(POOL + "server_opened_total") <= 2, closed
        assert amb.terminate() == 0, amb.log_text()


def test_transaction_mode_detects_session_state(server: PostgresServer, pg_ca_file: Path) -> None:
    """SET, LISTEN, advisory locks, temp tables, WITH HOLD: counted, logged once per app."""
    args = pool_args(server, pg_ca_file, "transaction")
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        done = psql(
            server,
            amb.listen.port,
            "set work_mem = '8MB'",
            "set work_mem = '9MB'",
            "begin; set local work_mem = '9MB'; commit",
            "listen somewhere",
            "select pg_advisory_lock(7)",
            "select pg_advisory_xact_lock(8)",
            "create temp table scratch (n int)",
            "begin; declare c cursor with hold for select 1; commit",
        )
        assert done.returncode == 0, done.stderr
        counts = {
            labels["feature"]: value
            for name, labels, value in amb.metrics()
            if name == POOL + "session_state_total"
        }
        assert counts == {
            "set": 2,
            "listen": 1,
            "advisory_lock": 1,
            "temp_table": 1,
            "with_hold": 1,
        }

        def logged() -> list[str]:
            return [e["feature"] for e in amb.events if e.get("event") == "pg_pool_session_state"]

        # the log is read from the process's stderr by a thread: wait for its lines
        wait_until(lambda: len(logged()) >= len(counts), "one event per feature")
        assert sorted(logged()) == sorted(counts)


def test_unreachable_server_is_the_apps_connect_error(tmp_path: Path) -> None:
    """No server at the upstream: the waiting app gets 08001 naming the cause, no bug."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # bound, never listening: connects are refused
    port = listener.getsockname()[1]
    try:
        args = ["--protocol", "postgres", "--pg-pool", "session", "--pg-upstream-trust"]
        with run_ambassador([f"127.0.0.1:{port}"], *args, "--connect-retries", "0") as amb:

            async def app() -> None:
                await asyncpg.connect(
                    host="127.0.0.1",
                    port=amb.listen.port,
                    user=POOL_USER,
                    database="postgres",
                    ssl=False,
                    timeout=10,
                )

            with pytest.raises(asyncpg.PostgresError) as err:
                asyncio.run(app())
            assert err.value.sqlstate == "08001", err.value
            assert "cannot reach" in str(err.value)
            assert amb.metric(POOL + "server_open_failures_total") == 1
            assert amb.find("pg_pool_open_bug") < 0, amb.log_text()
    finally:
        listener.close()


# -- configuration ---------------------------------------------------------------------------


def test_pool_without_a_way_to_log_in_is_a_config_error() -> None:
    """--pg-pool without a password source or --pg-upstream-trust: exit 2, one line."""
    done = run(
        "ambassador",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:5432",
        "--protocol",
        "postgres",
        "--pg-pool",
        "session",
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "--pg-pool" in done.stderr and "--pg-upstream-trust" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
