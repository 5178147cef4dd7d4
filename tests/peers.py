"""Real peer servers for tests: PostgreSQL 15 and Redis from the Debian packages, on loopback.

Each peer is started by the test session (session-scoped fixtures, so the suite pays for
``initdb`` once), waited for through a real client connection within a deadline, and
stopped by the PID it was started with, also when a test fails.

A missing binary skips the tests that need it on a developer's machine, but fails them
when ``CI=true``: CI must not go green by skipping (``./dev test`` installs the packages).

Neither server can take port 0 or an inherited socket, so each gets a random port below
the kernel's ephemeral range (no outgoing connection holds those); when it is taken the
server exits with "Address already in use" and the next candidate is tried. Nothing is
bound, closed and handed on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
import trustme

from tests.waiting import wait_until

LOOPBACK = "127.0.0.1"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
START_TIMEOUT = 30.0  # seconds for a peer to accept its first real connection
STOP_TIMEOUT = 15.0
_PORT_ATTEMPTS = 8


def missing(what: str) -> NoReturn:
    """Skip the test for want of ``what``; fail instead under ``CI=true``."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: CI must not skip; ./dev test installs it)")
    pytest.skip(what)


def need(binary: str | Path) -> str:
    """The path of an executable, or :func:`missing` when it is not installed."""
    found = shutil.which(str(binary))
    if found is None:
        missing(f"{binary} is not installed")
    return found


def candidate_ports(count: int = _PORT_ATTEMPTS) -> list[int]:
    """Random ports below the ephemeral range, for servers that must be told a port."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return random.sample(range(20000, max(low, 21000)), count)


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, pid: int | None = None) -> None:
    """Signal ``pid`` (default: ``proc``) and reap ``proc``; SIGKILL after the deadline."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid or proc.pid, sig)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        for target in {pid or proc.pid, proc.pid}:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)


Starter = Callable[[int, Path], subprocess.Popen[bytes]]


@contextlib.contextmanager
def serve_on_free_port(
    name: str,
    start: Starter,
    ready: Callable[[int, subprocess.Popen[bytes]], bool],
    stop: Callable[[subprocess.Popen[bytes]], None],
    logdir: Path,
) -> Iterator[int]:
    """Run a server that must be told its port; yield the port once ``ready`` says so.

    ``start(port, log)`` launches it logging to ``log``; ``ready(port, proc)`` checks
    that a real connection reaches that very process. A server that exits saying
    "Address already in use" is retried on the next candidate port; any other early
    exit raises with its log. ``stop(proc)`` runs on every exit path.
    """
    for port in candidate_ports():
        log = logdir / f"{name}-{port}.log"
        proc = start(port, log)
        try:
            if _up(proc, ready, port, f"{name} on port {port}"):
                yield port
                return
            text = log.read_text(errors="replace") if log.exists() else ""
            if "Address already in use" not in text:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{text}")
        finally:
            stop(proc)
    raise RuntimeError(f"{name}: no free port in {_PORT_ATTEMPTS} tries")


def _up(
    proc: subprocess.Popen[bytes],
    ready: Callable[[int, subprocess.Popen[bytes]], bool],
    port: int,
    what: str,
) -> bool:
    """True once ``ready(port, proc)``, False when ``proc`` exited first (bounded)."""

    def check() -> str | None:
        if proc.poll() is not None:
            return "exited"
        return "ready" if ready(port, proc) else None

    return wait_until(check, what, START_TIMEOUT) == "ready"


# -- PostgreSQL -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PostgresServer:
    """A running PostgreSQL: trust authentication for ``postgres`` on 127.0.0.1.

    A server started with :class:`PostgresTLS` instead takes only TLS with SCRAM over TCP
    (``hostssl``; a plaintext connection is rejected by the server itself), for ``user``
    with ``password``; :meth:`query` then goes through the unix socket in
    ``socket_dir``, where ``postgres`` is trusted.
    """

    port: int
    bindir: Path
    host: str = LOOPBACK
    user: str = "postgres"
    database: str = "postgres"
    password: str | None = None
    socket_dir: Path | None = None

    def tool(self, name: str) -> str:
        """The path of a client tool of the same version (``psql``, ``pgbench``)."""
        return str(self.bindir / name)

    def env(self, port: int | None = None) -> dict[str, str]:
        """libpq environment for the client tools: this server, or ``port`` on loopback."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(
            PGHOST=self.host,
            PGPORT=str(port or self.port),
            PGUSER=self.user,
            PGDATABASE=self.database,
            PGCONNECT_TIMEOUT="5",
            PGAPPNAME="podpatterns-tests",
        )
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        return env

    def admin_env(self) -> dict[str, str]:
        """libpq environment of a superuser session that needs no password: the unix
        socket of a TLS-only server, TCP otherwise."""
        env = self.env()
        if self.socket_dir is not None:
            env.update(PGHOST=str(self.socket_dir), PGUSER="postgres")
            env.pop("PGPASSWORD", None)
        return env

    def query(self, sql: str, connect_timeout: int = 5) -> str | None:
        """The unaligned result of ``sql`` in a new superuser session, or None when it fails."""
        done = subprocess.run(
            [self.tool("psql"), "-X", "-A", "-t", "-c", sql],
            env={**self.admin_env(), "PGCONNECT_TIMEOUT": str(connect_timeout)},
            capture_output=True,
            timeout=10,
            check=False,
        )
        return done.stdout.decode().strip() if done.returncode == 0 else None


PGBENCH_TIMEOUT = 120.0  # seconds for one pgbench run of a test, on a loaded machine


def pgbench_connect_each(
    server: PostgresServer,
    port: int,
    tmp: Path,
    *,
    clients: int = 2,
    transactions: int = 20,
    script: str = "select 1;\n",
    **env: str,
) -> str:
    """Run ``pgbench -n -C`` (a new connection for every transaction) in plaintext
    against ``port`` on loopback: ``clients`` clients, ``transactions`` runs of
    ``script`` each. pgbench also opens one connection first to look at the server.

    Args:
        server: the server whose tools and libpq environment (user, database, password)
            are used.
        port: the port pgbench connects to (the ambassador's listener).
        tmp: a directory for the script file.
        clients: pgbench ``-c``.
        transactions: pgbench ``-t``, per client.
        script: the SQL of one transaction.
        **env: libpq variables over the server's (``PGUSER``, ``PGPASSWORD``...).

    Returns:
        pgbench's stdout, after asserting that it exited 0 with no failed transaction.
    """
    pgbench = need(server.tool("pgbench"))
    path = tmp / "pgbench-connect-each.sql"
    path.write_text(script)
    environ = server.env(port)
    environ.update(PGSSLMODE="disable", **env)
    argv = [pgbench, "-n", "-C", "-c", str(clients), "-t", str(transactions), "-f", str(path)]
    done = subprocess.run(
        argv, env=environ, capture_output=True, text=True, timeout=PGBENCH_TIMEOUT, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "number of failed transactions: 0" in done.stdout, done.stdout
    return done.stdout


def _as_postgres() -> list[str]:
    """The command prefix that drops root: postgres refuses to run as root."""
    if os.geteuid() != 0:
        return []
    return [need("runuser"), "-u", "postgres", "--"]


def _postmaster_pid(data: Path, proc: subprocess.Popen[bytes]) -> int | None:
    """The PID of the postmaster we started, or None.

    That is ``proc`` itself, or runuser's child as named in postmaster.pid; the parent
    is checked, so no other process is ever signalled.
    """
    try:
        pid = int((data / "postmaster.pid").read_text().split()[0])
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid == proc.pid or ppid == proc.pid else None


#: The role ``postgres_tls_trust`` lets in over TLS without a password (--pg-pool tests).
POOL_USER = "pooler"

#: The name in the TLS-only servers' certificates (not the address they listen on).
PG_SERVER_NAME = "db.test"


@dataclass(frozen=True)
class PostgresTLS:
    """What a TLS-only server is given: its certificate chain and key (PEM), and the
    login role to create with a SCRAM password."""

    cert_chain: bytes
    key: bytes
    user: str = "app"
    password: str = "app-secret-pw"


def pg_tls(ca: trustme.CA) -> PostgresTLS:
    """A certificate for :data:`PG_SERVER_NAME` issued by ``ca`` through an intermediate,
    so that the server sends a chain (leaf and intermediate) and a client is given the
    root only."""
    leaf = ca.create_child_ca().issue_cert(PG_SERVER_NAME)
    return PostgresTLS(
        cert_chain=b"".join(blob.bytes() for blob in leaf.cert_chain_pems),
        key=leaf.private_key_pem.bytes(),
    )


#: Roles that tests may create on a TLS-only server to authenticate with md5 or a
#: cleartext password instead of SCRAM (tests/test_ambassador_pg_auth.py).
PG_MD5_ROLE = "app_md5"
PG_CLEARTEXT_ROLE = "app_cleartext"


def pg_route_args(ca: Path, *extra: str) -> list[str]:
    """The ambassador flags of a postgres route to a TLS-only server, verified
    (verify-full) with ``ca`` for :data:`PG_SERVER_NAME`, then ``extra``."""
    return [
        "--protocol",
        "postgres",
        "--upstream-tls",
        "--tls-ca",
        str(ca),
        "--tls-server-name",
        PG_SERVER_NAME,
        *extra,
    ]


# hostssl only: TCP without TLS matches no line, so the server itself refuses it
# ("no pg_hba.conf entry ... no encryption"); the unix socket is for the fixtures.
_TLS_HBA = f"""\
local all all trust
hostssl all {PG_MD5_ROLE} 127.0.0.1/32 md5
hostssl all {PG_CLEARTEXT_ROLE} 127.0.0.1/32 password
hostssl all all 127.0.0.1/32 scram-sha-256
hostssl all all ::1/128 scram-sha-256
"""


@contextlib.contextmanager
def run_postgres(
    tls: PostgresTLS | None = None,
    trusted: tuple[str, ...] = (),
    settings: tuple[str, ...] = (),
) -> Iterator[PostgresServer]:
    """Start a throw-away PostgreSQL 15 cluster; stop it and delete it on exit.

    With ``tls``: ``ssl = on`` with that certificate, ``hostssl``-only pg_hba with
    SCRAM (``password_encryption = scram-sha-256``) and ``tls.user`` created with
    ``tls.password``. ``trusted`` login roles are created too, and let in over TLS
    without a password (``hostssl ... trust``: the pooling tests' upstream).
    ``settings``: more ``name=value`` server settings (bench/pgpool.py's
    ``max_connections``).
    """
    postgres = need(PG_BIN / "postgres")
    initdb = need(PG_BIN / "initdb")
    need(PG_BIN / "psql")
    prefix = _as_postgres()
    # Not pytest's tmp_path: that lives under a 0700 root directory the postgres user
    # cannot traverse.
    tmp = Path(tempfile.mkdtemp(prefix="podpatterns-pg-"))
    try:
        if prefix:
            shutil.chown(tmp, "postgres", "postgres")
        data = tmp / "data"
        done = subprocess.run(
            [
                *prefix,
                initdb,
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
            capture_output=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb exited {done.returncode}:\n{done.stderr.decode()}")
        flags: list[str] = [arg for setting in settings for arg in ("-c", setting)]
        if tls is not None:
            (data / "server.crt").write_bytes(tls.cert_chain)
            (data / "server.key").write_bytes(tls.key)
            (data / "server.key").chmod(0o600)  # postgres refuses a key others can read
            trust = "".join(f"hostssl all {user} 127.0.0.1/32 trust\n" for user in trusted)
            (data / "pg_hba.conf").write_text(_TLS_HBA.replace("hostssl", trust + "hostssl", 1))
            if prefix:
                for name in ("server.crt", "server.key", "pg_hba.conf"):
                    shutil.chown(data / name, "postgres", "postgres")
            for setting in (
                "ssl=on",
                "ssl_cert_file=server.crt",
                "ssl_key_file=server.key",
                "password_encryption=scram-sha-256",
            ):
                flags += ["-c", setting]
        admin = PostgresServer(0, PG_BIN, socket_dir=tmp if tls is not None else None)

        def start(port: int, log: Path) -> subprocess.Popen[bytes]:
            with log.open("wb") as out:
                return subprocess.Popen(
                    [
                        *prefix,
                        postgres,
                        "-D",
                        str(data),
                        "-c",
                        "listen_addresses=127.0.0.1",
                        "-c",
                        f"port={port}",
                        "-c",
                        f"unix_socket_directories={tmp}",
                        "-c",
                        "fsync=off",
                        "-c",
                        "synchronous_commit=off",
                        "-c",
                        "full_page_writes=off",
                        *flags,
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )

        def ready(port: int, proc: subprocess.Popen[bytes]) -> bool:
            # ours, not another server that holds the port while ours fails to bind
            found = dataclasses.replace(admin, port=port).query(
                "show data_directory", connect_timeout=1
            )
            return found == str(data)

        def stop(proc: subprocess.Popen[bytes]) -> None:
            # SIGINT is the fast shutdown: roll back open sessions, then exit.
            _stop(proc, signal.SIGINT, _postmaster_pid(data, proc))

        with serve_on_free_port("postgres", start, ready, stop, tmp) as port:
            server = dataclasses.replace(admin, port=port)
            if tls is not None:
                role = f"create role {tls.user} login password '{tls.password}'"
                if server.query(role) is None:
                    raise RuntimeError(f"postgres: cannot create role {tls.user}")
                for user in trusted:
                    create = f"create role {user} login; grant create on schema public to {user}"
                    if server.query(create) is None:
                        raise RuntimeError(f"postgres: cannot create role {user}")
                server = dataclasses.replace(server, user=tls.user, password=tls.password)
            yield server
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class ReplicatedPostgres:
    """A primary and a streaming-replication standby (TLS-only, as :func:`run_postgres`
    with ``tls``), for role changes: :meth:`promote` the standby, :meth:`stop_primary`."""

    primary: PostgresServer
    standby: PostgresServer
    primary_data: Path
    standby_data: Path

    def _pg_ctl(self, *args: str) -> None:
        done = subprocess.run(
            [*_as_postgres(), need(PG_BIN / "pg_ctl"), *args],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl {args[0]} exited {done.returncode}:\n{done.stderr!r}")

    def promote(self) -> None:
        """``pg_ctl promote`` the standby and wait until it is a primary."""
        self._pg_ctl("promote", "-D", str(self.standby_data), "-w", "-t", "30")

    def stop_primary(self) -> None:
        """Stop the primary (fast shutdown: its sessions get 57P01) and wait for it."""
        self._pg_ctl("stop", "-D", str(self.primary_data), "-m", "fast", "-w", "-t", "30")


@contextlib.contextmanager
def run_replicated_postgres(tls: PostgresTLS) -> Iterator[ReplicatedPostgres]:
    """A primary (initdb) and its standby (``pg_basebackup -R``: ``standby.signal`` and
    ``primary_conninfo`` over the unix socket), both PostgreSQL 15 with ``ssl = on`` and
    the TLS-only pg_hba, ``tls.user`` created on the primary (replicated). Stopped and
    deleted on exit."""
    postgres = need(PG_BIN / "postgres")
    initdb = need(PG_BIN / "initdb")
    basebackup = need(PG_BIN / "pg_basebackup")
    prefix = _as_postgres()
    tmp = Path(tempfile.mkdtemp(prefix="podpatterns-pgrepl-"))
    try:
        if prefix:
            shutil.chown(tmp, "postgres", "postgres")
        primary_data, standby_data = tmp / "primary", tmp / "standby"
        args = ["-D", str(primary_data), "-A", "trust", "-U", "postgres", "-E", "UTF8"]
        done = subprocess.run(
            [*prefix, initdb, *args, "--locale=C", "--no-sync", "--no-instructions"],
            capture_output=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"initdb exited {done.returncode}:\n{done.stderr.decode()}")
        (primary_data / "server.crt").write_bytes(tls.cert_chain)
        (primary_data / "server.key").write_bytes(tls.key)
        (primary_data / "server.key").chmod(0o600)
        (primary_data / "pg_hba.conf").write_text(_TLS_HBA + "local replication all trust\n")
        if prefix:
            for name in ("server.crt", "server.key", "pg_hba.conf"):
                shutil.chown(primary_data / name, "postgres", "postgres")
        settings = [
            "ssl=on",
            "ssl_cert_file=server.crt",
            "ssl_key_file=server.key",
            "password_encryption=scram-sha-256",
            "listen_addresses=127.0.0.1",
            f"unix_socket_directories={tmp}",
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=on",
        ]

        def starter(data: Path) -> Starter:
            def start(port: int, log: Path) -> subprocess.Popen[bytes]:
                flags = [arg for setting in settings for arg in ("-c", setting)]
                with log.open("wb") as out:
                    return subprocess.Popen(
                        [*prefix, postgres, "-D", str(data), "-c", f"port={port}", *flags],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )

            return start

        admin = PostgresServer(0, PG_BIN, socket_dir=tmp)

        def ready_of(data: Path) -> Callable[[int, subprocess.Popen[bytes]], bool]:
            def ready(port: int, proc: subprocess.Popen[bytes]) -> bool:
                found = dataclasses.replace(admin, port=port).query(
                    "show data_directory", connect_timeout=1
                )
                return found == str(data)

            return ready

        def stopper(data: Path) -> Callable[[subprocess.Popen[bytes]], None]:
            return lambda proc: _stop(proc, signal.SIGINT, _postmaster_pid(data, proc))

        primary_cm = serve_on_free_port(
            "primary", starter(primary_data), ready_of(primary_data), stopper(primary_data), tmp
        )
        with primary_cm as primary_port:
            primary = dataclasses.replace(admin, port=primary_port)
            role = f"create role {tls.user} login password '{tls.password}'"
            if primary.query(role) is None:
                raise RuntimeError(f"postgres: cannot create role {tls.user}")
            done = subprocess.run(
                [
                    *prefix,
                    basebackup,
                    "-D",
                    str(standby_data),
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "-h",
                    str(tmp),
                    "-p",
                    str(primary_port),
                    "-U",
                    "postgres",
                ],
                capture_output=True,
                timeout=120,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(f"pg_basebackup exited {done.returncode}:\n{done.stderr!r}")
            standby_cm = serve_on_free_port(
                "standby",
                starter(standby_data),
                ready_of(standby_data),
                stopper(standby_data),
                tmp,
            )
            with standby_cm as standby_port:
                yield ReplicatedPostgres(
                    dataclasses.replace(primary, user=tls.user, password=tls.password),
                    dataclasses.replace(
                        admin, port=standby_port, user=tls.user, password=tls.password
                    ),
                    primary_data,
                    standby_data,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- Redis ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisServer:
    """A running redis-server without persistence on 127.0.0.1."""

    port: int
    host: str = LOOPBACK

    def process_id(self) -> int | None:
        """The ``process_id`` that ``INFO server`` reports on a new connection, or None."""
        try:
            with socket.create_connection((self.host, self.port), timeout=2) as sock:
                sock.sendall(b"INFO server\r\n")
                reply = b""
                while b"\r\n" not in reply or len(reply) < int(reply[1:].split(b"\r\n")[0]):
                    chunk = sock.recv(65536)
                    if not chunk:
                        return None
                    reply += chunk
        except (OSError, ValueError):
            return None
        found = re.search(rb"^process_id:(\d+)", reply, re.M)
        return int(found.group(1)) if found else None


@contextlib.contextmanager
def run_redis(workdir: Path) -> Iterator[RedisServer]:
    """Start redis-server (no RDB, no AOF) with its files in ``workdir``; stop it on exit."""
    binary = need("redis-server")

    def start(port: int, log: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                LOOPBACK,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--logfile",
                str(log),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def ready(port: int, proc: subprocess.Popen[bytes]) -> bool:
        # ours, not another redis that holds the port while ours fails to bind
        return RedisServer(port).process_id() == proc.pid

    with serve_on_free_port("redis-server", start, ready, _stop, workdir) as port:
        yield RedisServer(port)
