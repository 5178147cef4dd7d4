"""``--protocol postgres`` in front of real PostgreSQL 15 servers that take only TLS.

The servers (tests/peer_fixtures.py) run with ``ssl = on``, a certificate chain made
here with trustme, and a ``hostssl``-only pg_hba with SCRAM, so that the server itself
rejects a plaintext connection. The clients are psql, pgbench, psycopg 3 and asyncpg;
each connects in plaintext to the ambassador, as an app in the Pod does. Fakes stand in
only for what PostgreSQL 15 cannot do: answer ``N`` to an SSLRequest while requiring
TLS of its clients, send bytes after ``S``, and take TLS first with ALPN (PostgreSQL 17).
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
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import psycopg_pool
import pytest
import trustme

from podpatterns.ambassador.route import MAX_REFUSING
from tests.ambassador_process import AmbassadorProcess, run_ambassador
from tests.peers import PG_SERVER_NAME, PostgresServer, pgbench_connect_each
from tests.proc import run
from tests.waiting import wait_until

pytest_plugins = ("tests.peer_fixtures",)
pytestmark = pytest.mark.peer

CLIENT_TIMEOUT = 60.0
SSL_OF_SESSION = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"


@pytest.fixture(scope="module")
def ca_file(pg_ca: trustme.CA) -> Iterator[Path]:
    """The servers' root CA as a PEM file, for --tls-ca."""
    with tempfile.TemporaryDirectory(prefix="podpatterns-pgca-") as tmp:
        path = Path(tmp) / "ca.crt"
        pg_ca.cert_pem.write_to_path(str(path))
        yield path


def tls_args(ca: Path, *extra: str, name: str = PG_SERVER_NAME) -> list[str]:
    """The ambassador flags of a verified postgres route."""
    return [
        "--protocol",
        "postgres",
        "--upstream-tls",
        "--tls-ca",
        str(ca),
        "--tls-server-name",
        name,
        *extra,
    ]


def psql(
    server: PostgresServer,
    port: int,
    *sql: str,
    sslmode: str = "disable",
    host: str = "127.0.0.1",
    **libpq: str,
) -> subprocess.CompletedProcess[str]:
    """psql -c SQL ... against the ambassador on ``port`` (unaligned, tuples only);
    ``libpq`` adds environment variables (``PGSSLROOTCERT=...``)."""
    env = server.env(port)
    env.update(PGHOST=host, PGSSLMODE=sslmode, **libpq)
    commands = [arg for command in sql for arg in ("-c", command)]
    return subprocess.run(
        [server.tool("psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", *commands],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )


def upstream(server: PostgresServer) -> str:
    return f"{server.host}:{server.port}"


# -- verified TLS -------------------------------------------------------------------------


def test_plaintext_is_refused_by_the_server_itself(postgres_tls: PostgresServer) -> None:
    """Without the ambassador, a plaintext client is rejected by the server's pg_hba."""
    done = psql(postgres_tls, postgres_tls.port, "select 1", sslmode="disable")
    assert done.returncode != 0
    assert "no encryption" in done.stderr, done.stderr


def test_psql_session_is_tls_verified_through_ambassador(
    postgres_tls: PostgresServer, ca_file: Path
) -> None:
    """A plaintext psql gets a session whose upstream leg is TLS (pg_stat_ssl.ssl true)."""
    with run_ambassador([upstream(postgres_tls)], *tls_args(ca_file)) as amb:
        done = psql(postgres_tls, amb.listen.port, SSL_OF_SESSION)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "t"
        amb.wait_idle()
        assert amb.metric("podpatterns_ambassador_connections_failed_total") == 0
        assert amb.terminate() == 0, amb.log_text()


def test_client_sslrequest_is_answered_n(postgres_tls: PostgresServer, ca_file: Path) -> None:
    """psql's SSLRequest gets N: sslmode=prefer works in plaintext, require is refused."""
    with run_ambassador([upstream(postgres_tls)], *tls_args(ca_file)) as amb:
        done = psql(postgres_tls, amb.listen.port, SSL_OF_SESSION, sslmode="prefer")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "t"  # the upstream leg is TLS all the same
        done = psql(postgres_tls, amb.listen.port, "select 1", sslmode="require")
        assert done.returncode != 0
        assert "server does not support SSL" in done.stderr, done.stderr


def test_psycopg_asyncpg_and_pgbench_through_ambassador(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """psycopg 3, asyncpg and pgbench -C (SCRAM each time) get TLS sessions through it."""
    with run_ambassador([upstream(postgres_tls)], *tls_args(ca_file)) as amb:
        port = amb.listen.port
        password = postgres_tls.password
        with psycopg.connect(
            host="127.0.0.1",
            port=port,
            user=postgres_tls.user,
            password=password,
            dbname="postgres",
            sslmode="disable",
            connect_timeout=10,
        ) as conn:
            row = conn.execute(SSL_OF_SESSION).fetchone()
            assert row == (True,)
            big = conn.execute("select repeat('x', 1000000)").fetchone()
            assert big is not None and len(big[0]) == 1000000

        async def with_asyncpg() -> object:
            conn = await asyncpg.connect(
                host="127.0.0.1",
                port=port,
                user=postgres_tls.user,
                password=password,
                database="postgres",
                ssl=False,
                timeout=10,
            )
            try:
                return await conn.fetchval(SSL_OF_SESSION)
            finally:
                await conn.close()

        assert asyncio.run(with_asyncpg()) is True
        pgbench_connect_each(postgres_tls, port, tmp_path)
        amb.wait_idle()
        assert amb.metric("podpatterns_ambassador_connections_total") >= 42
        assert amb.metric("podpatterns_ambassador_connections_failed_total") == 0


def test_unix_socket_named_like_postgres(postgres_tls: PostgresServer, ca_file: Path) -> None:
    """A listener at DIR/.s.PGSQL.5432 serves psql -h DIR -p 5432."""
    with tempfile.TemporaryDirectory(prefix="podpatterns-pgsock-") as tmp:
        listen = f"unix:{tmp}/.s.PGSQL.5432"
        args = tls_args(ca_file)
        with run_ambassador([upstream(postgres_tls)], *args, listen=listen) as amb:
            done = psql(postgres_tls, 5432, SSL_OF_SESSION, host=tmp)
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == "t"
            assert amb.terminate() == 0, amb.log_text()


# -- errors in PostgreSQL's terms ---------------------------------------------------------


def fatal(done: subprocess.CompletedProcess[str]) -> str:
    """The FATAL line psql printed (its connection failure)."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if "FATAL:" in line]
    assert lines, done.stderr
    return lines[0].split("FATAL:", 1)[1].strip()


def sqlstate_of_connect(port: int, server: PostgresServer) -> str:
    """The SQLSTATE asyncpg reports when connecting through the ambassador fails."""

    async def connect() -> str:
        try:
            conn = await asyncpg.connect(
                host="127.0.0.1",
                port=port,
                user=server.user,
                password=server.password,
                database="postgres",
                ssl=False,
                timeout=10,
            )
        except asyncpg.PostgresError as exc:
            return str(exc.sqlstate)
        await conn.close()
        return "connected"

    return asyncio.run(connect())


def test_wrong_ca_is_an_error_response(postgres_tls: PostgresServer, tmp_path: Path) -> None:
    """An upstream certificate from another CA: psql shows FATAL, TLS verify failed, 08001."""
    other = tmp_path / "other-ca.crt"
    trustme.CA().cert_pem.write_to_path(str(other))
    with run_ambassador([upstream(postgres_tls)], *tls_args(other)) as amb:
        message = fatal(psql(postgres_tls, amb.listen.port, "select 1"))
        assert message.startswith(
            f"podpatterns ambassador: TLS to {upstream(postgres_tls)} failed: "
            "certificate verify failed"
        ), message
        assert sqlstate_of_connect(amb.listen.port, postgres_tls) == "08001"
        assert amb.metric("podpatterns_ambassador_connections_failed_total", reason="tls") >= 1
        assert postgres_tls.password is not None
        assert postgres_tls.password not in amb.log_text(10000)


def test_wrong_server_name_is_refused_unless_verify_ca(
    postgres_tls: PostgresServer, ca_file: Path
) -> None:
    """verify-full checks the name (a mismatch is FATAL); verify-ca checks the chain only."""
    with run_ambassador([upstream(postgres_tls)], *tls_args(ca_file, name="other.test")) as amb:
        message = fatal(psql(postgres_tls, amb.listen.port, "select 1"))
        assert "certificate verify failed" in message and "other.test" in message, message
    args = tls_args(ca_file, "--pg-sslmode", "verify-ca", name="other.test")
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        done = psql(postgres_tls, amb.listen.port, SSL_OF_SESSION)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "t"


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound here, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_unreachable_upstream_is_an_error_response(
    postgres_tls: PostgresServer, ca_file: Path
) -> None:
    """No endpoint reachable: psql shows FATAL cannot reach HOST:PORT (connection refused)."""
    with closed_port() as port:
        args = tls_args(ca_file, "--connect-retries", "0")
        with run_ambassador([f"127.0.0.1:{port}"], *args) as amb:
            message = fatal(psql(postgres_tls, amb.listen.port, "select 1"))
            assert message == (
                f"podpatterns ambassador: cannot reach 127.0.0.1:{port} (connection refused)"
            )
            assert sqlstate_of_connect(amb.listen.port, postgres_tls) == "08001"


@contextlib.contextmanager
def fake_server(answer: bytes) -> Iterator[tuple[int, list[bytes]]]:
    """A server that reads an SSLRequest, answers ``answer`` and records what follows.

    For what PostgreSQL 15 cannot be made to do: answer N to a client it will require
    TLS of, or send bytes after S. Yields its port and, per connection, the bytes
    received after the answer (until the peer closed).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    received: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            with conn:
                conn.settimeout(10)
                request = conn.recv(8)
                if request != b"\x00\x00\x00\x08\x04\xd2\x16\x2f":
                    received.append(b"not an SSLRequest: " + request)
                    continue
                conn.sendall(answer)
                rest = b""
                with contextlib.suppress(OSError):
                    while data := conn.recv(65536):
                        rest += data
                received.append(rest)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], received
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(10)


def test_server_answering_n_fails_without_plaintext_fallback(
    postgres_tls: PostgresServer, ca_file: Path
) -> None:
    """A server that answers N: FATAL naming it, and not a byte of plaintext sent to it."""
    with (
        fake_server(b"N") as (port, received),
        run_ambassador([f"127.0.0.1:{port}"], *tls_args(ca_file)) as amb,
    ):
        message = fatal(psql(postgres_tls, amb.listen.port, "select 1"))
        assert message == (
            f"podpatterns ambassador: 127.0.0.1:{port} does not accept TLS (it answered N "
            "to SSLRequest); not falling back to plaintext"
        )
        wait_until(lambda: received, "the fake to see the connection end")
        assert received == [b""]


def test_bytes_after_s_abort_the_connection(postgres_tls: PostgresServer, ca_file: Path) -> None:
    """Bytes injected after S (CVE-2021-23222) abort: FATAL, SQLSTATE 08P01, no handshake."""
    ready_for_query = b"Z\x00\x00\x00\x05I"
    with (
        fake_server(b"S" + ready_for_query) as (port, received),
        run_ambassador([f"127.0.0.1:{port}"], *tls_args(ca_file)) as amb,
    ):
        message = fatal(psql(postgres_tls, amb.listen.port, "select 1"))
        assert "unexpected byte(s) after 'S'" in message and "CVE-2021-23222" in message
        assert sqlstate_of_connect(amb.listen.port, postgres_tls) == "08P01"
        wait_until(lambda: len(received) == 2, "the fake to see both connections end")
        assert received == [b"", b""]  # no ClientHello, no startup packet


def test_connection_limit_reject_is_too_many_connections(
    postgres_tls: PostgresServer, ca_file: Path
) -> None:
    """--max-connections 1 --on-limit reject: the second client gets FATAL 53300."""
    args = tls_args(ca_file, "--max-connections", "1", "--on-limit", "reject")
    with (
        run_ambassador([upstream(postgres_tls)], *args) as amb,
        psycopg.connect(
            host="127.0.0.1",
            port=amb.listen.port,
            user=postgres_tls.user,
            password=postgres_tls.password,
            dbname="postgres",
            sslmode="disable",
        ) as held,
    ):
        assert held.execute("select 1").fetchone() == (1,)
        message = fatal(psql(postgres_tls, amb.listen.port, "select 1"))
        assert message.startswith("podpatterns ambassador: too many connections"), message
        assert sqlstate_of_connect(amb.listen.port, postgres_tls) == "53300"


@contextlib.contextmanager
def hung_psql(
    server: PostgresServer, ca_file: Path, *extra: str
) -> Iterator[tuple[AmbassadorProcess, subprocess.Popen[str]]]:
    """An ambassador, and a psql through it held in its startup: the upstream (a listener
    here) takes the connection and never answers the ambassador's SSLRequest."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    with listener, run_ambassador([f"127.0.0.1:{port}"], *tls_args(ca_file, *extra)) as amb:
        env = server.env(amb.listen.port)
        env["PGSSLMODE"] = "disable"
        client = subprocess.Popen(
            [server.tool("psql"), "-X", "-c", "select 1"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            hung, _ = listener.accept()  # the ambassador dialed on psql's behalf
            with hung:
                hung.settimeout(10)
                assert hung.recv(8) == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"  # never answered
                yield amb, client
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()


ADMIN_SHUTDOWN_TEXT = "terminating connection due to administrator command"


def test_drain_tells_a_connection_in_its_startup_admin_shutdown_at_once(
    postgres_tls: PostgresServer, ca_file: Path
) -> None:
    """--pg-drain transaction: a psql still in its startup gets FATAL 57P01 when draining
    starts, and the drain ends without waiting for the deadline."""
    with hung_psql(postgres_tls, ca_file, "--drain-timeout", "120s") as (amb, client):
        assert amb.terminate() == 0, amb.log_text()
        _, err = client.communicate(timeout=CLIENT_TIMEOUT)
        assert client.returncode == 2
        assert f"FATAL:  {ADMIN_SHUTDOWN_TEXT} (podpatterns ambassador" in err, err
        assert amb.find("drain_finished") >= 0, amb.log_text()
        assert closed_reasons(amb) == ["drained"]


def test_drain_deadline_tells_a_connection_in_its_startup_admin_shutdown(
    postgres_tls: PostgresServer, ca_file: Path
) -> None:
    """--pg-drain off: a psql still in its startup at the drain deadline gets FATAL 57P01."""
    args = ("--pg-drain", "off", "--drain-timeout", "100ms")
    with hung_psql(postgres_tls, ca_file, *args) as (amb, client):
        assert amb.terminate() == 0, amb.log_text()
        _, err = client.communicate(timeout=CLIENT_TIMEOUT)
        assert client.returncode == 2
        assert f"FATAL:  {ADMIN_SHUTDOWN_TEXT} (podpatterns ambassador" in err, err
        assert amb.wait_event("drain_deadline_cut")["cut"] == 1
        assert closed_reasons(amb) == ["drain_cut"]


def read_error_response(sock: socket.socket) -> dict[str, str]:
    """The fields of the one ErrorResponse the ambassador sends on ``sock`` before its
    FIN (a reset raises ConnectionResetError here)."""
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    assert data[:1] == b"E", data
    (length,) = struct.unpack("!i", data[1:5])
    assert len(data) == 1 + length, data
    return {f[:1].decode(): f[1:].decode() for f in data[5:-1].split(b"\0") if f}


def test_malformed_startup_packet_is_an_error_response(
    postgres_tls: PostgresServer, ca_file: Path
) -> None:
    """A TLS ClientHello where the startup packet belongs gets FATAL 08P01, then a FIN."""
    with (
        run_ambassador([upstream(postgres_tls)], *tls_args(ca_file)) as amb,
        socket.create_connection(("127.0.0.1", amb.listen.port)) as raw,
    ):
        raw.settimeout(CLIENT_TIMEOUT)
        raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
        fields = read_error_response(raw)
    assert fields["C"] == "08P01", fields
    assert fields["M"].startswith("podpatterns ambassador: invalid startup packet length")


@pytest.mark.parametrize("pg_drain", ["transaction", "off"])
def test_half_a_startup_packet_gets_admin_shutdown_then_fin(
    postgres_tls: PostgresServer, ca_file: Path, pg_drain: str
) -> None:
    """A client that sent half its StartupMessage gets FATAL 57P01 and a FIN on drain: when
    draining starts (--pg-drain transaction), at the deadline (off); never a bare reset."""
    args = tls_args(ca_file, "--pg-drain", pg_drain, "--drain-timeout", "200ms")
    with (
        run_ambassador([upstream(postgres_tls)], *args) as amb,
        socket.create_connection(("127.0.0.1", amb.listen.port)) as raw,
    ):
        raw.settimeout(CLIENT_TIMEOUT)
        raw.sendall(struct.pack("!ii", 40, 3 << 16) + b"user\0")  # 13 of its 40 bytes
        amb.wait_metric("podpatterns_ambassador_connections_active", lambda n: n == 1, "1")
        amb.signal(signal.SIGTERM)
        fields = read_error_response(raw)
        assert amb.wait() == 0, amb.log_text()
    assert fields["C"] == "57P01" and fields["S"] == "FATAL", fields
    assert fields["M"].startswith(ADMIN_SHUTDOWN_TEXT), fields
    assert closed_reasons(amb) == ["drained" if pg_drain == "transaction" else "drain_cut"]


def test_new_connections_while_draining_get_admin_shutdown(
    postgres_tls: PostgresServer, ca_file: Path
) -> None:
    """While the route drains (a transaction still open), a new psql or asyncpg connection
    gets FATAL 57P01 at once rather than "connection refused"."""
    args = tls_args(ca_file, "--drain-timeout", "120s")
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        with pg_connect(postgres_tls, amb.listen.port) as held:
            held.execute("select 1")  # BEGIN: the drain waits for its COMMIT
            mark = amb.mark()
            amb.signal(signal.SIGTERM)
            amb.wait_index("drain_started", after=mark)
            message = fatal(psql(postgres_tls, amb.listen.port, "select 1"))
            assert message.startswith(ADMIN_SHUTDOWN_TEXT), message
            assert sqlstate_of_connect(amb.listen.port, postgres_tls) == "57P01"
            refused = amb.metric("podpatterns_ambassador_connections_refused_total")
            assert refused == amb.metric(
                "podpatterns_ambassador_connections_refused_total", reason="draining"
            )
            assert refused == 2
            held.commit()  # the last session comes to rest: drained, and the drain ends
            assert amb.wait() == 0, amb.log_text()
        assert closed_reasons(amb) == ["drained"]


# -- refusals outside the connection count ------------------------------------------------


def test_refusals_at_the_limit_are_bounded(postgres_tls: PostgresServer, ca_file: Path) -> None:
    """A flood over --max-connections with --on-limit reject: at most MAX_REFUSING refusals
    are answered at once, the rest are reset and counted; once they end, 53300 again."""
    # refusals of silent clients last --startup-timeout: longer than this test, however slow
    args = tls_args(
        ca_file, "--max-connections", "1", "--on-limit", "reject", "--startup-timeout", "10m"
    )
    flood = MAX_REFUSING + 8
    with (
        run_ambassador([upstream(postgres_tls)], *args) as amb,
        pg_connect(postgres_tls, amb.listen.port) as held,
        contextlib.ExitStack() as stack,
    ):
        held.execute("select 1")
        # silent clients: each refusal waits for a startup packet that never comes
        silent = [
            stack.enter_context(socket.create_connection(("127.0.0.1", amb.listen.port)))
            for _ in range(flood)
        ]
        refused = "podpatterns_ambassador_connections_refused_total"
        amb.wait_metric(refused, lambda n: n == flood, str(flood))
        assert amb.metric("podpatterns_ambassador_refusals_unanswered_total") == 8

        def ended() -> list[socket.socket]:
            readable, _, _ = select.select(silent, [], [], 0)
            return readable  # EOF or a reset: the ambassador closed them

        wait_until(lambda: len(ended()) == 8, "8 silent clients to be reset")
        assert amb.find("refusals_full") >= 0, amb.log_text()
        done = psql(postgres_tls, amb.listen.port, "select 1")  # no slot: reset as well
        assert done.returncode == 2 and "FATAL" not in done.stderr, done.stderr
        for sock in silent:
            sock.close()  # the refusals in progress see their client leave, and end
        wait_until(
            lambda: (
                "too many connections" in psql(postgres_tls, amb.listen.port, "select 1").stderr
            ),
            "a refusal slot to be free again",
        )
        held.commit()


def test_refusal_of_a_silent_client_ends_at_startup_timeout(
    postgres_tls: PostgresServer, ca_file: Path
) -> None:
    """A client over the cap that never sends its startup is closed at --startup-timeout."""
    args = tls_args(
        ca_file, "--max-connections", "1", "--on-limit", "reject", "--startup-timeout", "300ms"
    )
    with (
        run_ambassador([upstream(postgres_tls)], *args) as amb,
        pg_connect(postgres_tls, amb.listen.port) as held,
        socket.create_connection(("127.0.0.1", amb.listen.port)) as silent,
    ):
        held.execute("select 1")
        silent.settimeout(CLIENT_TIMEOUT)
        assert silent.recv(1) == b""  # a FIN, once --startup-timeout has passed
        assert amb.metric("podpatterns_ambassador_connections_refused_total", reason="limit") == 1
        held.commit()


# -- drain at transaction boundaries (--pg-drain transaction, the default) ----------------


def pg_connect(server: PostgresServer, port: int, host: str = "127.0.0.1") -> psycopg.Connection:
    """A psycopg 3 connection through the ambassador (not autocommit: BEGIN is implicit)."""
    return psycopg.connect(
        host=host,
        port=port,
        user=server.user,
        password=server.password,
        dbname="postgres",
        sslmode="disable",
        connect_timeout=10,
    )


def closed_reasons(amb: AmbassadorProcess) -> list[str]:
    return [e["reason"] for e in amb.events if e.get("event") == "connection_closed"]


def test_drain_ends_an_idle_session_with_admin_shutdown(
    postgres_tls: PostgresServer, ca_file: Path
) -> None:
    """An idle session gets FATAL 57P01 naming podpatterns when draining starts."""
    with run_ambassador([upstream(postgres_tls)], *tls_args(ca_file)) as amb:
        with pg_connect(postgres_tls, amb.listen.port) as conn:
            conn.execute("select 1")
            conn.commit()  # ReadyForQuery I: idle between transactions
            assert amb.terminate() == 0, amb.log_text()
            with pytest.raises(psycopg.OperationalError) as err:
                conn.execute("select 1")
        assert ADMIN_SHUTDOWN_TEXT in str(err.value), err.value
        assert "podpatterns ambassador" in str(err.value), err.value
        assert closed_reasons(amb) == ["drained"]
        assert amb.find("drain_finished") >= 0, amb.log_text()


def test_drain_lets_a_transaction_commit_then_ends_the_session(
    postgres_tls: PostgresServer, ca_file: Path
) -> None:
    """A session inside BEGIN when draining starts goes on to COMMIT, then gets 57P01."""
    with run_ambassador([upstream(postgres_tls)], *tls_args(ca_file)) as amb:
        with pg_connect(postgres_tls, amb.listen.port) as conn:
            # libpq passes an ErrorResponse that arrives while idle to the notice handler
            said: list[str] = []
            conn.add_notice_handler(lambda d: said.append(f"{d.sqlstate} {d.message_primary}"))
            # BEGIN ... (ReadyForQuery T), with a transaction id to look up afterwards
            row = conn.execute("select pg_current_xact_id()::text").fetchone()
            assert row is not None
            mark = amb.mark()
            amb.signal(signal.SIGTERM)
            amb.wait_index("drain_started", after=mark)
            conn.execute("select 2")
            conn.commit()  # the transaction's end: ReadyForQuery I, then the 57P01
            assert amb.wait() == 0, amb.log_text()
            with pytest.raises(psycopg.OperationalError) as err:
                conn.execute("select 1")
        # the 57P01 came with the COMMIT's answer (a notice) or with the next query's
        shown = [*said, f"{err.value.sqlstate} {err.value}"]
        assert any(s.startswith("57P01") and ADMIN_SHUTDOWN_TEXT in s for s in shown), shown
        assert closed_reasons(amb) == ["drained"]
    with (
        run_ambassador([upstream(postgres_tls)], *tls_args(ca_file)) as amb,
        pg_connect(postgres_tls, amb.listen.port) as conn,
    ):
        status = conn.execute("select pg_xact_status(%s::xid8)", (row[0],)).fetchone()
        assert status == ("committed",)


def test_drain_cuts_and_counts_a_transaction_that_never_ends(
    postgres_tls: PostgresServer, ca_file: Path
) -> None:
    """A session still inside its transaction at --drain-timeout is cut and counted."""
    args = tls_args(ca_file, "--drain-timeout", "200ms")
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        with pg_connect(postgres_tls, amb.listen.port) as conn:
            conn.execute("select 1")  # BEGIN, never committed
            assert amb.terminate() == 0, amb.log_text()
            with pytest.raises(psycopg.OperationalError):
                conn.execute("select 1")
        assert amb.wait_event("drain_deadline_cut")["cut"] == 1
        assert closed_reasons(amb) == ["drain_cut"]


def test_pool_reconnects_after_drain_to_a_new_ambassador(
    postgres_tls: PostgresServer, ca_file: Path
) -> None:
    """psycopg_pool drops the 57P01 connection; its next query works through a new ambassador."""

    def ambassador(sock_dir: str) -> AmbassadorProcess:
        amb = AmbassadorProcess(
            "ambassador",
            "--listen",
            f"unix:{sock_dir}/.s.PGSQL.5432",
            "--upstream",
            upstream(postgres_tls),
            *tls_args(ca_file),
            "--shutdown-delay",
            "0",
            stdout=subprocess.DEVNULL,
        )
        amb.wait_event("route_listening")
        return amb

    with tempfile.TemporaryDirectory(prefix="podpatterns-pgpool-") as tmp:
        conninfo = psycopg.conninfo.make_conninfo(
            host=tmp,
            port=5432,
            user=postgres_tls.user,
            password=postgres_tls.password,
            dbname="postgres",
            sslmode="disable",
            connect_timeout=10,
        )
        first = ambassador(tmp)
        try:
            with psycopg_pool.ConnectionPool(
                conninfo,
                min_size=1,
                max_size=1,
                check=psycopg_pool.ConnectionPool.check_connection,
                open=True,
            ) as pool:
                with pool.connection() as conn:
                    before = conn.execute("select pg_backend_pid()").fetchone()
                assert first.terminate() == 0, first.log_text()
                assert closed_reasons(first) == ["drained"]
                second = ambassador(tmp)
                try:
                    with pool.connection() as conn:
                        after = conn.execute("select pg_backend_pid()").fetchone()
                    assert after is not None and after != before
                    assert second.terminate() == 0, second.log_text()
                finally:
                    second.stop()
        finally:
            first.stop()


# -- cancel requests ----------------------------------------------------------------------


def test_cancel_reaches_the_server_of_the_session(
    postgres_tls: PostgresServer, postgres_tls_2: PostgresServer, ca_file: Path
) -> None:
    """Round robin over two servers: psql's Ctrl-C cancels its pg_sleep on its own server."""
    servers = [postgres_tls, postgres_tls_2]
    args = tls_args(ca_file, "--balance", "round_robin")
    with run_ambassador([upstream(s) for s in servers], *args) as amb:
        env = postgres_tls.env(amb.listen.port)
        env["PGSSLMODE"] = "disable"
        client = subprocess.Popen(
            [postgres_tls.tool("psql"), "-X", "-c", "select pg_sleep(30)"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            sleeping = "select count(*) from pg_stat_activity where query = 'select pg_sleep(30)'"
            wait_until(lambda: any(s.query(sleeping) == "1" for s in servers), "pg_sleep to run")
            client.send_signal(signal.SIGINT)
            _, err = client.communicate(timeout=15)  # well before the 30 s sleep ends
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        assert "canceling statement due to user request" in err, err
        wait_until(lambda: amb.metric("podpatterns_ambassador_connections_active") == 0)


# -- the app's TLS terminated on the listener (--listen-tls-cert) --------------------------


def issue_listener_cert(tmp: Path) -> tuple[Path, list[str]]:
    """A new CA of the app's own (not the servers'), and the ambassador flags of a
    listener certificate it issued for 127.0.0.1 and localhost, written in ``tmp``:
    (CA file, flags)."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(tmp / "app-ca.crt"))
    leaf.private_key_pem.write_to_path(str(tmp / "listen.key"))
    with (tmp / "listen.crt").open("wb") as chain:
        for blob in leaf.cert_chain_pems:
            chain.write(blob.bytes())
    flags = [
        "--listen-tls-cert",
        str(tmp / "listen.crt"),
        "--listen-tls-key",
        str(tmp / "listen.key"),
    ]
    return tmp / "app-ca.crt", flags


@pytest.fixture(scope="module")
def app_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """:func:`issue_listener_cert`, once for the module."""
    return issue_listener_cert(tmp_path_factory.mktemp("app-tls"))


def test_listen_tls_terminates_the_apps_tls(
    postgres_tls: PostgresServer, ca_file: Path, app_tls: tuple[Path, list[str]]
) -> None:
    """--listen-tls-cert: psql with sslmode=verify-full against the app's CA gets a TLS
    session to the ambassador, and the upstream leg is TLS too (pg_stat_ssl)."""
    app_ca, flags = app_tls
    with run_ambassador([upstream(postgres_tls)], *tls_args(ca_file, *flags)) as amb:
        port, verified = amb.listen.port, {"PGSSLROOTCERT": str(app_ca)}
        # SCRAM over the app's TLS expects channel binding, which cannot span the two legs
        done = psql(postgres_tls, port, "select 1", sslmode="verify-full", **verified)
        assert "connect with channel_binding=disable" in fatal(done), done.stderr
        verified["PGCHANNELBINDING"] = "disable"
        done = psql(
            postgres_tls, port, "\\conninfo", SSL_OF_SESSION, sslmode="verify-full", **verified
        )
        assert done.returncode == 0, done.stderr
        *conninfo, upstream_ssl = done.stdout.strip().splitlines()
        assert "SSL connection (protocol: TLSv1.3" in "".join(conninfo), conninfo  # app's leg
        assert upstream_ssl == "t"  # the ambassador's leg, as the server sees it
        # a client that does not ask for TLS is still served in plaintext
        done = psql(postgres_tls, amb.listen.port, SSL_OF_SESSION, sslmode="disable")
        assert done.returncode == 0 and done.stdout.strip() == "t", done.stderr
        amb.wait_idle()
        assert amb.terminate() == 0, amb.log_text()
        assert closed_reasons(amb) == ["upstream_protocol", "eof", "eof"], amb.log_text()


def test_listen_tls_certificate_is_reloaded(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """A listener certificate replaced on disk (a renewal from another CA) is used by the
    next connection, without a restart."""
    live, renewed = tmp_path / "live", tmp_path / "renewed"
    live.mkdir()
    renewed.mkdir()
    first_ca, flags = issue_listener_cert(live)
    verified = {"sslmode": "verify-full", "PGCHANNELBINDING": "disable"}
    with run_ambassador([upstream(postgres_tls)], *tls_args(ca_file, *flags)) as amb:
        port = amb.listen.port
        done = psql(postgres_tls, port, "select 1", PGSSLROOTCERT=str(first_ca), **verified)
        assert done.returncode == 0, done.stderr
        mark = amb.mark()
        new_ca, _ = issue_listener_cert(renewed)
        for name in ("listen.key", "listen.crt"):  # renamed into place
            (renewed / name).replace(live / name)
        amb.wait_index("tls_reloaded", after=mark)
        done = psql(postgres_tls, port, "select 1", PGSSLROOTCERT=str(new_ca), **verified)
        assert done.returncode == 0, done.stderr
        done = psql(postgres_tls, port, "select 1", PGSSLROOTCERT=str(first_ca), **verified)
        assert done.returncode == 2 and "certificate verify failed" in done.stderr, done.stderr


def test_listen_tls_refusals_and_drain_speak_tls(
    postgres_tls: PostgresServer, ca_file: Path, app_tls: tuple[Path, list[str]]
) -> None:
    """Over the app's TLS leg, a refusal at the cap is FATAL 53300 and the drain's FATAL
    57P01 reaches an idle session, as in plaintext."""
    app_ca, flags = app_tls
    args = tls_args(ca_file, *flags, "--max-connections", "1", "--on-limit", "reject")
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        with psycopg.connect(
            host="127.0.0.1",
            port=amb.listen.port,
            user=postgres_tls.user,
            password=postgres_tls.password,
            dbname="postgres",
            connect_timeout=10,
            autocommit=True,
            sslmode="verify-full",
            sslrootcert=str(app_ca),
            channel_binding="disable",
        ) as conn:
            assert conn.pgconn.ssl_in_use
            done = psql(
                postgres_tls,
                amb.listen.port,
                "select 1",
                sslmode="verify-full",
                PGSSLROOTCERT=str(app_ca),
            )
            assert fatal(done).startswith("podpatterns ambassador: too many connections")
            assert amb.terminate() == 0, amb.log_text()
            with pytest.raises(psycopg.OperationalError) as err:
                conn.execute("select 1")
        assert ADMIN_SHUTDOWN_TEXT in str(err.value), err.value
        assert closed_reasons(amb) == ["drained"]


def test_listen_tls_refuses_plaintext_after_sslrequest_and_gssenc(
    postgres_tls: PostgresServer, ca_file: Path, app_tls: tuple[Path, list[str]]
) -> None:
    """With --listen-tls-cert a GSSENCRequest still gets N, and bytes sent after the
    SSLRequest, before its S, are refused (08P01), as PostgreSQL refuses them."""
    _, flags = app_tls
    gssenc = struct.pack("!ii", 8, 80877104)
    with (
        run_ambassador([upstream(postgres_tls)], *tls_args(ca_file, *flags)) as amb,
        socket.create_connection(("127.0.0.1", amb.listen.port)) as raw,
    ):
        raw.settimeout(CLIENT_TIMEOUT)
        raw.sendall(gssenc)
        assert raw.recv(1) == b"N"
        raw.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f" + b"Q\x00\x00\x00\x05x")
        fields = read_error_response(raw)
    assert fields["C"] == "08P01", fields
    assert fields["M"] == "podpatterns ambassador: received unencrypted data after SSL request"


def test_listen_tls_options_are_checked(tmp_path: Path) -> None:
    """--listen-tls-cert needs its key, a postgres route and a loadable certificate."""
    base = ("ambassador", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9", "--admin", "off")
    cases = [
        (
            ("--protocol", "postgres", "--listen-tls-cert", "/x.crt"),
            "--listen-tls-cert and --listen-tls-key: give both",
        ),
        (
            ("--listen-tls-cert", "/x.crt", "--listen-tls-key", "/x.key"),
            "--listen-tls-cert: only applies with --protocol postgres",
        ),
        (
            (
                "--protocol",
                "postgres",
                "--listen-tls-cert",
                "/nonexistent/x.crt",
                "--listen-tls-key",
                "/x.key",
            ),
            "--listen-tls-cert/--listen-tls-key: '/nonexistent/x.crt' / '/x.key': cannot load:",
        ),
    ]
    for args, want in cases:  # as for --tls-ca: exit 2, the file named, no traceback
        out = run(*base, *args)
        assert out.returncode == 2, (args, out.stderr)
        assert want in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)


# -- direct TLS (PostgreSQL 17+) ----------------------------------------------------------


@contextlib.contextmanager
def direct_tls_front(
    server: PostgresServer, ca: trustme.CA
) -> Iterator[tuple[int, list[tuple[bytes, str | None]]]]:
    """TLS first with ALPN ``postgresql``, as PostgreSQL 17 takes it, in front of the real
    server's unix socket (PostgreSQL 15 cannot do direct SSL itself).

    Yields its port and, per connection, (its first byte, the ALPN protocol selected).
    """
    assert server.socket_dir is not None
    target = str(server.socket_dir / f".s.PGSQL.{server.port}")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(PG_SERVER_NAME).configure_cert(context)
    context.set_alpn_protocols(["postgresql"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    seen: list[tuple[bytes, str | None]] = []
    threads: list[threading.Thread] = []
    sockets: list[socket.socket] = []

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def serve() -> None:
        while True:
            try:
                raw, _ = listener.accept()
            except OSError:
                return
            first = raw.recv(1, socket.MSG_PEEK)
            try:
                tls = context.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError):
                seen.append((first, None))
                raw.close()
                continue
            seen.append((first, tls.selected_alpn_protocol()))
            db = socket.socket(socket.AF_UNIX)
            sockets.extend((tls, db))
            db.connect(target)
            for src, dst in ((tls, db), (db, tls)):
                t = threading.Thread(target=pump, args=(src, dst), daemon=True)
                t.start()
                threads.append(t)

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1], seen
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        acceptor.join(10)
        for t in threads:
            t.join(10)
        for sock in sockets:
            sock.close()


def test_direct_tls_with_alpn(
    postgres_tls: PostgresServer, pg_ca: trustme.CA, ca_file: Path
) -> None:
    """--pg-tls-negotiation direct: a ClientHello first (no SSLRequest), ALPN postgresql."""
    with direct_tls_front(postgres_tls, pg_ca) as (port, seen):
        args = tls_args(ca_file, "--pg-tls-negotiation", "direct")
        with run_ambassador([f"127.0.0.1:{port}"], *args) as amb:
            done = psql(postgres_tls, amb.listen.port, "select 42")
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == "42"
            assert amb.terminate() == 0, amb.log_text()
    assert seen == [(b"\x16", "postgresql")]  # 0x16: a TLS handshake record
