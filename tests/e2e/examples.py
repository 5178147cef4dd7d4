"""What each manifest of docs/examples/ needs changed to run on this machine.

Shared by ``test_pods.py`` (``podman kube play``) and ``test_lifecycle.py`` (the
kubelet's rules, emulated): each function returns the text replacements for one
example, which :func:`tests.e2e.test_pods.manifest_documents` makes and asserts to
match, so a manifest that changes under the tests fails them instead of silently
testing something else. The Pods share the machine's network, so every port a test
talks to is one it chose (``candidate_ports``) and every admin server listens on
loopback only; ``containerPort`` follows the port, because the kubelet's probes name it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

import trustme

from tests.peers import PG_SERVER_NAME, PostgresServer, candidate_ports


def ambassador_postgres(
    server: PostgresServer, ca: trustme.CA, listen: int, admin: int
) -> dict[str, str]:
    """ambassador-postgres.yaml against the TLS-only ``server`` whose certificate ``ca``
    issued (it names PG_SERVER_NAME, not the address dialled)."""
    assert server.password is not None
    ca_pem = "".join(f"    {line}\n" for line in ca.cert_pem.bytes().decode().splitlines())
    return {
        "db.example.internal:5432": f"{server.host}:{server.port}",
        "- --tls-ca=/etc/db-tls/ca.crt\n": "- --tls-ca=/etc/db-tls/ca.crt\n"
        f"        - --tls-server-name={PG_SERVER_NAME}\n",
        "    -----BEGIN CERTIFICATE-----\n"
        "    REPLACE-WITH-THE-DATABASE-CA-CERTIFICATE\n"
        "    -----END CERTIFICATE-----\n": ca_pem,
        "--listen=127.0.0.1:5432": f"--listen=127.0.0.1:{listen}",
        "--admin=0.0.0.0:9901": f"--admin=127.0.0.1:{admin}",
        "containerPort: 9901": f"containerPort: {admin}",
        'value: "5432"': f'value: "{listen}"',
        "PGUSER: app": f"PGUSER: {server.user}",
        "PGPASSWORD: change-me": f"PGPASSWORD: {server.password}",
        "PGDATABASE: app": f"PGDATABASE: {server.database}",
    }


def nginx_and_sidecar(http: int, admin: int) -> dict[str, str]:
    """adapter-stdout.yaml or config-reload.yaml: nginx on ``http``, the sidecar's admin
    server on ``admin``."""
    return {
        "listen 8080;": f"listen 127.0.0.1:{http};",
        "containerPort: 8080": f"containerPort: {http}",
        "--admin=0.0.0.0:9901": f"--admin=127.0.0.1:{admin}",
        "containerPort: 9901": f"containerPort: {admin}",
    }


def job_with_sidecars(
    database: str, listen: int, admin_a: int, admin_b: int, exit_code: int
) -> dict[str, str]:
    """job-with-sidecars.yaml against ``database`` (HOST:PORT), main exiting ``exit_code``."""
    return {
        "db.example.internal:5432": "DATABASE",  # before every other 5432 is replaced
        "5432": str(listen),
        "DATABASE": database,
        "0.0.0.0:9901": f"127.0.0.1:{admin_a}",
        "containerPort: 9901": f"containerPort: {admin_a}",
        "0.0.0.0:9902": f"127.0.0.1:{admin_b}",
        "containerPort: 9902": f"containerPort: {admin_b}",
        'value: "0"': f'value: "{exit_code}"',
    }


def health_records(http: int, admin: int) -> dict[str, str]:
    """health-records.yaml with nginx on ``http`` and pod-health's admin on ``admin``."""
    return {
        "listen 8080;": f"listen 127.0.0.1:{http};",
        "http://127.0.0.1:8080/healthz": f"http://127.0.0.1:{http}/healthz",
        "containerPort: 8080": f"containerPort: {http}",
        "--admin=0.0.0.0:9901": f"--admin=127.0.0.1:{admin}",
        "9901": str(admin),  # containerPort, and the probes of web and worker
    }


def startup_ordering(
    database: str,
    listen: int,
    admin_a: int,
    admin_b: int,
    user: str = "app",
    dbname: str = "app",
) -> dict[str, str]:
    """startup-ordering.yaml (both Pods) against ``database`` (HOST:PORT); the first
    Pod's psql logs in as ``user`` to ``dbname``."""
    return {
        "db.example.internal:5432": database,
        "--listen=127.0.0.1:5432": f"--listen=127.0.0.1:{listen}",
        '{name: PGPORT, value: "5432"}': f'{{name: PGPORT, value: "{listen}"}}',
        '("127.0.0.1", 5432)': f'("127.0.0.1", {listen})',
        "{name: PGUSER, value: app}": f"{{name: PGUSER, value: {user}}}",
        "{name: PGDATABASE, value: app}": f"{{name: PGDATABASE, value: {dbname}}}",
        "0.0.0.0:9901": f"127.0.0.1:{admin_a}",
        "containerPort: 9901": f"containerPort: {admin_a}",
        "http://127.0.0.1:9901/readyz": f"http://127.0.0.1:{admin_a}/readyz",
        "0.0.0.0:9902": f"127.0.0.1:{admin_b}",
        "containerPort: 9902": f"containerPort: {admin_b}",
    }


class LateServer:
    """A TCP relay from 127.0.0.1:``port`` to a real server on loopback port ``target``
    that listens only from :meth:`open` on: a database that comes up when the test says.

    A context manager: on exit it stops accepting, closes every connection and joins
    its threads.
    """

    def __init__(self, target: int) -> None:
        self.port = candidate_ports(1)[0]
        self.target = target
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []

    def open(self) -> None:
        """Start accepting connections."""
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)  # to see _stop
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            server.settimeout(None)
            self._sockets += [client, server]
            self._spawn(self._pump, client, server)
            self._spawn(self._pump, server, client)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)

    def __enter__(self) -> LateServer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        for sock in [*self._sockets, *([self._listener] if self._listener else [])]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=10)
