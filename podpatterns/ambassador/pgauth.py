"""PostgreSQL credentials the app never holds (issue 14): secrets and server authentication.

The app connects over loopback with a user name and no password; the ambassador
authenticates to the server itself. This module has the two halves of that:

* **secret sources**: :class:`PasswordFile` (``--pg-password-file``, a Kubernetes Secret
  volume: re-read when the file changes, including the kubelet's ``..data`` symlink swap,
  and counted) and :class:`PasswordCommand` (``--pg-password-command``, a command that
  prints a token such as a cloud IAM token: cached until a margin before its expiry, run
  at most once a minute however many connections arrive, single-flight);
* **the client side of server authentication**: :func:`authenticate` answers the
  server's authentication requests on a server stream on which the StartupMessage was
  sent (SCRAM-SHA-256, SCRAM-SHA-256-PLUS with ``tls-server-end-point`` channel binding,
  MD5, cleartext only where allowed), checks the server's SCRAM signature, and returns
  what the server sent after AuthenticationOk up to ReadyForQuery. It needs no client:
  a pooled server connection or a health connection use it the same way.
* **the server side on the app's leg** (``--pg-client-auth password-file``):
  :class:`ClientPassword` holds the app's own password or the SCRAM verifier PostgreSQL
  keeps for it, and :func:`scram_server` checks the app's SCRAM-SHA-256 proof (with
  ``tls-server-end-point`` channel binding over the app's TLS), or a cleartext password
  when ``--pg-client-auth-method password`` asks for one. Both sides share the SCRAM
  primitives (:func:`salted_keys`, :func:`scram_nonce`, :func:`scram_attributes`).

Secrets never leave this module in a message: errors name the option and the file or
command, never the content.

References: RFC 5802 (SCRAM), RFC 7677 (SCRAM-SHA-256), RFC 5803 (the verifier's
form), RFC 5929 section 4.1
(``tls-server-end-point``), RFC 4013 (SASLprep), and
https://www.postgresql.org/docs/current/sasl-authentication.html.
"""

from __future__ import annotations

import asyncio
import base64
import calendar
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import shlex
import ssl
import stringprep
import struct
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from podpatterns import logs
from podpatterns.ambassador.certinfo import signature_oid
from podpatterns.ambassador.protocol import Failure, Stream, TLSStream
from podpatterns.subproc import run_output

#: Upstream authentication methods the ambassador can answer (``--pg-auth-methods``).
METHODS = ("scram-sha-256", "md5", "password")

MAX_MESSAGE = 1 << 20  # a startup-phase message larger than this is not PostgreSQL
MAX_TOKEN = 64 * 1024  # a password command's output beyond this is refused

# AuthenticationRequest codes
AUTH_OK, AUTH_CLEARTEXT, AUTH_MD5 = 0, 3, 5
AUTH_SASL, AUTH_SASL_CONTINUE, AUTH_SASL_FINAL = 10, 11, 12
_CODE_NAMES = {2: "Kerberos V5", 6: "SCM credentials", 7: "GSSAPI", 8: "GSSAPI", 9: "SSPI"}

#: AuthenticationOk, as the ambassador sends it to an app it authenticated itself.
AUTH_OK_MESSAGE = b"R" + struct.pack("!ii", 8, AUTH_OK)
#: AuthenticationCleartextPassword: the ambassador asks the app for its own password.
AUTH_CLEARTEXT_MESSAGE = b"R" + struct.pack("!ii", 8, AUTH_CLEARTEXT)

# Signature algorithm OIDs whose hash is MD5 or SHA-1: channel binding uses SHA-256
# for those (RFC 5929 section 4.1), else the signature's own hash.
_SIG_HASH = {
    "1.2.840.113549.1.1.4": "sha256",  # md5WithRSAEncryption
    "1.2.840.113549.1.1.5": "sha256",  # sha1WithRSAEncryption
    "1.2.840.10045.4.1": "sha256",  # ecdsa-with-SHA1
    "1.2.840.10040.4.3": "sha256",  # dsa-with-sha1
    "1.2.840.113549.1.1.14": "sha224",
    "1.2.840.113549.1.1.11": "sha256",
    "1.2.840.113549.1.1.12": "sha384",
    "1.2.840.113549.1.1.13": "sha512",
    "1.2.840.10045.4.3.1": "sha224",
    "1.2.840.10045.4.3.2": "sha256",
    "1.2.840.10045.4.3.3": "sha384",
    "1.2.840.10045.4.3.4": "sha512",
    "2.16.840.1.101.3.4.3.2": "sha256",  # dsa-with-sha256
}


class ServerError(Exception):
    """The server ended the startup with an ErrorResponse.

    Attributes:
        raw: the ErrorResponse message exactly as the server sent it ('E', length,
            fields), to pass on to an app so that it sees the server's own error
            (28P01 for a wrong password).
        fields: the message's fields by their one-letter code (``C``: SQLSTATE,
            ``M``: message, ``S``: severity).
    """

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.fields = error_fields(raw)
        super().__init__(
            f"{self.fields.get('S', 'ERROR')}: {self.fields.get('M', '')} "
            f"(SQLSTATE {self.sqlstate})"
        )

    @property
    def sqlstate(self) -> str:
        """The error's SQLSTATE (``28P01``: invalid_password)."""
        return self.fields.get("C", "XX000")


class SecretError(Exception):
    """A secret source could not give a secret. The message names the option and the
    file or command, never a secret."""


def error_fields(raw: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse or NoticeResponse message, by field code."""
    out: dict[str, str] = {}
    for part in raw[5:].split(b"\0"):
        if part:
            out.setdefault(chr(part[0]), part[1:].decode("utf-8", "replace"))
    return out


# -- secret sources ---------------------------------------------------------------------------


class SecretSource(Protocol):
    """Where the password (or token) for the server comes from."""

    async def get(self) -> str:
        """The secret for a new server connection. Raises :class:`SecretError`."""

    def invalidate(self) -> None:
        """The server refused the secret: get a fresh one for the next connection
        (within the source's own rate limit)."""


def _strip_newline(text: str) -> str:
    # `echo secret > file` and `kubectl create secret --from-file` keep a newline the
    # password does not have; other whitespace is the password's own.
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def _read_secret(path: Path) -> str:
    with path.open("rb") as f:
        data = f.read(MAX_TOKEN + 1)
    if len(data) > MAX_TOKEN:
        raise SecretError(f"{path}: larger than {MAX_TOKEN} bytes")
    try:
        return _strip_newline(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise SecretError(f"{path}: not UTF-8 text") from None


class PasswordFile:
    """A password in a file, re-read when the file changes (``--pg-password-file``).

    Each :meth:`get` costs one ``stat`` of the path, which follows the symlinks of a
    Kubernetes Secret volume (``password -> ..data/password``, ``..data -> ..2026_...``):
    when the kubelet swaps ``..data``, the identity of the file the path names changes,
    and the new file is read on a worker thread, never on the event loop. So a rotation
    applies to the next server connection; connections already authenticated go on.

    Args:
        path: the file; one trailing newline is not part of the password.
        option: the option that named it, for error messages.

    Attributes:
        rotations: times the content changed after the first read.
        failures: stats or reads that failed (the last password is kept).
    """

    def __init__(self, path: Path, option: str = "--pg-password-file") -> None:
        self.path = path
        self.option = option
        self.rotations = 0
        self.failures = 0
        self._value: str | None = None
        self._identity: tuple[int, int, int, int] | None = None
        self._reading: asyncio.Lock | None = None
        self._log = logs.get("ambassador")

    def _stat(self) -> tuple[int, int, int, int]:
        st = os.stat(self.path)
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def load(self) -> str:
        """Read the file now (blocking: at start). Raises :class:`SecretError`."""
        try:
            identity = self._stat()
            value = _read_secret(self.path)
        except OSError as exc:
            raise SecretError(
                f"{self.option}: cannot read {self.path}: {exc.strerror or exc}"
            ) from None
        except SecretError as exc:
            raise SecretError(f"{self.option}: {exc}") from None
        if not value:
            raise SecretError(f"{self.option}: {self.path} is empty")
        self._accept(value, identity)
        return value

    def _accept(self, value: str, identity: tuple[int, int, int, int]) -> None:
        if self._value is not None and value != self._value:
            self.rotations += 1
            self._log.info("pg_password_rotated", path=str(self.path), rotations=self.rotations)
        self._value = value
        self._identity = identity

    async def get(self) -> str:
        """The password; the file is re-read first when it changed."""
        try:
            identity = self._stat()
        except OSError as exc:
            return self._keep(exc)
        if identity == self._identity and self._value is not None:
            return self._value
        if self._reading is None:
            self._reading = asyncio.Lock()
        async with self._reading:  # single-flight: one read however many connections
            if identity == self._identity and self._value is not None:
                return self._value
            try:
                value = await asyncio.to_thread(_read_secret, self.path)
            except (OSError, SecretError) as exc:
                return self._keep(exc)
            if not value:
                return self._keep(SecretError("empty file"))
            self._accept(value, identity)
            return value

    def _keep(self, exc: Exception) -> str:
        """A failed stat or read: keep the last password (a swap in progress)."""
        self.failures += 1
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        self._log.warning("pg_password_file_failed", path=str(self.path), error=why)
        if self._value is None:
            raise SecretError(f"{self.option}: cannot read {self.path}: {why}")
        return self._value

    def invalidate(self) -> None:
        """Re-read the file on the next :meth:`get` even if it looks unchanged."""
        self._identity = None


def parse_token_output(out: bytes, now: float) -> tuple[str, float | None]:
    """A password command's output: (token, expiry as Unix seconds or None).

    Plain text is the token (one trailing newline dropped). A JSON object gives it in
    ``token`` (or ``access_token``, ``password``) and its expiry in ``expiry`` (or
    ``expires_at``, ``expiration``, ``expireTime``: Unix seconds or RFC 3339 UTC) or
    ``expires_in`` (seconds from now).

    Raises:
        SecretError: empty output, not UTF-8, or a JSON object without a token.
    """
    try:
        text = out.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SecretError("the output is not UTF-8 text") from None
    if not text:
        raise SecretError("the output is empty")
    if not text.startswith("{"):
        return text, None
    try:
        data = json.loads(text)
    except ValueError:
        raise SecretError("the output starts with { but is not JSON") from None
    if not isinstance(data, dict):
        raise SecretError("the JSON output is not an object")
    token = next((data[k] for k in ("token", "access_token", "password") if k in data), None)
    if not isinstance(token, str) or not token:
        raise SecretError("the JSON output has no token (token, access_token or password)")
    expiry: float | None = None
    if isinstance(data.get("expires_in"), int | float):
        expiry = now + float(data["expires_in"])
    for key in ("expiry", "expires_at", "expiration", "expireTime"):
        if key in data:
            expiry = _timestamp(data[key])
            break
    return token, expiry


def _timestamp(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip().replace("+00:00", "Z")
        if text.endswith("Z"):
            head = text[:-1].split(".", 1)[0]
            try:
                return float(calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S")))
            except ValueError:
                pass
    raise SecretError("the JSON output's expiry is neither Unix seconds nor RFC 3339 UTC")


class PasswordCommand:
    """A token printed by a command (``--pg-password-command``), cached.

    The token is used until a margin before its expiry (the output's own, see
    :func:`parse_token_output`, else ``ttl`` after the run): ``min(margin, lifetime/4)``
    before it. However many connections arrive, the command runs at most once per
    ``min_interval`` (single-flight: the connections that arrive during a run wait for
    it), never per connection. A failed refresh keeps the previous token while it has
    not expired.

    Args:
        command: the command line, split like a shell would (no shell runs it).
        ttl: seconds a token is used when the output names no expiry.
        margin: refresh this long before the expiry (at most a quarter of the lifetime).
        min_interval: the least time between two runs while a token is valid.
        retry_pause: the least time between a failed run and the next one.
        timeout: seconds a run may take.
        clock: wall-clock seconds (expiries are wall-clock times).

    Attributes:
        runs: commands run; failures: runs that gave no token.
    """

    def __init__(
        self,
        command: str,
        ttl: float = 600.0,
        *,
        margin: float = 300.0,
        min_interval: float = 60.0,
        retry_pause: float = 5.0,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        option: str = "--pg-password-command",
    ) -> None:
        try:
            self.argv = shlex.split(command)
        except ValueError as exc:
            raise SecretError(f"{option}: cannot split the command line: {exc}") from None
        if not self.argv:
            raise SecretError(f"{option}: empty command")
        self.ttl = ttl
        self.margin = margin
        self.min_interval = min_interval
        self.retry_pause = retry_pause
        self.timeout = timeout
        self.option = option
        self.runs = 0
        self.failures = 0
        self._clock = clock
        self._token: str | None = None
        self._expires = 0.0
        self._refresh_at = 0.0
        self._last_run: float | None = None
        self._last_error = ""  # why the last run failed; "" when it gave a token
        self._lock: asyncio.Lock | None = None
        self._log = logs.get("ambassador")

    @property
    def expires(self) -> float | None:
        """When the cached token expires (Unix seconds), or None before the first."""
        return self._expires if self._token is not None else None

    def _fresh(self, now: float) -> bool:
        if self._token is None or now >= self._expires:
            return False
        if now < self._refresh_at:
            return True
        # due for a refresh, but not more often than once per min_interval
        return self._last_run is not None and now - self._last_run < self.min_interval

    async def get(self) -> str:
        """The token, from the cache or from one run of the command."""
        if self._fresh(self._clock()) and self._token is not None:
            return self._token
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            now = self._clock()
            if self._fresh(now) and self._token is not None:
                return self._token  # refreshed by the run this one waited for
            last = self._last_run
            if self._last_error and last is not None and now - last < self.retry_pause:
                # the last run failed just now: never a run per connection while the
                # issuer is down; the previous token while it is valid, else the error
                if self._token is not None and now < self._expires:
                    return self._token
                raise SecretError(f"{self.option}: {self.argv[0]} {self._last_error}")
            return await self._run(now)

    async def _run(self, now: float) -> str:
        self._last_run = now
        self._last_error = ""
        self.runs += 1
        try:
            async with asyncio.timeout(self.timeout):
                code, out, err = await run_output(self.argv)
        except TimeoutError:
            code, out, err = -1, b"", f"timed out after {self.timeout:g}s"
        why = ""
        if code != 0:
            why = f"exited {code}" + (f": {err}" if err else "")
        elif len(out) > MAX_TOKEN:
            why = f"printed more than {MAX_TOKEN} bytes"
        else:
            try:
                token, expiry = parse_token_output(out, now)
            except SecretError as exc:
                why = str(exc)
            else:
                lifetime = (expiry - now) if expiry is not None else self.ttl
                self._token = token
                self._expires = now + lifetime
                self._refresh_at = self._expires - min(self.margin, lifetime / 4)
                self._log.info(
                    "pg_password_command_refreshed",
                    runs=self.runs,
                    expires_in=round(lifetime, 1),
                    size=len(token),
                )
                return token
        self.failures += 1
        self._last_error = why
        self._log.warning("pg_password_command_failed", command=self.argv[0], error=why)
        if self._token is not None and now < self._expires:
            return self._token  # still valid: keep serving while the issuer recovers
        raise SecretError(f"{self.option}: {self.argv[0]} {why}")

    def invalidate(self) -> None:
        """Refresh on the next :meth:`get` (after ``min_interval`` since the last run)."""
        self._refresh_at = 0.0


def password_source(
    file: Path | None, command: str | None, ttl: float = 600.0
) -> SecretSource | None:
    """The source the options name, checked now (a file is read once). Raises
    :class:`SecretError` for a file that cannot be read or a command line that cannot
    be split."""
    if file is not None:
        source = PasswordFile(file)
        source.load()
        return source
    if command is not None:
        return PasswordCommand(command, ttl)
    return None


# -- the client side of server authentication --------------------------------------------


def startup_message(user: str, database: str, **parameters: str) -> bytes:
    """A protocol 3.0 StartupMessage for a connection the ambassador makes itself (a
    pool's, a health check's)."""
    pairs = {"user": user, "database": database, **parameters}
    body = struct.pack("!i", 196608) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in pairs.items()
    )
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def startup_parameters(startup: bytes) -> dict[str, str]:
    """The parameters of a StartupMessage (length, protocol, then name/value pairs)."""
    items = startup[8:].split(b"\0")
    out: dict[str, str] = {}
    for i in range(0, len(items) - 1, 2):
        if not items[i]:
            break
        out[items[i].decode("utf-8", "replace")] = items[i + 1].decode("utf-8", "replace")
    return out


def channel_binding_data(cert_der: bytes) -> bytes:
    """``tls-server-end-point`` channel-binding data (RFC 5929 section 4.1): the hash of
    the server certificate with its signature's hash, SHA-256 for MD5 and SHA-1.

    Raises:
        ValueError: the signature algorithm has no single hash (RSASSA-PSS, Ed25519:
            PostgreSQL cannot bind to those either).
    """
    oid = signature_oid(cert_der)
    name = _SIG_HASH.get(oid)
    if name is None:
        raise ValueError(f"no channel-binding hash for signature algorithm {oid}")
    return hashlib.new(name, cert_der).digest()


def peer_certificate(stream: Stream) -> bytes | None:
    """The server certificate (DER) of a TLS stream, or None for a plaintext one."""
    if not isinstance(stream, TLSStream):
        return None
    obj = stream.transport.get_extra_info("ssl_object")
    if not isinstance(obj, ssl.SSLObject | ssl.SSLSocket):
        return None
    der = obj.getpeercert(binary_form=True)
    return der or None


def saslprep(password: str) -> bytes:
    """SASLprep (RFC 4013) of a password, as PostgreSQL applies it; the raw bytes when
    the password is not a valid SASLprep string (PostgreSQL does the same)."""
    raw = password.encode("utf-8")
    if password.isascii() and all(0x20 <= b < 0x7F for b in raw):
        return raw  # printable ASCII: unchanged
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in password if not stringprep.in_table_b1(c)
    )
    text = unicodedata.normalize("NFKC", mapped)
    if not text:
        return raw
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    if any(check(c) for c in text for check in prohibited):
        return raw
    if any(stringprep.in_table_d1(c) for c in text):
        if any(stringprep.in_table_d2(c) for c in text):
            return raw
        if not (stringprep.in_table_d1(text[0]) and stringprep.in_table_d1(text[-1])):
            return raw
    return text.encode("utf-8")


# -- SCRAM primitives: one implementation for both sides (RFC 5802 section 3) ----------------


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, "sha256").digest()


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def scram_nonce() -> bytes:
    """A fresh SCRAM nonce: 18 random bytes, base64 (printable, no comma), as libpq and
    the PostgreSQL server make theirs."""
    return base64.b64encode(secrets.token_bytes(18))


def scram_attributes(message: bytes) -> dict[bytes, bytes]:
    """The ``a=value`` attributes of a SCRAM message, by their one-letter name (the
    first of each name kept)."""
    out: dict[bytes, bytes] = {}
    for part in message.split(b","):
        if part[1:2] == b"=":
            out.setdefault(part[:1], part[2:])
    return out


def salted_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey) of RFC 5802 for this password, salt and iteration count:
    ``iterations`` PBKDF2 rounds, so milliseconds; no cache (see :func:`_scram_keys`)."""
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)
    return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")


# SCRAM keys per (password, salt, iterations): the salt of a role stays the same, so a
# new connection costs two HMACs instead of 4096 PBKDF2 rounds (pgbouncer caches too).
# Only the ambassador's own secret goes in: an app's wrong passwords must not evict it.
_KEYS: dict[tuple[bytes, bytes, int], tuple[bytes, bytes]] = {}
_KEYS_MAX = 64


def _scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """:func:`salted_keys`, cached per (password digest, salt, iterations)."""
    digest = hashlib.sha256(saslprep(password)).digest()  # the cache holds no password
    key = (digest, salt, iterations)
    found = _KEYS.get(key)
    if found is None:
        found = salted_keys(password, salt, iterations)
        if len(_KEYS) >= _KEYS_MAX:
            _KEYS.pop(next(iter(_KEYS)))
        _KEYS[key] = found
    return found


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    """The MD5 PasswordMessage payload: ``md5`` + md5(md5(password + user) + salt)."""
    inner = hashlib.md5((password + user).encode(), usedforsecurity=False).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt, usedforsecurity=False).hexdigest().encode()


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


@dataclass
class ServerSession:
    """A server connection after authentication, at its first ReadyForQuery.

    Attributes:
        messages: what the server sent after AuthenticationOk up to and including
            ReadyForQuery (ParameterStatus, BackendKeyData, NoticeResponse,
            ReadyForQuery), exactly as sent: an app's connection can be given them.
        parameters: the ParameterStatus values (``server_version``,
            ``in_hot_standby``...).
        key: the BackendKeyData body (process ID and secret key), or None.
        method: how the ambassador authenticated: ``scram-sha-256-plus``,
            ``scram-sha-256``, ``md5``, ``password`` or ``trust`` (the server asked
            nothing).
        leftover: bytes read past ReadyForQuery (none from a conforming server).
    """

    messages: bytes
    parameters: dict[str, str] = field(default_factory=dict)
    key: bytes | None = None
    method: str = "trust"
    leftover: bytes = b""


class _Reader:
    """Whole messages from a stream during the startup."""

    def __init__(self, stream: Stream, endpoint: str) -> None:
        self.stream = stream
        self.endpoint = endpoint

    async def next(self) -> tuple[bytes, bytes]:
        """(type byte, whole message). Raises Failure, or ServerError for an 'E'."""
        try:
            head = await self.stream.read_exactly(5)
            (length,) = struct.unpack_from("!i", head, 1)
            if not 4 <= length <= MAX_MESSAGE:
                raise Failure(
                    "protocol",
                    f"podpatterns ambassador: {self.endpoint} sent an invalid message during "
                    f"startup (type {head[:1]!r}, length {length})",
                )
            message = head + await self.stream.read_exactly(length - 4)
        except ConnectionError:
            raise Failure(
                "upstream_closed",
                f"podpatterns ambassador: {self.endpoint} closed the connection during startup",
            ) from None
        if head[:1] == b"E":
            raise ServerError(message)
        return head[:1], message


def _auth_code(kind: bytes, message: bytes, endpoint: str) -> int:
    if kind != b"R" or len(message) < 9:
        raise Failure(
            "protocol",
            f"podpatterns ambassador: {endpoint} sent {kind!r} during authentication",
        )
    (code,) = struct.unpack_from("!i", message, 5)
    return int(code)


def _refused(method: str, endpoint: str, why: str) -> Failure:
    return Failure(
        "auth",
        f"podpatterns ambassador: {endpoint} asks for {method} authentication, {why}",
    )


async def authenticate(
    stream: Stream,
    *,
    user: str,
    password: str,
    methods: Collection[str] = ("scram-sha-256",),
    server_cert: bytes | None = None,
    endpoint: str = "the server",
) -> ServerSession:
    """Authenticate on a server connection whose StartupMessage was just sent.

    Answers the server's authentication request (SASL SCRAM-SHA-256, with channel
    binding ``SCRAM-SHA-256-PLUS`` when ``server_cert`` is given and the server offers
    it; MD5; cleartext), verifies the server's SCRAM signature, then reads up to
    ReadyForQuery.

    Args:
        stream: the server connection (TLS already on, if any), StartupMessage sent.
        user: the role, as in the StartupMessage (MD5 salts with it).
        password: the password or token.
        methods: which of :data:`METHODS` the server may ask for; SCRAM's channel
            binding is part of ``scram-sha-256``.
        server_cert: the server's certificate (DER, :func:`peer_certificate`) when the
            connection is TLS: enables ``-PLUS`` and tells the server so otherwise.
        endpoint: the server's name in error messages.

    Returns:
        The server's messages after AuthenticationOk, and what they say.

    Raises:
        ServerError: the server sent an ErrorResponse (a wrong password: 28P01); its
            raw bytes are on the exception.
        Failure: ``auth`` for a method not allowed or not supported, or a server
            signature that does not verify; ``protocol`` or ``upstream_closed`` for a
            broken exchange.
    """
    reader = _Reader(stream, endpoint)
    method = "trust"
    while True:
        kind, message = await reader.next()
        if kind in (b"v", b"N"):  # NegotiateProtocolVersion; a NoticeResponse
            continue
        code = _auth_code(kind, message, endpoint)
        if code == AUTH_OK:
            break
        if code == AUTH_CLEARTEXT:
            if "password" not in methods:
                raise _refused(
                    "cleartext password",
                    endpoint,
                    "which is refused (--pg-auth-methods; allowed only over verified TLS)",
                )
            await stream.write(_message(b"p", password.encode() + b"\0"))
            method = "password"
        elif code == AUTH_MD5:
            if "md5" not in methods:
                raise _refused("md5", endpoint, "which --pg-auth-methods does not allow")
            salt = message[9:13]
            await stream.write(_message(b"p", md5_password(user, password, salt) + b"\0"))
            method = "md5"
        elif code == AUTH_SASL:
            if "scram-sha-256" not in methods:
                raise _refused("SCRAM", endpoint, "which --pg-auth-methods does not allow")
            mechanisms = [m for m in message[9:].split(b"\0") if m]
            method = await _scram(reader, mechanisms, password, server_cert, endpoint)
        else:
            name = _CODE_NAMES.get(code, f"code {code}")
            raise _refused(name, endpoint, "which the ambassador cannot answer")
    return await _until_ready(reader, method)


async def _scram(
    reader: _Reader,
    mechanisms: list[bytes],
    password: str,
    server_cert: bytes | None,
    endpoint: str,
) -> str:
    """The SCRAM-SHA-256(-PLUS) exchange up to AuthenticationSASLFinal, verified."""
    stream = reader.stream
    plus = server_cert is not None and b"SCRAM-SHA-256-PLUS" in mechanisms
    if plus:
        assert server_cert is not None
        try:
            binding = channel_binding_data(server_cert)
        except ValueError:
            plus = False  # PostgreSQL itself cannot bind to such a certificate
    if plus:
        gs2, mechanism = b"p=tls-server-end-point,,", b"SCRAM-SHA-256-PLUS"
        cbind = gs2 + binding
    elif b"SCRAM-SHA-256" in mechanisms:
        # "y": the client could bind, the server did not offer it (RFC 5802 section 6)
        gs2 = b"y,," if server_cert is not None else b"n,,"
        mechanism, cbind = b"SCRAM-SHA-256", gs2
    else:
        offered = ", ".join(m.decode("ascii", "replace") for m in mechanisms)
        raise _refused(f"SASL ({offered})", endpoint, "which the ambassador cannot answer")
    nonce = scram_nonce()
    first_bare = b"n=,r=" + nonce  # PostgreSQL takes the user from the startup
    first = gs2 + first_bare
    await stream.write(_message(b"p", mechanism + b"\0" + struct.pack("!i", len(first)) + first))
    kind, message = await reader.next()
    if _auth_code(kind, message, endpoint) != AUTH_SASL_CONTINUE:
        raise Failure("protocol", f"podpatterns ambassador: {endpoint}: SCRAM out of order")
    server_first = message[9:]
    attrs = scram_attributes(server_first)
    server_nonce, salt_b64, iterations = attrs.get(b"r", b""), attrs.get(b"s"), attrs.get(b"i")
    if not server_nonce.startswith(nonce) or salt_b64 is None or iterations is None:
        raise Failure(
            "protocol", f"podpatterns ambassador: {endpoint}: invalid SCRAM server-first-message"
        )
    try:
        salt = base64.b64decode(salt_b64, validate=True)
        rounds = int(iterations)
    except ValueError:
        raise Failure(
            "protocol", f"podpatterns ambassador: {endpoint}: invalid SCRAM salt or iterations"
        ) from None
    if not 1 <= rounds <= 10_000_000:
        raise Failure("protocol", f"podpatterns ambassador: {endpoint}: SCRAM iterations {rounds}")
    final_bare = b"c=" + base64.b64encode(cbind) + b",r=" + server_nonce
    auth_message = first_bare + b"," + server_first + b"," + final_bare
    if (hashlib.sha256(saslprep(password)).digest(), salt, rounds) in _KEYS:
        client_key, server_key = _scram_keys(password, salt, rounds)
    else:
        # 4096 PBKDF2 rounds take milliseconds: off the loop, once per password and salt
        client_key, server_key = await asyncio.to_thread(_scram_keys, password, salt, rounds)
    stored = hashlib.sha256(client_key).digest()
    proof = _xor(client_key, _hmac(stored, auth_message))
    await stream.write(_message(b"p", final_bare + b",p=" + base64.b64encode(proof)))
    kind, message = await reader.next()
    if _auth_code(kind, message, endpoint) != AUTH_SASL_FINAL:
        raise Failure("protocol", f"podpatterns ambassador: {endpoint}: SCRAM out of order")
    server_final = message[9:]
    expected = _hmac(server_key, auth_message)
    verifier = server_final[2:] if server_final.startswith(b"v=") else b""
    try:
        given = base64.b64decode(verifier, validate=True)
    except ValueError:
        given = b""
    if not hmac.compare_digest(given, expected):
        # the peer does not know the password's verifier: not the server we meant
        raise Failure(
            "auth",
            f"podpatterns ambassador: {endpoint}: the server's SCRAM signature does not "
            "verify (not the server that holds the password)",
        )
    return "scram-sha-256-plus" if plus else "scram-sha-256"


async def _until_ready(reader: _Reader, method: str) -> ServerSession:
    """Read from AuthenticationOk to ReadyForQuery."""
    out: list[bytes] = []
    session = ServerSession(b"", method=method)
    while True:
        kind, message = await reader.next()
        out.append(message)
        if kind == b"S":
            name, _, rest = message[5:].partition(b"\0")
            value = rest.split(b"\0", 1)[0]
            session.parameters[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        elif kind == b"K":
            session.key = message[5:]
        elif kind == b"Z":
            break
    session.messages = b"".join(out)
    session.leftover = reader.stream.take_buffered()
    return session


# -- the server side: the app's own password on the loopback leg (--pg-client-auth) ----------

#: How the app proves its password (``--pg-client-auth-method``): as PostgreSQL's
#: pg_hba methods of the same names.
CLIENT_METHODS = ("scram-sha-256", "password")

#: PBKDF2 rounds of a verifier made here from a plain password (PostgreSQL's default
#: ``scram_iterations``).
SCRAM_ITERATIONS = 4096

#: The longest authentication message an app may send (PostgreSQL's
#: PG_MAX_AUTH_TOKEN_LENGTH).
MAX_CLIENT_AUTH = 65535

_VERIFIER_PREFIX = "SCRAM-SHA-256$"
_GS2_BINDING = b"tls-server-end-point"


@dataclass(frozen=True)
class ScramVerifier:
    """What a server keeps to check SCRAM-SHA-256 without the password: ``pg_authid``'s
    ``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`` (RFC 5803 form)."""

    iterations: int
    salt: bytes = field(repr=False)
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> ScramVerifier:
        """Read a verifier as ``select rolpassword from pg_authid`` shows it.

        Raises:
            ValueError: not that form (the message quotes none of it).
        """
        if not text.startswith(_VERIFIER_PREFIX):
            raise ValueError("it does not start with SCRAM-SHA-256$")
        try:
            head, keys = text[len(_VERIFIER_PREFIX) :].split("$")
            iterations, salt = head.split(":")
            stored, server = keys.split(":")
            rounds = int(iterations)
            out = cls(
                rounds,
                base64.b64decode(salt, validate=True),
                base64.b64decode(stored, validate=True),
                base64.b64decode(server, validate=True),
            )
        except ValueError:
            raise ValueError(
                "it is not SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>"
            ) from None
        if not 1 <= rounds <= 10_000_000 or not out.salt:
            raise ValueError("its iteration count or salt is out of range")
        if len(out.stored_key) != 32 or len(out.server_key) != 32:
            raise ValueError("its keys are not SHA-256 digests")
        return out

    @classmethod
    def make(
        cls, password: str, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS
    ) -> ScramVerifier:
        """The verifier of a password (``iterations`` PBKDF2 rounds: off the event loop)."""
        salt = salt if salt is not None else secrets.token_bytes(16)
        client_key, server_key = salted_keys(password, salt, iterations)
        return cls(iterations, salt, hashlib.sha256(client_key).digest(), server_key)

    def text(self) -> str:
        """The ``pg_authid`` form, which :meth:`parse` reads."""
        salt, stored, server = (
            base64.b64encode(raw).decode() for raw in (self.salt, self.stored_key, self.server_key)
        )
        return f"{_VERIFIER_PREFIX}{self.iterations}:{salt}${stored}:{server}"

    def check_password(self, password: str) -> bool:
        """True when ``password`` is the one this verifier was made from: what
        PostgreSQL's ``password`` method does with a SCRAM secret (PBKDF2 rounds: call
        it off the event loop). Constant-time comparisons."""
        client_key, server_key = salted_keys(password, self.salt, self.iterations)
        stored = hashlib.sha256(client_key).digest()
        # both compared, always: the time does not tell which one differed
        return hmac.compare_digest(stored, self.stored_key) & hmac.compare_digest(
            server_key, self.server_key
        )


class ClientPassword:
    """The app's own password (``--pg-client-password-file``) and how it must be proven
    (``--pg-client-auth-method``).

    The file holds the password, or the SCRAM-SHA-256 verifier PostgreSQL keeps in
    ``pg_authid`` (so the Pod's Secret need not hold the app's plaintext); either works
    with either method. It is re-read when it changes (:class:`PasswordFile`); content
    that does not read as either keeps the last good one, counted in ``failures``.

    Args:
        file: the password file (loaded by :meth:`load`).
        method: one of :data:`CLIENT_METHODS`.

    Attributes:
        ok: app connections authenticated, by method (``scram-sha-256-plus``,
            ``scram-sha-256``, ``password``).
    """

    def __init__(self, file: PasswordFile, method: str = "scram-sha-256") -> None:
        if method not in CLIENT_METHODS:
            raise ValueError(f"client method {method!r}: not one of {CLIENT_METHODS}")
        self.file = file
        self.method = method
        self.ok: Counter[str] = Counter()
        self._value = ""
        self._secret: ScramVerifier | str = ""
        self._made: tuple[str, ScramVerifier] | None = None  # from a plain password
        self._making: asyncio.Lock | None = None
        self._log = logs.get("ambassador")

    @staticmethod
    def _read(value: str) -> ScramVerifier | str:
        """The file's content as a verifier or a password. Raises ValueError."""
        if value.startswith(_VERIFIER_PREFIX):
            return ScramVerifier.parse(value)
        if len(value) == 35 and value.startswith("md5") and _is_hex(value[3:]):
            # what pg_authid holds for an md5 role: it salts with the user name and
            # checks neither SCRAM nor a cleartext password here
            raise ValueError("an md5 hash cannot be used, give the password or its SCRAM verifier")
        return value

    def load(self) -> None:
        """Read and check the file now (blocking: at start).

        Raises:
            SecretError: unreadable, empty, or neither a password nor a verifier (the
                message names the option and the file, never the content).
        """
        value = self.file.load()
        try:
            secret = self._read(value)
        except ValueError as exc:
            raise SecretError(f"{self.file.option}: {self.file.path}: {exc}") from None
        self._value, self._secret = value, secret

    async def secret(self) -> ScramVerifier | str:
        """The verifier or password in effect: the file re-read first if it changed."""
        try:
            value = await self.file.get()
        except SecretError:
            value = self._value  # the file went: the last one holds (a swap under way)
        if value != self._value:
            try:
                secret = self._read(value)
            except ValueError as exc:
                self.file.failures += 1
                self._log.warning(
                    "pg_client_password_invalid", path=str(self.file.path), error=str(exc)
                )
            else:
                self._value, self._secret = value, secret
        return self._secret

    async def verifier(self) -> ScramVerifier:
        """The SCRAM verifier in effect: the file's own, or made once (random salt,
        :data:`SCRAM_ITERATIONS`) from the password it holds."""
        secret = await self.secret()
        if isinstance(secret, ScramVerifier):
            return secret
        if self._making is None:
            self._making = asyncio.Lock()
        async with self._making:  # single-flight: one derivation per password
            if self._made is None or self._made[0] != secret:
                self._made = (secret, await asyncio.to_thread(ScramVerifier.make, secret))
            return self._made[1]

    async def authenticate(self, stream: Stream, cert: bytes | None = None) -> bool:
        """Authenticate the app on ``stream`` (its StartupMessage read) as the method
        says: True when it proved the password, False when it did not (the caller
        answers 28P01, as PostgreSQL does).

        Args:
            stream: the app's connection.
            cert: the listener's own certificate (DER) when the app's leg is TLS
                (``--listen-tls-cert``): SCRAM-SHA-256-PLUS is offered and bound to it
                (``tls-server-end-point``). None on the plaintext loopback leg.

        Raises:
            Failure: ``protocol`` or ``auth`` for a broken exchange (the message says
                how, as PostgreSQL's would).
            ConnectionError: the app left (libpq without a password does).
        """
        if self.method == "password":
            await stream.write(AUTH_CLEARTEXT_MESSAGE)
            kind, body = await read_client_message(stream)
            _expect_password_message(kind)
            given = body.split(b"\0", 1)[0].decode("utf-8", "replace")
            secret = await self.secret()
            if isinstance(secret, ScramVerifier):
                ok = await asyncio.to_thread(secret.check_password, given)
            else:
                ok = hmac.compare_digest(given.encode(), secret.encode())
            method = "password"
        else:
            verifier = await self.verifier()
            method = await scram_server(stream, verifier, cert)
            ok = bool(method)
        if ok:
            self.ok[method] += 1
        return ok


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _expect_password_message(kind: bytes) -> None:
    if kind != b"p":
        raise Failure(
            "protocol",
            f"podpatterns ambassador: expected password response, got message type {kind!r}",
        )


async def read_client_message(stream: Stream) -> tuple[bytes, bytes]:
    """(type, body) of one message from the app during its authentication.

    Raises:
        Failure: ``protocol`` for a length out of range.
        ConnectionError: the app left.
    """
    head = await stream.read_exactly(5)
    (length,) = struct.unpack_from("!i", head, 1)
    if not 4 <= length <= MAX_CLIENT_AUTH + 4:
        raise Failure(
            "protocol",
            f"podpatterns ambassador: invalid message during authentication "
            f"(type {head[:1]!r}, length {length})",
        )
    return head[:1], await stream.read_exactly(length - 4)


def _malformed(why: str) -> Failure:
    # PostgreSQL's words for it (auth-scram.c), SQLSTATE 08P01
    return Failure("protocol", f"podpatterns ambassador: malformed SCRAM message ({why})")


async def scram_server(stream: Stream, verifier: ScramVerifier, cert: bytes | None = None) -> str:
    """The server side of SCRAM-SHA-256, as PostgreSQL runs it (auth-scram.c): the
    mechanisms, SASLInitialResponse, SASLContinue, SASLResponse, SASLFinal.

    ``SCRAM-SHA-256-PLUS`` is offered when ``cert`` (this end's certificate on a TLS leg)
    is given and has a channel-binding hash; the app's ``tls-server-end-point`` data
    must then match it. A proof is checked in constant time.

    Args:
        stream: the app's connection, its StartupMessage read.
        verifier: the password's verifier.
        cert: this end's certificate (DER) when the leg is TLS, else None.

    Returns:
        ``scram-sha-256-plus`` or ``scram-sha-256`` when the proof verified (SASLFinal
        sent; AuthenticationOk is the caller's), ``""`` when it did not (nothing sent:
        the caller answers 28P01).

    Raises:
        Failure: ``protocol`` (08P01) for a malformed exchange, ``auth`` (28000) for a
            channel-binding mismatch.
        ConnectionError: the app left.
    """
    binding: bytes | None = None
    if cert is not None:
        with contextlib.suppress(ValueError):  # RSASSA-PSS, Ed25519: no binding either
            binding = channel_binding_data(cert)
    mechanisms = [b"SCRAM-SHA-256-PLUS"] if binding is not None else []
    mechanisms.append(b"SCRAM-SHA-256")
    await stream.write(
        _message(b"R", struct.pack("!i", AUTH_SASL) + b"\0".join(mechanisms) + b"\0\0")
    )

    # SASLInitialResponse: mechanism, then client-first-message
    kind, body = await read_client_message(stream)
    _expect_password_message(kind)
    mechanism, _, rest = body.partition(b"\0")
    if mechanism not in mechanisms:
        raise Failure(
            "protocol",
            "podpatterns ambassador: client selected an invalid SASL authentication mechanism",
        )
    if len(rest) < 4:
        raise _malformed("no client-first-message")
    (size,) = struct.unpack_from("!i", rest)
    first = rest[4:]
    if size != len(first):
        raise _malformed("its length does not match the message")
    plus = mechanism == b"SCRAM-SHA-256-PLUS"
    flag, sep1, after = first.partition(b",")
    authzid, sep2, first_bare = after.partition(b",")
    if not sep1 or not sep2:
        raise _malformed("no GS2 header")
    if flag.startswith(b"p="):
        if not plus:
            raise Failure(
                "protocol",
                "podpatterns ambassador: the client selected SCRAM-SHA-256 without channel "
                "binding, but the SCRAM message includes channel binding data",
            )
        if flag[2:] != _GS2_BINDING:
            raise Failure(
                "protocol",
                f"podpatterns ambassador: unsupported SCRAM channel-binding type "
                f'"{flag[2:].decode("ascii", "replace")}"',
            )
    elif flag in (b"n", b"y"):
        if plus:
            raise Failure(
                "protocol",
                "podpatterns ambassador: the client selected SCRAM-SHA-256-PLUS, but the "
                "SCRAM message does not include channel binding data",
            )
        if flag == b"y" and binding is not None:
            raise Failure(
                "auth",
                "podpatterns ambassador: SCRAM channel binding negotiation error: the "
                "client supports SCRAM channel binding but thinks the server does not; "
                "this server does",
            )
    else:
        raise _malformed("unexpected channel-binding flag")
    if authzid:
        raise Failure(
            "protocol",
            "podpatterns ambassador: client uses authorization identity, but it is not supported",
        )
    if first_bare.startswith(b"m="):
        raise Failure(
            "protocol", "podpatterns ambassador: client requires an unsupported SCRAM extension"
        )
    parts = first_bare.split(b",")
    # the user name (n=) is ignored, as PostgreSQL does: the StartupMessage's counts
    if len(parts) < 2 or not parts[0].startswith(b"n=") or not parts[1].startswith(b"r="):
        raise _malformed("no user name or nonce in client-first-message")
    client_nonce = parts[1][2:]
    if not client_nonce or any(not 0x21 <= c <= 0x7E or c == 0x2C for c in client_nonce):
        raise _malformed("the client nonce is not printable")

    nonce = client_nonce + scram_nonce()
    server_first = (
        b"r=" + nonce + b",s=" + base64.b64encode(verifier.salt) + b",i=%d" % verifier.iterations
    )
    await stream.write(_message(b"R", struct.pack("!i", AUTH_SASL_CONTINUE) + server_first))

    # SASLResponse: client-final-message
    kind, final = await read_client_message(stream)
    _expect_password_message(kind)
    without_proof, sep, proof_b64 = final.rpartition(b",p=")
    attrs = scram_attributes(without_proof)
    if not sep or not final.startswith(b"c=") or b"r" not in attrs:
        raise _malformed("unexpected attribute in client-final-message")
    try:
        given_cbind = base64.b64decode(attrs[b"c"], validate=True)
        proof = base64.b64decode(proof_b64, validate=True)
    except ValueError:
        raise _malformed("invalid base64 in client-final-message") from None
    expected_cbind = first[: len(first) - len(first_bare)]  # the gs2 header as sent
    if plus:
        assert binding is not None
        expected_cbind += binding
    if not hmac.compare_digest(given_cbind, expected_cbind):
        raise Failure("auth", "podpatterns ambassador: SCRAM channel binding check failed")
    if not hmac.compare_digest(attrs[b"r"], nonce):
        raise _malformed("nonce does not match")
    if len(proof) != 32:
        raise _malformed("malformed proof in client-final-message")

    auth_message = first_bare + b"," + server_first + b"," + without_proof
    client_key = _xor(proof, _hmac(verifier.stored_key, auth_message))
    if not hmac.compare_digest(hashlib.sha256(client_key).digest(), verifier.stored_key):
        return ""
    signature = base64.b64encode(_hmac(verifier.server_key, auth_message))
    await stream.write(_message(b"R", struct.pack("!i", AUTH_SASL_FINAL) + b"v=" + signature))
    return "scram-sha-256-plus" if plus else "scram-sha-256"


# -- what a postgres route does with it -------------------------------------------------------


def allowed_methods(listed: Sequence[str] | None, verified_tls: bool) -> frozenset[str]:
    """The upstream methods in effect: ``--pg-auth-methods`` as given, else
    ``scram-sha-256`` everywhere and ``md5`` too over verified TLS."""
    if listed is not None:
        return frozenset(listed)
    return frozenset({"scram-sha-256", "md5"} if verified_tls else {"scram-sha-256"})


class Credentials:
    """A postgres route's credentials: the app holds none (``--pg-password-*``).

    Args:
        secret: the password or token for the server.
        methods: the upstream methods allowed (:func:`allowed_methods`).
        client_password: with ``--pg-client-auth password-file``, the app's own
            password (or its SCRAM verifier) and the method it is asked with
            (``--pg-client-auth-method``: SCRAM-SHA-256 by default, cleartext when asked).

    Attributes:
        auths: upstream authentications by (method, result): result ``ok``,
            ``rejected`` (the server's ErrorResponse), ``failed`` (refused here).
        client_rejected: app connections refused for a wrong password.
    """

    def __init__(
        self,
        secret: SecretSource,
        methods: Collection[str],
        client_password: ClientPassword | None = None,
    ) -> None:
        self.secret = secret
        self.methods = frozenset(methods)
        self.client_password = client_password
        self.auths: Counter[tuple[str, str]] = Counter()
        self.client_rejected = 0

    @property
    def rotations(self) -> int:
        """Password file content changes seen (0 for a command)."""
        secret = self.secret
        if isinstance(secret, PasswordFile):
            return secret.rotations
        return 0

    @property
    def command_runs(self) -> tuple[int, int]:
        """(runs, failures) of the password command; (0, 0) for a file."""
        if isinstance(self.secret, PasswordCommand):
            return self.secret.runs, self.secret.failures
        return 0, 0

    async def authenticate(self, stream: Stream, user: str, endpoint: str) -> ServerSession:
        """:func:`authenticate` with this route's secret and methods, counted; a server
        that refuses the secret (28P01) makes the source fetch a fresh one.

        Raises:
            ServerError, Failure: as :func:`authenticate`; Failure ``credentials`` when
                no secret could be had.
        """
        try:
            password = await self.secret.get()
        except SecretError as exc:
            self.auths[("none", "failed")] += 1
            raise Failure(
                "credentials", f"podpatterns ambassador: no password for {endpoint}: {exc}"
            ) from None
        try:
            session = await authenticate(
                stream,
                user=user,
                password=password,
                methods=self.methods,
                server_cert=peer_certificate(stream),
                endpoint=endpoint,
            )
        except ServerError as exc:
            self.auths[("server", "rejected")] += 1
            if exc.sqlstate == "28P01":
                self.secret.invalidate()
            raise
        except Failure:
            self.auths[("none", "failed")] += 1
            raise
        self.auths[(session.method, "ok")] += 1
        return session
