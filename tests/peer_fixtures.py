"""Session-scoped fixtures for the real peers of :mod:`tests.peers`.

A pytest plugin: a test module that uses them declares
``pytest_plugins = ("tests.peer_fixtures",)``. It is separate from :mod:`tests.peers`
because test modules import that one for its helpers, and pytest cannot load a module it
has already imported as a plugin.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.peers import PostgresServer, RedisServer, run_postgres, run_redis


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
