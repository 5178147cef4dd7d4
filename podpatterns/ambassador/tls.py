"""TLS origination: a verified client context, rebuilt when its files change on disk.

Kubernetes Secret volumes update by swapping a ``..data`` symlink, which inotify on the
file itself never reports; we watch the directories and decide by content hash, with a
periodic re-check because events can be lost. A rebuilt context is used by new
connections; live connections keep the context they were made with.
"""

from __future__ import annotations

import hashlib
import ssl
import time
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING

from podpatterns import logs
from podpatterns.dirwatch import STEP_MS, DirWatcher
from podpatterns.errors import ConfigError

if TYPE_CHECKING:
    from podpatterns.ambassador.config import RouteConfig

# The watch of the TLS files may react in a second rather than at once: besides the
# longer step every watch now has (dirwatch.STEP_MS; at 5 ms a TLS route spent about
# 17 ms of CPU per second while idle, issue 11's benchmark), it ticks once a second.
WATCH_STEP_MS = STEP_MS
WATCH_TICK_SECONDS = 1.0


def _why(exc: OSError | ssl.SSLError) -> str:
    """A short reason for a TLS file that cannot be loaded, without OpenSSL's noise."""
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        return f"not valid PEM for this use ({reason})"
    return exc.strerror or str(exc)


class TLSContextProvider:
    """Build and hot-reload the upstream TLS context of one route."""

    def __init__(
        self,
        *,
        ca: Path | None,
        cert: Path | None,
        key: Path | None,
        verify: bool,
        route: str = "default",
        recheck: float = 30.0,
        check_hostname: bool = True,
        alpn: tuple[str, ...] = (),
        unverified_note: str = "--tls-insecure-skip-verify: the upstream is not authenticated",
    ) -> None:
        self.ca, self.cert, self.key, self.verify = ca, cert, key, verify
        self.check_hostname = check_hostname  # with verify: the name too, not only the chain
        self.alpn = alpn
        self._unverified_note = unverified_note
        self.recheck = recheck
        self.reloads = 0
        self.reload_failures = 0
        self._log = logs.get("ambassador", route=route)
        self._digest = self._files_digest()
        self._failed_digest = ""
        self.peers: dict[str, tuple[bytes, float]] = {}
        """The certificate each upstream (by server name) last presented, DER, and when
        (Unix seconds): what ``GET /status`` reads the upstream's expiry from."""
        self._sslobject_class = _recording(self.peers)
        self.context = self._build(initial=True)

    def _files(self) -> list[Path]:
        return [p for p in (self.ca, self.cert, self.key) if p is not None]

    def _files_digest(self) -> str:
        h = hashlib.sha256()
        for path in self._files():
            try:
                h.update(path.read_bytes())
            except OSError:
                h.update(b"\0missing\0")
        return h.hexdigest()

    def _build(self, initial: bool = False) -> ssl.SSLContext:
        which = f"--tls-ca: {str(self.ca)!r}" if self.ca is not None else "system CA bundle"
        try:
            ctx = ssl.create_default_context(cafile=str(self.ca) if self.ca is not None else None)
            # The TLS leg (tlsleg.py) does not hold writes across a TLS 1.2
            # renegotiation; refuse it rather than reset mid-stream (TLS 1.3 has none).
            ctx.options |= ssl.OP_NO_RENEGOTIATION
            if self.cert is not None:
                which = f"--tls-cert/--tls-key: {str(self.cert)!r}" + (
                    f" / {str(self.key)!r}" if self.key else ""
                )
                ctx.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        except (OSError, ssl.SSLError) as exc:
            if initial:
                raise ConfigError(f"{which}: cannot load: {_why(exc)}") from None
            raise
        ctx.sslobject_class = self._sslobject_class
        if self.alpn:
            ctx.set_alpn_protocols(list(self.alpn))
        if self.verify and not self.check_hostname:
            ctx.check_hostname = False  # the chain is still verified (CERT_REQUIRED)
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            if initial:
                self._log.warning("tls_verification_disabled", note=self._unverified_note)
        return ctx

    def maybe_reload(self) -> bool:
        """Rebuild the context if the files' content changed; True when it was swapped."""
        digest = self._files_digest()
        if digest in (self._digest, self._failed_digest):
            # Same content as the context in use, or as the last change that failed:
            # count and log each bad change once, not on every event and re-check.
            return False
        try:
            ctx = self._build()
        except (OSError, ssl.SSLError) as exc:
            # Half-written rotation, or a bad file: keep serving with the old context.
            self._failed_digest = digest
            self.reload_failures += 1
            self._log.error("tls_reload_failed", error=str(exc))
            return False
        self._digest = digest
        self.context = ctx
        self.reloads += 1
        self._log.info("tls_reloaded", files=[str(p) for p in self._files()])
        return True

    def watched_dirs(self) -> list[Path]:
        """The directories :meth:`watch` watches (none without CA or client files)."""
        return sorted({p.parent for p in self._files()})

    async def watch(self) -> None:
        """Reload on file events in the files' directories and every ``recheck`` s.

        Runs until cancelled; returns at once when there is nothing to watch (see
        :meth:`watched_dirs`).
        """
        dirs = self.watched_dirs()
        if not dirs:
            return
        watcher = DirWatcher(
            dirs,
            resync=self.recheck,
            debounce_ms=200,
            step_ms=WATCH_STEP_MS,
            tick=WATCH_TICK_SECONDS,
            component="ambassador",
        )
        async with aclosing(watcher.wakeups()) as wakeups:
            async for _ in wakeups:
                self.maybe_reload()


def _recording(peers: dict[str, tuple[bytes, float]]) -> type[ssl.SSLObject]:
    """An :class:`ssl.SSLObject` class that keeps the certificate of each upstream it
    completes a handshake with in ``peers`` (``SSLContext.sslobject_class``: every TLS
    leg, whatever the route's protocol, is made by ``wrap_bio``)."""

    class Recording(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            der = self.getpeercert(binary_form=True)
            if der:
                peers[self.server_hostname or "?"] = (der, time.time())

    return Recording


def route_tls(cfg: RouteConfig) -> TLSContextProvider | None:
    """The upstream TLS contexts of a route: None without ``--upstream-tls``.

    A ``--protocol postgres`` route verifies as ``--pg-sslmode`` says and offers ALPN
    ``postgresql``; any other verifies unless ``--tls-insecure-skip-verify``.
    """
    if cfg.upstream_tls and cfg.protocol == "postgres":
        mode = cfg.sslmode
        return TLSContextProvider(
            ca=cfg.tls_ca,
            cert=cfg.tls_cert,
            key=cfg.tls_key,
            verify=mode in ("verify-ca", "verify-full"),
            check_hostname=mode == "verify-full",
            alpn=("postgresql",),
            route=cfg.name,
            unverified_note=f"--pg-sslmode {mode}: the upstream is not authenticated",
        )
    if cfg.upstream_tls:
        return TLSContextProvider(
            ca=cfg.tls_ca,
            cert=cfg.tls_cert,
            key=cfg.tls_key,
            verify=not cfg.tls_insecure_skip_verify,
            route=cfg.name,
        )
    return None
