"""The ambassador's listening socket: bound through the shared :mod:`podpatterns.listen`."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from podpatterns.ambassador.config import UnixAddress
from podpatterns.ambassador.listener import Listener, bind
from podpatterns.errors import BindError
from podpatterns.options import HostPort


async def test_unix_listener_replaces_a_stale_socket_and_refuses_a_live_one(
    tmp_path: Path,
) -> None:
    """A socket file left by an earlier run is replaced; a live one or a regular file is a
    BindError naming --listen; the listener reports its path and removes it at close."""
    path = tmp_path / "db.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays: nobody listens on it
    address = UnixAddress(path)
    listener = Listener(bind(address), lambda sock, peer: sock.close(), unix=address)
    try:
        assert listener.address == address
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))  # it listens at the path asked for
        client.close()
        with pytest.raises(BindError, match=r"--listen: .*db.sock' is in use by another process"):
            bind(address)
    finally:
        listener.close()
    assert not path.exists()
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(BindError, match=r"--listen: .*file' exists and is not a socket"):
        bind(UnixAddress(regular))


async def test_tcp_listener_reports_the_port_chosen() -> None:
    """Port 0: the listener reports the port the kernel chose; that port taken is a
    BindError naming --listen."""
    listener = Listener(bind(HostPort("127.0.0.1", 0)), lambda sock, peer: sock.close())
    try:
        assert isinstance(listener.address, HostPort) and listener.address.port > 0
        with pytest.raises(BindError, match="--listen: cannot bind"):
            bind(listener.address)
    finally:
        listener.close()
