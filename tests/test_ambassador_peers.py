"""The ambassador process in front of real PostgreSQL and Redis servers.

The clients are the servers' own tools (psql, pgbench, redis-cli, redis-benchmark); each
test compares what they get through the ambassador with what they get directly, then
checks the ambassador's metrics and that SIGTERM ends it with exit code 0.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from tests.ambassador_process import AmbassadorProcess, run_ambassador
from tests.peers import PostgresServer, RedisServer, need

pytest_plugins = ("tests.peer_fixtures",)
pytestmark = pytest.mark.peer

CLIENT_TIMEOUT = 120.0
MIB = 1024 * 1024
RELAYS = pytest.mark.parametrize("relay", ["splice", "protocol"])
SPLICE_FLAG = {"splice": "on", "protocol": "off"}


def run(argv: list[str], env: dict[str, str] | None = None, stdin: bytes = b"") -> bytes:
    """Run a client tool to completion; its stdout, or a failure showing its stderr."""
    done = subprocess.run(
        argv, input=stdin, env=env, capture_output=True, timeout=CLIENT_TIMEOUT, check=False
    )
    assert done.returncode == 0, f"{argv[0]} exited {done.returncode}: {done.stderr.decode()}"
    return done.stdout


def check_served_and_exit(amb: AmbassadorProcess, connections: int, up: int, down: int) -> None:
    """Check /metrics after the traffic, then that SIGTERM exits 0.

    Every connection must be closed and none failed, with at least ``connections``
    connections and ``up``/``down`` bytes counted.
    """
    amb.wait_idle()
    assert amb.metric("podpatterns_ambassador_connections_total") >= connections
    assert amb.metric("podpatterns_ambassador_connections_failed_total") == 0
    closed = amb.metric("podpatterns_ambassador_connections_closed_total")
    assert closed == amb.metric("podpatterns_ambassador_connections_total")
    assert amb.metric("podpatterns_ambassador_bytes_total", direction="upstream") >= up
    assert amb.metric("podpatterns_ambassador_bytes_total", direction="downstream") >= down
    assert amb.terminate() == 0, amb.log_text()


# -- PostgreSQL -----------------------------------------------------------------------------

PSQL_SCRIPT = r"""
\set ON_ERROR_STOP 1
create temp table t (id int primary key, name text, amount numeric(12, 2));
insert into t select g, 'name-' || g, (g * 7919 % 100000) / 100.0
  from generate_series(1, 50000) g;
select count(*), sum(id), sum(amount), min(name), max(name), avg(amount)::numeric(12, 4) from t;
select id % 7 as bucket, count(*), sum(amount), max(amount) from t group by 1 order by 1;
select md5(string_agg(name || ':' || amount, ',' order by id)) from t;
select repeat('x', 1000000) as big;
create temp table u (n int, payload text);
\copy u from '{upload}' with (format csv)
select count(*), md5(string_agg(payload, '' order by n)) from u;
\copy (select * from t order by id) to stdout with (format csv)
"""


@RELAYS
def test_psql_output_identical_direct_and_through(
    postgres: PostgresServer, tmp_path: Path, relay: str
) -> None:
    """psql queries, a 1 MB row and \\copy both ways print the same bytes through the ambassador."""
    rows = [f"{n},{hashlib.sha256(str(n).encode()).hexdigest() * 4}" for n in range(20000)]
    upload = tmp_path / "upload.csv"
    upload.write_text("\n".join(rows) + "\n")
    payload_md5 = hashlib.md5("".join(r.split(",")[1] for r in rows).encode()).hexdigest()
    script = PSQL_SCRIPT.format(upload=upload).encode()
    psql = [postgres.tool("psql"), "-X", "-A", "-q"]

    direct = run(psql, postgres.env(), stdin=script)
    with run_ambassador(
        [f"{postgres.host}:{postgres.port}"], "--splice", SPLICE_FLAG[relay]
    ) as amb:
        assert amb.find("route_listening", lambda e: e["relay"] == relay) >= 0
        through = run(psql, postgres.env(amb.listen.port), stdin=script)
        assert through == direct
        lines = through.splitlines()
        assert b"x" * 1000000 in lines
        assert f"20000|{payload_md5}".encode() in lines
        assert f"50000,name-50000,{50000 * 7919 % 100000 / 100:.2f}".encode() in lines
        check_served_and_exit(amb, 1, upload.stat().st_size, len(through))


def test_pgbench_through_ambassador(postgres: PostgresServer) -> None:
    """pgbench -i and -S run through the ambassador with 0 failures and read the same data."""
    pgbench = need(postgres.tool("pgbench"))
    psql = [postgres.tool("psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c"]
    checksum = (
        "select count(*), sum(abalance), md5(string_agg(aid || ':' || bid || ':' || abalance,"
        " ',' order by aid)) from pgbench_accounts"
    )
    with run_ambassador([f"{postgres.host}:{postgres.port}"]) as amb:
        through = postgres.env(amb.listen.port)
        run([pgbench, "-i", "-s", "1", "-q"], through)
        report = run([pgbench, "-c", "4", "-j", "2", "-t", "200", "-S"], through).decode()
        assert "number of transactions actually processed: 800/800" in report, report
        assert re.search(r"^number of failed transactions: 0 \(", report, re.M), report
        via = run([*psql, checksum], through)
        direct = run([*psql, checksum], postgres.env())
        assert via == direct
        assert via.startswith(b"100000|")
        # pgbench -i: 1 session; the run: 4 sessions; psql: 1
        check_served_and_exit(amb, 6, 100000 * 10, 800 * 10)


def test_sigterm_drains_inflight_pgbench(postgres: PostgresServer) -> None:
    """SIGTERM during a pgbench run lets its sessions finish every transaction, then exits 0."""
    pgbench = need(postgres.tool("pgbench"))
    # The drain lasts as long as pgbench's remaining transactions, which on a loaded
    # machine (load 16) outlasted the default 30 s deadline and the 15 s the test waited
    # for the exit: what is tested is that they finish, so both bounds are generous.
    drain = ("--drain-timeout", str(CLIENT_TIMEOUT))
    with run_ambassador([f"{postgres.host}:{postgres.port}"], *drain) as amb:
        through = postgres.env(amb.listen.port)
        run([pgbench, "-i", "-s", "1", "-q"], through)
        accepted = "podpatterns_ambassador_connections_total"
        before = amb.metric(accepted, route="default")
        bench = subprocess.Popen(
            [pgbench, "-n", "-c", "2", "-t", "10000", "-S"],
            env=through,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            # pgbench first opens (and closes) one connection to read the scale, then
            # its 2 sessions: wait until all 3 were accepted and 2 are open, so SIGTERM
            # lands while both sessions run (not between the check and the sessions).
            amb.wait_metric(accepted, lambda n: n >= before + 3, "pgbench sessions accepted")
            active = "podpatterns_ambassador_connections_active"
            amb.wait_metric(active, lambda n: n >= 2, "2 (pgbench in flight)")
            assert amb.terminate(timeout=CLIENT_TIMEOUT + 10) == 0, amb.log_text()
            out, err = bench.communicate(timeout=CLIENT_TIMEOUT)
        finally:
            if bench.poll() is None:
                bench.kill()
                bench.communicate()
        assert bench.returncode == 0, err.decode()
        report = out.decode()
        assert "number of transactions actually processed: 20000/20000" in report, report
        assert re.search(r"^number of failed transactions: 0 \(", report, re.M), report
        assert amb.wait_event("drain_started")["in_flight"] >= 2
        assert amb.find("drain_finished") >= 0
        assert amb.find("drain_deadline_cut") == -1


# -- Redis ----------------------------------------------------------------------------------


def test_redis_benchmark_through_ambassador(redis: RedisServer) -> None:
    """Pipelined redis-benchmark set/get/lpush/lpop completes through the ambassador."""
    benchmark = need("redis-benchmark")
    cli = [need("redis-cli"), "-h", redis.host, "-p", str(redis.port)]
    run([*cli, "DEL", "key:__rand_int__", "mylist"])
    with run_ambassador([f"{redis.host}:{redis.port}"]) as amb:
        argv = [benchmark, "-h", redis.host, "-p", str(amb.listen.port)]
        out = run([*argv, "-q", "-n", "20000", "-t", "set,get,lpush,lpop", "-P", "16"]).decode()
        done = dict(re.findall(r"\b([A-Z]+): ([\d.]+) requests per second", out))
        assert sorted(done) == ["GET", "LPOP", "LPUSH", "SET"], out
        assert all(float(rate) > 0 for rate in done.values()), out
        assert run([*cli, "STRLEN", "key:__rand_int__"]) == b"3\n"
        assert run([*cli, "LLEN", "mylist"]) == b"0\n"
        # 50 clients per test; each request is > 20 bytes and each reply > 4
        check_served_and_exit(amb, 4 * 50, 4 * 20000 * 20, 4 * 20000 * 4)


REDIS_SCRIPT = """\
DEL {p}:list {p}:ctr {p}:hash
RPUSH {p}:list alpha beta gamma delta
LRANGE {p}:list 1 -1
INCRBY {p}:ctr 41
INCR {p}:ctr
HSET {p}:hash f1 v1 f2 v2
HGETALL {p}:hash
STRLEN big:direct
STRLEN big:through
EXISTS big:direct big:through nope
GETRANGE big:through 1000 1063
TYPE {p}:hash
"""


@RELAYS
def test_redis_cli_identical_direct_and_through(redis: RedisServer, relay: str) -> None:
    """redis-cli 1 MB SET/GET and a command mix answer the same directly and through."""
    cli = need("redis-cli")
    value = hashlib.sha256(relay.encode()).hexdigest().encode() * (MIB // 64)
    other = value[::-1]
    with run_ambassador([f"{redis.host}:{redis.port}"], "--splice", SPLICE_FLAG[relay]) as amb:
        assert amb.find("route_listening", lambda e: e["relay"] == relay) >= 0
        direct = [cli, "-h", redis.host, "-p", str(redis.port)]
        through = [cli, "-h", redis.host, "-p", str(amb.listen.port)]
        assert run([*through, "-x", "SET", "big:through"], stdin=value) == b"OK\n"
        assert run([*direct, "-x", "SET", "big:direct"], stdin=other) == b"OK\n"
        for key, expected in (("big:through", value), ("big:direct", other)):
            assert run([*through, "GET", key]) == expected + b"\n"
            assert run([*direct, "GET", key]) == expected + b"\n"
        results = {
            name: run(argv, stdin=REDIS_SCRIPT.format(p=f"t:{relay}:{name}").encode())
            for name, argv in (("direct", direct), ("through", through))
        }
        assert results["through"] == results["direct"]
        assert b"1048576\n1048576\n2\n" in results["through"]
        # one SET of 1 MiB went up, two GETs of 1 MiB came down
        check_served_and_exit(amb, 4, MIB, 2 * MIB)
