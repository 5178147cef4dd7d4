"""``--protocol postgres`` in front of real PostgreSQL 15 servers that take only TLS.

The servers (tests/peer_fixtures.py) run with ``ssl = on``, a certificate chain made
here with trustme, and a ``hostssl``-only pg_hba with SCRAM, so that the server itself
rejects a plaintext connection. The clients are psql, pgbench, psycopg 3 and asyncpg;
each connects in plaintext to the ambassador, as an app in the Pod does. Fakes stand in
only for what PostgreSQL 15 cannot do: answer ``N`` to an SSLRequest while requiring
TLS of its clients, send bytes after ``S``, and take TLS first with ALPN (PostgreSQL 17).
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.ambassador_process import run_ambassador
from tests.peers import PG_SERVER_NAME, PostgresServer

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
    sql: str,
    sslmode: str = "disable",
    host: str = "127.0.0.1",
) -> subprocess.CompletedProcess[str]:
    """psql -c SQL against the ambassador on ``port`` (unaligned, tuples only)."""
    env = server.env(port)
    env.update(PGHOST=host, PGSSLMODE=sslmode)
    return subprocess.run(
        [server.tool("psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
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
