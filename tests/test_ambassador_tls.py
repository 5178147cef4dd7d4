"""Ambassador TLS origination against real TLS servers (certificates from trustme).

The upstream servers are blocking ``ssl`` sockets in threads, bound to 127.0.0.1 port 0,
except the echo server of the round trip, which is an asyncio TLS server. A server
thread never raises: it records what it saw and the errors it hit, and tests assert on
those records.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import structlog
import trustme
from prometheus_client.parser import text_string_to_metric_families

from podpatterns.ambassador import Ambassador, RouteConfig, tlsleg
from podpatterns.ambassador.route import Route
from podpatterns.ambassador.tlsleg import READ_BATCH, TLSTransport
from podpatterns.options import HostPort
from podpatterns.runtime import Runtime, RuntimeConfig
from tests.waiting import eventually

Handler = Callable[["TLSServer", ssl.SSLSocket], None]

# -- certificates and files ------------------------------------------------------------


def pem_file(path: Path, blob: trustme.Blob) -> Path:
    blob.write_to_path(str(path))
    return path


def server_context(
    cert: trustme.LeafCert,
    client_ca: trustme.CA | None = None,
    version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A server context presenting ``cert``; requires a client cert from ``client_ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    if client_ca is not None:
        client_ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    if version is not None:
        ctx.maximum_version = version
    return ctx


class SecretDir:
    """A directory laid out like a mounted Kubernetes Secret.

    ``ca.crt``, ``tls.crt`` and ``tls.key`` are symlinks through ``..data``, which points
    at a timestamped directory; :meth:`update` writes a new one and swaps ``..data``
    atomically, as the kubelet's AtomicWriter does.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.generation = 0

    def update(self, files: dict[str, bytes]) -> None:
        self.generation += 1
        stamp = f"..2026_01_01_00_00_{self.generation:02d}.{os.getpid()}"
        target = self.root / stamp
        target.mkdir()
        for name, data in files.items():
            (target / name).write_bytes(data)
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)
        old = (self.root / "..data").resolve() if (self.root / "..data").exists() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(stamp)
        os.replace(tmp, self.root / "..data")
        if old is not None:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()

    def path(self, name: str) -> Path:
        return self.root / name


def client_files(ca: trustme.CA, client: trustme.LeafCert | None = None) -> dict[str, bytes]:
    files = {"ca.crt": ca.cert_pem.bytes()}
    if client is not None:
        files["tls.crt"] = b"".join(p.bytes() for p in client.cert_chain_pems)
        files["tls.key"] = client.private_key_pem.bytes()
    return files


# -- upstream servers --------------------------------------------------------------------


class TLSServer:
    """A blocking TLS server: one thread per connection, running ``handler``.

    ``context`` may be replaced at any time; each new connection uses the current one.
    """

    def __init__(self, context: ssl.SSLContext, handler: Handler) -> None:
        self.context = context
        self.handler = handler
        self.sni: list[str | None] = []
        self.errors: list[BaseException] = []
        self.handshakes = 0
        self.events: dict[str, threading.Event] = {}
        self.values: dict[str, Any] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port: int = self.sock.getsockname()[1]
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepter.start()

    def event(self, name: str) -> threading.Event:
        return self.events.setdefault(name, threading.Event())

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(30)
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _record_sni(self, sslobj: Any, name: str | None, ctx: ssl.SSLContext) -> None:
        self.sni.append(name)

    def _serve(self, conn: socket.socket) -> None:
        ctx = self.context
        ctx.sni_callback = self._record_sni
        try:
            # Ragged EOFs raise here, so a clean b"" from recv() proves a close_notify.
            tls = ctx.wrap_socket(conn, server_side=True, suppress_ragged_eofs=False)
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(exc)
            conn.close()
            return
        self.handshakes += 1
        self._conns.append(tls)  # wrap_socket detached conn; close() shuts this one down
        try:
            self.handler(self, tls)
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(exc)
        finally:
            tls.close()

    def close(self) -> None:
        self._stop.set()
        self._accepter.join(5)
        self.sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)


@contextlib.contextmanager
def tls_server(context: ssl.SSLContext, handler: Handler) -> Iterator[TLSServer]:
    server = TLSServer(context, handler)
    try:
        yield server
    finally:
        server.close()


def echo(server: TLSServer, tls: ssl.SSLSocket) -> None:
    """Echo each read until the client's close_notify, then close_notify back."""
    while data := tls.recv(65536):
        tls.sendall(data)
    tls.unwrap()


# -- the ambassador and its clients -------------------------------------------------------


@contextlib.asynccontextmanager
async def ambassador(port: int, **tls: Any) -> AsyncIterator[Ambassador]:
    cfg = RouteConfig(
        listen=HostPort("127.0.0.1", 0),
        upstream=(HostPort("127.0.0.1", port),),
        upstream_tls=True,
        connect_retries=0,
        **tls,
    )
    amb = Ambassador([cfg])
    await amb.start()
    try:
        yield amb
        await drained(amb)  # every connection must end on its own, not by the close below
    finally:
        await amb.close()


def route_of(amb: Ambassador) -> Route:
    return amb.routes[0]


def listen_port(amb: Ambassador) -> int:
    addr = amb.addresses[0]
    assert isinstance(addr, HostPort)
    return addr.port


@contextlib.asynccontextmanager
async def client(
    amb: Ambassador, rcvbuf: int | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", listen_port(amb)))
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, msg: bytes) -> bytes:
    writer.write(msg)
    await writer.drain()
    async with asyncio.timeout(10):
        return await reader.readexactly(len(msg))


async def read_to_end(reader: asyncio.StreamReader) -> bytes | None:
    """All bytes until EOF, or None when the connection was reset instead."""
    try:
        async with asyncio.timeout(10):
            return await reader.read()
    except ConnectionResetError:
        return None


async def drained(amb: Ambassador) -> None:
    async with asyncio.timeout(10):
        await amb.wait_drained()


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    return pem_file(tmp_path / "ca.pem", ca.cert_pem)


@pytest.fixture
def ip_cert(ca: trustme.CA) -> trustme.LeafCert:
    """A server certificate valid for 127.0.0.1, the address the ambassador dials."""
    return ca.issue_cert("127.0.0.1")


# -- verified round trip -------------------------------------------------------------------


class HashingEcho(asyncio.Protocol):
    """Echo with flow control; hashes what it received."""

    def __init__(self, done: asyncio.Future[tuple[int, str]]) -> None:
        self.done = done
        self.hash = hashlib.sha256()
        self.n = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass it

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.hash.update(data)
        self.n += len(data)
        self.transport.write(data)

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    def eof_received(self) -> None:
        if not self.done.done():
            self.done.set_result((self.n, self.hash.hexdigest()))


async def round_trip(ca_file: Path, ip_cert: trustme.LeafCert, size: int) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[tuple[int, str]] = loop.create_future()
    server = await loop.create_server(
        lambda: HashingEcho(done), "127.0.0.1", 0, ssl=server_context(ip_cert)
    )
    payload = os.urandom(size)
    try:
        port = server.sockets[0].getsockname()[1]
        async with ambassador(port, tls_ca=ca_file) as amb, client(amb) as (reader, writer):

            async def send() -> None:
                for i in range(0, size, 100_000):
                    writer.write(payload[i : i + 100_000])
                    await writer.drain()
                writer.write_eof()

            async with asyncio.timeout(60), asyncio.TaskGroup() as tg:
                tg.create_task(send())
                echoed = tg.create_task(reader.read())
            assert (
                hashlib.sha256(echoed.result()).hexdigest() == hashlib.sha256(payload).hexdigest()
            )
            assert await done == (size, hashlib.sha256(payload).hexdigest())
            assert route_of(amb).stats.failed == {}
    finally:
        server.close()
        await server.wait_closed()


async def test_round_trip_multi_mb_checksums_both_ways(
    ca_file: Path, ip_cert: trustme.LeafCert
) -> None:
    """8 MB through a verified TLS upstream arrive intact in both directions."""
    await round_trip(ca_file, ip_cert, 8 * 1024 * 1024)


def test_round_trip_on_uvloop(ca_file: Path, ip_cert: trustme.LeafCert) -> None:
    """The TLS leg relays 8 MB intact both ways on uvloop, the CLI's default loop."""
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(round_trip(ca_file, ip_cert, 8 * 1024 * 1024))


# -- verification failures -----------------------------------------------------------------


async def scrape(runtime: Runtime) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    admin = runtime.admin_address
    assert admin is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin.port}/metrics") as resp,
    ):
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_wrong_ca_fails_closed_and_counted(ip_cert: trustme.LeafCert, tmp_path: Path) -> None:
    """An upstream cert from an untrusted CA: client cut, counted as tls, exported in /metrics."""
    other = pem_file(tmp_path / "other.pem", trustme.CA().cert_pem)
    with tls_server(server_context(ip_cert), echo) as server:
        cfg = RouteConfig(
            listen=HostPort("127.0.0.1", 0),
            upstream=(HostPort("127.0.0.1", server.port),),
            upstream_tls=True,
            tls_ca=other,
            connect_retries=0,
        )
        with structlog.testing.capture_logs() as logs:
            amb = Ambassador([cfg])
            runtime = Runtime(RuntimeConfig(admin=HostPort("127.0.0.1", 0), drain_timeout=1), [amb])
            await runtime.start()
            try:
                async with client(amb) as (reader, writer):
                    writer.write(b"hello")
                    assert not await read_to_end(reader)
                assert route_of(amb).stats.failed == {"tls": 1}
                assert amb.in_flight() == 0  # the failed connection was finished, not leaked
                samples = await scrape(runtime)
            finally:
                await runtime.shutdown()
    failed = [e for e in logs if e["event"] == "upstream_connect_failed"]
    assert [e["reason"] for e in failed] == ["tls"]
    assert "CERTIFICATE_VERIFY_FAILED" in failed[0]["error"]
    key = (
        "podpatterns_ambassador_connections_failed_total",
        (("reason", "tls"), ("route", "default")),
    )
    assert samples[key] == 1.0
    assert server.handshakes == 0


async def test_wrong_name_fails(ca_file: Path, ca: trustme.CA) -> None:
    """A cert for another name than the dialled host fails verification (reason tls)."""
    cert = ca.issue_cert("upstream.test")
    with tls_server(server_context(cert), echo) as server:
        async with ambassador(server.port, tls_ca=ca_file) as amb:
            async with client(amb) as (reader, writer):
                writer.write(b"hello")
                assert not await read_to_end(reader)
            assert route_of(amb).stats.failed == {"tls": 1}


async def test_sni_and_server_name_override(ca_file: Path, ca: trustme.CA) -> None:
    """--tls-server-name sends that SNI and verifies that name while dialling 127.0.0.1."""
    cert = ca.issue_cert("upstream.test")
    with tls_server(server_context(cert), echo) as server:
        async with (
            ambassador(server.port, tls_ca=ca_file, tls_server_name="upstream.test") as amb,
            client(amb) as (reader, writer),
        ):
            assert await ping(reader, writer, b"hello") == b"hello"
            assert route_of(amb).stats.failed == {}
        assert server.sni == ["upstream.test"]


async def test_insecure_skip_verify_works_and_warns(ip_cert: trustme.LeafCert) -> None:
    """--tls-insecure-skip-verify accepts an unknown CA and logs a warning at startup."""
    with (
        tls_server(server_context(ip_cert), echo) as server,
        structlog.testing.capture_logs() as logs,
    ):
        async with (
            ambassador(server.port, tls_insecure_skip_verify=True) as amb,
            client(amb) as (reader, writer),
        ):
            assert await ping(reader, writer, b"hello") == b"hello"
    warnings = [e for e in logs if e["event"] == "tls_verification_disabled"]
    assert [w["log_level"] for w in warnings] == ["warning"]


# -- mTLS --------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
async def test_mtls_with_and_without_client_cert(
    ca: trustme.CA,
    ca_file: Path,
    ip_cert: trustme.LeafCert,
    tmp_path: Path,
    version: ssl.TLSVersion | None,
) -> None:
    """A server that requires a client cert serves the ambassador with one, refuses without
    (TLS 1.3: after the handshake, a reset; TLS 1.2: a failed handshake, reason tls)."""
    client_ca = trustme.CA()
    cert = client_ca.issue_cert("ambassador.test")
    key = pem_file(tmp_path / "client.key", cert.private_key_pem)
    crt = tmp_path / "client.crt"
    crt.write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
    ctx = server_context(ip_cert, client_ca=client_ca, version=version)
    with tls_server(ctx, echo) as server:
        async with (
            ambassador(server.port, tls_ca=ca_file, tls_cert=crt, tls_key=key) as amb,
            client(amb) as (reader, writer),
        ):
            assert await ping(reader, writer, b"with cert") == b"with cert"
        assert server.errors == []
        async with ambassador(server.port, tls_ca=ca_file) as amb:
            async with client(amb) as (reader, writer):
                writer.write(b"without cert")
                # TLS 1.3: the server checks the client cert after our handshake is done,
                # so its alert arrives on the first read and the client is cut then.
                assert not await read_to_end(reader)
            await drained(amb)
            stats = route_of(amb).stats
            if version is None:
                # The alert, or the server's RST when our write of the request hits its
                # closed socket before the alert is read: either way the client is reset.
                assert stats.failed == {}
                assert stats.closed in ({"error": 1}, {"reset": 1})
            else:
                assert (stats.closed, stats.failed) == ({"upstream_tls": 1}, {"tls": 1})
    # after the with block: the server's threads have finished recording
    assert [type(e) for e in server.errors] == [ssl.SSLError]


# -- certificate rotation ------------------------------------------------------------------------


async def test_rotation_through_watch_loop_new_client_ca(
    ca: trustme.CA, ip_cert: trustme.LeafCert, tmp_path: Path
) -> None:
    """A ..data swap to a client cert from a new CA is picked up by the file watch: new
    connections use it, a connection opened before keeps working."""
    old_ca, new_ca = trustme.CA(), trustme.CA()
    secret = SecretDir(tmp_path / "secret")
    secret.update(client_files(ca, old_ca.issue_cert("ambassador.test")))
    files = {
        "tls_ca": secret.path("ca.crt"),
        "tls_cert": secret.path("tls.crt"),
        "tls_key": secret.path("tls.key"),
    }
    with tls_server(server_context(ip_cert, client_ca=old_ca), echo) as server:
        async with ambassador(server.port, **files) as amb:
            provider = route_of(amb).tls
            assert provider is not None
            assert provider.recheck >= 30  # so the reload below comes from a file event
            async with client(amb) as (live_r, live_w):
                assert await ping(live_r, live_w, b"before") == b"before"
                server.context = server_context(ip_cert, client_ca=new_ca)
                async with client(amb) as (reader, writer):
                    writer.write(b"old cert")
                    assert not await read_to_end(reader)  # the server now wants the new CA

                secret.update(client_files(ca, new_ca.issue_cert("ambassador.test")))
                await eventually(lambda: provider.reloads == 1)

                async with client(amb) as (reader, writer):
                    assert await ping(reader, writer, b"new cert") == b"new cert"
                assert await ping(live_r, live_w, b"still alive") == b"still alive"


async def test_rotation_of_ca_bundle(ca: trustme.CA, tmp_path: Path) -> None:
    """Rotating the CA bundle makes a server with a new chain verify; a bad rotation is
    counted and the last good context stays in use."""
    new_ca = trustme.CA()
    secret = SecretDir(tmp_path / "secret")
    secret.update(client_files(ca))
    with tls_server(server_context(ca.issue_cert("127.0.0.1")), echo) as server:
        async with ambassador(server.port, tls_ca=secret.path("ca.crt")) as amb:
            provider = route_of(amb).tls
            assert provider is not None
            async with client(amb) as (live_r, live_w):
                assert await ping(live_r, live_w, b"before") == b"before"
                server.context = server_context(new_ca.issue_cert("127.0.0.1"))
                async with client(amb) as (reader, _):
                    assert not await read_to_end(reader)
                assert route_of(amb).stats.failed == {"tls": 1}

                secret.update(client_files(new_ca))
                # Direct call: the watch loop's event may lag behind the swap.
                provider.maybe_reload()
                assert provider.reloads == 1
                async with client(amb) as (reader, writer):
                    assert await ping(reader, writer, b"new chain") == b"new chain"

                secret.update({"ca.crt": b"-----BEGIN CERTIFICATE-----\nbroken\n"})
                assert not provider.maybe_reload()
                assert not provider.maybe_reload()
                assert provider.reload_failures == 1  # once per bad change, however often seen
                async with client(amb) as (reader, writer):
                    assert await ping(reader, writer, b"last good") == b"last good"
                assert await ping(live_r, live_w, b"still alive") == b"still alive"


# -- half-close -------------------------------------------------------------------------------


def delayed_reply(server: TLSServer, tls: ssl.SSLSocket) -> None:
    """Read the request up to the close_notify, wait 1 s, reply, then close_notify."""
    request = hashlib.sha256()
    n = 0
    while data := tls.recv(65536):  # b"" only on close_notify (suppress_ragged_eofs=False)
        request.update(data)
        n += len(data)
    server.values["request"] = (n, request.hexdigest())
    server.event("request_done").set()
    time.sleep(1.0)  # the upstream takes its time; the client leg is half-closed meanwhile
    tls.sendall(server.values["reply"])
    tls.unwrap()


async def half_close(
    ca_file: Path, ip_cert: trustme.LeafCert, version: ssl.TLSVersion | None
) -> None:
    request = os.urandom(300_000)
    reply = os.urandom(3 * 1024 * 1024)
    with tls_server(server_context(ip_cert, version=version), delayed_reply) as server:
        server.values["reply"] = reply
        async with ambassador(server.port, tls_ca=ca_file) as amb:
            async with client(amb) as (reader, writer):
                writer.write(request)
                await writer.drain()
                writer.write_eof()
                got = await read_to_end(reader)
                assert got is not None, "reset instead of the reply"
                assert hashlib.sha256(got).hexdigest() == hashlib.sha256(reply).hexdigest()
            await drained(amb)
            stats = route_of(amb).stats
            assert stats.closed == {"eof": 1}
            assert stats.bytes_up == len(request)
            assert stats.bytes_down == len(reply)
    assert server.values["request"] == (len(request), hashlib.sha256(request).hexdigest())
    assert server.errors == []


@pytest.mark.parametrize(
    "version", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2-openssl-server"]
)
async def test_half_close_reply_after_delay(
    ca_file: Path, ip_cert: trustme.LeafCert, version: ssl.TLSVersion | None
) -> None:
    """Client FIN becomes close_notify; the reply sent 1 s later still reaches the client,
    then the upstream's close_notify becomes the client's EOF."""
    await half_close(ca_file, ip_cert, version)


def test_half_close_on_uvloop(ca_file: Path, ip_cert: trustme.LeafCert) -> None:
    """The TLS half-close works on uvloop, the CLI's default loop."""
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(half_close(ca_file, ip_cert, None))


def reply_then_tcp_fin(server: TLSServer, tls: ssl.SSLSocket) -> None:
    """Reply, then a bare TCP FIN with no close_notify; wait for the proxy to close."""
    tls.recv(65536)
    tls.sendall(b"reply")
    raw = socket.socket(fileno=os.dup(tls.fileno()))
    raw.settimeout(10)
    raw.shutdown(socket.SHUT_WR)
    server.event("fin_sent").set()
    with contextlib.suppress(OSError):
        while raw.recv(65536):
            pass
    raw.close()


async def test_upstream_tcp_fin_without_close_notify_is_eof(
    ca_file: Path, ip_cert: trustme.LeafCert
) -> None:
    """A TCP FIN without close_notify after the reply ends the client's stream with EOF."""
    with tls_server(server_context(ip_cert), reply_then_tcp_fin) as server:
        async with ambassador(server.port, tls_ca=ca_file) as amb:
            async with client(amb) as (reader, writer):
                writer.write(b"request")
                async with asyncio.timeout(10):
                    assert await reader.readexactly(5) == b"reply"
                    assert await reader.read() == b""  # EOF, not a reset
                writer.write_eof()
            await drained(amb)


# -- resets ---------------------------------------------------------------------------------


def reset_after_request(server: TLSServer, tls: ssl.SSLSocket) -> None:
    tls.recv(65536)
    tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # close the TCP socket under the TLS session: an RST, no close_notify
    os.close(tls.detach())


async def test_upstream_reset_resets_client(ca_file: Path, ip_cert: trustme.LeafCert) -> None:
    """An RST from the TLS upstream reaches the client as an RST."""
    with tls_server(server_context(ip_cert), reset_after_request) as server:
        async with ambassador(server.port, tls_ca=ca_file) as amb:
            async with client(amb) as (reader, writer):
                writer.write(b"request")
                with pytest.raises(ConnectionResetError):
                    async with asyncio.timeout(10):
                        await reader.read()
            await drained(amb)
            assert route_of(amb).stats.closed == {"reset": 1}


def wait_for_reset(server: TLSServer, tls: ssl.SSLSocket) -> None:
    """Echo one read, then report how the TCP stream ends: RST, FIN or more bytes."""
    tls.sendall(tls.recv(65536))
    # Read the TCP socket itself: Python's ssl reports an RST as SSLEOFError, like a FIN.
    raw = socket.socket(fileno=os.dup(tls.fileno()))
    raw.settimeout(10)
    try:
        server.values["after"] = raw.recv(65536)
    except ConnectionResetError as exc:
        server.values["after"] = exc
    finally:
        raw.close()
        server.event("after").set()


async def test_client_reset_resets_upstream(ca_file: Path, ip_cert: trustme.LeafCert) -> None:
    """An RST from the client reaches the TLS upstream as an RST, not a close_notify."""
    with tls_server(server_context(ip_cert), wait_for_reset) as server:
        async with ambassador(server.port, tls_ca=ca_file) as amb:
            async with client(amb) as (reader, writer):
                assert await ping(reader, writer, b"hi") == b"hi"
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            await drained(amb)
        assert await asyncio.to_thread(server.event("after").wait, 10)
        assert isinstance(server.values["after"], ConnectionResetError)


# -- backpressure -----------------------------------------------------------------------------


def flood(server: TLSServer, tls: ssl.SSLSocket) -> None:
    """Send ``total`` bytes in 256 KiB writes, counting what the kernel took; then, if
    ``trailer`` is set, wait for the close_notify and send the trailer."""
    tls.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    block = server.values["block"]
    total = server.values["total"]
    sent = 0
    while sent < total:
        tls.sendall(block)
        sent += len(block)
        server.values["sent"] = sent
    if "trailer" in server.values:
        server.values["after_flood"] = tls.recv(65536)  # b"" only on close_notify
        tls.sendall(server.values["trailer"])
    tls.unwrap()


async def stalled(server: TLSServer) -> int:
    """Wait until the flooding server makes no progress over 25 polls; bytes it sent."""
    last, still = -1, 0
    async with asyncio.timeout(30):
        while still < 25:
            await asyncio.sleep(0.02)
            sent = server.values["sent"]
            still, last = (still + 1, last) if sent == last else (0, sent)
    return last


async def read_hashed(reader: asyncio.StreamReader, digest: Any = None) -> tuple[int, bytes]:
    """Read to EOF; (length, sha256) without holding it all."""
    digest = digest or hashlib.sha256()
    n = 0
    async with asyncio.timeout(60):
        while chunk := await reader.read(1 << 20):
            digest.update(chunk)
            n += len(chunk)
    return n, digest.digest()


def tls_leg(amb: Ambassador) -> TLSTransport:
    conn = next(iter(route_of(amb).connections))
    relay: Any = conn.relay
    leg = relay.upstream.transport
    assert isinstance(leg, TLSTransport)
    return leg


async def test_slow_client_slows_tls_upstream(ca_file: Path, ip_cert: trustme.LeafCert) -> None:
    """A client that does not read stops the TLS upstream; the ambassador's buffers stay
    bounded, and all bytes arrive intact once the client reads."""
    block = os.urandom(256 * 1024)
    total = 64 * 1024 * 1024
    with tls_server(server_context(ip_cert), flood) as server:
        server.values.update(block=block, total=total, sent=0)
        async with (
            ambassador(server.port, tls_ca=ca_file) as amb,
            client(amb, rcvbuf=64 * 1024) as (reader, writer),
        ):
            sent = await stalled(server)
            assert sent < total // 2, f"upstream sent {sent} bytes to a client not reading"
            relay: Any = next(iter(route_of(amb).connections)).relay
            limit = route_of(amb).cfg.buffer_size + READ_BATCH
            assert relay.client.transport.get_write_buffer_size() <= limit
            leg = tls_leg(amb)
            assert leg._incoming.pending + sum(len(b) for b in leg._backlog) <= 1024 * 1024

            expected = hashlib.sha256(block * (total // len(block))).digest()
            assert await read_hashed(reader) == (total, expected)
            writer.write_eof()


async def test_half_close_while_paused_keeps_buffered_reply(
    ca_file: Path, ip_cert: trustme.LeafCert, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client half-close while the upstream direction is paused with records buffered in
    the TLS leg sends close_notify without losing them; the rest of the reply follows."""
    # A batch smaller than a record and than one TCP read, so that a pause mostly leaves
    # ciphertext in the BIO and part of a record in the SSLObject: the state in which
    # SSL_shutdown would otherwise fail (OpenSSL 3) or drop data (OpenSSL 1.1).
    monkeypatch.setattr(tlsleg, "READ_BATCH", 5000)
    block = os.urandom(256 * 1024)
    total = 32 * 1024 * 1024
    with tls_server(server_context(ip_cert), flood) as server:
        server.values.update(block=block, total=total, sent=0, trailer=b"trailer")
        async with (
            ambassador(server.port, tls_ca=ca_file) as amb,
            client(amb, rcvbuf=64 * 1024) as (reader, writer),
        ):
            head = bytearray()
            for _ in range(10):
                await stalled(server)
                leg = tls_leg(amb)
                if leg._incoming.pending + leg._sslobj.pending():
                    break
                # The pause fell on a record boundary with nothing left over; move on.
                head += await reader.read(100_000)
            else:
                pytest.fail("the TLS leg never paused with records buffered")
            writer.write_eof()
            n, digest = await read_hashed(reader, hashlib.sha256(head))
            data = block * (total // len(block)) + b"trailer"
            assert (len(head) + n, digest) == (len(data), hashlib.sha256(data).digest())
    assert server.values["after_flood"] == b""
    assert server.errors == []


# -- record boundaries ---------------------------------------------------------------------


class Collect(asyncio.Protocol):
    """A leg's protocol that keeps what it is given."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.reads = 0
        self.eofs = 0

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.reads += 1

    def eof_received(self) -> bool:
        self.eofs += 1
        return True


def unread(sock: socket.socket) -> int:
    """Bytes in ``sock``'s receive queue that its reader has not taken yet."""
    (count,) = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))
    return int(count)


async def test_leg_delivers_split_and_batched_records_then_close_notify(
    ca: trustme.CA, ip_cert: trustme.LeafCert
) -> None:
    """Records split across TCP reads, several records in one read, and a close_notify
    right behind the last record reach the protocol whole, in order, then one EOF (the
    leg stops reading as soon as no ciphertext is left, so this is what could regress)."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    up = socket.create_connection(listener.getsockname())
    server_sock, _ = listener.accept()
    listener.close()
    up.setblocking(False)
    server_sock.setblocking(False)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context(ip_cert).wrap_bio(incoming, outgoing, server_side=True)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    connecting = asyncio.ensure_future(
        tlsleg.connect(up, ctx, server_hostname="127.0.0.1", handshake_timeout=10)
    )
    try:
        async with asyncio.timeout(10):
            handshaken = False
            while not (handshaken and connecting.done()):
                if not handshaken:
                    incoming.write(await loop.sock_recv(server_sock, 65536))
                    try:
                        server.do_handshake()
                        handshaken = True
                    except ssl.SSLWantReadError:
                        pass
                    await loop.sock_sendall(server_sock, outgoing.read())
                else:
                    await asyncio.wait({connecting})
            leg = connecting.result()
            got = Collect()
            leg.attach(got)

            def record(data: bytes) -> bytes:
                server.write(data)
                return outgoing.read()

            async def send(data: bytes) -> None:
                await loop.sock_sendall(server_sock, data)
                await eventually(lambda: unread(up) == 0, "the leg read what was sent")

            one, two, three = b"1" * 100, b"2" * 3000, b"3" * 50
            r1, r2, r3 = record(one), record(two), record(three)
            with contextlib.suppress(ssl.SSLWantReadError):
                server.unwrap()  # close_notify, into the outgoing BIO
            close_notify = outgoing.read()
            await send(r1[:7])  # not even a whole record header
            await send(r1[7:40])
            assert got.data == b""
            await send(r1[40:] + r2 + r3[:20])  # two whole records, a third begun
            await eventually(lambda: got.data == one + two)
            assert got.eofs == 0
            await send(r3[20:] + close_notify)
            await eventually(lambda: got.eofs == 1)
            assert got.data == one + two + three
    finally:
        if connecting.done() and not connecting.exception():
            connecting.result().abort()
        else:
            connecting.cancel()
            up.close()
        server_sock.close()
