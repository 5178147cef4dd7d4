"""Connect to an upstream: endpoint order, per-attempt timeout, retries with backoff."""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass

from podpatterns.ambassador.upstreams import Endpoint, SockAddr, UpstreamPool


class DialError(Exception):
    """No endpoint could be reached; ``reason`` is the last failure's kind."""

    def __init__(self, reason: str, detail: str, endpoint: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.endpoint = endpoint  # the last endpoint tried, when there was one


@dataclass(frozen=True)
class DialPolicy:
    """How hard to try (the route's connect options)."""

    connect_timeout: float
    retries: int
    backoff: float
    backoff_max: float
    keepalive: bool
    nodelay: bool


# Linux: the socket is made non-blocking by socket() itself, not by an ioctl after it
_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)
_TCP = (socket.AF_INET, socket.AF_INET6)


def tune(sock: socket.socket, family: int, keepalive: bool, nodelay: bool) -> None:
    """Set TCP_NODELAY and SO_KEEPALIVE on a TCP socket (no-op for unix sockets).

    ``family`` is the socket's, passed in: ``sock.family`` builds an enum on every read.
    """
    if family not in _TCP:
        return
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if keepalive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def classify(exc: BaseException) -> str:
    """A short failure reason for metrics and logs."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, OSError):
        return "unreachable"
    return "error"


FailureHook = Callable[[Endpoint, str], None]
# (socket, endpoint) on success, or (None, None, error): DialError when every attempt
# failed, anything else is a bug passed on.
DoneHook = Callable[[socket.socket | None, Endpoint | None, BaseException | None], None]


class Dialer:
    """Reach one of a pool's endpoints for one connection, driven by loop callbacks.

    Tries endpoints in the pool's order and every resolved address of each; an endpoint
    none of whose addresses answered is marked down (passive health). After a full round
    fails, waits an exponential backoff with full jitter. At most ``1 + retries``
    connect attempts in all; ``on_failure`` is called once per failed attempt, and
    ``on_done`` exactly once at the end, unless :meth:`cancel` comes first.

    Callbacks rather than a task and a coroutine per connection: this is the hot path
    of a new connection, and replacing the task, the coroutine and ``asyncio.timeout``
    (whose ``get_running_loop()`` calls ``getpid()`` on Python 3.11) saved 11-18% of
    the CPU per new connection (CHANGELOG). Not ``loop.sock_connect``
    either: uvloop's resolves the address again on a worker thread for every call, even
    an IP literal (10-14% CPU per new connection); addresses here are resolved already.

    On success ``on_done`` runs while the socket is still registered for writability
    (with a no-op callback), and the registration is dropped when it returns: a relay
    that registers its own callbacks on the socket inside ``on_done`` then reuses
    uvloop's poll handle instead of closing it and opening another (7 syscalls). A
    receiver that closes the socket inside ``on_done`` must ``remove_writer`` first.
    """

    __slots__ = (
        "_addrs",
        "_ai",
        "_candidates",
        "_ei",
        "_eps",
        "_fd",
        "_last",
        "_left",
        "_loop",
        "_on_done",
        "_on_failure",
        "_only",
        "_policy",
        "_pool",
        "_resolving",
        "_round_no",
        "_sock",
        "_timer",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: UpstreamPool,
        policy: DialPolicy,
        on_done: DoneHook,
        on_failure: FailureHook | None = None,
        only: Endpoint | None = None,
        candidates: Callable[[], list[Endpoint]] | None = None,
    ) -> None:
        self._loop = loop
        self._only = only  # try this endpoint alone (a request bound to one server)
        # the endpoints of each round, when not the pool's order (PostgreSQL roles)
        self._candidates = candidates if candidates is not None else pool.candidates
        self._pool = pool
        self._policy = policy
        self._on_done: DoneHook | None = on_done
        self._on_failure = on_failure
        self._left = policy.retries + 1
        self._last = ("unreachable", "no endpoint", "")
        self._round_no = 0
        self._eps: list[Endpoint] = []
        self._ei = 0  # index of the endpoint being tried in _eps
        self._addrs: list[tuple[int, SockAddr]] | None = None  # its addresses, once known
        self._ai = 0  # index of the next address to try in _addrs
        self._sock: socket.socket | None = None  # the attempt in progress
        self._fd = -1
        self._timer: asyncio.TimerHandle | None = None  # connect timeout or backoff
        self._resolving: asyncio.Task[list[tuple[int, SockAddr]]] | None = None

    def start(self) -> None:
        """Begin the first round (``on_done`` may run before this returns)."""
        self._new_round()

    def cancel(self) -> None:
        """Stop trying and close the attempt in progress; ``on_done`` is not called."""
        if self._on_done is None:
            return
        self._on_done = None
        self._stop_attempt()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._resolving is not None:
            self._resolving.cancel()
            self._resolving = None

    # -- the attempts ---------------------------------------------------------------------

    def _new_round(self) -> None:
        self._timer = None
        self._eps = self._candidates() if self._only is None else [self._only]
        self._ei = 0
        self._addrs = None
        if not self._eps:
            self._done(None, None, DialError("unreachable", "no endpoint to try"))
            return
        self._advance()

    def _advance(self) -> None:
        """Make attempts until one has to wait or the dial is over."""
        while self._on_done is not None:
            if self._ei == len(self._eps):  # a full round failed: back off
                cap = min(self._policy.backoff_max, self._policy.backoff * 2**self._round_no)
                self._round_no += 1
                self._timer = self._loop.call_later(random.uniform(0, cap), self._new_round)
                return
            ep = self._eps[self._ei]
            if self._addrs is None:
                if not ep.addrs:
                    self._resolve(ep)
                    return
                self._addrs = ep.addrs
                self._ai = 0
            if self._ai < len(self._addrs) and self._left > 0:
                family, addr = self._addrs[self._ai]
                self._ai += 1
                if self._attempt(ep, family, addr):
                    return
                continue
            # every address of ep failed (or no attempts are left)
            self._pool.mark_failure(ep, self._last[0])
            if self._left <= 0:
                self._done(None, None, DialError(*self._last))
                return
            self._ei += 1
            self._addrs = None

    def _attempt(self, ep: Endpoint, family: int, addr: SockAddr) -> bool:
        """Start one connect; False when it failed at once."""
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | _NONBLOCK)
        except OSError as exc:  # EMFILE and the like: not the endpoint's fault, no retry
            self._done(None, None, DialError("error", f"socket(): {exc}"))
            return True
        if not _NONBLOCK:
            sock.setblocking(False)
        try:
            tune(sock, family, self._policy.keepalive, self._policy.nodelay)
            sock.connect(addr)
        except BlockingIOError:
            pass  # EINPROGRESS: wait until the socket is writable, then read SO_ERROR
        except OSError as exc:
            sock.close()
            self._failed(ep, addr, exc)
            return False
        else:
            self._pool.mark_success(ep)
            self._done(sock, ep, None)
            return True
        self._sock = sock
        self._fd = sock.fileno()
        self._loop.add_writer(self._fd, self._writable, ep, addr)
        self._timer = self._loop.call_later(self._policy.connect_timeout, self._timed_out, ep, addr)
        return True

    def _writable(self, ep: Endpoint, addr: SockAddr) -> None:
        sock = self._sock
        if sock is None:  # level-triggered: a second wake-up before the writer is gone
            return
        assert self._timer is not None
        self._timer.cancel()
        self._timer = None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._stop_attempt()
            sock.close()
            self._sock = None
            self._failed(ep, addr, OSError(err, os.strerror(err)))  # subclass by errno
            self._advance()
            return
        self._sock = None
        self._pool.mark_success(ep)
        self._done(sock, ep, None)
        if sock.fileno() == self._fd:  # not closed by on_done (which removed the writer)
            self._loop.remove_writer(self._fd)

    def _timed_out(self, ep: Endpoint, addr: SockAddr) -> None:
        self._timer = None
        self._stop_attempt()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._failed(ep, addr, TimeoutError())
        self._advance()

    def _stop_attempt(self) -> None:
        if self._sock is not None:
            self._loop.remove_writer(self._fd)

    def _failed(self, ep: Endpoint, addr: SockAddr, exc: OSError) -> None:
        self._last = (classify(exc), f"{ep} ({addr[0]}): {exc or 'timed out'}", str(ep))
        self._left -= 1
        _report(self._on_failure, ep, self._last[0])

    # -- name resolution (only when an endpoint's addresses expired) --------------------

    def _resolve(self, ep: Endpoint) -> None:
        task = self._loop.create_task(self._pool.addresses(ep))
        self._resolving = task
        task.add_done_callback(lambda t: self._resolved(ep, t))

    def _resolved(self, ep: Endpoint, task: asyncio.Task[list[tuple[int, SockAddr]]]) -> None:
        if task.cancelled():
            return
        exc = task.exception()  # retrieved even when no longer wanted
        if self._on_done is None:
            return
        self._resolving = None
        if exc is None:
            self._addrs = task.result()
        elif isinstance(exc, OSError):
            self._addrs = []
            self._last = (classify(exc), f"{ep}: {exc}", str(ep))
            self._left -= 1
            _report(self._on_failure, ep, self._last[0])
        else:
            self._done(None, None, exc)
            return
        self._ai = 0
        self._advance()

    def _done(
        self, sock: socket.socket | None, ep: Endpoint | None, exc: BaseException | None
    ) -> None:
        callback, self._on_done = self._on_done, None
        assert callback is not None
        callback(sock, ep, exc)


def _report(hook: FailureHook | None, ep: Endpoint, reason: str) -> None:
    if hook is not None:
        hook(ep, reason)
