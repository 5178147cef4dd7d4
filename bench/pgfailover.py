"""How long a failover takes through ``--pg-pool transaction`` with role-aware routing.

Issue 14's target: after a failover, new work reaches the new primary within one
``--health-check-interval`` plus 1 s. Each repetition starts a fresh PostgreSQL 15
primary and streaming standby (tests.peers.run_replicated_postgres: TLS-only, SCRAM),
an ambassador with ``--pg-pool transaction --pg-target-session-attrs read-write`` over
both, and one app connection (psycopg 3, autocommit) that writes one row at a time in a
loop (bounded in count and time), each write answering with the server's port. Then the
primary is stopped (``pg_ctl stop -m fast``) and the standby promoted (``pg_ctl promote
-w``), as a failover manager does.

Reported per run, from the moment ``pg_ctl promote -w`` returned (the standby is a
primary from then on): when the ambassador logged the new role (``pg_role_changed``),
when the app's first write landed on the new primary, and when a new app connection
first did; and how many of the app's writes failed (the target: none, or only the one
in flight when the primary stopped). The app's connection is never reopened.

Usage: ``.venv/bin/python bench/pgfailover.py [--reps N] [--interval 1s,2s]``; the
figures go to stdout as a table and, with ``--json FILE``, to a file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402
import trustme  # noqa: E402

from tests.ambassador_process import AmbassadorProcess, run_ambassador  # noqa: E402
from tests.peers import (  # noqa: E402
    PostgresServer,
    ReplicatedPostgres,
    pg_route_args,
    pg_tls,
    run_replicated_postgres,
)
from tests.proc import Event  # noqa: E402

MAX_WRITES = 20000  # per run: the writer's loop is bounded in count...
MAX_SECONDS = 60.0  # ...and in time
WARMUP_WRITES = 200  # before the failover


@dataclass
class Run:
    """One failover: seconds after ``pg_ctl promote -w`` returned (None: not seen)."""

    interval: float
    role_seen: float | None = None
    first_write: float | None = None
    new_connection: float | None = None
    writes: int = 0
    failed: int = 0
    lost: int = 0  # transactions the ambassador answered with an error, connection kept
    reconnects: int = 0  # the app's connection was closed (never, if all goes well)
    errors: list[str] = field(default_factory=list)


class Writer(threading.Thread):
    """One app connection writing a row at a time; records (time, port) or the error."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.conninfo = f"host=127.0.0.1 port={port} user=app dbname=postgres sslmode=disable"
        self.conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=30)
        self.results: list[tuple[float, int | None, str]] = []
        self.reconnects = 0
        self.stop = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + MAX_SECONDS
        for n in range(MAX_WRITES):
            if self.stop.is_set() or time.monotonic() > deadline:
                break
            try:
                row = self.conn.execute(
                    "insert into writes values (%s) returning inet_server_port()", (n,)
                ).fetchone()
                assert row is not None
                self.results.append((time.monotonic(), int(row[0]), ""))
            except psycopg.Error as exc:
                self.results.append((time.monotonic(), None, str(exc).splitlines()[0]))
                if self.conn.closed:
                    self.reconnects += 1
                    self.conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=30)
        self.conn.close()


def new_connection_port(port: int) -> int:
    """The server port a new app connection's first statement reaches."""
    conninfo = f"host=127.0.0.1 port={port} user=app dbname=postgres sslmode=disable"
    with psycopg.connect(conninfo, autocommit=True, connect_timeout=30) as conn:
        row = conn.execute("select inet_server_port()").fetchone()
    assert row is not None
    return int(row[0])


def one_run(ca: trustme.CA, ca_file: Path, interval: float) -> Run:
    """A fresh pair, the ambassador, the writer, the failover; the figures."""
    result = Run(interval)
    with (
        run_replicated_postgres(pg_tls(ca)) as pair,
        tempfile.TemporaryDirectory() as tmp,
    ):
        made = pair.primary.query("create table writes (n int); grant all on writes to app")
        assert made is not None
        password = Path(tmp) / "password"
        assert pair.primary.password is not None
        password.write_text(pair.primary.password + "\n")
        args = pg_route_args(
            ca_file,
            "--pg-password-file",
            str(password),
            "--pg-target-session-attrs",
            "read-write",
            "--pg-health-user",
            "app",
            "--health-check-interval",
            f"{interval}s",
            "--connect-retries",
            "0",
            "--pg-pool",
            "transaction",
            "--pg-pool-wait",
            "20s",
            "--startup-timeout",
            "30s",
        )
        upstreams = [f"{s.host}:{s.port}" for s in (pair.primary, pair.standby)]
        with run_ambassador(upstreams, *args) as amb:
            measure(amb, pair, result)
    return result


def measure(amb: AmbassadorProcess, pair: ReplicatedPostgres, result: Run) -> None:
    def has_role(server: PostgresServer, role: str | None = None) -> Callable[[Event], bool]:
        name = f"{server.host}:{server.port}"
        return lambda e: e.get("upstream") == name and role in (None, e.get("role"))

    amb.wait_event("pg_role_changed", has_role(pair.primary, "primary"), timeout=30)
    amb.wait_event("pg_role_changed", has_role(pair.standby, "standby"), timeout=30)
    writer = Writer(amb.listen.port)
    writer.start()
    new = pair.standby.port
    try:
        while len(writer.results) < WARMUP_WRITES:  # the writer is under way
            time.sleep(0.01)
        mark = amb.mark()
        pair.stop_primary()
        pair.promote()
        promoted = time.monotonic()
        promoted_wall = time.time()
        while new_connection_port(amb.listen.port) != new:
            if time.monotonic() - promoted > MAX_SECONDS:
                break
        result.new_connection = time.monotonic() - promoted
        amb.wait_event("pg_role_changed", has_role(pair.standby, "primary"), after=mark, timeout=30)
        seen = amb.find("pg_role_changed", has_role(pair.standby), after=mark)
        result.role_seen = _event_time(amb, seen) - promoted_wall
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(p == new for _, p, _ in writer.results):
            time.sleep(0.01)
    finally:
        writer.stop.set()
        writer.join(timeout=30)
    firsts = [t for t, p, _ in writer.results if p == new]
    result.first_write = (firsts[0] - promoted) if firsts else None
    result.writes = len(writer.results)
    result.failed = sum(1 for _, p, _ in writer.results if p is None)
    result.errors = sorted({e for _, p, e in writer.results if p is None})
    result.lost = int(amb.metric("podpatterns_ambassador_pg_pool_transactions_lost_total"))
    result.reconnects = writer.reconnects


def _event_time(amb: AmbassadorProcess, index: int) -> float:
    """The wall-clock time event ``index`` was logged at (its ISO timestamp, UTC)."""
    return dt.datetime.fromisoformat(str(amb.events[index]["timestamp"])).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--interval", default="1,2", help="health intervals, seconds")
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()
    ca = trustme.CA()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        ca_file = Path(tmp) / "ca.crt"
        ca.cert_pem.write_to_path(str(ca_file))
        for _ in range(opts.reps):
            for interval in (float(i.rstrip("s")) for i in opts.interval.split(",")):
                run = one_run(ca, ca_file, interval)
                runs.append(run)
                print(json.dumps(asdict(run)), flush=True)
    print(
        "\n| health interval | runs | role seen (s) | first write on new primary (s) "
        "| new connection (s) | writes failed | app reconnects |"
    )
    print("|---|---|---|---|---|---|---|")
    for interval in sorted({r.interval for r in runs}):
        rs = [r for r in runs if r.interval == interval]

        def fmt(values: list[float | None]) -> str:
            seen = [v for v in values if v is not None]
            if not seen:
                return "-"
            return f"{statistics.median(seen):.2f} (max {max(seen):.2f})"

        print(
            f"| {interval:g} s | {len(rs)} | {fmt([r.role_seen for r in rs])} "
            f"| {fmt([r.first_write for r in rs])} | {fmt([r.new_connection for r in rs])} "
            f"| {sum(r.failed for r in rs)} of {sum(r.writes for r in rs)} "
            f"| {sum(r.reconnects for r in rs)} |"
        )
    if opts.json is not None:
        opts.json.write_text(json.dumps([asdict(r) for r in runs], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
