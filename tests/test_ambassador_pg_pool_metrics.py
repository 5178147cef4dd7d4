"""``--pg-metrics`` with ``--pg-pool session|transaction`` against a real PostgreSQL 15.

The pooled app connection counts from the app's own messages and what the app receives:
the ambassador's re-prepare Parses, its stand-in Closes and the reset query
(``DISCARD ALL``) are not the app's and must not show. Each test runs a workload whose
counts are known exactly (queries, transactions, errors by SQLSTATE class) and compares.
The server and helpers are those of tests/test_ambassador_pg_pool.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.ambassador_process import AmbassadorProcess, run_ambassador
from tests.peers import PostgresServer
from tests.test_ambassador_pg_pool import (
    POOL,
    app_connect,
    connect,
    idle_is,
    pool_args,
    server,
)
from tests.test_ambassador_postgres_metrics import _pgbench

pytest_plugins = ("tests.peer_fixtures",)
pytestmark = pytest.mark.peer
__all__ = ["server"]  # the fixture, shared

PG = "podpatterns_ambassador_pg_"
MODES = ("session", "transaction")


def counts(amb: AmbassadorProcess) -> dict[str, object]:
    """The query metrics, as one comparable value."""
    errors = {
        labels["sqlstate_class"]: value
        for name, labels, value in amb.metrics()
        if name == PG + "errors_total"
    }
    return {
        "queries": amb.metric(PG + "queries_total"),
        "transactions": amb.metric(PG + "transactions_total"),
        "durations": amb.metric(PG + "query_duration_seconds_count"),
        "errors": errors,
    }


def pgbench_prepared(server: PostgresServer, port: int, tmp_path: Path, *args: str) -> None:
    """pgbench -M prepared of a 4-statement transaction (begin, two selects, end): no
    failed transaction."""
    script = tmp_path / "tx.sql"
    script.write_text("\\set n random(1, 1000)\nbegin;\nselect :n + 1;\nselect :n;\nend;\n")
    out = _pgbench(server, port, "-n", "-M", "prepared", *args, "-f", str(script))
    assert "number of failed transactions: 0" in out, out


def psycopg_workload(conn: psycopg.Connection) -> None:
    """10 queries, 7 transactions, one error of class 22 and one of class 42.

    On an autocommit connection: three autocommit statements (two of them fail), a block
    (BEGIN, two statements, COMMIT: 4 queries, 1 transaction) and a statement prepared
    under a name and executed three times (psycopg prepares with a Parse...Sync of its own:
    no query).
    """
    assert conn.execute("select 1").fetchone() == (1,)
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute("select 1/0")
    with pytest.raises(psycopg.errors.UndefinedTable):
        conn.execute("select * from no_such_table")
    with conn.transaction():
        conn.execute("select 1")
        conn.execute("select 2")
    for i in range(3):
        row = conn.execute("select %s::int + 1", (i,), prepare=True).fetchone()
        assert row == (i + 1,)


def psycopg_counts(times: int) -> dict[str, object]:
    """What :func:`psycopg_workload` run ``times`` times adds up to."""
    n = float(times)
    return {
        "queries": 10 * n,
        "transactions": 7 * n,
        "durations": 10 * n,
        "errors": {"22": n, "42": n},
    }


@pytest.mark.parametrize("mode", MODES)
def test_psycopg_workload_counts_exactly(
    server: PostgresServer, pg_ca_file: Path, mode: str
) -> None:
    """Queries, transactions, errors by class, durations: exactly the app's, twice over,
    the reset between the two app connections (session mode) not among them."""
    args = pool_args(server, pg_ca_file, mode, "--pg-metrics", "--pg-pool-size", "1")
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        port = amb.listen.port
        with connect(server, port, autocommit=True) as conn:
            psycopg_workload(conn)
        assert counts(amb) == psycopg_counts(1)
        idle_is(amb, 1)  # returned, and in session mode reset with DISCARD ALL
        with connect(server, port, autocommit=True) as conn:
            psycopg_workload(conn)
        idle_is(amb, 1)
        assert counts(amb) == psycopg_counts(2)
        endpoint = f"{server.host}:{server.port}"
        assert amb.metric(PG + "queries_total", endpoint=endpoint) == 20
        assert amb.metric(POOL + "server_opened_total") == 1
        assert amb.terminate() == 0, amb.log_text()


def test_asyncpg_statement_caches_count_only_the_apps_queries(
    server: PostgresServer, pg_ca_file: Path
) -> None:
    """Four asyncpg apps on two backends in transaction mode: their statements are
    prepared again on whichever backend serves them, and stand-in Closes answer the
    Parses a backend already has; only the apps' 5 queries and 3 transactions per round
    (and one error each) are counted."""
    rounds, apps = 20, 4
    args = pool_args(server, pg_ca_file, "transaction", "--pg-metrics", "--pg-pool-size", "2")
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        port = amb.listen.port

        async def app(n: int) -> None:
            conn = await app_connect(server, port)
            try:
                for i in range(rounds):
                    assert await conn.fetchval("select $1::int * 2", i + n) == (i + n) * 2
                    await conn.fetchval("select pg_backend_pid()")
                    async with conn.transaction():  # BEGIN, the statement, COMMIT
                        await conn.execute("select $1::text", str(i))
                with pytest.raises(asyncpg.DivisionByZeroError):
                    await conn.fetchval("select 1 / $1::int", 0)
            finally:
                await conn.close()

        async def run_apps() -> None:
            await asyncio.gather(*(app(n * 1000) for n in range(apps)))

        asyncio.run(run_apps())
        assert counts(amb) == {
            "queries": float(apps * (rounds * 5 + 1)),
            "transactions": float(apps * (rounds * 3 + 1)),
            "durations": float(apps * (rounds * 5 + 1)),
            "errors": {"22": float(apps)},
        }
        assert amb.metric(POOL + "server_opened_total") <= 2
        assert amb.terminate() == 0, amb.log_text()


def test_pgbench_prepared_counts_exactly(
    server: PostgresServer, pg_ca_file: Path, tmp_path: Path
) -> None:
    """pgbench -M prepared, 6 clients on 2 backends: 4 queries and 1 transaction per
    pgbench transaction, nothing of the ambassador's re-prepares."""
    clients, per_client = 6, 50
    args = pool_args(server, pg_ca_file, "transaction", "--pg-metrics", "--pg-pool-size", "2")
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        pgbench_prepared(
            server,
            amb.listen.port,
            tmp_path,
            "-c",
            str(clients),
            "-j",
            str(clients),
            "-t",
            str(per_client),
        )
        total = clients * per_client
        assert counts(amb) == {
            "queries": float(4 * total),
            "transactions": float(total),
            "durations": float(4 * total),
            "errors": {},
        }
        assert amb.terminate() == 0, amb.log_text()


def test_slow_query_through_a_transaction_pool(server: PostgresServer, pg_ca_file: Path) -> None:
    """--pg-slow-query with a pool: the app's Parse...Execute cycle is reported with its
    text (literals hidden) and the endpoint of the backend that ran it."""
    args = pool_args(server, pg_ca_file, "transaction", "--pg-metrics", "--pg-slow-query", "20ms")
    with run_ambassador([f"{server.host}:{server.port}"], *args) as amb:
        with connect(server, amb.listen.port, autocommit=True) as conn:
            sql = "select pg_sleep(%s), 'hunter2' as secret_value"
            conn.execute(sql, (0.05,), prepare=False)
        event = amb.wait_event("pg_slow_query")
        assert event["query"] == "select pg_sleep($1), ? as secret_value", event
        assert event["upstream"] == f"{server.host}:{server.port}"
        assert float(event["duration_ms"]) >= 50
        assert amb.terminate() == 0, amb.log_text()
        assert "hunter2" not in amb.log_text(1000)
