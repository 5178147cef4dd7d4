"""Credentials the app never holds (issue 14): the ambassador authenticates to the server.

The server is the real PostgreSQL 15 of tests/peer_fixtures.py (``ssl = on``, TLS-only
pg_hba with SCRAM, plus an md5 and a cleartext ``password`` line for two roles the tests
create). The apps (psql, psycopg 3, asyncpg) connect in plaintext to the ambassador with
NO password; the ambassador takes the password from ``--pg-password-file`` (a Secret
volume laid out as the kubelet does, ``..data`` swap included) or from the token that
``--pg-password-command`` prints (a script that counts its runs).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import asyncpg
import psycopg
import pytest
import trustme
from cryptography import x509

from podpatterns.ambassador import pgauth
from podpatterns.ambassador.pgauth import (
    PasswordCommand,
    PasswordFile,
    SecretError,
    ServerError,
    channel_binding_data,
    parse_token_output,
    startup_message,
)
from podpatterns.ambassador.postgres import PostgresHandler
from podpatterns.ambassador.upstreams import Endpoint
from podpatterns.options import HostPort
from tests.ambassador_process import AmbassadorProcess, run_ambassador
from tests.peers import (
    PG_CLEARTEXT_ROLE,
    PG_MD5_ROLE,
    PG_SERVER_NAME,
    PostgresServer,
    pg_route_args,
)
from tests.proc import run

pytest_plugins = ("tests.peer_fixtures",)

CLIENT_TIMEOUT = 60.0
SSL_OF_SESSION = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
WHO = "select current_user"


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def ca_file(pg_ca_file: Path) -> Path:
    """The servers' root CA as a PEM file, for --tls-ca."""
    return pg_ca_file


def tls_args(ca: Path, *extra: str) -> list[str]:
    """The ambassador flags of a verified postgres route."""
    return pg_route_args(ca, *extra)


def upstream(server: PostgresServer) -> str:
    return f"{server.host}:{server.port}"


def make_role(server: PostgresServer, name: str, password: str, encryption: str = "") -> None:
    """(Re)create a login role; ``encryption`` md5 stores an md5 hash instead of SCRAM."""
    sql = f"drop role if exists {name}; "
    if encryption:
        sql += f"set password_encryption = '{encryption}'; "
    sql += f"create role {name} login password '{password}'"
    assert server.query(sql) is not None, f"cannot create role {name}"


def psql(
    server: PostgresServer, port: int, user: str, *sql: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """psql -c SQL as ``user`` through the ambassador, with no password at all."""
    penv = server.env(port)
    penv.pop("PGPASSWORD", None)
    penv.update(PGUSER=user, PGSSLMODE="disable", **env)
    commands = [arg for command in sql for arg in ("-c", command)]
    return subprocess.run(
        [server.tool("psql"), "-X", "-A", "-t", "-w", "-v", "ON_ERROR_STOP=1", *commands],
        env=penv,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
        check=False,
    )


def psycopg_connect(port: int, user: str, password: str | None = None) -> psycopg.Connection:
    """A psycopg connection through the ambassador (no password unless given)."""
    conninfo = f"host=127.0.0.1 port={port} user={user} dbname=postgres sslmode=disable"
    if password is not None:
        conninfo += f" password={password}"
    return psycopg.connect(conninfo, connect_timeout=10)


async def asyncpg_value(port: int, user: str, sql: str) -> object:
    conn = await asyncpg.connect(
        host="127.0.0.1", port=port, user=user, database="postgres", ssl=False, timeout=20
    )
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


def asyncpg_sqlstate(port: int, user: str) -> str:
    """The SQLSTATE asyncpg reports for a connection through the ambassador, or ``ok``."""

    async def go() -> str:
        try:
            await asyncpg_value(port, user, "select 1")
        except asyncpg.PostgresError as exc:
            return str(exc.sqlstate)
        return "ok"

    return asyncio.run(go())


def secret_file(tmp: Path, text: str) -> Path:
    path = tmp / "password"
    path.write_text(text + "\n")
    return path


def status_text(amb: AmbassadorProcess) -> str:
    with urllib.request.urlopen(f"http://{amb.admin}/status", timeout=5) as resp:
        return str(resp.read().decode())


def assert_not_leaked(amb: AmbassadorProcess, *secrets: str) -> None:
    """No secret in the ambassador's log, its metrics or its /status."""
    texts = [amb.log_text(100000), status_text(amb)]
    with urllib.request.urlopen(f"http://{amb.admin}/metrics", timeout=5) as resp:
        texts.append(resp.read().decode())
    for text in texts:
        for secret in secrets:
            assert secret not in text


# -- channel binding, token parsing, the token cache ---------------------------------------


@pytest.mark.parametrize("key_type", ["ECDSA", "RSA"])
def test_channel_binding_hashes_the_certificate_with_its_signature_hash(key_type: str) -> None:
    """tls-server-end-point data is the certificate's hash with its signature's hash."""
    ca = trustme.CA(key_type=getattr(trustme.KeyType, key_type))
    der = ssl.PEM_cert_to_DER_cert(ca.issue_cert("db.test").cert_chain_pems[0].bytes().decode())
    algo = x509.load_der_x509_certificate(der).signature_hash_algorithm
    assert algo is not None
    expected = hashlib.new(algo.name, der).digest()
    assert channel_binding_data(der) == expected


def test_token_output_plain_and_json() -> None:
    """A plain token has no expiry; JSON gives token and expiry (RFC 3339 or seconds)."""
    assert parse_token_output(b"abc\n", 100.0) == ("abc", None)
    token, expiry = parse_token_output(
        json.dumps({"token": "t", "expiry": "2030-01-01T00:00:00Z"}).encode(), 0.0
    )
    assert (token, expiry) == ("t", 1893456000.0)
    assert parse_token_output(b'{"access_token": "t", "expires_in": 60}', 100.0) == ("t", 160.0)
    with pytest.raises(SecretError):
        parse_token_output(b'{"expiry": 1}', 0.0)
    with pytest.raises(SecretError):
        parse_token_output(b"  \n", 0.0)


def counting_command(tmp: Path, token: str, expires_in: float | None = None) -> tuple[str, Path]:
    """A command that prints ``token`` (JSON with expires_in when given) and appends a
    line to a file per run; (command line, that file)."""
    runs = tmp / "runs"
    script = tmp / "token.py"
    out = json.dumps({"token": token, "expires_in": expires_in}) if expires_in else token
    script.write_text(
        "import sys\n"
        f"with open({str(runs)!r}, 'a') as f:\n"
        "    f.write('run\\n')\n"
        f"sys.stdout.write({out!r})\n"
    )
    return f"{sys.executable} {script}", runs


def test_password_command_runs_once_for_concurrent_gets_and_refreshes_before_expiry(
    tmp_path: Path,
) -> None:
    """20 concurrent gets run the command once; it runs again a margin before expiry,
    never more than once a minute while the token is valid, and at once when expired."""
    token = "t" * 3000
    command, runs = counting_command(tmp_path, token, expires_in=600)
    now = [1000.0]
    source = PasswordCommand(command, clock=lambda: now[0])

    async def scenario() -> None:
        got = await asyncio.gather(*(source.get() for _ in range(20)))
        assert set(got) == {token} and source.runs == 1
        now[0] += 449  # refresh at 600 - min(300, 600 / 4) = 450 s
        await source.get()
        assert source.runs == 1
        now[0] += 2
        await asyncio.gather(*(source.get() for _ in range(5)))
        assert source.runs == 2

    asyncio.run(scenario())
    assert runs.read_text().count("run") == 2

    (tmp_path / "short").mkdir()
    short, _ = counting_command(tmp_path / "short", "s", 30)
    now[0] = 5000.0
    source = PasswordCommand(short, clock=lambda: now[0])

    async def rate_limited() -> None:
        await source.get()
        now[0] += 23  # due (30 - 7.5), but the last run was 23 s ago: the token is kept
        await source.get()
        assert source.runs == 1
        now[0] += 8  # expired: a run is needed, whatever the rate
        await source.get()
        assert source.runs == 2

    asyncio.run(rate_limited())


def test_password_command_failure_keeps_a_valid_token_and_names_no_secret(tmp_path: Path) -> None:
    """A failing refresh keeps the valid token; with none, the error names the command,
    and the command is not run again per connection but after a pause."""
    flag = tmp_path / "fail"
    script = tmp_path / "tok.py"
    script.write_text(
        "import os, sys\n"
        f"if os.path.exists({str(flag)!r}):\n"
        "    sys.exit(3)\n"
        "print('sekrit-token')\n"
    )
    now = [0.0]
    source = PasswordCommand(f"{sys.executable} {script}", ttl=100, clock=lambda: now[0])

    async def scenario() -> None:
        assert await source.get() == "sekrit-token"
        flag.write_text("")
        now[0] += 80  # past the refresh point (75), more than a minute after the run
        assert await source.get() == "sekrit-token"
        assert (source.runs, source.failures) == (2, 1)
        now[0] += 30  # expired
        with pytest.raises(SecretError) as info:
            await source.get()
        assert "exited 3" in str(info.value) and "sekrit" not in str(info.value)
        assert source.runs == 3
        now[0] += 1  # failed just now: no run per connection, the same error
        for _ in range(5):
            with pytest.raises(SecretError):
                await source.get()
        assert source.runs == 3
        flag.unlink()
        now[0] += 5  # after the pause: run again
        assert await source.get() == "sekrit-token"
        assert source.runs == 4

    asyncio.run(scenario())


def test_password_file_rereads_after_a_kubelet_swap(tmp_path: Path) -> None:
    """A ``..data`` swap is seen by the next get and counted; an unchanged file is not
    re-read."""
    volume = kubelet_volume(tmp_path, "first")
    source = PasswordFile(volume / "password")
    assert source.load() == "first"

    async def scenario() -> None:
        assert await source.get() == "first"
        kubelet_swap(volume, "second")
        assert await source.get() == "second"
        assert await source.get() == "second"
        assert source.rotations == 1

    asyncio.run(scenario())


def kubelet_volume(root: Path, password: str) -> Path:
    """A Secret volume as the kubelet lays it out: ``password -> ..data/password``,
    ``..data -> ..<timestamp>``."""
    volume = root / "secret"
    volume.mkdir()
    stamp = volume / "..2026_01_01_00_00_00.0"
    stamp.mkdir()
    (stamp / "password").write_text(password)
    (volume / "..data").symlink_to(stamp.name)
    (volume / "password").symlink_to("..data/password")
    return volume


def kubelet_swap(volume: Path, password: str) -> None:
    """The kubelet's atomic update: a new timestamped directory, ``..data_tmp`` pointing
    to it, renamed over ``..data``, the old directory removed."""
    old = os.readlink(volume / "..data")
    stamp = volume / f"..2026_{time.monotonic_ns()}"
    stamp.mkdir()
    (stamp / "password").write_text(password)
    (volume / "..data_tmp").symlink_to(stamp.name)
    os.rename(volume / "..data_tmp", volume / "..data")
    (volume / old / "password").unlink()
    (volume / old).rmdir()


# -- config checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["--pg-password-file", "{file}", "--pg-password-command", "echo x"],
            "--pg-password-file and --pg-password-command: give one of them",
        ),
        (["--pg-password-file", "{missing}"], "--pg-password-file: cannot read"),
        (
            ["--pg-password-file", "{file}", "--pg-auth-methods", "password"],
            "--pg-auth-methods: 'password' (cleartext) needs verified TLS",
        ),
        (
            ["--pg-password-file", "{file}", "--pg-client-auth", "password-file"],
            "--pg-client-password-file: give it exactly with --pg-client-auth password-file",
        ),
        (["--pg-auth-methods", "md5"], "--pg-auth-methods: only applies with --pg-password"),
    ],
)
def test_bad_credential_config_is_one_line_exit_2(
    tmp_path: Path, extra: list[str], expected: str
) -> None:
    """Contradictory or unreadable credential settings: exit 2 with one error line
    naming the option, no traceback, no secret."""
    file = secret_file(tmp_path, "do-not-show-me")
    assert_refused(
        [a.format(file=file, missing=tmp_path / "nope") for a in extra], expected, "do-not-show-me"
    )


def assert_refused(args: list[str], expected: str, secret: str) -> None:
    """A postgres route with ``args`` exits 2 with one error line containing
    ``expected``, no traceback, and no ``secret``."""
    done = run(
        "ambassador",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:5432",
        "--protocol",
        "postgres",
        "--pg-sslmode",
        "require",
        "--upstream-tls",
        "--admin",
        "off",
        *args,
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("podpatterns") and f"error: {expected}" in last, done.stderr
    assert "Traceback" not in done.stderr
    assert secret not in done.stderr


# -- against the real server --------------------------------------------------------------

peer = pytest.mark.peer


@peer
def test_apps_connect_with_no_password_scram_plus_over_tls(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """psql, psycopg and asyncpg with no password get verified-TLS sessions; the
    ambassador used SCRAM-SHA-256-PLUS; the password is nowhere in logs or admin."""
    assert postgres_tls.password is not None
    file = secret_file(tmp_path, postgres_tls.password)
    with run_ambassador(
        [upstream(postgres_tls)], *tls_args(ca_file, "--pg-password-file", str(file))
    ) as amb:
        port = amb.listen.port
        done = psql(postgres_tls, port, "app", SSL_OF_SESSION, WHO)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["t", "app"]
        with psycopg_connect(port, "app") as conn:
            assert conn.execute(WHO).fetchone() == ("app",)
            assert conn.info.backend_pid > 0
        assert asyncio.run(asyncpg_value(port, "app", SSL_OF_SESSION)) is True
        amb.wait_idle()
        assert (
            amb.metric(
                "podpatterns_ambassador_pg_upstream_auth_total",
                method="scram-sha-256-plus",
                result="ok",
            )
            == 3
        )
        assert_not_leaked(amb, postgres_tls.password)


@peer
def test_authenticate_without_a_client(postgres_tls: PostgresServer, ca_file: Path) -> None:
    """The handler opens an authenticated server connection with no app attached (a
    pool's, a health check's): ParameterStatus, BackendKeyData and ReadyForQuery."""
    assert postgres_tls.password is not None
    ctx = ssl.create_default_context(cafile=str(ca_file))
    creds = pgauth.Credentials(_Static(postgres_tls.password), {"scram-sha-256"})
    handler = PostgresHandler(
        lambda: ctx, sslmode="verify-full", server_name=PG_SERVER_NAME, credentials=creds
    )
    endpoint = Endpoint(HostPort(postgres_tls.host, postgres_tls.port))

    async def go() -> pgauth.ServerSession:
        sock = socket.create_connection((postgres_tls.host, postgres_tls.port), timeout=5)
        sock.setblocking(False)
        stream, tls, session = await handler.open_server(
            sock, endpoint, startup_message("app", "postgres", application_name="pool")
        )
        assert tls is not None
        try:
            query = b"select current_user\0"
            await stream.write(b"Q" + (len(query) + 4).to_bytes(4, "big") + query)
            reply = b""
            async with asyncio.timeout(CLIENT_TIMEOUT):
                while not reply.endswith(b"Z\x00\x00\x00\x05I"):
                    more = await stream.read()
                    assert more, reply
                    reply += more
            assert b"app" in reply
        finally:
            tls.transport.abort()
            await asyncio.sleep(0)  # let the transport close its socket
        return session

    session = asyncio.run(go())
    assert session.method == "scram-sha-256-plus"
    assert session.parameters["server_version"].startswith("15")
    assert session.parameters["application_name"] == "pool"
    assert session.key is not None and len(session.key) == 8
    assert session.messages.endswith(b"Z\x00\x00\x00\x05I")
    assert creds.auths[("scram-sha-256-plus", "ok")] == 1


class _Static:
    """A fixed secret (a SecretSource)."""

    def __init__(self, value: str) -> None:
        self.value = value

    async def get(self) -> str:
        return self.value

    def invalidate(self) -> None:
        pass


@peer
def test_md5_role_over_verified_tls_and_refused_over_unverified(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """An md5 role authenticates over verified TLS by default; over --pg-sslmode
    require md5 is refused (FATAL 28000) unless --pg-auth-methods opts in."""
    make_role(postgres_tls, PG_MD5_ROLE, "md5-role-pw", encryption="md5")
    stored = postgres_tls.query(f"select rolpassword from pg_authid where rolname='{PG_MD5_ROLE}'")
    assert stored is not None and stored.startswith("md5")
    file = secret_file(tmp_path, "md5-role-pw")
    with run_ambassador(
        [upstream(postgres_tls)], *tls_args(ca_file, "--pg-password-file", str(file))
    ) as amb:
        done = psql(postgres_tls, amb.listen.port, PG_MD5_ROLE, WHO)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == PG_MD5_ROLE
        assert amb.metric("podpatterns_ambassador_pg_upstream_auth_total", method="md5") == 1
    unverified = [
        "--protocol",
        "postgres",
        "--upstream-tls",
        "--pg-sslmode",
        "require",
        "--pg-password-file",
        str(file),
    ]
    with run_ambassador([upstream(postgres_tls)], *unverified) as amb:
        done = psql(postgres_tls, amb.listen.port, PG_MD5_ROLE, WHO)
        assert done.returncode == 2
        assert "asks for md5 authentication" in done.stderr, done.stderr
        assert asyncpg_sqlstate(amb.listen.port, PG_MD5_ROLE) == "28000"
    with run_ambassador(
        [upstream(postgres_tls)], *unverified, "--pg-auth-methods", "scram-sha-256,md5"
    ) as amb:
        amb.wait_event("pg_md5_without_verified_tls")
        done = psql(postgres_tls, amb.listen.port, PG_MD5_ROLE, WHO)
        assert done.returncode == 0, done.stderr


@peer
def test_cleartext_only_when_listed_and_verified(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """A server asking for a cleartext password gets it only with --pg-auth-methods
    password (over verified TLS); otherwise the app sees FATAL 28000."""
    make_role(postgres_tls, PG_CLEARTEXT_ROLE, "clear-pw")
    file = secret_file(tmp_path, "clear-pw")
    args = tls_args(ca_file, "--pg-password-file", str(file))
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        done = psql(postgres_tls, amb.listen.port, PG_CLEARTEXT_ROLE, WHO)
        assert done.returncode == 2
        assert "asks for cleartext password authentication" in done.stderr, done.stderr
    with run_ambassador(
        [upstream(postgres_tls)], *args, "--pg-auth-methods", "scram-sha-256,password"
    ) as amb:
        done = psql(postgres_tls, amb.listen.port, PG_CLEARTEXT_ROLE, WHO)
        assert done.returncode == 0, done.stderr
        assert amb.metric("podpatterns_ambassador_pg_upstream_auth_total", method="password") == 1


@peer
def test_wrong_password_reaches_the_app_as_the_servers_28p01(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """A wrong secret: psql, psycopg and asyncpg see the server's own FATAL 28P01."""
    file = secret_file(tmp_path, "not-the-password")
    with run_ambassador(
        [upstream(postgres_tls)], *tls_args(ca_file, "--pg-password-file", str(file))
    ) as amb:
        done = psql(postgres_tls, amb.listen.port, "app", "select 1")
        assert done.returncode == 2
        assert 'FATAL:  password authentication failed for user "app"' in done.stderr
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg_connect(amb.listen.port, "app")
        assert 'password authentication failed for user "app"' in str(info.value)
        assert asyncpg_sqlstate(amb.listen.port, "app") == "28P01"
        assert amb.metric("podpatterns_ambassador_pg_upstream_auth_total", result="rejected") == 3
        assert_not_leaked(amb, "not-the-password")


@peer
def test_password_file_rotation_by_kubelet_swap_under_load(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """The role's password changes and the Secret volume's ``..data`` is swapped while
    sessions run queries: they go on, new connections use the new password, and the
    rotation is counted once."""
    make_role(postgres_tls, "app_rot", "rot-pw-1")
    volume = kubelet_volume(tmp_path, "rot-pw-1")
    args = tls_args(ca_file, "--pg-password-file", str(volume / "password"))
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        port = amb.listen.port
        conns = [psycopg_connect(port, "app_rot") for _ in range(4)]
        stop = threading.Event()
        errors: list[BaseException] = []
        counts = [0] * len(conns)

        def load(i: int) -> None:
            deadline = time.monotonic() + 30
            try:
                while not stop.is_set() and time.monotonic() < deadline and counts[i] < 100000:
                    conns[i].execute("select 1").fetchone()
                    counts[i] += 1
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=load, args=(i,)) for i in range(len(conns))]
        for t in threads:
            t.start()
        try:
            assert postgres_tls.query("alter role app_rot password 'rot-pw-2'") is not None
            kubelet_swap(volume, "rot-pw-2")
            for _ in range(5):
                done = psql(postgres_tls, port, "app_rot", WHO)
                assert done.returncode == 0, done.stderr
            assert asyncio.run(asyncpg_value(port, "app_rot", WHO)) == "app_rot"
        finally:
            stop.set()
            for t in threads:
                t.join(CLIENT_TIMEOUT)
        assert not errors, errors
        assert all(n > 0 for n in counts)
        for conn in conns:
            assert conn.execute(WHO).fetchone() == ("app_rot",)
            conn.close()
        assert amb.metric("podpatterns_ambassador_pg_password_rotations_total") == 1
        amb.wait_event("pg_password_rotated")
        assert_not_leaked(amb, "rot-pw-1", "rot-pw-2")


@peer
def test_token_command_runs_once_for_concurrent_connections(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """12 apps connecting at once with a 3 KiB token: the command ran once."""
    token = "tok-" + "x" * 3068
    make_role(postgres_tls, "app_token", token)
    command, runs = counting_command(tmp_path, token, expires_in=3600)
    args = tls_args(ca_file, "--pg-password-command", command)
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        port = amb.listen.port

        async def many() -> list[object]:
            return await asyncio.gather(*(asyncpg_value(port, "app_token", WHO) for _ in range(12)))

        assert asyncio.run(many()) == ["app_token"] * 12
        assert runs.read_text().count("run") == 1
        assert amb.metric("podpatterns_ambassador_pg_password_command_runs_total") == 1
        amb.wait_event("pg_password_command_refreshed", lambda e: e.get("size") == len(token))
        assert_not_leaked(amb, token)
        # a command line may carry a credential: /status shows it redacted
        status = json.loads(status_text(amb))
        config = status["components"]["ambassador"]["routes"][0]["config"]
        assert config["pg_password_command"] == "<redacted>"
        assert str(runs.parent) not in status_text(amb)


@peer
def test_client_auth_password_file(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """--pg-client-auth password-file: the app's own password is required; a wrong one
    gets FATAL 28P01 from the ambassador, counted; the right one a session."""
    assert postgres_tls.password is not None
    server_pw = secret_file(tmp_path, postgres_tls.password)
    (tmp_path / "client").mkdir()
    client_pw = secret_file(tmp_path / "client", "app-side-pw")
    args = tls_args(
        ca_file,
        "--pg-password-file",
        str(server_pw),
        "--pg-client-auth",
        "password-file",
        "--pg-client-password-file",
        str(client_pw),
    )
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        port = amb.listen.port
        done = psql(postgres_tls, port, "app", WHO, PGPASSWORD="app-side-pw")
        assert done.returncode == 0, done.stderr
        done = psql(postgres_tls, port, "app", WHO, PGPASSWORD="wrong")
        assert done.returncode == 2
        assert 'FATAL:  password authentication failed for user "app"' in done.stderr
        done = psql(postgres_tls, port, "app", WHO)
        assert done.returncode == 2 and "no password supplied" in done.stderr, done.stderr
        with psycopg_connect(port, "app", password="app-side-pw") as conn:
            assert conn.execute(WHO).fetchone() == ("app",)
        assert amb.metric("podpatterns_ambassador_pg_client_auth_failures_total") == 1
        assert_not_leaked(amb, postgres_tls.password, "app-side-pw")


@peer
def test_command_failure_is_an_error_response(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """A token command that fails: the app gets FATAL 08001 naming the command."""
    args = tls_args(ca_file, "--pg-password-command", f"{sys.executable} -c 'raise SystemExit(4)'")
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        done = psql(postgres_tls, amb.listen.port, "app", "select 1")
        assert done.returncode == 2
        assert "no password for" in done.stderr and "exited 4" in done.stderr, done.stderr
        assert asyncpg_sqlstate(amb.listen.port, "app") == "08001"


def test_server_error_keeps_the_raw_message() -> None:
    """ServerError carries the server's bytes and their fields."""
    from podpatterns.ambassador.postgres import error_response

    raw = error_response("28P01", 'password authentication failed for user "x"')
    exc = ServerError(raw)
    assert exc.raw == raw and exc.sqlstate == "28P01"


def test_tls_detail_of_an_ssl_error_made_in_python() -> None:
    """An SSLError raised by tlsleg itself (no OpenSSL reason) is described, not a crash
    of the health loop that met it (a server stopping during the handshake)."""
    from podpatterns.ambassador.postgres import _tls_detail

    exc = ssl.SSLEOFError("upstream closed the connection during TLS handshake")
    assert _tls_detail(exc) == "upstream closed the connection during TLS handshake"
