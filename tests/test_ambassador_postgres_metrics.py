"""``--pg-metrics``: queries, transactions, errors and durations per route and endpoint.

The wire tests feed the framing watch bytes as they would arrive (split anywhere); the
peer tests run psql and pgbench against the TLS-only PostgreSQL 15 of
tests/peer_fixtures.py through the ambassador and compare the counters with what the
clients did.
"""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from podpatterns.ambassador import Ambassador, RouteConfig
from podpatterns.ambassador.pgdrain import TransactionWatch
from podpatterns.ambassador.pgmetrics import (
    QUERY_BUCKETS,
    QueryStats,
    SlowQueries,
    normalize,
    sqlstate_class,
)
from podpatterns.ambassador.postgres import error_response
from podpatterns.metrics import exposition, new_registry
from podpatterns.options import HostPort
from tests.ambassador_process import AmbassadorProcess, run_ambassador
from tests.peers import PostgresServer, need
from tests.test_ambassador_postgres import CLIENT_TIMEOUT, ca_file, psql, tls_args, upstream

pytest_plugins = ("tests.peer_fixtures",)
__all__ = ["ca_file"]  # the module fixture, shared


def _msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", 4 + len(body)) + body


def _feed(watch: TransactionWatch, side: str, data: bytes, step: int) -> None:
    for i in range(0, len(data), step):
        watch.passed(side, data[i : i + step])


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_watch_counts_queries_transactions_and_errors_across_any_split(step: int) -> None:
    """Simple and extended queries, a block, an autocommit error: counted however split."""
    stats = QueryStats()
    watch = TransactionWatch(stats)
    execute = _msg(b"E", b"\0\0\0\0\0")
    client = (
        _msg(b"Q", b"select 1\0")  # autocommit: 1 query, 1 transaction
        + _msg(b"P", b"\0select 1\0\0\0")
        + _msg(b"B", b"\0\0" + bytes(6))
        + execute
        + execute
        + _msg(b"S")  # 2 queries, 1 transaction
        + _msg(b"P", b"\0select 1\0\0\0")
        + _msg(b"S")  # no Execute: no query, no transaction
        + _msg(b"Q", b"begin\0")
        + _msg(b"Q", b"select 1/0\0")
        + _msg(b"Q", b"rollback\0")  # 3 queries, 1 transaction (E -> I)
    )
    server = (
        _msg(b"C", b"SELECT 1\0")
        + _msg(b"Z", b"I")
        + _msg(b"C", b"SELECT 1\0") * 2
        + _msg(b"Z", b"I")
        + _msg(b"1")
        + _msg(b"Z", b"I")
        + _msg(b"Z", b"T")
        + error_response("22012", "division by zero", severity="ERROR")
        + _msg(b"Z", b"E")
        + _msg(b"Z", b"I")
    )
    _feed(watch, "client", client, step)
    _feed(watch, "upstream", server, step)
    assert (stats.queries, stats.transactions) == (6, 3)
    assert dict(stats.errors) == {"22": 1}
    assert sum(stats.buckets) == stats.queries
    assert watch.at_rest()


def test_sqlstate_class_reads_only_the_c_field() -> None:
    """The class is the C field's first two characters; anything else is ``unknown``."""
    body = error_response("42P01", "relation does not exist", severity="ERROR")[5:]
    assert sqlstate_class(body) == "42"
    assert sqlstate_class(b"SERROR\0Mno code\0\0") == "unknown"
    assert sqlstate_class(b"C\xff\xfe\0") == "unknown"


def test_error_body_kept_is_bounded() -> None:
    """A huge ErrorResponse is walked past; only its head is ever held."""
    stats = QueryStats()
    watch = TransactionWatch(stats)
    big = error_response("XX000", "x" * 1_000_000, severity="ERROR")
    watch.passed("client", _msg(b"Q", b"select\0"))
    for i in range(0, len(big), 65536):
        watch.passed("upstream", big[i : i + 65536])
        assert len(watch.server.carry) <= 5 + 128
    watch.passed("upstream", _msg(b"Z", b"I"))
    assert dict(stats.errors) == {"XX": 1}
    assert stats.queries == 1


def test_metric_families_are_exposed_per_route_and_endpoint() -> None:
    """A --pg-metrics route exposes the four families, a histogram among them."""
    route = RouteConfig(
        listen=HostPort("127.0.0.1", 0),
        upstream=(HostPort("127.0.0.1", 1),),
        protocol="postgres",
        pg_metrics=True,
    )
    amb = Ambassador([route])
    queries = amb.routes[0].queries
    assert queries is not None
    stats = queries.for_endpoint(amb.routes[0].pool.endpoints[0])
    stats.observe(0.003, 2)
    registry = new_registry()
    for c in amb.collectors():
        registry.register(c)
    samples = {
        (sample.name, sample.labels.get("le", "")): (sample.labels, sample.value)
        for family in text_string_to_metric_families(exposition(registry).decode())
        for sample in family.samples
        if "_pg_" in sample.name
    }
    labels, value = samples[("podpatterns_ambassador_pg_queries_total", "")]
    assert labels == {"route": "default", "endpoint": "127.0.0.1:1"} and value == 2
    duration = "podpatterns_ambassador_pg_query_duration_seconds"
    assert samples[(duration + "_bucket", "0.005")][1] == 2
    assert samples[(duration + "_bucket", "0.0025")][1] == 0
    assert samples[(duration + "_count", "")][1] == 2
    assert len(QUERY_BUCKETS) + 1 == len(stats.buckets)


# -- against PostgreSQL 15 ----------------------------------------------------------------


def _pg(amb: AmbassadorProcess, name: str) -> float:
    return amb.metric(f"podpatterns_ambassador_pg_{name}")


def _pgbench(server: PostgresServer, port: int, *args: str) -> str:
    env = server.env(port)
    env["PGSSLMODE"] = "disable"
    done = subprocess.run(
        [need(server.tool("pgbench")), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _pgbench_init(server: PostgresServer) -> None:
    """pgbench's tables, made by the superuser (PostgreSQL 15: public is not writable)
    and readable by the test user."""
    done = subprocess.run(
        [need(server.tool("pgbench")), "-i", "-s", "1", "-q"],
        env=server.admin_env(),
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    grant = f'grant select on all tables in schema public to "{server.user}"'
    assert server.query(grant) is not None


def _processed(out: str) -> int:
    match = re.search(r"number of transactions actually processed: (\d+)", out)
    assert match is not None, out
    return int(match.group(1))


@pytest.mark.peer
def test_pgbench_select_only_counts_match(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """pgbench -S -c 2: queries and transactions grow by exactly what pgbench reports.

    pgbench's own setup queries are the same in both runs, so the difference between a
    run of 2N and one of N transactions per client is pgbench's N x clients exactly.
    """
    with run_ambassador([upstream(postgres_tls)], *tls_args(ca_file, "--pg-metrics")) as amb:
        port = amb.listen.port
        _pgbench_init(postgres_tls)
        counts = []
        for n in (50, 100):
            before = (_pg(amb, "queries_total"), _pg(amb, "transactions_total"))
            done = _processed(_pgbench(postgres_tls, port, "-n", "-S", "-c", "2", "-t", str(n)))
            assert done == 2 * n
            amb.wait_idle()
            after = (_pg(amb, "queries_total"), _pg(amb, "transactions_total"))
            counts.append((after[0] - before[0], after[1] - before[1]))
        (q1, t1), (q2, t2) = counts
        assert q2 - q1 == 2 * 50, counts
        assert t2 - t1 == 2 * 50, counts
        assert q1 >= 100 and t1 >= 100, counts
        assert _pg(amb, "query_duration_seconds_count") == _pg(amb, "queries_total")
        assert _pg(amb, "errors_total") == 0
        endpoint = upstream(postgres_tls)
        assert amb.metric("podpatterns_ambassador_pg_queries_total", endpoint=endpoint) > 0
        assert amb.terminate() == 0, amb.log_text()


@pytest.mark.peer
def test_division_by_zero_is_counted_under_class_22(
    postgres_tls: PostgresServer, ca_file: Path
) -> None:
    """select 1/0 (SQLSTATE 22012) is one error of class 22; no query text is logged."""
    with run_ambassador([upstream(postgres_tls)], *tls_args(ca_file, "--pg-metrics")) as amb:
        done = psql(postgres_tls, amb.listen.port, "select 1/0")
        assert done.returncode != 0 and "division by zero" in done.stderr, done.stderr
        amb.wait_idle()
        assert amb.metric("podpatterns_ambassador_pg_errors_total", sqlstate_class="22") == 1
        assert _pg(amb, "errors_total") == 1
        assert _pg(amb, "queries_total") == 1
        assert _pg(amb, "transactions_total") == 1  # an autocommit statement, failed
        assert _pg(amb, "query_duration_seconds_count") == 1
        assert amb.terminate() == 0, amb.log_text()
        assert "1/0" not in amb.log_text()


@pytest.mark.peer
def test_metrics_with_drain_off_relay_and_count(
    postgres_tls: PostgresServer, ca_file: Path
) -> None:
    """--pg-drain off --pg-metrics: the session is framed for the counts alone."""
    args = tls_args(ca_file, "--pg-metrics", "--pg-drain", "off")
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        done = psql(postgres_tls, amb.listen.port, "begin; select 1; commit")
        assert done.returncode == 0, done.stderr
        amb.wait_idle()
        assert _pg(amb, "queries_total") == 1  # one simple Query holding three statements
        assert _pg(amb, "transactions_total") == 1
        assert amb.terminate() == 0, amb.log_text()


# -- --pg-slow-query ----------------------------------------------------------------------

SECRETS = ("hunter2", "4111111111111111", "3.14159", "0xDEADBEEF", "s3cr3t")
QUERIES = (
    "select * from users where name = 'hunter2' and card = 4111111111111111",
    "update t set pi = 3.14159, mask = 0xDEADBEEF where id = 7",
    "select E'it\\'s s3cr3t', $$hunter2$$, $tag$4111111111111111$tag$",
    "insert into t2 values ('it''s hunter2', -3.14159e2, .5, U&'s3cr3t')",
    "select 'never closed hunter2 s3cr3t",
    "select $1::text, x1 from t1 where y = '4111111111111111'::int8",
)


@pytest.mark.parametrize("query", QUERIES)
def test_normalized_text_never_holds_a_literal(query: str) -> None:
    """Numbers and quoted strings, in every PostgreSQL spelling, become ``?``."""
    out = normalize(query.encode())
    for secret in SECRETS:
        assert secret.lower() not in out.lower(), out
    assert "?" in out
    assert not re.search(r"(?<![\w$])\d", out), out  # no number outside names and $n


def test_watch_reports_slow_queries_without_literals() -> None:
    """A simple Query and a Parse/Execute cycle over the threshold are reported, normalized."""
    reported: list[dict[str, object]] = []

    class Log:
        def warning(self, event: str, **kw: object) -> None:
            reported.append({"event": event, **kw})

    watch = TransactionWatch(QueryStats(), slow=SlowQueries(0.0, Log(), "db:5432"))
    client = (
        _msg(b"Q", b"select 'hunter2', 42\0")
        + _msg(b"P", b"\0select * from t where a = 'x' and b = 7\0\0\0")
        + _msg(b"B", b"\0\0" + bytes(6))
        + _msg(b"E", b"\0\0\0\0\0")
        + _msg(b"S")
    )
    _feed(watch, "client", client, 3)
    _feed(watch, "upstream", _msg(b"Z", b"I") * 2, 1)
    assert [r["query"] for r in reported] == [
        "select ?, ?",
        "select * from t where a = ? and b = ?",
    ]
    assert all(r["event"] == "pg_slow_query" and r["upstream"] == "db:5432" for r in reported)


@pytest.mark.peer
def test_slow_query_is_logged_without_literals(postgres_tls: PostgresServer, ca_file: Path) -> None:
    """--pg-slow-query: a query over the threshold is one event, its literals hidden."""
    args = tls_args(ca_file, "--pg-metrics", "--pg-slow-query", "20ms")
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        sql = "select pg_sleep(0.05), 'hunter2' as secret_value, 4111111111111111"
        done = psql(postgres_tls, amb.listen.port, sql)
        assert done.returncode == 0, done.stderr
        event = amb.wait_event("pg_slow_query")
        assert event["query"] == "select pg_sleep(?), ? as secret_value, ?", event
        assert float(event["duration_ms"]) >= 50
        assert amb.terminate() == 0, amb.log_text()
        assert "hunter2" not in amb.log_text(1000)
        assert "4111111111111111" not in amb.log_text(1000)
