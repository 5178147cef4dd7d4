"""Upstream names are re-resolved: on a timer, and at once after a connect failure.

The ambassador runs in a private mount namespace where /etc/hosts is a bind-mounted file
the test rewrites, so the machine's own /etc/hosts is never touched. The name points at
127.0.0.2 or 127.0.0.3, where two servers on the same port answer with their identity.
"""

from __future__ import annotations

import contextlib
import os
import socket
import socketserver
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.ambassador_process import AmbassadorProcess, Event, run_ambassador
from tests.peers import missing, need

pytestmark = pytest.mark.root

NAME = "dns-test.podpatterns.internal"
SERVER_A = "127.0.0.2"
SERVER_B = "127.0.0.3"


class _Answer(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        assert isinstance(self.server, IdentityServer)
        self.request.sendall(self.server.identity)


class IdentityServer(socketserver.ThreadingTCPServer):
    """Answers every connection with its identity line, then closes it."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, host: str, port: int, identity: bytes) -> None:
        self.identity = identity
        super().__init__((host, port), _Answer)
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The bound port."""
        port: int = self.server_address[1]
        return port

    def stop(self) -> None:
        """Stop serving and close the listening socket: new connects are refused."""
        if self._thread.is_alive():
            self.shutdown()
            self._thread.join(5)
        self.server_close()


@pytest.fixture
def servers() -> Iterator[tuple[IdentityServer, IdentityServer]]:
    """Server A on 127.0.0.2 and server B on 127.0.0.3, on the same port."""
    for _ in range(5):
        a = IdentityServer(SERVER_A, 0, b"A\n")
        try:
            b = IdentityServer(SERVER_B, a.port, b"B\n")
        except OSError:  # that port is taken on 127.0.0.3: try another
            a.stop()
            continue
        try:
            yield a, b
        finally:
            a.stop()
            b.stop()
        return
    pytest.fail("no port free on both 127.0.0.2 and 127.0.0.3")


def point_name_at(hosts: Path, address: str) -> None:
    """Rewrite ``hosts`` in place: a bind mount pins the inode, so no rename."""
    with hosts.open("r+") as f:
        f.truncate()
        f.write(f"127.0.0.1 localhost\n{address} {NAME}\n")


@pytest.fixture
def hosts_file(tmp_path: Path) -> Path:
    """A hosts file that a private mount namespace can mount over /etc/hosts."""
    if os.geteuid() != 0:
        pytest.skip("needs root: mounts /etc/hosts in a private mount namespace")
    unshare = need("unshare")
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    point_name_at(hosts, SERVER_A)
    probe = subprocess.run(
        [unshare, "--mount", "sh", "-c", 'mount --bind "$1" /etc/hosts', "sh", str(hosts)],
        capture_output=True,
        timeout=10,
        check=False,
    )
    if probe.returncode != 0:
        missing(f"cannot bind-mount /etc/hosts in a mount namespace: {probe.stderr.decode()}")
    return hosts


@contextlib.contextmanager
def ambassador_with_hosts(hosts: Path, port: int, *extra: str) -> Iterator[AmbassadorProcess]:
    """The ambassador, upstream ``NAME:port``, seeing ``hosts`` as its /etc/hosts."""
    prefix = [
        need("unshare"),
        "--mount",
        "sh",
        "-c",
        'mount --bind "$1" /etc/hosts && shift && exec "$@"',
        "sh",
        str(hosts),
    ]
    with run_ambassador([f"{NAME}:{port}"], *extra, prefix=prefix) as amb:
        yield amb


def identity(amb: AmbassadorProcess) -> bytes:
    """Connect through the ambassador and read what the upstream answered until EOF."""
    with socket.create_connection((amb.listen.host, amb.listen.port), timeout=10) as sock:
        chunks = []
        while chunk := sock.recv(64):
            chunks.append(chunk)
    return b"".join(chunks)


def resolved_to(address: str) -> Callable[[Event], bool]:
    """A ``where`` for ``upstream_resolved`` events naming only ``address``."""
    return lambda ev: ev.get("addresses") == [address]


def test_dns_refresh_follows_hosts_change(
    hosts_file: Path, servers: tuple[IdentityServer, IdentityServer]
) -> None:
    """With --dns-refresh 0.5s, new connections follow an /etc/hosts change to server B."""
    a, _ = servers
    with ambassador_with_hosts(hosts_file, a.port, "--dns-refresh", "0.5s") as amb:
        assert identity(amb) == b"A\n"
        amb.wait_event("upstream_resolved", resolved_to(SERVER_A))
        mark = amb.mark()
        point_name_at(hosts_file, SERVER_B)
        event = amb.wait_event("upstream_resolved", resolved_to(SERVER_B), after=mark, timeout=10)
        assert event["previous"] == [SERVER_A]
        assert identity(amb) == b"B\n"
        assert amb.find("upstream_down") == -1
        assert amb.terminate() == 0, amb.log_text()


def test_connect_failure_triggers_reresolution(
    hosts_file: Path, servers: tuple[IdentityServer, IdentityServer]
) -> None:
    """A refused connect re-resolves the name at once, though --dns-refresh is 1h."""
    a, _ = servers
    with ambassador_with_hosts(
        hosts_file, a.port, "--dns-refresh", "1h", "--connect-retries", "3"
    ) as amb:
        assert identity(amb) == b"A\n"
        point_name_at(hosts_file, SERVER_B)
        assert identity(amb) == b"A\n"  # cached: no timer fires for an hour
        mark = amb.mark()
        a.stop()
        assert identity(amb) == b"B\n"
        down = amb.wait_index("upstream_down", lambda ev: ev["reason"] == "refused", after=mark)
        amb.wait_event("upstream_resolved", resolved_to(SERVER_B), after=down)
        failures = amb.metric(
            "podpatterns_ambassador_upstream_connect_failures_total", reason="refused"
        )
        assert failures >= 1
        assert amb.metric("podpatterns_ambassador_connections_failed_total") == 0
        assert amb.terminate() == 0, amb.log_text()
