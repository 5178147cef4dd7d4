"""``--drain-close``: how a plain TCP route ends the connections left at the drain deadline.

The reset (``rst``, the default) is proved in tests/test_cli.py; here ``fin`` on both
relays, with a real ambassador process and real sockets.
"""

from __future__ import annotations

import signal
import socket

import pytest

from tests.ambassador_process import run_ambassador


@pytest.mark.parametrize("relay", ["on", "off"])
def test_drain_close_fin_ends_both_sides_with_eof(relay: str) -> None:
    """With --drain-close fin, both peers read the relayed bytes, then EOF, not a reset."""
    with socket.create_server(("127.0.0.1", 0)) as up:
        port = up.getsockname()[1]
        args = ["--drain-timeout", "200ms", "--drain-close", "fin", "--splice", relay]
        with run_ambassador([f"127.0.0.1:{port}"], *args) as amb:
            client = socket.create_connection(("127.0.0.1", amb.listen.port), timeout=10)
            server, _ = up.accept()
            with client, server:
                server.settimeout(10)
                client.sendall(b"ping")
                assert server.recv(4) == b"ping"
                server.sendall(b"pong")
                assert client.recv(4) == b"pong"
                amb.signal(signal.SIGTERM)
                assert amb.wait() == 0, amb.log_text()
                assert amb.wait_event("drain_deadline_cut")["cut"] == 1
                assert client.recv(100) == b""  # a FIN: ConnectionResetError with rst
                assert server.recv(100) == b""
