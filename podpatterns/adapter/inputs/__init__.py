"""Inputs: records pushed to the adapter over localhost (HTTP, syslog, TCP), beside the file tail.

An input owns its listening sockets and turns what arrives into records; it hands them to
a :class:`Spool`, which makes them durable before it returns. What an input tells its
peer follows from that one call:

- a request/response input (HTTP) answers success only after :meth:`Spool.append`
  returned, and answers "try later" when it raised :class:`SpoolFull`;
- a stream input (TCP, unix stream) awaits :meth:`Spool.wait_for_space` before reading
  more, so a full spool pushes back on the app through the socket;
- a datagram input (UDP, unix datagram) cannot push back: what it cannot append is
  dropped and counted.

From the spool on, pushed records travel the same way as lines of a tailed file: batched,
transformed, shipped, and checkpointed only once every sink has acknowledged them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from podpatterns.listen import bind_inet, bind_unix
from podpatterns.options import HostPort

if TYPE_CHECKING:
    from collections.abc import Callable

Record = dict[str, Any]


def listen_warning(log: Any, flag: str, bind: HostPort | Path) -> None:
    """Warn when an input listens beyond loopback: anything that reaches it can push."""
    if isinstance(bind, HostPort) and not bind.is_loopback:
        log.warning(
            "input_not_loopback",
            input=flag,
            address=str(bind),
            note="reachable from outside the Pod; bind 127.0.0.1 unless that is intended",
        )


@dataclass(frozen=True, slots=True)
class Bound:
    """An input's socket, bound: where it listens, and its socket file's inode (for
    :func:`podpatterns.listen.remove_unix`; ``None`` for TCP and UDP)."""

    sock: socket.socket
    address: HostPort | Path
    unix_ino: int | None


def bind_input(
    name: str, option: str, where: HostPort | Path, kind: socket.SocketKind, mode: int, log: Any
) -> Bound:
    """Bind an input's socket (a unix socket file with permissions ``mode``, or a TCP or
    UDP address, warned about beyond loopback). The caller logs ``input_listening`` once
    it serves: a peer told the address then finds it listening.

    Raises:
        BindError: naming ``option``, the address and the reason.
    """
    if isinstance(where, Path):
        sock = bind_unix(where, kind, mode, option)
        bound = Bound(sock, where, os.stat(where).st_ino)
    else:
        sock = bind_inet(where, kind, option)
        host, port = sock.getsockname()[:2]
        bound = Bound(sock, HostPort(host, port), None)
        listen_warning(log, name, bound.address)
    return bound


def port_of(name: str, address: HostPort | Path | None) -> int:
    """The TCP or UDP port an input listens on.

    Raises:
        RuntimeError: not started, or a unix socket.
    """
    if not isinstance(address, HostPort):
        raise RuntimeError(f"{name} has no port")
    return address.port


class SpoolFull(Exception):
    """The spool holds its maximum of unacknowledged bytes; try again after ``retry_after``."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"spool full, retry after {retry_after:g} s")
        self.retry_after = retry_after


class Spool(Protocol):
    """Where inputs put records. Durable on return: an fsync'ed segment file."""

    async def append(self, records: list[Record], *, source: str) -> None:
        """Store ``records`` (in order) durably, tagged with the input ``source``.

        The records are the spool's from then on: each gets ``input`` set to ``source``,
        and they are shipped as they are (values JSON can hold: what is read back after
        a restart is their JSON form).

        Raises:
            SpoolFull: nothing was stored; the caller tells its peer to retry.
            OSError: the disk failed; nothing was stored.
        """

    async def append_raw(
        self,
        data: bytes,
        *,
        source: str,
        kind: str,
        count: int,
        decode: Callable[[bytes, str], list[Record]],
    ) -> None:
        """Store ``data`` durably as it arrived: whole messages that ``decode(data,
        source)`` turns into records when they are read back (after a restart, the
        decoder registered for ``kind``). Cheaper than :meth:`append` for an input whose
        messages are small: no record is built or encoded before the data is durable.

        Raises:
            SpoolFull: nothing was stored; the caller tells its peer to retry.
            OSError: the disk failed; nothing was stored.
        """

    async def wait_for_space(self) -> None:
        """Return at once unless an append was refused (:class:`SpoolFull`); then once
        at most half the spool's bound is used, so an append of up to that much
        succeeds (a stream input pauses reading on this)."""


class Input(Protocol):
    """A source of pushed records."""

    name: str

    async def start(self, spool: Spool) -> None:
        """Bind the listening sockets (a bind error raises) and start serving."""

    async def close(self) -> None:
        """Stop accepting; requests in flight are answered before this returns.

        May be called again (the adapter's close() calls it after a cut drain).
        """

    def is_live(self) -> bool:
        """False once a task of the input died (a bug): the adapter's /livez says so."""

    def collect(self) -> dict[str, float]:
        """Counters for the metrics collector (name -> value)."""
