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

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import trustme

from podpatterns.ambassador.pgroles import Role, Roles, matches, parse_role_reply
from podpatterns.ambassador.upstreams import Endpoint
from podpatterns.options import HostPort
from tests.ambassador_process import AmbassadorProcess, run_ambassador
from tests.peers import (
    PostgresServer,
    ReplicatedPostgres,
    pg_route_args,
    pg_tls,
    run_replicated_postgres,
)

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
    conninfo = f"host=127.0.0.1 port={port} user=app dbname=postgres sslmode=disable"
    with psycopg.connect(conninfo, connect_timeout=10) as conn:
        row = conn.execute(WHERE).fetchone()
    assert row is not None
    return int(row[0]), bool(row[1])


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
def test_close_on_role_change_ends_sessions_with_admin_shutdown(
    pair: ReplicatedPostgres, ca_file: Path, password_file: Path
) -> None:
    """--pg-close-on-role-change: a session on the standby (target standby) gets FATAL
    57P01 when the standby is promoted; without the flag it goes on."""
    upstreams = [ep(pair.primary), ep(pair.standby)]
    closing = role_args(ca_file, password_file, "standby", "--pg-close-on-role-change")
    keeping = role_args(ca_file, password_file, "standby")
    conninfo = "host=127.0.0.1 port={} user=app dbname=postgres sslmode=disable"
    with (
        run_ambassador(upstreams, *closing) as amb,
        run_ambassador(upstreams, *keeping) as other,
    ):
        for a in (amb, other):
            wait_role(a, pair.standby, "standby")
        with (
            psycopg.connect(conninfo.format(amb.listen.port), autocommit=True) as conn,
            psycopg.connect(conninfo.format(other.listen.port), autocommit=True) as kept,
        ):
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
        # both are primaries now: a new session has no standby to go to, and is told so
        with pytest.raises(psycopg.OperationalError) as info:
            where(other.listen.port)
        assert "no endpoint is standby" in str(info.value), info.value
        assert other.metric("podpatterns_ambassador_connections_failed_total", reason="role") == 1
        amb.wait_event("connection_closed", lambda e: e.get("reason") == "role_changed")
