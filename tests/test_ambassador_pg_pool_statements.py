"""``--pg-pool transaction``: the prepared statements kept per server connection
(``--pg-pool-max-prepared``, LRU eviction with a Close) and per app connection
(``--pg-pool-max-client-prepared``), against a real PostgreSQL 15.

The server and helpers are those of tests/test_ambassador_pg_pool.py. What a server
connection holds is read on that connection itself (``pg_prepared_statements`` through
the app's connection, with a pool of one server connection).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from tests.ambassador_process import run_ambassador
from tests.peers import PostgresServer
from tests.test_ambassador_pg_pool import POOL, app_connect, connect, pool_args, server
from tests.test_ambassador_pg_pool_metrics import pgbench_prepared

pytest_plugins = ("tests.peer_fixtures",)
pytestmark = pytest.mark.peer
__all__ = ["server"]  # the fixture, shared

HELD = (
    "select count(*), count(*) filter (where name like 'podpatterns_%') from pg_prepared_statements"
)


def test_lru_bound_on_the_server_connection_with_right_answers(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """Ten statements, bound 3: every answer right, each statement prepared again when it
    was evicted, never more than 3 on the server connection."""
    bound, statements, rounds = 3, 10, 3
    args = pool_args(
        server,
        pg_ca_file,
        "transaction",
        "--pg-pool-size",
        "1",
        "--pg-pool-max-prepared",
        str(bound),
    )
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        with connect(server, amb.listen.port, autocommit=True) as conn:
            for r in range(rounds):
                for k in range(statements):
                    sql = f"select %s::int + {k}"
                    assert conn.execute(sql, (r,), prepare=True).fetchone() == (r + k,)
                    held = conn.execute(HELD, prepare=False).fetchone()
                    assert held is not None
                    assert held[0] == held[1] <= bound, held  # only ours, within the bound
            assert held == (bound, bound)
        # each execution found its statement evicted (LRU, 10 statements in turn)
        assert amb.metric(POOL + "statements_prepared_total") == rounds * statements
        assert amb.metric(POOL + "statements_evicted_total") == rounds * statements - bound
        assert amb.metric(POOL + "statements") == bound  # the app left: the server's only
        assert amb.terminate() == 0, amb.log_text()


def test_asyncpg_caches_larger_than_the_bound(server: PostgresServer, pg_ca_file: Path) -> None:
    """Four asyncpg apps, six statements each, two server connections with a bound of 2:
    right answers throughout; once the apps left, the pool tracks only what the server
    connections hold."""
    bound, size = 2, 2
    args = pool_args(
        server,
        pg_ca_file,
        "transaction",
        "--pg-pool-size",
        str(size),
        "--pg-pool-max-prepared",
        str(bound),
    )
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        port = amb.listen.port

        async def app(n: int) -> None:
            conn = await app_connect(server, port)
            try:
                for i in range(15):
                    for k in range(6):  # the same texts in every app: shared names
                        got = await conn.fetchval(f"select $1::int * {k + 1}", i + n)
                        assert got == (i + n) * (k + 1)
                    async with conn.transaction():
                        await conn.execute("select $1::text", str(i))
            finally:
                await conn.close()

        async def apps() -> None:
            await asyncio.gather(*(app(n * 100) for n in range(4)))

        asyncio.run(apps())
        assert amb.metric(POOL + "statements_evicted_total") > 0
        assert amb.metric(POOL + "statements") <= size * bound
        assert amb.terminate() == 0, amb.log_text()


def test_pgbench_prepared_with_a_bound_of_one(
    server: PostgresServer, pg_ca_file: Path, tmp_path: Path
) -> None:
    """pgbench -M prepared, two statements a transaction, a bound of 1: every Bind may
    need its statement again, inside a pipeline; no failed transaction."""
    args = pool_args(
        server,
        pg_ca_file,
        "transaction",
        "--pg-pool-size",
        "2",
        "--pg-pool-max-prepared",
        "1",
    )
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        pgbench_prepared(server, amb.listen.port, tmp_path, "-c", "4", "-j", "4", "-t", "50")
        assert amb.metric(POOL + "statements_evicted_total") > 0
        assert amb.metric(POOL + "statements") <= 2
        assert amb.terminate() == 0, amb.log_text()


def test_app_naming_too_many_statements_gets_53400(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """--pg-pool-max-client-prepared 5: asyncpg's sixth named statement ends its
    connection with an ErrorResponse (FATAL 53400) naming the option; other apps go on."""
    args = pool_args(server, pg_ca_file, "transaction", "--pg-pool-max-client-prepared", "5")
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        port = amb.listen.port

        async def app() -> None:
            # statement_cache_size 0: only the statements named below
            conn = await app_connect(server, port, statement_cache_size=0)
            try:
                held = [await conn.prepare(f"select {k}", name=f"s{k}") for k in range(5)]
                assert [await s.fetchval() for s in held] == [0, 1, 2, 3, 4]
                with pytest.raises(asyncpg.PostgresError) as err:
                    await conn.prepare("select 5", name="s5")
                # FATAL during a query: asyncpg raises ConnectionDoesNotExistError with
                # the server's (here the ambassador's) message
                assert "--pg-pool-max-client-prepared 5" in str(err.value), err.value
            finally:
                await conn.close()

        asyncio.run(app())
        assert amb.metric(POOL + "statements_refused_total") == 1
        with connect(server, port, autocommit=True) as other:
            assert other.execute("select 1", prepare=True).fetchone() == (1,)
        assert amb.terminate() == 0, amb.log_text()


def test_max_prepared_zero_passes_the_apps_names(server: PostgresServer, pg_ca_file: Path) -> None:
    """--pg-pool-max-prepared 0: statements are not tracked; inside one transaction a
    prepared statement works under the app's own name."""
    args = pool_args(server, pg_ca_file, "transaction", "--pg-pool-max-prepared", "0")
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        with connect(server, amb.listen.port) as conn:  # not autocommit: one transaction
            pgconn = conn.pgconn
            pgconn.exec_(b"begin")
            assert pgconn.prepare(b"mine", b"select 41 + $1::int").error_message == b""
            assert pgconn.exec_prepared(b"mine", [b"1"]).get_value(0, 0) == b"42"
            names = pgconn.exec_(b"select name from pg_prepared_statements")
            assert names.get_value(0, 0) == b"mine"
            pgconn.exec_(b"rollback")
        assert amb.metric(POOL + "statements_prepared_total") == 0
        assert amb.terminate() == 0, amb.log_text()
