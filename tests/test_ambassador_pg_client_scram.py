"""The app's own password on the loopback leg, proven with SCRAM-SHA-256 (issue 14).

With ``--pg-client-auth password-file`` the ambassador is the server of the app's
authentication: SCRAM-SHA-256 by default (SCRAM-SHA-256-PLUS bound to the listener's
certificate when the app's leg is TLS), cleartext only with ``--pg-client-auth-method
password``. The password file holds the password or the verifier PostgreSQL keeps in
``pg_authid``. The clients are real: psql and pgbench (libpq 15 from Debian, which has
no ``require_auth``), psycopg 3 (its wheel's own libpq 18, which has it) and asyncpg;
the upstream is the real PostgreSQL 15 of tests/peer_fixtures.py.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import struct
from contextlib import closing
from pathlib import Path

import asyncpg
import psycopg
import pytest

from podpatterns.ambassador.pgauth import (
    ClientPassword,
    PasswordFile,
    ScramVerifier,
    SecretError,
    scram_attributes,
    startup_message,
)
from tests.ambassador_process import run_ambassador
from tests.peers import PostgresServer, pgbench_connect_each
from tests.test_ambassador_pg_auth import (
    CLIENT_TIMEOUT,
    WHO,
    assert_not_leaked,
    assert_refused,
    kubelet_swap,
    kubelet_volume,
    make_role,
    psql,
    secret_file,
    tls_args,
    upstream,
)
from tests.test_ambassador_postgres import issue_listener_cert
from tests.test_ambassador_postgres import psql as psql_app

pytest_plugins = ("tests.peer_fixtures",)

peer = pytest.mark.peer

APP_PW = "app-side-pw"
FAILED = 'FATAL:  password authentication failed for user "app"'
CLIENT_AUTH = "podpatterns_ambassador_pg_client_auth_total"
CLIENT_FAILURES = "podpatterns_ambassador_pg_client_auth_failures_total"


@pytest.fixture
def ca_file(pg_ca_file: Path) -> Path:
    """The servers' root CA as a PEM file, for --tls-ca."""
    return pg_ca_file


def client_auth_args(
    server: PostgresServer, ca: Path, tmp: Path, client_secret: str, *extra: str
) -> list[str]:
    """A verified postgres route that logs in with the server's password and asks the
    app for its own (``client_secret``: a password or a verifier) in ``tmp``."""
    assert server.password is not None
    (tmp / "server").mkdir()
    (tmp / "client").mkdir()
    return tls_args(
        ca,
        "--pg-password-file",
        str(secret_file(tmp / "server", server.password)),
        "--pg-client-auth",
        "password-file",
        "--pg-client-password-file",
        str(secret_file(tmp / "client", client_secret)),
        *extra,
    )


def psycopg_conninfo(port: int, password: str, **params: str) -> str:
    """A psycopg conninfo for the app user through the ambassador."""
    params.setdefault("sslmode", "disable")
    extra = " ".join(f"{k}={v}" for k, v in params.items())
    return f"host=127.0.0.1 port={port} user=app dbname=postgres password={password} {extra}"


def psycopg_who(port: int, password: str, **params: str) -> object:
    """``select current_user`` over psycopg (libpq 18: require_auth is known)."""
    with psycopg.connect(psycopg_conninfo(port, password, **params), connect_timeout=10) as conn:
        row = conn.execute(WHO).fetchone()
        return row[0] if row else None


def psycopg_error(port: int, password: str, **params: str) -> str:
    """The error psycopg reports for a connection that must fail."""
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg_who(port, password, **params)
    return str(err.value)


def asyncpg_who(port: int, password: str) -> object:
    """``select current_user`` over asyncpg, or the SQLSTATE it reports."""

    async def go() -> object:
        try:
            conn = await asyncpg.connect(
                host="127.0.0.1",
                port=port,
                user="app",
                password=password,
                database="postgres",
                ssl=False,
                timeout=20,
            )
        except asyncpg.PostgresError as exc:
            return str(exc.sqlstate)
        try:
            return await conn.fetchval(WHO)
        finally:
            await conn.close()

    return asyncio.run(go())


def psql_right_and_wrong(server: PostgresServer, port: int) -> None:
    """psql with the app's password gets a session; with a wrong one, FATAL 28P01."""
    done = psql(server, port, "app", WHO, PGPASSWORD=APP_PW)
    assert done.returncode == 0 and done.stdout.strip() == "app", done.stderr
    done = psql(server, port, "app", WHO, PGPASSWORD="wrong-pw")
    assert done.returncode == 2 and FAILED in done.stderr, done.stderr


def server_verifier(server: PostgresServer, role: str, password: str) -> str:
    """The SCRAM verifier the real server stores for ``password`` (pg_authid)."""
    make_role(server, role, password, "scram-sha-256")
    stored = server.query(f"select rolpassword from pg_authid where rolname = '{role}'")
    assert stored is not None and stored.startswith("SCRAM-SHA-256$"), stored
    return stored


# -- the verifier and the primitives ------------------------------------------------------


@peer
def test_verifier_is_the_servers_own(postgres_tls: PostgresServer) -> None:
    """A verifier made here from a password, salt and iteration count equals the one
    PostgreSQL stores for that password (the primitives are PostgreSQL's), and reads back;
    it checks the password and no other."""
    stored = server_verifier(postgres_tls, "app_verifier", "v3rif-pw \u00e9")
    parsed = ScramVerifier.parse(stored)
    assert parsed.text() == stored
    assert ScramVerifier.make("v3rif-pw \u00e9", parsed.salt, parsed.iterations) == parsed
    assert parsed.check_password("v3rif-pw \u00e9")
    assert not parsed.check_password("v3rif-pw e")
    assert "v3rif" not in repr(parsed) and parsed.salt.hex() not in repr(parsed)


@pytest.mark.parametrize(
    "text",
    [
        "SCRAM-SHA-256$4096:c2FsdA==$short",
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
        "md5" + "0" * 32,
    ],
)
def test_unusable_client_secret_refused_at_load(tmp_path: Path, text: str) -> None:
    """A broken verifier or an md5 hash in --pg-client-password-file is refused when
    loaded; the message names the option and the file, not the content."""
    client = ClientPassword(PasswordFile(secret_file(tmp_path, text), "--pg-client-password-file"))
    with pytest.raises(SecretError) as err:
        client.load()
    assert str(err.value).startswith("--pg-client-password-file: ")
    assert text not in str(err.value) and "c2FsdA" not in str(err.value)


# -- SCRAM-SHA-256 on the plaintext loopback leg ------------------------------------------


@peer
def test_scram_default_with_psql_psycopg_asyncpg_pgbench(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """By default the app proves its password with SCRAM-SHA-256: psql, psycopg with
    require_auth=scram-sha-256, asyncpg and 40 pgbench -C connections get sessions; a
    wrong password gets FATAL 28P01 (psql, psycopg, asyncpg), counted, never logged;
    require_auth=password is refused by the client itself (no cleartext is asked)."""
    args = client_auth_args(postgres_tls, ca_file, tmp_path, APP_PW)
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        port = amb.listen.port
        psql_right_and_wrong(postgres_tls, port)
        assert psycopg_who(port, APP_PW, require_auth="scram-sha-256") == "app"
        error = psycopg_error(port, "wrong-pw", require_auth="scram-sha-256")
        assert 'password authentication failed for user "app"' in error, error
        error = psycopg_error(port, APP_PW, require_auth="password")
        assert "server requested SASL authentication" in error, error
        assert asyncpg_who(port, APP_PW) == "app"
        assert asyncpg_who(port, "wrong-pw") == "28P01"
        pgbench_connect_each(postgres_tls, port, tmp_path, PGUSER="app", PGPASSWORD=APP_PW)
        assert amb.metric(CLIENT_FAILURES) == 3
        assert amb.metric(CLIENT_AUTH, method="scram-sha-256") == 1 + 1 + 1 + 41
        assert amb.metric(CLIENT_AUTH, method="password") == 0
        assert_not_leaked(amb, APP_PW, "wrong-pw")
        assert amb.log_text(100000).count('"pg_client_auth_failed"') == 3


@peer
def test_verifier_from_pg_authid_as_the_password_file(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """The verifier the real server produced (pg_authid) as the password file: the app
    with the password gets a session over SCRAM (psql, psycopg, asyncpg), a wrong one
    28P01; the Secret holds no plaintext."""
    verifier = server_verifier(postgres_tls, "app_verifier", APP_PW)
    args = client_auth_args(postgres_tls, ca_file, tmp_path, verifier)
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        port = amb.listen.port
        psql_right_and_wrong(postgres_tls, port)
        assert psycopg_who(port, APP_PW, require_auth="scram-sha-256") == "app"
        assert asyncpg_who(port, APP_PW) == "app"
        assert amb.metric(CLIENT_AUTH, method="scram-sha-256") == 3
        assert amb.metric(CLIENT_FAILURES) == 1
        assert_not_leaked(amb, APP_PW, verifier.split("$")[2])


@peer
def test_scram_with_a_session_pool(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """With --pg-pool session the app still proves its password with SCRAM first:
    right password a pooled session, wrong one 28P01 and no server connection for it."""
    args = client_auth_args(postgres_tls, ca_file, tmp_path, APP_PW, "--pg-pool", "session")
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        port = amb.listen.port
        assert psycopg_who(port, APP_PW, require_auth="scram-sha-256") == "app"
        assert asyncpg_who(port, "wrong-pw") == "28P01"
        done = psql(postgres_tls, port, "app", WHO, PGPASSWORD="wrong-pw")
        assert done.returncode == 2 and FAILED in done.stderr, done.stderr
        pgbench_connect_each(postgres_tls, port, tmp_path, PGUSER="app", PGPASSWORD=APP_PW)
        assert amb.metric(CLIENT_AUTH, method="scram-sha-256") == 42
        assert amb.metric(CLIENT_FAILURES) == 2
        # reused: psycopg's one, and for pgbench's 2 clients at most one lent and one
        # still being reset (DISCARD ALL) each, for its 40 connections
        assert amb.metric("podpatterns_ambassador_pg_pool_server_opened_total") <= 5
        assert_not_leaked(amb, APP_PW, "wrong-pw")


# -- cleartext when asked ------------------------------------------------------------------


@peer
@pytest.mark.parametrize("stored", ["password", "verifier"])
def test_cleartext_method_when_chosen(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path, stored: str
) -> None:
    """--pg-client-auth-method password asks for the cleartext password, checked
    against a stored password or a stored verifier; a client that requires SCRAM
    refuses it; a wrong password gets 28P01."""
    secret = APP_PW if stored == "password" else server_verifier(postgres_tls, "app_v", APP_PW)
    extra = ("--pg-client-auth-method", "password")
    args = client_auth_args(postgres_tls, ca_file, tmp_path, secret, *extra)
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        port = amb.listen.port
        psql_right_and_wrong(postgres_tls, port)
        assert psycopg_who(port, APP_PW, require_auth="password") == "app"
        error = psycopg_error(port, APP_PW, require_auth="scram-sha-256")
        assert "server requested a cleartext password" in error, error
        assert asyncpg_who(port, APP_PW) == "app"
        assert amb.metric(CLIENT_AUTH, method="password") == 3
        assert amb.metric(CLIENT_AUTH, method="scram-sha-256") == 0
        assert amb.metric(CLIENT_FAILURES) == 1
        assert_not_leaked(amb, APP_PW, "wrong-pw")


# -- SCRAM-SHA-256-PLUS over the app's TLS ---------------------------------------------------


@peer
def test_scram_plus_over_the_apps_tls(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """With --listen-tls-cert the ambassador offers SCRAM-SHA-256-PLUS bound to its
    own certificate: psql and psycopg with channel_binding=require get sessions (so the
    tls-server-end-point data matched); in plaintext plain SCRAM serves the same app."""
    app_ca, flags = issue_listener_cert(tmp_path)
    args = client_auth_args(postgres_tls, ca_file, tmp_path, APP_PW, *flags)
    verified = {"sslmode": "verify-full", "sslrootcert": str(app_ca)}
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        port = amb.listen.port
        done = psql_app(
            postgres_tls,
            port,
            WHO,
            sslmode="verify-full",
            PGPASSWORD=APP_PW,
            PGSSLROOTCERT=str(app_ca),
            PGCHANNELBINDING="require",
        )
        assert done.returncode == 0 and done.stdout.strip() == "app", done.stderr
        who = psycopg_who(
            port, APP_PW, channel_binding="require", require_auth="scram-sha-256", **verified
        )
        assert who == "app"
        error = psycopg_error(port, "wrong-pw", channel_binding="require", **verified)
        assert 'password authentication failed for user "app"' in error, error
        assert psycopg_who(port, APP_PW) == "app"  # sslmode=disable: SCRAM without -PLUS
        assert amb.metric(CLIENT_AUTH, method="scram-sha-256-plus") == 2
        assert amb.metric(CLIENT_AUTH, method="scram-sha-256") == 1
        assert amb.metric(CLIENT_FAILURES) == 1


@peer
def test_cleartext_over_tls_fails_a_client_requiring_channel_binding(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """--pg-client-auth-method password over the app's TLS: a client that requires
    channel binding refuses the cleartext request; one that does not is served."""
    app_ca, flags = issue_listener_cert(tmp_path)
    extra = (*flags, "--pg-client-auth-method", "password")
    args = client_auth_args(postgres_tls, ca_file, tmp_path, APP_PW, *extra)
    verified = {"sslmode": "verify-full", "sslrootcert": str(app_ca)}
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        port = amb.listen.port
        error = psycopg_error(port, APP_PW, channel_binding="require", **verified)
        assert "channel binding required" in error, error
        assert psycopg_who(port, APP_PW, **verified) == "app"
        assert amb.metric(CLIENT_AUTH, method="password") == 1


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["--pg-password-file", "{file}", "--pg-client-auth-method", "password"],
            "--pg-client-auth-method: only applies with --pg-client-auth password-file",
        ),
        (
            ["--pg-client-auth-method", "password"],
            "--pg-client-auth-method: only applies with --pg-password",
        ),
        (
            ["--pg-password-file", "{file}", "--pg-client-auth-method", "md5"],
            "--pg-client-auth-method",
        ),
        (
            [
                "--pg-password-file",
                "{file}",
                "--pg-client-auth",
                "password-file",
                "--pg-client-password-file",
                "{verifier}",
            ],
            "--pg-client-password-file: {verifier}: it is not SCRAM-SHA-256$",
        ),
    ],
)
def test_bad_client_auth_config_is_one_line_exit_2(
    tmp_path: Path, extra: list[str], expected: str
) -> None:
    """Client-auth settings that contradict or cannot be used: exit 2 with one error
    line naming the option, no traceback, no secret."""
    file = secret_file(tmp_path, "do-not-show-me")
    (tmp_path / "v").mkdir()
    verifier = secret_file(tmp_path / "v", "SCRAM-SHA-256$4096:c2FsdA==$do-not-show-me")
    args = [a.format(file=file, verifier=verifier) for a in extra]
    assert_refused(args, expected.format(verifier=verifier), "do-not-show-me")


# -- the exchange, message by message ----------------------------------------------------


class RawApp:
    """An app that speaks the SCRAM exchange byte by byte (what no driver would send),
    on a real connection to the ambassador, over the app's TLS when ``context`` is given."""

    def __init__(self, port: int, context: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
        if context is not None:
            sock.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest
            assert sock.recv(1) == b"S"
            sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
        self.sock = sock
        self.buf = b""
        sock.sendall(startup_message("app", "postgres"))

    def close(self) -> None:
        self.sock.close()

    def read(self) -> tuple[bytes, bytes]:
        """(type, body) of the next message; ``(b"", b"")`` once the ambassador closed."""
        while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack_from("!i", self.buf, 1)[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                return b"", b""
            self.buf += chunk
        end = 1 + struct.unpack_from("!i", self.buf, 1)[0]
        kind, body, self.buf = self.buf[:1], self.buf[5:end], self.buf[end:]
        return kind, body

    def send(self, body: bytes) -> None:
        """A password-type message ('p': SASLInitialResponse, SASLResponse)."""
        self.sock.sendall(b"p" + struct.pack("!i", len(body) + 4) + body)

    def initial(self, mechanism: bytes, first: bytes) -> None:
        self.send(mechanism + b"\0" + struct.pack("!i", len(first)) + first)

    def mechanisms(self) -> list[bytes]:
        """The mechanisms of the AuthenticationSASL the ambassador opens with."""
        kind, body = self.read()
        assert kind == b"R" and struct.unpack_from("!i", body)[0] == 10, (kind, body)
        return [m for m in body[4:].split(b"\0") if m]

    def error(self) -> dict[str, str]:
        """The fields of the ErrorResponse that comes next."""
        kind, body = self.read()
        assert kind == b"E", (kind, body)
        return {f[:1].decode(): f[1:].decode() for f in body.split(b"\0") if f}

    def final(self, gs2: bytes, nonce_extra: bytes = b"", proof: bytes = b"\0" * 32) -> None:
        """Read the server-first-message, send a client-final-message with ``gs2`` as
        the channel binding and ``proof``."""
        kind, body = self.read()
        assert kind == b"R" and struct.unpack_from("!i", body)[0] == 11, (kind, body)
        nonce = scram_attributes(body[4:])[b"r"] + nonce_extra
        c = base64.b64encode(gs2)
        self.send(b"c=" + c + b",r=" + nonce + b",p=" + base64.b64encode(proof))


@peer
@pytest.mark.parametrize(
    ("mechanism", "first", "wrong", "sqlstate", "words"),
    [
        (b"SCRAM-SHA-1", b"n,,n=,r=abc", None, "08P01", "invalid SASL authentication mechanism"),
        (b"SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc", None, "08P01", "invalid"),
        (
            b"SCRAM-SHA-256",
            b"p=tls-server-end-point,,n=,r=abc",
            None,
            "08P01",
            "selected SCRAM-SHA-256 without channel binding",
        ),
        (b"SCRAM-SHA-256", b"n,a=bob,n=,r=abc", None, "08P01", "authorization identity"),
        (b"SCRAM-SHA-256", b"n,,m=ext,n=,r=abc", None, "08P01", "unsupported SCRAM extension"),
        (b"SCRAM-SHA-256", b"x,,n=,r=abc", None, "08P01", "malformed SCRAM message"),
        (b"SCRAM-SHA-256", b"n,,n=,r=abc", "nonce", "08P01", "nonce does not match"),
        (b"SCRAM-SHA-256", b"n,,n=,r=abc", "cbind", "28000", "channel binding check failed"),
        (b"SCRAM-SHA-256", b"n,,n=,r=abc", "proof", "28P01", "password authentication failed"),
    ],
)
def test_broken_exchanges_get_postgres_errors(
    postgres_tls: PostgresServer,
    ca_file: Path,
    tmp_path: Path,
    mechanism: bytes,
    first: bytes,
    wrong: str | None,
    sqlstate: str,
    words: str,
) -> None:
    """On the plaintext leg only SCRAM-SHA-256 is offered; a mechanism not offered, a
    malformed client-first-message, a wrong nonce or channel binding gets FATAL with
    PostgreSQL's SQLSTATE and words; only a wrong proof counts as a wrong password."""
    args = client_auth_args(postgres_tls, ca_file, tmp_path, APP_PW)
    with (
        run_ambassador([upstream(postgres_tls)], *args) as amb,
        closing(RawApp(amb.listen.port)) as app,
    ):
        assert app.mechanisms() == [b"SCRAM-SHA-256"]
        app.initial(mechanism, first)
        if wrong is not None:
            app.final(b"y,," if wrong == "cbind" else b"n,,", b"x" if wrong == "nonce" else b"")
        fields = app.error()
        assert fields["S"] == "FATAL" and fields["C"] == sqlstate, fields
        assert words in fields["M"], fields
        assert app.read() == (b"", b"")  # then the ambassador closes
        assert amb.metric(CLIENT_FAILURES) == (1 if wrong == "proof" else 0)
        assert amb.metric(CLIENT_AUTH) == 0


@peer
def test_channel_binding_over_tls_is_checked(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """Over the app's TLS both mechanisms are offered; a client that says it could bind
    but thinks the server cannot ('y') is refused (28000), and -PLUS binding data that
    is not the listener certificate's hash fails the check (28000)."""
    app_ca, flags = issue_listener_cert(tmp_path)
    args = client_auth_args(postgres_tls, ca_file, tmp_path, APP_PW, *flags)
    context = ssl.create_default_context(cafile=str(app_ca))
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        with closing(RawApp(amb.listen.port, context)) as app:
            assert app.mechanisms() == [b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"]
            app.initial(b"SCRAM-SHA-256", b"y,,n=,r=abc")
            fields = app.error()
        assert fields["C"] == "28000" and "negotiation error" in fields["M"], fields
        with closing(RawApp(amb.listen.port, context)) as app:
            app.mechanisms()
            gs2 = b"p=tls-server-end-point,,"
            app.initial(b"SCRAM-SHA-256-PLUS", gs2 + b"n=,r=abc")
            app.final(gs2 + b"\0" * 32)
            fields = app.error()
        assert fields["C"] == "28000" and "channel binding check failed" in fields["M"], fields
        assert amb.metric(CLIENT_FAILURES) == 0


@peer
def test_client_password_file_rotation(
    postgres_tls: PostgresServer, ca_file: Path, tmp_path: Path
) -> None:
    """The client password file is re-read when the kubelet swaps the Secret: from a
    password to a verifier of another; the next app needs the new password; content that
    is no verifier is logged and the last good one stays."""
    args = client_auth_args(postgres_tls, ca_file, tmp_path, "unused")
    volume = kubelet_volume(tmp_path / "client", "first-pw")
    at = args.index("--pg-client-password-file") + 1
    args[at] = str(volume / "password")
    with run_ambassador([upstream(postgres_tls)], *args) as amb:
        port = amb.listen.port
        assert psycopg_who(port, "first-pw") == "app"
        kubelet_swap(volume, server_verifier(postgres_tls, "app_rot", APP_PW))
        psql_right_and_wrong(postgres_tls, port)
        error = psycopg_error(port, "first-pw")
        assert 'password authentication failed for user "app"' in error, error
        mark = amb.mark()
        kubelet_swap(volume, "SCRAM-SHA-256$4096:broken")
        assert psycopg_who(port, APP_PW) == "app"
        amb.wait_index("pg_client_password_invalid", after=mark)
        assert "broken" not in amb.log_text(100000)
        assert amb.metric(CLIENT_FAILURES) == 2
