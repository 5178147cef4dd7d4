"""An epoll set of the ambassador's own, for the sockets of splice relays and their dials.

Why not the event loop's ``add_reader``/``add_writer``: uvloop gives each fd a libuv poll
handle, and on this hot path that costs syscalls and objects. A new handle is an epoll
ADD, a DEL, an ``ioctl(FIONBIO)`` and a failing DEL; each change of interest a DEL and a
re-ADD; closing it three DELs, two of them failing. A splice connection registers two
sockets and changes their interest four to six times. Here each change is one
``epoll_ctl``, and the loop watches a single fd (this epoll set) for all of them.

Level-triggered, like the loop's own readers and writers; an error or hang-up wakes both
the reader and the writer of the fd, as libuv does. Callbacks must tolerate a spurious
call (all of the splice relay's and the dialer's make a non-blocking attempt and return
on EAGAIN): an fd closed and reused within one batch of events can get one stale event.
Remove an fd's callbacks before closing it.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable

_READ = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_WRITE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR
_BATCH = 256  # events per wake-up; more stay pending (level-triggered) for the next

Callback = Callable[[], None]


class Poller:
    """Readers and writers on fds, with the loop's method names (see the module doc)."""

    __slots__ = ("_ep", "_fds", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._ep = select.epoll()
        self._fds: dict[int, list[Callback | None]] = {}  # fd: [reader, writer]
        loop.add_reader(self._ep.fileno(), self._dispatch)

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._add(fd, 0, callback)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._add(fd, 1, callback)

    def remove_reader(self, fd: int) -> bool:
        return self._remove(fd, 0)

    def remove_writer(self, fd: int) -> bool:
        return self._remove(fd, 1)

    def close(self) -> None:
        """Stop watching; callbacks still registered are dropped."""
        if not self._ep.closed:
            self._loop.remove_reader(self._ep.fileno())
            self._ep.close()
            self._fds.clear()

    # -- internals -----------------------------------------------------------------------

    def _add(self, fd: int, slot: int, callback: Callback) -> None:
        entry = self._fds.get(fd)
        if entry is None:
            entry = self._fds[fd] = [None, None]
            entry[slot] = callback
            self._ep.register(fd, _events(entry))
            return
        had = entry[slot] is not None
        entry[slot] = callback
        if not had:
            self._ep.modify(fd, _events(entry))

    def _remove(self, fd: int, slot: int) -> bool:
        entry = self._fds.get(fd)
        if entry is None or entry[slot] is None:
            return False
        entry[slot] = None
        if entry[0] is None and entry[1] is None:
            del self._fds[fd]
            self._ep.unregister(fd)
        else:
            self._ep.modify(fd, _events(entry))
        return True

    def _dispatch(self) -> None:
        fds = self._fds
        for fd, events in self._ep.poll(0, _BATCH):
            entry = fds.get(fd)
            if entry is None:  # removed by an earlier callback of this batch
                continue
            if events & _READ and entry[0] is not None:
                entry[0]()
            if events & _WRITE and entry[1] is not None:
                entry[1]()


def _events(entry: list[Callback | None]) -> int:
    return (select.EPOLLIN if entry[0] is not None else 0) | (
        select.EPOLLOUT if entry[1] is not None else 0
    )
