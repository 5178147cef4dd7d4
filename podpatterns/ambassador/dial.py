"""Connect to an upstream: endpoint order, per-attempt timeout, retries with backoff."""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from podpatterns.ambassador.upstreams import Endpoint, UpstreamPool


class DialError(Exception):
    """No endpoint could be reached; ``reason`` is the last failure's kind."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class DialPolicy:
    """How hard to try (the route's connect options)."""

    connect_timeout: float
    retries: int
    backoff: float
    backoff_max: float
    keepalive: bool
    nodelay: bool


def tune(sock: socket.socket, keepalive: bool, nodelay: bool) -> None:
    """Set TCP_NODELAY and SO_KEEPALIVE on a TCP socket (no-op for unix sockets)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    if nodelay:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if keepalive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


async def connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, addr: Any) -> None:
    """Connect a non-blocking socket to an already resolved address.

    Not ``loop.sock_connect``: uvloop's resolves the address again on a worker thread
    for every call, even an IP literal, which cost 10-14% CPU per new connection
    (bench/ambassador.py). The address here is always resolved already.

    Raises:
        OSError: the connect failed (``ConnectionRefusedError`` etc. by errno).
    """
    try:
        sock.connect(addr)
        return
    except BlockingIOError:
        pass  # EINPROGRESS: wait until the socket is writable, then read SO_ERROR
    fd = sock.fileno()
    done: asyncio.Future[None] = loop.create_future()

    def writable() -> None:
        loop.remove_writer(fd)  # level-triggered: one wake-up is all we need
        if not done.done():
            done.set_result(None)

    loop.add_writer(fd, writable)
    try:
        await done
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))  # OSError picks the subclass from errno


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


async def dial(
    pool: UpstreamPool,
    policy: DialPolicy,
    on_failure: FailureHook | None = None,
) -> tuple[socket.socket, Endpoint]:
    """Return a connected non-blocking socket and the endpoint it reached.

    Tries endpoints in the pool's order and every resolved address of each; an endpoint
    none of whose addresses answered is marked down (passive health). After a full round
    fails, sleeps an exponential backoff with full jitter. At most ``1 + retries``
    connect attempts in all; ``on_failure`` is called once per failed attempt.

    Raises:
        DialError: every attempt failed.
    """
    loop = asyncio.get_running_loop()
    left = policy.retries + 1
    last = ("unreachable", "no endpoint")
    round_no = 0
    while True:
        for ep in pool.candidates():
            try:
                addrs = await pool.addresses(ep)
            except OSError as exc:
                addrs = []
                last = (classify(exc), f"{ep}: {exc}")
                left -= 1
                _report(on_failure, ep, last[0])
            for family, addr in addrs:
                if left <= 0:
                    break
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    tune(sock, policy.keepalive, policy.nodelay)
                    async with asyncio.timeout(policy.connect_timeout):
                        await connect(loop, sock, addr)
                except (OSError, TimeoutError) as exc:
                    sock.close()
                    last = (classify(exc), f"{ep} ({addr[0]}): {exc or 'timed out'}")
                    left -= 1
                    _report(on_failure, ep, last[0])
                    continue
                except BaseException:
                    sock.close()
                    raise
                pool.mark_success(ep)
                return sock, ep
            pool.mark_failure(ep, last[0])
            if left <= 0:
                raise DialError(*last)
        cap = min(policy.backoff_max, policy.backoff * 2**round_no)
        round_no += 1
        await asyncio.sleep(random.uniform(0, cap))


def _report(hook: FailureHook | None, ep: Endpoint, reason: str) -> None:
    if hook is not None:
        hook(ep, reason)
