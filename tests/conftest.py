"""Fixtures shared by the whole suite (helpers to import live in plain modules:
:mod:`tests.proc`, :mod:`tests.servers`, :mod:`tests.waiting`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.proc import Proc


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes started by a test; killed at teardown if still running."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


@pytest.fixture(params=["on", "off"], ids=["splice", "protocol"])
def relay_mode(request: pytest.FixtureRequest) -> str:
    """Run a test over both relays: splice and the asyncio Protocol relay."""
    mode: str = request.param
    return mode
