"""Session-scoped fixtures for the real peers of :mod:`tests.peers`.

A pytest plugin: a test module that uses them declares
``pytest_plugins = ("tests.peer_fixtures",)``. It is separate from :mod:`tests.peers`
because test modules import that one for its helpers, and pytest cannot load a module it
has already imported as a plugin.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trustme

from tests.peers import (
    PG_SERVER_NAME,
    PostgresServer,
    PostgresTLS,
    RedisServer,
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


def _tls(ca: trustme.CA) -> PostgresTLS:
    # a chain: leaf and intermediate, issued by the root a client is given
    leaf = ca.create_child_ca().issue_cert(PG_SERVER_NAME)
    return PostgresTLS(
        cert_chain=b"".join(blob.bytes() for blob in leaf.cert_chain_pems),
        key=leaf.private_key_pem.bytes(),
    )


@pytest.fixture(scope="session")
def postgres_tls(pg_ca: trustme.CA) -> Iterator[PostgresServer]:
    """A PostgreSQL 15 server that takes only TLS with SCRAM over TCP, for the session."""
    with run_postgres(_tls(pg_ca)) as server:
        yield server


@pytest.fixture(scope="session")
def postgres_tls_2(pg_ca: trustme.CA) -> Iterator[PostgresServer]:
    """A second such server (routing between two servers)."""
    with run_postgres(_tls(pg_ca)) as server:
        yield server
