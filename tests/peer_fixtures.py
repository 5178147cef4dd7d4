"""Session-scoped fixtures for the real peers of :mod:`tests.peers`.

A pytest plugin: a test module that uses them declares
``pytest_plugins = ("tests.peer_fixtures",)``. It is separate from :mod:`tests.peers`
because test modules import that one for its helpers, and pytest cannot load a module it
has already imported as a plugin.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.peers import (
    POOL_USER,
    PostgresServer,
    RedisServer,
    pg_tls,
    run_postgres,
    run_redis,
)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL 15 server for the whole session."""
    with run_postgres() as server:
        yield server


@pytest.fixture(scope="session")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server for the whole session."""
    with run_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="session")
def pg_ca() -> trustme.CA:
    """The CA that issued the TLS-only PostgreSQL servers' certificates."""
    return trustme.CA()


@pytest.fixture(scope="session")
def postgres_tls(pg_ca: trustme.CA) -> Iterator[PostgresServer]:
    """A PostgreSQL 15 server that takes only TLS with SCRAM over TCP, for the session."""
    with run_postgres(pg_tls(pg_ca)) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_tls_2(pg_ca: trustme.CA) -> Iterator[PostgresServer]:
    """A second such server (routing between two servers)."""
    with run_postgres(pg_tls(pg_ca)) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_tls_trust(pg_ca: trustme.CA) -> Iterator[PostgresServer]:
    """A TLS-only server like :func:`postgres_tls` that also trusts :data:`POOL_USER`
    over TLS (no password), the upstream of pooled connections before a password source."""
    with run_postgres(pg_tls(pg_ca), trusted=(POOL_USER,)) as server:
        yield server


@pytest.fixture(scope="session")
def pg_ca_file(pg_ca: trustme.CA) -> Iterator[Path]:
    """The TLS-only servers' root CA as a PEM file, for --tls-ca."""
    with tempfile.TemporaryDirectory(prefix="podpatterns-pgca-") as tmp:
        path = Path(tmp) / "ca.crt"
        pg_ca.cert_pem.write_to_path(str(path))
        yield path
