"""Many things that each expire a fixed time after they began, on one timer.

A pooled app's startup (``--startup-timeout``) and a server connection's reset are each
over within a millisecond almost always; a timer of their own (``loop.call_later`` and
its cancel: about 5 µs on uvloop) cost more than the rest of their bookkeeping. With one
timeout for all, the deadlines come in the order the things were added: one timer, set
for the oldest, is enough.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)


class Deadlines(Generic[T]):
    """Items that expire ``timeout`` seconds after :meth:`add` unless :meth:`discard`\\ ed
    first; ``expire(item)`` is called for each that does.

    Args:
        timeout: seconds from :meth:`add` to the expiry.
        expire: called with an item at its deadline (it is no longer held then).

    The clock and timers are those of the running loop of the first :meth:`add`.
    """

    def __init__(self, timeout: float, expire: Callable[[T], None]) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timeout = timeout
        self._expire = expire
        self._items: dict[T, float] = {}  # oldest first, so in deadline order
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def add(self, item: T) -> float:
        """Hold ``item`` until its deadline, which is returned (in loop time)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        when = loop.time() + self._timeout
        self._items.pop(item, None)  # added again: its new deadline is the latest
        self._items[item] = when
        if self._timer is None:
            self._timer = loop.call_at(when, self._fire)
        return when

    def discard(self, item: T) -> None:
        """``item`` is done before its deadline (nothing if it is not held)."""
        self._items.pop(item, None)

    def items(self) -> list[T]:
        """The items held, oldest first."""
        return list(self._items)

    def close(self) -> None:
        """Forget every item, expire none."""
        self._items.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        items = self._items
        loop = self._loop
        assert loop is not None
        now = loop.time()
        while items:
            item, when = next(iter(items.items()))
            if when > now:
                self._timer = loop.call_at(when, self._fire)
                return
            del items[item]
            self._expire(item)  # may add or discard others
