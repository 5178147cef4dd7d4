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
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Literal, TypeVar, cast

T = TypeVar("T")

#: Seconds a wait may take before the test fails (every wait in tests/ unless told).
TIMEOUT = 15.0
#: Seconds between the first two polls; the pause grows by half each time, up to
#: :data:`POLL_MAX`, so that a slow check (a ``podman inspect``, a psql session) does
#: not keep a CPU busy on a loaded machine while a cheap one still returns at once.
POLL = 0.01
POLL_MAX = 0.1

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


def _pauses(check: Check[T], what: str | None, within: float) -> Generator[float, None, T]:
    """Call ``check`` until it returns a true value, which is returned; between two calls,
    yield how long to pause. Raises AssertionError at the deadline."""
    deadline = time.monotonic() + within
    pause = POLL
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(_failed(check, what, within, value))
        yield pause
        pause = min(pause * 1.5, POLL_MAX)


async def eventually(check: Check[T], what: str | None = None, within: float = TIMEOUT) -> T:
    """Poll ``check()`` until it returns a true value; return that value.

    Args:
        check: the condition, polled on the event loop (see :data:`POLL`).
        what: what is awaited, for the failure message (default: ``check``'s source).
        within: seconds before giving up.

    Raises:
        AssertionError: ``check`` did not hold ``within`` seconds; the message names
            ``what`` and the last result.
    """
    polls = _pauses(check, what, within)
    try:
        # Polling is the point: the condition has no event to await.
        while True:  # noqa: ASYNC110
            await asyncio.sleep(next(polls))
    except StopIteration as done:
        return cast(T, done.value)


def wait_until(check: Check[T], what: str | None = None, within: float = TIMEOUT) -> T:
    """:func:`eventually` for synchronous tests: poll ``check()`` (blocking) until it holds.

    Raises:
        AssertionError: as :func:`eventually`.
    """
    polls = _pauses(check, what, within)
    try:
        while True:
            time.sleep(next(polls))
    except StopIteration as done:
        return cast(T, done.value)


def wait_for_file(path: Path, within: float = TIMEOUT) -> str:
    """Wait until ``path`` exists with some content; return its text."""
    return wait_until(lambda: path.exists() and path.read_text(), f"{path} with content", within)
