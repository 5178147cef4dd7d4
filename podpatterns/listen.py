"""Listening sockets, bound the same way by every component.

The ambassador's listeners and the adapter's inputs bind here: a TCP or UDP address
(``SO_REUSEADDR`` for streams, so a restart does not wait out TIME_WAIT), or a unix
socket file that replaces a stale one left by an earlier run, but never a live one or a
file that is not a socket. Errors are :class:`~podpatterns.errors.BindError`, one line
naming the option, the address and the reason.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from podpatterns.errors import BindError
from podpatterns.options import HostPort

__all__ = ["bind_inet", "bind_unix", "remove_unix"]


def bind_inet(address: HostPort, kind: socket.SocketKind, option: str) -> socket.socket:
    """A non-blocking socket bound to ``address`` (the first address it resolves to).

    Args:
        address: host and port (port 0: the kernel chooses).
        kind: ``SOCK_STREAM`` (given ``SO_REUSEADDR``) or ``SOCK_DGRAM``.
        option: the option the address comes from, for errors.

    Raises:
        BindError: it does not resolve, or cannot be bound (in use, not permitted).
    """
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=kind, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"{option}: cannot resolve {str(address)!r}: {exc}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise BindError(f"{option}: cannot bind {address}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def bind_unix(path: Path, kind: socket.SocketKind, mode: int | None, option: str) -> socket.socket:
    """A non-blocking unix socket bound at ``path``, replacing a stale socket file.

    The socket is bound under a temporary name in the same directory, given its mode,
    then renamed over ``path``: a peer never sees it with the wrong permissions, and a
    socket file left by an earlier run is replaced in one step. A path that exists and
    is not a socket, or a socket something still listens on, is an error. (The socket's
    own name, ``getsockname()``, is the temporary one: callers keep ``path``.)

    Args:
        path: where the socket file goes.
        kind: ``SOCK_STREAM`` or ``SOCK_DGRAM``.
        mode: permissions of the socket file (``None``: as the umask leaves them).
        option: the option the path comes from, for errors.

    Raises:
        BindError: naming ``option``, the path and the reason.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise BindError(f"{option}: cannot use {str(path)!r}: {exc.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise BindError(
                f"{option}: {str(path)!r} exists and is not a socket (remove it, or choose "
                "another path)"
            )
        probe = socket.socket(socket.AF_UNIX, kind)
        probe.setblocking(False)  # a live server with a full backlog must not block us
        try:
            probe.connect(str(path))
        except BlockingIOError:
            live = True  # its backlog is full: very much alive
        except OSError:
            live = False  # nobody listens: a stale socket file, replaced below
        else:
            live = True
        finally:
            probe.close()
        if live:
            raise BindError(f"{option}: {str(path)!r} is in use by another process")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sock = socket.socket(socket.AF_UNIX, kind)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock.bind(str(tmp))
        if mode is not None:
            os.chmod(tmp, mode)
        os.rename(tmp, path)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise BindError(f"{option}: cannot bind {str(path)!r}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def remove_unix(path: Path, ino: int | None) -> None:
    """Remove the socket file at ``path`` if it is still ours (inode ``ino``): another
    process may have replaced it since."""
    if ino is None:
        return
    with contextlib.suppress(OSError):
        if os.lstat(path).st_ino == ino:
            os.unlink(path)
