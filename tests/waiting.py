"""Wait for a condition the code under test exposes no event for: one async, one sync poll.

Prefer a real signal when there is one (a log event: :meth:`tests.proc.Proc.wait_event`;
an ``asyncio.Event``; a connection that answers). These helpers poll a condition that has
no such signal, within a deadline, and fail naming what was awaited.

Both share one default deadline, :data:`TIMEOUT`. It bounds how long a broken test hangs,
not how fast the code must be: it is generous because the suite runs on loaded CI
machines, and a passing test never waits for it. Timed claims belong in ``bench/``.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar

T = TypeVar("T")

#: Seconds a wait may take before the test fails (every wait in tests/ unless told).
TIMEOUT = 15.0
#: Seconds between two polls.
POLL = 0.01

Check = Callable[[], T | Literal[False] | None]


def describe(check: Callable[[], object]) -> str:
    """What ``check`` waits for, for a failure message: a lambda's source line, else its name."""
    name = getattr(check, "__qualname__", repr(check))
    if name.endswith("<lambda>"):
        try:
            source = inspect.getsource(check).strip()
        except (OSError, TypeError):
            return name
        return source
    return name


def _failed(check: Callable[[], object], what: str | None, within: float, last: object) -> str:
    return f"waited {within:g}s for {what or describe(check)}; last result: {last!r}"


async def eventually(check: Check[T], what: str | None = None, within: float = TIMEOUT) -> T:
    """Poll ``check()`` until it returns a true value; return that value.

    Args:
        check: the condition, polled every :data:`POLL` seconds on the event loop.
        what: what is awaited, for the failure message (default: ``check``'s source).
        within: seconds before giving up.

    Raises:
        AssertionError: ``check`` did not hold ``within`` seconds; the message names
            ``what`` and the last result.
    """
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_failed(check, what, within, value))
        await asyncio.sleep(POLL)


def wait_until(check: Check[T], what: str | None = None, within: float = TIMEOUT) -> T:
    """:func:`eventually` for synchronous tests: poll ``check()`` (blocking) until it holds.

    Raises:
        AssertionError: as :func:`eventually`.
    """
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_failed(check, what, within, value))
        time.sleep(POLL)


def wait_for_file(path: Path, within: float = TIMEOUT) -> str:
    """Wait until ``path`` exists with some content; return its text."""
    return wait_until(lambda: path.exists() and path.read_text(), f"{path} with content", within)
