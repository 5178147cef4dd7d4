"""PostgreSQL: the ambassador's first protocol handler (``--protocol postgres``).

PostgreSQL does not start with a TLS ClientHello. The client sends an 8-byte SSLRequest,
the server answers ``S`` or ``N``, and TLS starts after an ``S`` (PostgreSQL 17 and later
also take TLS first, "direct SSL", when the ClientHello carries the ALPN protocol
``postgresql``). So a byte relay with ``--upstream-tls`` cannot reach a stock server; this
handler speaks the startup on both sides (docs/ambassador-postgres.md):

* client side (plaintext over loopback or a unix socket): an SSLRequest or GSSENCRequest
  is answered ``N``, the StartupMessage is kept and sent on upstream; a CancelRequest is
  routed to the endpoint that serves the session it names;
* upstream side: SSLRequest, ``S`` required (a byte after it, before the server's TLS
  handshake, aborts: CVE-2021-23222), TLS verified as ``--pg-sslmode`` says, then the
  StartupMessage, and the authentication exchange relayed message by message until
  ReadyForQuery, remembering BackendKeyData for cancel requests;
* every failure before that reaches the client as an ErrorResponse (FATAL, with a
  SQLSTATE), which libpq, psycopg or asyncpg show as the server's own error would be.

Reference: https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP
and protocol-message-formats.html.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Callable

from podpatterns import logs
from podpatterns.ambassador import tlsleg
from podpatterns.ambassador.pgauth import (
    AUTH_OK_MESSAGE,
    Credentials,
    ServerError,
    ServerSession,
    startup_parameters,
)
from podpatterns.ambassador.pgroles import Role, Roles, matches
from podpatterns.ambassador.protocol import (
    Established,
    Failure,
    SessionWatch,
    SocketStream,
    Stream,
    TLSStream,
)
from podpatterns.ambassador.upstreams import Endpoint

SSL_REQUEST = 80877103  # 1234 << 16 | 5679
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
SSL_REQUEST_PACKET = struct.pack("!ii", 8, SSL_REQUEST)
MAX_STARTUP_PACKET = 10000  # the server's own limit (MAX_STARTUP_PACKET_LENGTH)
MAX_MESSAGE = 1 << 20  # an authentication message larger than this is not PostgreSQL
KEY_MIN, KEY_MAX = 4, 256  # cancel key bytes: 4 before protocol 3.2, up to 256 since
ALPN = "postgresql"

# Authentication request codes ('R') the client answers with one message
# (cleartext, MD5, GSS, GSS continue, SSPI, SASL, SASL continue).
_AUTH_NEEDS_REPLY = frozenset({3, 5, 7, 8, 9, 10, 11})

SQLSTATE = {
    "unreachable": "08001",  # sqlclient_unable_to_establish_sqlconnection
    "tls": "08001",
    "timeout": "08001",
    "protocol": "08P01",  # protocol_violation
    "upstream_closed": "08006",  # connection_failure
    "limit": "53300",  # too_many_connections
    "shutdown": "57P01",  # admin_shutdown
    "auth": "28000",  # invalid_authorization_specification
    "credentials": "08001",  # a secret that may come back: the app retries
    "role": "08001",  # as libpq's "could not make a readable-writable connection"
}

SSLMODES = ("disable", "prefer", "require", "verify-ca", "verify-full")


def error_response(sqlstate: str, message: str, severity: str = "FATAL") -> bytes:
    """An ErrorResponse message ('E'): severity (twice, S and V), SQLSTATE, message."""
    fields = b"".join(
        tag + value.encode("utf-8", "replace").replace(b"\0", b"?") + b"\0"
        for tag, value in ((b"S", severity), (b"V", severity), (b"C", sqlstate), (b"M", message))
    )
    body = fields + b"\0"
    return b"E" + struct.pack("!i", len(body) + 4) + body


def _tls_detail(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        # an SSLError made in Python (tlsleg's EOF during the handshake) has no reason
        reason = getattr(exc, "reason", None)
        if reason:
            return str(reason)
        return str(exc.args[-1]) if exc.args else type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out"
    return str(exc) or type(exc).__name__


def _without_channel_binding(message: bytes, endpoint: Endpoint) -> bytes:
    """AuthenticationSASL without the ``-PLUS`` mechanisms.

    Channel binding ties SCRAM to the TLS connection the client sees; the app's leg is
    plaintext, and libpq rightly refuses a ``-PLUS`` offer over it ("server offered
    SCRAM-SHA-256-PLUS authentication over a non-SSL connection"). The server still
    authenticates the client with plain SCRAM-SHA-256.
    """
    names = [n for n in message[9:].split(b"\0") if n and not n.endswith(b"-PLUS")]
    if not names:
        raise Failure(
            "protocol",
            f"podpatterns ambassador: {endpoint} offers only SASL channel binding, "
            "which a plaintext client leg cannot do",
        )
    body = struct.pack("!i", 10) + b"".join(n + b"\0" for n in names) + b"\0"
    return b"R" + struct.pack("!i", len(body) + 4) + body


def _check_gs2_header(body: bytes) -> None:
    """Refuse, naming the fix, a SASLInitialResponse whose GS2 header is ``y``.

    ``y`` says "I can bind to the channel but the server did not offer it": a client
    that speaks TLS to the ambassador (``--listen-tls-cert``) says so when the offer
    comes without ``-PLUS``, and a server that offered ``-PLUS`` rightly takes it for a
    downgrade attack (RFC 5802 section 6), with a message that does not help the app.
    The app's TLS ends at the ambassador, so its channel cannot be bound to the server's.
    """
    _, _, rest = body.partition(b"\0")
    if rest[4:5] == b"y":
        raise Failure(
            "protocol",
            "podpatterns ambassador: the app's TLS ends at the ambassador, so SCRAM "
            "channel binding to the server is impossible; connect with "
            "channel_binding=disable",
        )


def _has_message(buf: bytes) -> bool:
    """True when ``buf`` starts with a whole message, or with a header no message has."""
    if len(buf) < 5:
        return False
    (length,) = struct.unpack_from("!i", buf, 1)
    return not 4 <= length <= MAX_MESSAGE or len(buf) >= 1 + length


class CancelKeys:
    """Which endpoint serves the session a cancel key belongs to.

    Keyed by the CancelRequest's body after the code (process ID and secret key, 4 to
    256 bytes since protocol 3.2), exactly as BackendKeyData gave them.
    """

    def __init__(self) -> None:
        self._by_key: dict[bytes, Endpoint] = {}

    def add(self, key: bytes, endpoint: Endpoint) -> None:
        self._by_key[key] = endpoint

    def remove(self, key: bytes) -> None:
        self._by_key.pop(key, None)

    def get(self, key: bytes) -> Endpoint | None:
        return self._by_key.get(key)

    def __len__(self) -> int:
        return len(self._by_key)


class PostgresHandler:
    """The ``postgres`` protocol of one route (a :class:`~.protocol.ProtocolHandler`).

    Args:
        context: the upstream TLS context (None for a plaintext upstream); a callable so
            that a reloaded context is used by new connections.
        sslmode: ``disable``, ``prefer``, ``require``, ``verify-ca`` or ``verify-full``;
            the context already verifies what the mode asks for.
        negotiation: ``postgres`` (SSLRequest, then TLS) or ``direct`` (TLS first, ALPN
            ``postgresql``: PostgreSQL 17 and later).
        server_name: SNI and verified name; None to use each endpoint's host.
        handshake_timeout: seconds the TLS handshake may take.
        route: the route's name, for logs.
        watch: makes each established session's watch from the endpoint it reached
            (``--pg-drain transaction`` or ``--pg-metrics``:
            :class:`~.pgdrain.TransactionWatch`), or None to relay sessions as bytes.
        listen_context: the listener's TLS server context (``--listen-tls-cert``), a
            callable for reloads; with it the app's SSLRequest is answered ``S`` and its
            TLS terminated here. None answers ``N``.
        listen_certificate: the certificate (DER) a context of ``listen_context``
            presents, for SCRAM-SHA-256-PLUS on the app's leg (``--pg-client-auth``).
        credentials: with ``--pg-password-file`` or ``--pg-password-command``: the app
            holds no password; the ambassador answers the app's startup itself (after
            ``--pg-client-auth``) and authenticates to the server with these
            (:mod:`.pgauth`). None relays the authentication exchange.
        roles: with ``--pg-target-session-attrs``, the endpoints' roles: each session's
            startup reports its server's role, and a session on a server that does not
            serve the target is refused (``role``) before the app hears of it.
    """

    name = "postgres"

    def __init__(
        self,
        context: Callable[[], ssl.SSLContext] | None,
        *,
        sslmode: str = "disable",
        negotiation: str = "postgres",
        server_name: str | None = None,
        handshake_timeout: float = 5.0,
        route: str = "default",
        watch: Callable[[Endpoint], SessionWatch] | None = None,
        listen_context: Callable[[], ssl.SSLContext] | None = None,
        listen_certificate: Callable[[ssl.SSLContext], bytes | None] | None = None,
        credentials: Credentials | None = None,
        roles: Roles | None = None,
    ) -> None:
        if sslmode not in SSLMODES:
            raise ValueError(f"sslmode {sslmode!r}: not one of {SSLMODES}")
        if (context is None) != (sslmode == "disable"):
            raise ValueError("a TLS context is needed exactly when sslmode is not 'disable'")
        self.context = context
        self.sslmode = sslmode
        self.negotiation = negotiation
        self.server_name = server_name
        self.handshake_timeout = handshake_timeout
        self.watch = watch
        self.listen_context = listen_context
        self.listen_certificate = listen_certificate
        self.credentials = credentials
        self.roles = roles
        self.keys = CancelKeys()
        #: With ``--pg-pool``: the server (endpoint, its own key) a CancelRequest carrying a
        #: key the ambassador issued must reach; None when no such app connection holds one.
        self.cancel_target: Callable[[bytes], tuple[Endpoint, bytes] | None] | None = None
        self.cancels = 0  # cancel requests forwarded
        self.cancels_unknown = 0  # cancel requests for a key no session holds
        self.log = logs.get("ambassador", route=route)

    def open(self, client: SocketStream, label: str) -> PostgresSession:
        """A session for a connection just accepted."""
        return PostgresSession(self, client, label)

    async def open_server(
        self,
        upstream: socket.socket,
        endpoint: Endpoint,
        startup: bytes,
        *,
        check_role: bool = True,
    ) -> tuple[Stream, TLSStream | None, ServerSession]:
        """A server connection with no app attached (a pool's, a health check's): TLS
        as the route says, ``startup`` sent (:func:`.pgauth.startup_message`), then
        authenticated with the route's credentials up to ReadyForQuery.

        Args:
            upstream: a connected, non-blocking socket to ``endpoint``.
            endpoint: the endpoint it reaches.
            startup: the StartupMessage to send.
            check_role: with ``--pg-target-session-attrs``, refuse (Failure ``role``) a
                server whose startup reports a role that does not serve the target (a
                pooled connection must not land on a standby); the role is recorded
                either way. The role check itself passes False.

        Returns:
            The stream to use from here (the TLS leg, or the plaintext socket), the TLS
            leg or None, and what the server said up to ReadyForQuery.

        Raises:
            Failure, ServerError: as :meth:`.pgauth.Credentials.authenticate`;
                ConnectionError when the server went away.
        """
        if self.credentials is None:
            raise ValueError("open_server needs credentials (--pg-password-*)")
        plain = SocketStream(upstream)
        tls = (
            None
            if self.sslmode == "disable"
            else await self.negotiate_tls(plain, upstream, endpoint)
        )
        stream: Stream = tls if tls is not None else plain
        try:
            await stream.write(startup)
            user = startup_parameters(startup).get("user", "")
            session = await self.credentials.authenticate(stream, user, str(endpoint))
            if check_role:
                self.check_role(endpoint, session)
        except BaseException:
            if tls is not None:
                tls.transport.abort()  # the caller never saw the leg: close it here
            raise
        return stream, tls, session

    def check_role(self, endpoint: Endpoint, session: ServerSession) -> None:
        """Record the role a server's startup reported (``--pg-target-session-attrs``);
        raise Failure ``role`` when it does not serve the route's target."""
        roles = self.roles
        role = Role.from_parameters(session.parameters)
        if roles is None or role is None:
            return
        roles.update(endpoint, role, "session")
        if not matches(roles.target, role):
            raise Failure(
                "role",
                f"podpatterns ambassador: {endpoint} is {role.name}, not "
                f"{roles.target} (--pg-target-session-attrs)",
            )

    async def negotiate_tls(
        self, plain: SocketStream, upstream: socket.socket, endpoint: Endpoint
    ) -> TLSStream | None:
        """Start TLS on a connected upstream socket as ``sslmode`` and ``negotiation``
        say; None when ``prefer`` settles for plaintext.

        Raises:
            Failure: TLS refused or failed, or bytes injected before the handshake.
        """
        handler = self
        assert handler.context is not None
        if handler.negotiation == "postgres":
            await plain.write(SSL_REQUEST_PACKET)
            answer = await plain.read()
            if not answer:
                raise Failure(
                    "upstream_closed",
                    f"podpatterns ambassador: {endpoint} closed the connection after SSLRequest",
                )
            if answer[:1] == b"N":
                if len(answer) > 1:
                    raise self._injected(endpoint, len(answer) - 1, "N")
                if handler.sslmode == "prefer":
                    handler.log.warning(
                        "pg_tls_refused_plaintext",
                        upstream=str(endpoint),
                        note="--pg-sslmode prefer: continuing WITHOUT TLS",
                    )
                    return None
                raise Failure(
                    "tls",
                    f"podpatterns ambassador: {endpoint} does not accept TLS "
                    "(it answered N to SSLRequest); not falling back to plaintext",
                )
            if answer[:1] != b"S":
                # An 'E' here comes from an unauthenticated peer: not trusted, not shown.
                raise Failure(
                    "protocol",
                    f"podpatterns ambassador: {endpoint} answered SSLRequest with "
                    f"{answer[:1]!r}, not S or N",
                )
            # CVE-2021-23222: bytes after 'S' and before the server's handshake are
            # plaintext that a man in the middle may have injected; never read them as
            # part of the session. What arrived with the 'S' or already waits is refused.
            if len(answer) > 1:
                raise self._injected(endpoint, len(answer) - 1, "S")
            try:
                waiting = upstream.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                waiting = b""
            if waiting:
                raise self._injected(endpoint, 1, "S")
        name = handler.server_name or endpoint.address.host
        try:
            leg = await tlsleg.connect(
                upstream,
                handler.context(),
                server_hostname=name,
                handshake_timeout=handler.handshake_timeout,
            )
        except (ssl.SSLError, TimeoutError, ConnectionError) as exc:
            raise Failure(
                "tls", f"podpatterns ambassador: TLS to {endpoint} failed: {_tls_detail(exc)}"
            ) from exc
        if handler.negotiation == "direct":
            ssl_object = leg.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.selected_alpn_protocol() != ALPN:
                leg.abort()
                raise Failure(
                    "tls",
                    f"podpatterns ambassador: {endpoint} did not select ALPN {ALPN!r} "
                    "for direct TLS (PostgreSQL 17 or later needed; or use "
                    "--pg-tls-negotiation postgres)",
                )
        return TLSStream(leg)

    @staticmethod
    def _injected(endpoint: Endpoint, n: int, answer: str) -> Failure:
        return Failure(
            "protocol",
            f"podpatterns ambassador: {endpoint} sent {n} unexpected byte(s) after "
            f"{answer!r} to SSLRequest (possible injection, CVE-2021-23222); connection aborted",
        )


class PostgresSession:
    """One client connection until ReadyForQuery (a :class:`~.protocol.ProtocolSession`)."""

    def __init__(self, handler: PostgresHandler, client: SocketStream, label: str) -> None:
        self.handler = handler
        self._plain = client
        self.client: Stream = client  # the TLS leg instead, once the app's TLS is on
        self._client_tls: TLSStream | None = None
        self._listen_cert: bytes | None = None  # our certificate on the app's TLS leg
        self.label = label
        self.startup: bytes | None = None  # the StartupMessage, to send upstream
        self.cancel: bytes | None = None  # a CancelRequest's key, when that is what came
        self._pinned: Endpoint | None = None
        self.key: bytes | None = None  # BackendKeyData of this session, once seen
        self._bindable = False  # the server offered SCRAM channel binding (-PLUS)
        self._handshaking = False  # the TLS handshake with the app is under way
        self._interrupted = False

    @property
    def pinned(self) -> Endpoint | None:
        """The endpoint a CancelRequest must reach; None for a new session."""
        return self._pinned

    # -- client side ---------------------------------------------------------------------

    async def accept(self) -> bool:
        """Answer SSLRequest/GSSENCRequest with ``N``; read the StartupMessage or a
        CancelRequest. False when the client left, or cancelled an unknown session."""
        try:
            accepted = await self._accept()
        except BaseException:
            self._interrupted = True  # mid-packet, perhaps: the boundary is unknown
            raise
        creds = self.handler.credentials
        if accepted and self.startup is not None and creds and creds.client_password:
            return await self._check_client_password(creds)
        return accepted

    async def _check_client_password(self, creds: Credentials) -> bool:
        """``--pg-client-auth password-file``: the app proves its own password.

        SCRAM-SHA-256 by default (``-PLUS``, bound to the listener's certificate, when
        the app's leg is TLS), cleartext with ``--pg-client-auth-method password``
        (:meth:`.pgauth.ClientPassword.authenticate`). A wrong password gets the
        server's own words for it, FATAL 28P01, and is counted; it is never logged.
        """
        assert creds.client_password is not None and self.startup is not None
        user = startup_parameters(self.startup).get("user", "")
        try:
            if await creds.client_password.authenticate(self.client, self._listen_cert):
                return True
        except ConnectionError:
            return False  # libpq without a password closes here (fe_sendauth)
        creds.client_rejected += 1
        self.handler.log.info("pg_client_auth_failed", client=self.label, user=user)
        message = f'password authentication failed for user "{user}"'
        await self.client.write(error_response("28P01", message))
        return False

    async def _accept(self) -> bool:
        client = self.client
        for _ in range(3):  # at most an SSLRequest and a GSSENCRequest before the startup
            try:
                head = await client.read_exactly(4)
            except ConnectionError:
                return False
            (length,) = struct.unpack("!i", head)
            if not 8 <= length <= MAX_STARTUP_PACKET:
                # A TLS ClientHello (libpq's sslnegotiation=direct) lands here too: the
                # client leg is plaintext by design.
                raise Failure(
                    "protocol",
                    f"podpatterns ambassador: invalid startup packet length {length} "
                    "(the client must connect without TLS: sslmode=disable or prefer)",
                )
            body = await client.read_exactly(length - 4)
            (code,) = struct.unpack("!i", body[:4])
            if code in (SSL_REQUEST, GSSENC_REQUEST) and length == 8:
                if self._client_tls is not None:
                    raise Failure(
                        "protocol",
                        "podpatterns ambassador: encryption requested again inside TLS",
                    )
                if code == SSL_REQUEST and self.handler.listen_context is not None:
                    client = await self._start_client_tls()
                    continue
                # Without --listen-tls-cert the client leg stays plaintext (loopback or a
                # unix socket inside the Pod); TLS is the upstream leg's business. GSSAPI
                # encryption is never offered.
                await client.write(b"N")
                continue
            if code == CANCEL_REQUEST:
                key = body[4:]
                if not KEY_MIN <= len(key) - 4 <= KEY_MAX:
                    return False  # the server ignores a malformed cancel too
                self.cancel = key
                pooled = self.handler.cancel_target
                target = pooled(key) if pooled is not None else None
                if target is not None:  # --pg-pool: the key is ours; the server's own
                    self._pinned, self.cancel = target
                    return True
                self._pinned = self.handler.keys.get(key)
                if self._pinned is None:
                    self.handler.cancels_unknown += 1
                    return False
                return True
            if code >> 16 != 3:
                raise Failure(
                    "protocol",
                    f"podpatterns ambassador: unsupported frontend protocol "
                    f"{code >> 16}.{code & 0xFFFF}",
                )
            self.startup = head + body
            return True
        raise Failure("protocol", "podpatterns ambassador: too many negotiation requests")

    async def _start_client_tls(self) -> Stream:
        """Answer the app's SSLRequest ``S`` and run the TLS server handshake."""
        handler = self.handler
        assert handler.listen_context is not None
        sock = self._plain.sock
        # What PostgreSQL checks too (CVE-2021-23222, the server's side): plaintext the
        # app sent after its SSLRequest, before our S, is not read as part of the session.
        try:
            waiting = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            waiting = b""
        if waiting:
            raise Failure(
                "protocol",
                "podpatterns ambassador: received unencrypted data after SSL request",
            )
        await self._plain.write(b"S")
        self._handshaking = True  # cut short, the client's stream is neither plain nor TLS
        context = handler.listen_context()
        if handler.listen_certificate is not None:  # what SCRAM-SHA-256-PLUS binds to
            self._listen_cert = handler.listen_certificate(context)
        leg = await tlsleg.accept(sock, context, handshake_timeout=handler.handshake_timeout)
        self._handshaking = False
        self._client_tls = TLSStream(leg)
        self.client = self._client_tls
        return self.client

    # -- upstream side -------------------------------------------------------------------

    async def connect(self, upstream: socket.socket, endpoint: Endpoint) -> Established | None:
        """TLS as the mode says, then the startup and authentication until ReadyForQuery."""
        stream: Stream
        tls: TLSStream | None = None
        plain = SocketStream(upstream)
        if self.handler.sslmode == "disable":
            stream = plain
        else:
            tls = await self.handler.negotiate_tls(plain, upstream, endpoint)
            stream = tls if tls is not None else plain
        if self.cancel is not None:
            await self._forward_cancel(stream, endpoint)
            return None
        assert self.startup is not None
        await stream.write(self.startup)
        if self.handler.credentials is not None:
            try:
                leftover = await self._authenticate_here(stream, endpoint, self.handler.credentials)
            except Failure as failure:
                if failure.kind == "role" and tls is not None:
                    tls.transport.abort()  # the route dials again: leave nothing behind
                raise
        else:
            leftover = await self._authenticate(stream, endpoint)
        if leftover is None:
            return None
        if self.key is not None:
            self.handler.keys.add(self.key, endpoint)
        return Established(
            upstream,
            tls,
            to_client=leftover + stream.take_buffered(),
            to_upstream=self.client.take_buffered(),
            # at ReadyForQuery both streams stand at a message boundary: a watch starts here
            watch=self.handler.watch(endpoint) if self.handler.watch is not None else None,
            client=self._client_tls,
        )

    async def _forward_cancel(self, stream: Stream, endpoint: Endpoint) -> None:
        """Send the CancelRequest and wait until the server closes (as libpq does)."""
        assert self.cancel is not None
        packet = struct.pack("!ii", 8 + len(self.cancel), CANCEL_REQUEST) + self.cancel
        await stream.write(packet)
        try:
            while await stream.read():
                pass
        except ConnectionError:
            pass  # the server is done with it either way
        self.handler.cancels += 1

    async def _authenticate_here(
        self, upstream: Stream, endpoint: Endpoint, creds: Credentials
    ) -> bytes | None:
        """Authenticate to the server with the route's secret; then give the app
        AuthenticationOk and the server's messages up to ReadyForQuery.

        None when the server refused (its ErrorResponse, 28P01 for a wrong password,
        is passed on to the app exactly as sent; the server closes next).
        """
        assert self.startup is not None
        user = startup_parameters(self.startup).get("user", "")
        try:
            session = await creds.authenticate(upstream, user, str(endpoint))
        except ServerError as exc:
            self.handler.log.warning(
                "pg_upstream_auth_rejected",
                upstream=str(endpoint),
                user=user,
                sqlstate=exc.sqlstate,
                error=exc.fields.get("M", ""),
            )
            await self.client.write(exc.raw)
            return None
        # a role that does not serve the target is refused before the app hears
        # anything: the route dials again (Startup.run)
        self.handler.check_role(endpoint, session)
        key = session.key
        if key is not None and KEY_MIN <= len(key) - 4 <= KEY_MAX:
            self.key = key
        await self.client.write(AUTH_OK_MESSAGE + session.messages)
        return session.leftover

    async def _authenticate(self, upstream: Stream, endpoint: Endpoint) -> bytes | None:
        """Relay the authentication until ReadyForQuery; the bytes read past it.

        Lock-step, as the protocol is: the server's messages are passed on in batches,
        and after an authentication request that needs an answer, exactly one client
        message is read and passed on. None when the server ended the startup with an
        ErrorResponse (already passed on; the server closes next).
        """
        buf = b""
        while True:
            if not _has_message(buf):
                data = await upstream.read()
                if not data:
                    raise Failure(
                        "upstream_closed",
                        f"podpatterns ambassador: {endpoint} closed the connection during startup",
                    )
                buf += data
                continue
            pos = 0
            out: list[bytes] = []
            reply = done = error = False
            while _has_message(buf[pos:]):
                kind = buf[pos : pos + 1]
                (length,) = struct.unpack_from("!i", buf, pos + 1)
                if not 4 <= length <= MAX_MESSAGE:
                    raise Failure(
                        "protocol",
                        f"podpatterns ambassador: {endpoint} sent an invalid message "
                        f"during startup (type {kind!r}, length {length})",
                    )
                end = pos + 1 + length
                message = buf[pos:end]
                if kind == b"R" and length >= 8:
                    (code,) = struct.unpack_from("!i", buf, pos + 5)
                    reply = code in _AUTH_NEEDS_REPLY
                    if code == 10:
                        message = _without_channel_binding(message, endpoint)
                        self._bindable = len(message) != 1 + length
                elif kind == b"K":
                    key = buf[pos + 5 : end]
                    if KEY_MIN <= len(key) - 4 <= KEY_MAX:
                        self.key = key
                elif kind == b"Z":
                    done = True
                elif kind == b"E":
                    error = True
                out.append(message)
                pos = end
                if done or error or reply:
                    break
            if out:
                await self.client.write(b"".join(out))
                buf = buf[pos:]
            if done:
                return buf
            if error:
                return None
            if reply:
                head = await self.client.read_exactly(5)
                (length,) = struct.unpack_from("!i", head, 1)
                if not 4 <= length <= MAX_MESSAGE:
                    raise Failure(
                        "protocol",
                        f"podpatterns ambassador: invalid client message during "
                        f"authentication (type {head[:1]!r}, length {length})",
                    )
                body = await self.client.read_exactly(length - 4)
                if head[:1] == b"p" and self._bindable:
                    _check_gs2_header(body)
                await upstream.write(head + body)

    # -- failures ------------------------------------------------------------------------

    async def refuse(self, failure: Failure) -> None:
        """Finish the client's startup if needed, then send a FATAL ErrorResponse."""
        if self.cancel is not None:
            return  # a cancel request gets no answer, ever
        if self.client.writing or self._handshaking:
            return  # cut while sending the client a message: its stream is broken
        if self.startup is None and not self._interrupted:
            # refused before the startup was read: read it, so that an SSLRequest gets
            # its N first (libpq shows no text of an error answering an SSLRequest)
            try:
                if not await self._accept() or self.cancel is not None:
                    return
            except (Failure, ConnectionError):
                return
        # Cut while reading the startup (a drain, --startup-timeout): the rest of the
        # client's packet is not waited for; the client reads the error when it reads.
        await self.client.write(error_response(SQLSTATE[failure.kind], failure.message))
        if self._client_tls is not None:
            self._client_tls.transport.close()  # close_notify after the error, then FIN

    def finished(self) -> None:
        """Forget this session's cancel key; close the app's TLS leg if no relay took it."""
        if self.key is not None:
            self.handler.keys.remove(self.key)
            self.key = None
        tls, self._client_tls = self._client_tls, None
        if tls is not None and not tls.handed_over and not tls.transport.is_closing():
            tls.transport.abort()  # a relay never took it (refuse() closed it otherwise)
