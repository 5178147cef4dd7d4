"""Role-aware routing (issue 14): ``--pg-target-session-attrs`` over a primary and a standby.

Two real PostgreSQL 15 servers with streaming replication are made by each test
(initdb, ``pg_basebackup -R``, ``standby.signal``: :func:`tests.peers.run_replicated_postgres`),
TLS-only with SCRAM as the other PostgreSQL tests. The ambassador learns each server's
role from its own health connection (``in_hot_standby`` in the startup's
ParameterStatus); the tests promote the standby with ``pg_ctl promote`` and stop the
old primary, and wait for the ambassador's ``pg_role_changed`` events, never for a
duration.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
import trustme

from podpatterns.ambassador import config as amb_config
from podpatterns.ambassador.pgauth import Credentials, PasswordFile, startup_message
from podpatterns.ambassador.pgpool import Pools, PoolSettings, ServerConn
from podpatterns.ambassador.pgroles import Role, Roles, matches, parse_role_reply
from podpatterns.ambassador.postgres import PostgresHandler
from podpatterns.ambassador.protocol import Failure
from podpatterns.ambassador.upstreams import Endpoint
from podpatterns.options import HostPort
from tests.ambassador_process import AmbassadorProcess, run_ambassador
from tests.peers import (
    PG_SERVER_NAME,
    PostgresServer,
    ReplicatedPostgres,
    pg_route_args,
    pg_tls,
    run_replicated_postgres,
)
from tests.waiting import wait_until

pytest_plugins = ("tests.peer_fixtures",)

WHERE = "select inet_server_port(), pg_is_in_recovery()"
PRIMARY, STANDBY = Role(False, False), Role(True, True)


# -- the rules, without servers ----------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "primary", "standby", "unknown"),
    [
        ("any", True, True, True),
        ("read-write", True, False, False),
        ("read-only", False, True, False),
        ("primary", True, False, False),
        ("standby", False, True, False),
        ("prefer-standby", True, True, True),
    ],
)
def test_targets_match_roles_as_libpq(
    target: str, primary: bool, standby: bool, unknown: bool
) -> None:
    """Each target takes the roles libpq's target_session_attrs takes."""
    assert matches(target, PRIMARY) is primary
    assert matches(target, STANDBY) is standby
    assert matches(target, None) is unknown
    assert matches("read-only", Role(False, True))  # default_transaction_read_only=on
    assert not matches("read-write", Role(False, True))


def test_order_prefers_standbys_and_falls_back_to_unknown_roles() -> None:
    """prefer-standby puts standbys first; a target no known endpoint serves tries
    the endpoints of unknown role; a role change away from the target is reported."""
    a, b, c = (Endpoint(HostPort("127.0.0.1", p)) for p in (1, 2, 3))
    roles = Roles("prefer-standby")
    roles.update(a, PRIMARY, "test")
    roles.update(b, STANDBY, "test")
    assert roles.order([a, b, c]) == [b, a, c]
    rw = Roles("read-write")
    assert rw.order([a, b, c]) == [a, b, c]  # nothing known yet: try each
    rw.update(b, STANDBY, "test")
    assert rw.order([a, b, c]) == [a, c]
    rw.update(a, PRIMARY, "test")
    assert rw.order([a, b, c]) == [a]
    mismatched: list[Endpoint] = []
    rw.on_mismatch = mismatched.append
    rw.update(a, STANDBY, "test")
    assert mismatched == [a] and rw.changes[a] == 1
    assert rw.order([a, b, c]) == [c]


def test_role_reply_of_pg_is_in_recovery() -> None:
    """The DataRow of the role query of an old server gives its role."""
    row = b"\x00\x02" + b"\x00\x00\x00\x01t" + b"\x00\x00\x00\x02on"
    reply = b"T\x00\x00\x00\x04" + b"D" + (len(row) + 4).to_bytes(4, "big") + row
    assert parse_role_reply(reply + b"Z\x00\x00\x00\x05I") == STANDBY


# -- two real servers ----------------------------------------------------------------------

peer = pytest.mark.peer


@pytest.fixture
def pair(pg_ca: trustme.CA) -> Iterator[ReplicatedPostgres]:
    """A primary and its streaming standby, made for this test."""
    with run_replicated_postgres(pg_tls(pg_ca)) as servers:
        yield servers


@pytest.fixture
def ca_file(pg_ca_file: Path) -> Path:
    return pg_ca_file


def role_args(ca: Path, password_file: Path, target: str, *extra: str) -> list[str]:
    """A verified postgres route with credentials, role routing to ``target`` and
    role checks every 0.3 s."""
    return pg_route_args(
        ca,
        "--pg-password-file",
        str(password_file),
        "--pg-target-session-attrs",
        target,
        "--pg-health-user",
        "app",
        "--health-check-interval",
        "0.3s",
        "--connect-retries",
        "0",
        *extra,
    )


def ep(server: PostgresServer) -> str:
    return f"{server.host}:{server.port}"


def wait_role(amb: AmbassadorProcess, server: PostgresServer, role: str, after: int = 0) -> None:
    amb.wait_event(
        "pg_role_changed",
        lambda e: e.get("upstream") == ep(server) and e.get("role") == role,
        after=after,
        timeout=30,
    )


def where(port: int) -> tuple[int, bool]:
    """(server port, in recovery) of a new session through the ambassador, no password."""
    with app_conn(port) as conn:
        row = conn.execute(WHERE).fetchone()
    assert row is not None
    return int(row[0]), bool(row[1])


POOL = "podpatterns_ambassador_pg_pool_"


def pool_role_args(ca: Path, password_file: Path, target: str, mode: str, *extra: str) -> list[str]:
    """:func:`role_args` with ``--pg-pool mode``; a generous --pg-pool-wait, so that an
    app's transaction waits out a failover on a loaded machine."""
    return role_args(
        ca,
        password_file,
        target,
        "--pg-pool",
        mode,
        "--pg-pool-wait",
        "20s",
        "--startup-timeout",
        "30s",
        *extra,
    )


def app_conn(port: int, autocommit: bool = True) -> psycopg.Connection:
    """A psycopg 3 connection through the ambassador, no password (the pool logs in)."""
    return psycopg.connect(
        f"host=127.0.0.1 port={port} user=app dbname=postgres sslmode=disable",
        connect_timeout=30,
        autocommit=autocommit,
    )


def closed_for_role(amb: AmbassadorProcess) -> float:
    return amb.metric(POOL + "server_closed_total", reason="role_changed")


@pytest.fixture
def password_file(tmp_path: Path, pair: ReplicatedPostgres) -> Path:
    assert pair.primary.password is not None
    path = tmp_path / "password"
    path.write_text(pair.primary.password + "\n")
    return path


@peer
def test_failover_new_sessions_follow_the_primary(
    pair: ReplicatedPostgres, ca_file: Path, password_file: Path
) -> None:
    """read-write goes to the primary, read-only and prefer-standby to the standby;
    after the primary stops and the standby is promoted, read-write sessions go to the
    new primary as soon as the ambassador has seen the promotion, and the Pod stays
    ready throughout."""
    upstreams = [ep(pair.primary), ep(pair.standby)]
    rw_args = role_args(ca_file, password_file, "read-write")
    ro_args = role_args(ca_file, password_file, "read-only")
    with (
        run_ambassador(upstreams, *rw_args) as rw,
        run_ambassador(upstreams, *ro_args) as ro,
    ):
        for amb in (rw, ro):
            wait_role(amb, pair.primary, "primary")
            wait_role(amb, pair.standby, "standby")
        assert where(rw.listen.port) == (pair.primary.port, False)
        assert where(ro.listen.port) == (pair.standby.port, True)
        assert rw.metric("podpatterns_ambassador_pg_endpoint_role", role="primary") == 1

        mark = rw.mark()
        pair.stop_primary()
        pair.promote()
        wait_role(rw, pair.standby, "primary", after=mark)
        assert where(rw.listen.port) == (pair.standby.port, False)
        assert rw.metric("podpatterns_ambassador_pg_role_changes_total") >= 1
        # no server is read-only now; the stopped one's role is unknown, so it is tried
        # (its check may be stale, as libpq tries each host) and the app told why
        wait_role(ro, pair.standby, "primary", after=mark)
        ro.wait_event("pg_role_unknown", lambda e: e.get("upstream") == ep(pair.primary))
        with pytest.raises(psycopg.OperationalError) as info:
            where(ro.listen.port)
        assert f"cannot reach {ep(pair.primary)}" in str(info.value), info.value
        for amb in (rw, ro):
            with urllib.request.urlopen(f"http://{amb.admin}/readyz", timeout=5) as resp:
                assert resp.status == 200


@peer
@pytest.mark.parametrize("pool", ["off", "session"])
def test_close_on_role_change_ends_sessions_with_admin_shutdown(
    pair: ReplicatedPostgres, ca_file: Path, password_file: Path, pool: str
) -> None:
    """--pg-close-on-role-change: a session on the standby (target standby) gets FATAL
    57P01 when the standby is promoted; without the flag it goes on. With --pg-pool
    session, the same, and either way the pooled server connection is closed when the
    app leaves (role_changed), never lent again."""
    upstreams = [ep(pair.primary), ep(pair.standby)]
    pooled = ("--pg-pool", pool, "--pg-pool-wait", "2s") if pool != "off" else ()
    closing = role_args(ca_file, password_file, "standby", "--pg-close-on-role-change", *pooled)
    keeping = role_args(ca_file, password_file, "standby", *pooled)
    with (
        run_ambassador(upstreams, *closing) as amb,
        run_ambassador(upstreams, *keeping) as other,
    ):
        for a in (amb, other):
            wait_role(a, pair.standby, "standby")
        with app_conn(amb.listen.port) as conn, app_conn(other.listen.port) as kept:
            assert conn.execute(WHERE).fetchone() == (pair.standby.port, True)
            assert kept.execute(WHERE).fetchone() == (pair.standby.port, True)
            mark = amb.mark()
            pair.promote()
            amb.wait_event(
                "pg_role_sessions_ended", lambda e: e.get("sessions") == 1, after=mark, timeout=30
            )
            with pytest.raises(psycopg.OperationalError) as info:
                conn.execute("select 1")
            assert "the server's role changed" in str(info.value), info.value
            wait_role(other, pair.standby, "primary", after=0)
            assert kept.execute(WHERE).fetchone() == (pair.standby.port, False)
            if pool != "off":
                wait_until(lambda: closed_for_role(amb) == 1, "the ended session's server closed")
                assert closed_for_role(other) == 0  # still lent
        if pool != "off":
            wait_until(lambda: closed_for_role(other) == 1, "the kept session's server closed")
            assert other.metric(POOL + "connections", state="idle") == 0
        # both are primaries now: a new session has no standby to go to, and is told so
        with pytest.raises(psycopg.OperationalError) as info:
            where(other.listen.port)
        assert "no endpoint is standby" in str(info.value), info.value
        assert other.metric("podpatterns_ambassador_connections_failed_total", reason="role") == 1
        amb.wait_event("connection_closed", lambda e: e.get("reason") == "role_changed")


@peer
def test_a_server_connection_with_no_app_is_refused_on_the_wrong_role(
    pair: ReplicatedPostgres, ca_file: Path, password_file: Path
) -> None:
    """open_server (a pool's connection) to a standby under read-write: Failure role,
    and the standby's role recorded; the role check itself is not refused."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    secret = PasswordFile(password_file)
    secret.load()
    roles = Roles("read-write")
    handler = PostgresHandler(
        lambda: ctx,
        sslmode="verify-full",
        server_name=PG_SERVER_NAME,
        credentials=Credentials(secret, {"scram-sha-256"}),
        roles=roles,
    )
    standby = Endpoint(HostPort(pair.standby.host, pair.standby.port))

    async def open_standby(check_role: bool) -> str:
        sock = socket.create_connection((pair.standby.host, pair.standby.port), timeout=5)
        sock.setblocking(False)
        tls = None
        try:
            _, tls, session = await handler.open_server(
                sock, standby, startup_message("app", "postgres"), check_role=check_role
            )
            return session.parameters["in_hot_standby"]
        except Failure as failure:
            await asyncio.sleep(0)  # open_server aborted its TLS leg: let it close
            return failure.kind
        finally:
            if tls is not None:
                tls.transport.abort()
                await asyncio.sleep(0)  # let the transport close its socket
            else:
                sock.close()

    assert asyncio.run(open_standby(True)) == "role"
    assert roles.get(standby) == STANDBY
    assert asyncio.run(open_standby(False)) == "on"


# -- pooled server connections follow the roles (--pg-pool with roles) ---------------------


def test_pool_with_roles_is_accepted(tmp_path: Path) -> None:
    """--pg-pool with --pg-target-session-attrs and --pg-close-on-role-change builds a
    config (it was refused before pooled connections followed the roles)."""
    for mode in ("session", "transaction"):
        route = amb_config.build(
            {},
            {},
            {
                "listen": "127.0.0.1:0",
                "upstream": ["127.0.0.1:5432", "127.0.0.1:5433"],
                "protocol": "postgres",
                "pg_password_file": str(tmp_path / "password"),
                "pg_pool": mode,
                "pg_target_session_attrs": "read-write",
                "pg_health_user": "app",
                "health_check_interval": "2s",
                "pg_close_on_role_change": True,
            },
        ).routes[0]
        assert (route.pg_pool, route.pg_target_session_attrs) == (mode, "read-write")


def test_pool_closes_what_a_role_change_strands_and_keeps_its_counts() -> None:
    """Without servers: a role change closes the idle server connections to that endpoint
    (role_changed), one returned from it later is closed instead of kept, one past its
    lifetime too (max_lifetime), and the pool's counts stay true (none left resetting)."""
    a, b = (Endpoint(HostPort("127.0.0.1", p)) for p in (1, 2))
    roles = Roles("read-write")
    handler = PostgresHandler(None, roles=roles)

    async def dial() -> tuple[socket.socket, Endpoint]:
        raise AssertionError("no server connection is opened here")

    async def scenario() -> Pools:
        pools = Pools(PoolSettings(), handler, dial)
        roles.on_change = pools.role_changed
        roles.update(a, PRIMARY, "test")
        roles.update(b, PRIMARY, "test")
        pool = pools.pool_for(startup_message("app", "postgres"))
        conns = [ServerConn(pool, ep, b"", b"", 60.0) for ep in (a, a, b, a)]
        for server in conns:
            server.endpoint.active += 1
            pool.opening += 1
            pool.opened(server)  # idle
        lent, on_b, on_a, old = (pool.take() for _ in conns)  # the latest first
        assert (lent, on_b, on_a, old) == (conns[3], conns[2], conns[1], conns[0])
        assert lent is not None and on_b is not None and on_a is not None and old is not None
        for returned in (on_b, on_a):
            pool.returning(returned)
            pool.release(returned)
        roles.update(a, STANDBY, "test")  # demoted: its idle connection goes at once
        assert list(pool.idle) == [on_b] and pools.closed["role_changed"] == 1
        pool.returning(lent)
        pool.release(lent)  # returned from the demoted endpoint: closed, not kept
        old.expires = 0.0
        roles.update(a, PRIMARY, "test")
        pool.returning(old)
        pool.release(old)  # past its lifetime
        assert pools.closed == {"role_changed": 2, "max_lifetime": 1}
        assert (pool.in_use, len(pool.idle), pool.resetting, pool.opening) == (0, 1, 0, 0)
        assert (a.active, b.active) == (0, 1)
        pool.close_idle()
        return pools

    asyncio.run(scenario())


@peer
def test_transaction_pool_writes_follow_the_primary_across_a_failover(
    pair: ReplicatedPostgres, ca_file: Path, password_file: Path
) -> None:
    """--pg-pool transaction, read-write, the primary stopped and the standby promoted:
    an app connection idle meanwhile goes on writing on the new primary without an error;
    one whose statement was running gets an ERROR for it (not FATAL) and goes on; one
    idle inside a transaction block gets an ERROR at its next statement, ROLLBACK (simple
    or extended protocol) works, and it goes on. No app connection is closed."""
    upstreams = [ep(pair.primary), ep(pair.standby)]
    # (nearly) every query reported with its endpoint: a lost transaction ends its queries
    # there (a 120 s pg_sleep lost after seconds is always over 1 ms)
    metrics = ("--pg-metrics", "--pg-slow-query", "1ms")
    args = pool_role_args(ca_file, password_file, "read-write", "transaction", *metrics)
    made = pair.primary.query("create table writes (n int); grant all on writes to app")
    assert made is not None
    wait_until(lambda: pair.standby.query("select count(*) from writes") == "0", "replicated")
    sleeping = "select count(*) from pg_stat_activity where query = 'select pg_sleep(120)'"
    with (
        run_ambassador(upstreams, *args) as amb,
        app_conn(amb.listen.port) as conn,
        app_conn(amb.listen.port) as running,
        app_conn(amb.listen.port, autocommit=False) as block,
        app_conn(amb.listen.port, autocommit=False) as extended,
        app_conn(amb.listen.port, autocommit=False) as unnamed,
        ThreadPoolExecutor(1) as pool,
    ):
        wait_role(amb, pair.primary, "primary")
        wait_role(amb, pair.standby, "standby")
        conn.execute("insert into writes values (1)")
        assert conn.execute(WHERE).fetchone() == (pair.primary.port, False)
        block.execute("insert into writes values (100)")  # BEGIN: a block left open
        extended.execute("insert into writes values (200)")
        unnamed.execute("insert into writes values (300)")
        slept = pool.submit(running.execute, "select pg_sleep(120)")
        wait_until(lambda: pair.primary.query(sleeping) == "1", "the statement running")
        mark = amb.mark()
        pair.stop_primary()
        pair.promote()
        # idle meanwhile: the next transactions run on the promoted server, no error
        conn.execute("insert into writes values (2), (3)")
        with conn.transaction():
            conn.execute("insert into writes values (4)")
            row = conn.execute(WHERE).fetchone()
        assert row == (pair.standby.port, False)
        assert conn.execute("select count(*) from writes").fetchone() == (4,)
        # running when the primary stopped: that statement failed, the connection did not
        with pytest.raises(psycopg.errors.AdminShutdown) as lost:
            slept.result(timeout=60)
        assert "this transaction did not complete" in str(lost.value), lost.value
        assert running.execute(WHERE).fetchone() == (pair.standby.port, False)
        # inside a block: told at its next statement, which is not run elsewhere
        with pytest.raises(psycopg.errors.AdminShutdown):
            block.execute("insert into writes values (101)")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            block.execute("insert into writes values (102)")
        block.rollback()
        assert block.execute(WHERE).fetchone() == (pair.standby.port, False)
        block.commit()
        # the same, ended by a ROLLBACK in the extended protocol (a named statement)
        with pytest.raises(psycopg.errors.AdminShutdown):
            extended.execute("insert into writes values (%s)", (201,))
        extended.execute("rollback", prepare=True)
        assert extended.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert extended.execute(WHERE, prepare=True).fetchone() == (pair.standby.port, False)
        extended.commit()
        with pytest.raises(psycopg.errors.AdminShutdown):
            unnamed.execute("select 1")
        unnamed.execute("rollback", binary=True)  # Parse, Bind, Describe, Execute, Sync
        assert unnamed.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert unnamed.execute(WHERE).fetchone() == (pair.standby.port, False)
        assert conn.execute("select count(*) from writes where n > 4").fetchone() == (0,)
        wait_role(amb, pair.standby, "primary", after=mark)
        assert amb.metric(POOL + "transactions_lost_total") == 4
        assert not any(c.closed for c in (conn, running, block, extended, unnamed))
    assert amb.find("pg_pool_open_bug") < 0, amb.log_text()
    # --pg-metrics: the lost pg_sleep ended on the old primary, once; no later query on
    # the new one was timed from it (nor from the statements answered by the ambassador)
    slept_on = [e["upstream"] for e in amb.events if e.get("event") == "pg_slow_query"
                and "pg_sleep" in e.get("query", "")]  # fmt: skip
    slow = [e for e in amb.events if e.get("event") == "pg_slow_query"]
    assert slept_on == [ep(pair.primary)], slow


@peer
def test_transaction_pool_closes_connections_of_an_endpoint_that_changed_role(
    pair: ReplicatedPostgres, ca_file: Path, password_file: Path
) -> None:
    """--pg-pool transaction, read-only: when the standby is promoted, its idle server
    connection is closed at once and the one lent to an app's transaction when that
    transaction ends (role_changed); the app's next transaction finds no read-only
    server and is told so after --pg-pool-wait, not 53300."""
    upstreams = [ep(pair.primary), ep(pair.standby)]
    args = pool_role_args(ca_file, password_file, "read-only", "transaction")
    args[args.index("--pg-pool-wait") + 1] = "1s"
    with run_ambassador(upstreams, *args) as amb:
        wait_role(amb, pair.standby, "standby")
        with app_conn(amb.listen.port, autocommit=False) as busy, app_conn(amb.listen.port) as idle:
            busy.execute("select 1")  # BEGIN (implicit): a server connection held
            assert idle.execute(WHERE).fetchone() == (pair.standby.port, True)
            wait_until(lambda: amb.metric(POOL + "connections", state="idle") == 1)
            mark = amb.mark()
            pair.promote()
            wait_role(amb, pair.standby, "primary", after=mark)
            wait_until(lambda: closed_for_role(amb) == 1, "the idle connection closed")
            assert amb.metric(POOL + "connections", state="in_use") == 1
            assert busy.execute(WHERE).fetchone() == (pair.standby.port, False)
            busy.commit()  # the transaction ends: its server connection is not returned
            wait_until(lambda: closed_for_role(amb) == 2, "the lent connection closed")
            assert amb.metric(POOL + "connections", state="idle") == 0
            with pytest.raises(psycopg.OperationalError) as info:
                idle.execute("select 1")
            assert "no endpoint is read-only" in str(info.value), info.value
        assert amb.metric(POOL + "wait_timeouts_total") == 0
