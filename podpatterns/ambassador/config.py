"""Ambassador configuration: one declaration per option, one immutable config object.

Flags and environment variables describe one route (``default``). A config file may
instead list several ``routes:``; each entry takes the same keys as the flags, and keys
set at the top level of the file (or by flags and environment) apply to every route
unless the route sets its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from podpatterns.ambassador.pgauth import CLIENT_METHODS as PG_CLIENT_METHODS
from podpatterns.ambassador.pgauth import METHODS as PG_AUTH_METHODS
from podpatterns.ambassador.pgpool import POOL_MODES, PoolSettings
from podpatterns.ambassador.pgroles import TARGETS as PG_TARGETS
from podpatterns.ambassador.postgres import SSLMODES
from podpatterns.errors import ConfigError
from podpatterns.options import (
    HostPort,
    Option,
    parse_bind,
    parse_bool,
    parse_choice,
    parse_duration,
    parse_hostport,
    parse_int,
    parse_optional_duration,
    parse_path,
    parse_size,
    parse_str,
    resolve_entry,
    resolve_with_file,
)
from podpatterns.runtime import RUNTIME_OPTIONS, RuntimeConfig


@dataclass(frozen=True, order=True)
class UnixAddress:
    """A unix-domain socket path to listen on."""

    path: Path

    def __str__(self) -> str:
        return f"unix:{self.path}"


ListenAddress = HostPort | UnixAddress


def parse_listen(text: str) -> ListenAddress:
    """Parse ``HOST:PORT`` (port 0 picks a free port) or ``unix:/path``."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path.startswith("/"):
            raise ValueError("needs an absolute socket path (unix:/shared/db.sock)")
        return UnixAddress(Path(path))
    return parse_bind(text)


def _r(name: str, parse: Any, default: Any, help: str, **kw: Any) -> Option[Any]:
    return Option(name, parse, default, help, scope="route", **kw)


ROUTE_OPTIONS: tuple[Option[Any], ...] = (
    _r(
        "listen",
        parse_listen,
        None,
        "address to accept on: HOST:PORT or unix:/path",
        metavar="ADDR",
    ),
    _r(
        "upstream",
        parse_hostport,
        (),
        "upstream endpoint HOST:PORT; repeat for several",
        multiple=True,
        metavar="HOST:PORT",
    ),
    _r(
        "balance",
        parse_choice("failover", "round_robin", "least_conn"),
        "failover",
        "how to pick an endpoint: failover (in order), round_robin or least_conn",
        metavar="POLICY",
    ),
    _r(
        "connect_timeout",
        parse_duration,
        5.0,
        "timeout of one upstream connect attempt",
        metavar="DURATION",
    ),
    _r(
        "connect_retries",
        parse_int(0, 100),
        3,
        "further connect attempts after the first, across endpoints",
        metavar="N",
    ),
    _r(
        "retry_backoff",
        parse_duration,
        0.1,
        "first backoff between retry rounds (doubles, with full jitter)",
        metavar="DURATION",
    ),
    _r("retry_backoff_max", parse_duration, 2.0, "cap of the retry backoff", metavar="DURATION"),
    _r(
        "dns_refresh",
        parse_duration,
        30.0,
        "re-resolve upstream names this often (and after any connect failure)",
        metavar="DURATION",
    ),
    _r(
        "fail_cooldown",
        parse_duration,
        10.0,
        "skip an endpoint this long after a failed connect (passive health)",
        metavar="DURATION",
    ),
    _r(
        "health_check_interval",
        parse_optional_duration,
        None,
        "active TCP health checks of every endpoint at this interval (off by default)",
        metavar="DURATION",
    ),
    _r(
        "health_check_timeout",
        parse_duration,
        2.0,
        "timeout of one active health check",
        metavar="DURATION",
    ),
    _r(
        "max_connections", parse_int(0), 0, "concurrent connection cap; 0 is unlimited", metavar="N"
    ),
    _r(
        "on_limit",
        parse_choice("wait", "reject"),
        "wait",
        "at the cap: wait (leave new connections in the kernel backlog) or reject them",
        metavar="MODE",
    ),
    _r(
        "idle_timeout",
        parse_optional_duration,
        None,
        "close a connection with no bytes either way for this long (off by default)",
        metavar="DURATION",
    ),
    _r(
        "half_close_timeout",
        parse_optional_duration,
        None,
        "close a half-closed connection idle for this long (off by default)",
        metavar="DURATION",
    ),
    _r(
        "max_lifetime",
        parse_optional_duration,
        None,
        "close connections older than this (off by default)",
        metavar="DURATION",
    ),
    _r(
        "max_lifetime_jitter",
        parse_duration,
        0.0,
        "random extra lifetime, up to this much, so connections do not expire together",
        metavar="DURATION",
    ),
    _r("upstream_tls", parse_bool, False, "originate TLS to the upstream (verified)", flag=True),
    _r(
        "tls_ca",
        parse_path,
        None,
        "CA bundle to verify the upstream (default: system CAs)",
        metavar="FILE",
    ),
    _r("tls_cert", parse_path, None, "client certificate for mTLS (PEM)", metavar="FILE"),
    _r("tls_key", parse_path, None, "client private key for mTLS (PEM)", metavar="FILE"),
    _r(
        "tls_server_name",
        parse_str,
        None,
        "SNI and verified name (default: the upstream host)",
        metavar="NAME",
    ),
    _r(
        "tls_insecure_skip_verify",
        parse_bool,
        False,
        "DANGEROUS: do not verify the upstream certificate",
        flag=True,
    ),
    _r(
        "proxy_protocol",
        parse_choice("off", "v1", "v2"),
        "off",
        "send a PROXY protocol header to the upstream",
        metavar="VERSION",
    ),
    _r(
        "splice",
        parse_choice("auto", "on", "off"),
        "auto",
        "zero-copy relay with os.splice on plaintext legs (Linux)",
        metavar="MODE",
    ),
    _r(
        "buffer_size",
        parse_size,
        256 * 1024,
        "bytes buffered per direction before reading pauses",
        metavar="SIZE",
    ),
    _r(
        "ready_requires_upstream",
        parse_bool,
        False,
        "ready only while at least one endpoint is healthy",
        flag=True,
    ),
    _r(
        "drain_close",
        parse_choice("rst", "fin"),
        "rst",
        "how connections still open at the drain deadline are closed: rst (a reset, "
        "buffered bytes dropped) or fin (buffered bytes sent, then a FIN)",
        metavar="HOW",
    ),
    _r("tcp_keepalive", parse_bool, True, "TCP keepalive on both legs", flag=True),
    _r("tcp_nodelay", parse_bool, True, "TCP_NODELAY on both legs", flag=True),
)

#: The options of protocol-aware routes (docs/ambassador-postgres.md).
PROTOCOL_OPTIONS: tuple[Option[Any], ...] = (
    _r(
        "protocol",
        parse_choice("tcp", "postgres"),
        "tcp",
        "what the route speaks: tcp (a byte relay) or postgres (startup, TLS and errors "
        "handled as PostgreSQL does)",
        metavar="NAME",
    ),
    _r(
        "startup_timeout",
        parse_duration,
        30.0,
        "time a protocol route may take to establish a session (client startup, upstream "
        "TLS, authentication)",
        metavar="DURATION",
    ),
    _r(
        "pg_sslmode",
        parse_choice(*SSLMODES),
        None,
        "PostgreSQL TLS to the upstream, as libpq's sslmode: verify-full (the default "
        "with --upstream-tls), verify-ca, require, prefer, or disable (the default without)",
        metavar="MODE",
    ),
    _r(
        "pg_tls_negotiation",
        parse_choice("postgres", "direct"),
        "postgres",
        "how TLS starts: postgres (SSLRequest, then TLS) or direct (TLS first with ALPN "
        "postgresql; PostgreSQL 17 and later)",
        metavar="MODE",
    ),
    _r(
        "listen_tls_cert",
        parse_path,
        None,
        "server certificate (PEM, chain included) to terminate the app's TLS on the "
        "listener: a postgres route answers the app's SSLRequest S (off by default: N)",
        metavar="FILE",
    ),
    _r(
        "listen_tls_key",
        parse_path,
        None,
        "private key (PEM) of --listen-tls-cert",
        metavar="FILE",
    ),
    _r(
        "pg_drain",
        parse_choice("transaction", "off"),
        "transaction",
        "how shutdown ends PostgreSQL sessions: transaction (idle ones get FATAL 57P01 "
        "when draining starts, the others at the end of their transaction; frames the "
        "relayed messages, so no splice) or off (sessions are relayed as bytes and cut "
        "at the drain deadline)",
        metavar="MODE",
    ),
    _r(
        "pg_metrics",
        parse_bool,
        False,
        "count PostgreSQL queries, transactions and errors by SQLSTATE class, and time "
        "the queries, per endpoint (never the query text); frames the relayed messages, "
        "so no splice",
        flag=True,
    ),
    _r(
        "pg_slow_query",
        parse_optional_duration,
        None,
        "with --pg-metrics, log a pg_slow_query event for each query that takes at least "
        "this long, its text with every literal replaced by ? (off by default)",
        metavar="DURATION",
    ),
    _r(
        "pg_password_file",
        parse_path,
        None,
        "the app holds no password: the ambassador authenticates to the server with the "
        "password in this file (a Secret volume; re-read when it changes, for new server "
        "connections)",
        metavar="FILE",
    ),
    _r(
        "pg_password_command",
        parse_str,
        None,
        "the app holds no password: the ambassador authenticates with the token this "
        "command prints (plain, or JSON with token and expiry), cached until shortly "
        "before it expires and run at most once a minute",
        metavar="CMD",
    ),
    _r(
        "pg_password_command_ttl",
        parse_duration,
        600.0,
        "how long a token of --pg-password-command is used when its output names no expiry",
        metavar="DURATION",
    ),
    _r(
        "pg_auth_methods",
        parse_choice(*PG_AUTH_METHODS),
        (),
        "upstream authentication methods the ambassador answers with its secret "
        "(repeat, or comma-separated): scram-sha-256, md5, password (cleartext: verified "
        "TLS only); default scram-sha-256, plus md5 over verified TLS",
        multiple=True,
        metavar="METHOD",
    ),
    _r(
        "pg_client_auth",
        parse_choice("trust", "password-file"),
        "trust",
        "with --pg-password-*, how the app is authenticated on the loopback leg: trust "
        "(any app in the Pod) or password-file (the app's own password, "
        "--pg-client-password-file, proven as --pg-client-auth-method says)",
        metavar="MODE",
    ),
    _r(
        "pg_client_auth_method",
        parse_choice(*PG_CLIENT_METHODS),
        "scram-sha-256",
        "with --pg-client-auth password-file, how the app proves its password, as the "
        "pg_hba.conf methods of these names: scram-sha-256 (SCRAM-SHA-256-PLUS over the "
        "app's TLS with --listen-tls-cert) or password (cleartext, for clients without SCRAM)",
        metavar="METHOD",
    ),
    _r(
        "pg_client_password_file",
        parse_path,
        None,
        "the password the app must give with --pg-client-auth password-file, or its "
        "SCRAM-SHA-256 verifier as pg_authid holds it (re-read when it changes)",
        metavar="FILE",
    ),
    _r(
        "pg_target_session_attrs",
        parse_choice(*PG_TARGETS),
        "any",
        "which server a new session goes to, as libpq's target_session_attrs: any, "
        "read-write, read-only, primary, standby or prefer-standby; the roles come from "
        "the ambassador's own health connection to each endpoint (needs "
        "--health-check-interval, --pg-health-user and --pg-password-*)",
        metavar="ATTRS",
    ),
    _r(
        "pg_health_user",
        parse_str,
        None,
        "the role of the ambassador's health connections (role-aware routing); "
        "authenticated with --pg-password-file or --pg-password-command",
        metavar="USER",
    ),
    _r(
        "pg_health_database",
        parse_str,
        "postgres",
        "the database of the ambassador's health connections",
        metavar="NAME",
    ),
    _r(
        "pg_close_on_role_change",
        parse_bool,
        False,
        "end the sessions on an endpoint whose role stops matching "
        "--pg-target-session-attrs (a demoted primary) with FATAL 57P01 at their next "
        "transaction boundary",
        flag=True,
    ),
)

# --pg-pool (issue 14, docs/ambassador-postgres.md "Pooling")
POOL_OPTIONS: tuple[Option[Any], ...] = (
    _r(
        "pg_pool",
        parse_choice(*POOL_MODES),
        "off",
        "PostgreSQL connection pooling: off, session (a server connection per app "
        "connection, reset with --pg-pool-reset-query and reused after it) or transaction "
        "(a server connection per transaction); the ambassador authenticates to the server",
        metavar="MODE",
    ),
    _r(
        "pg_pool_size",
        parse_int(1, 10000),
        20,
        "with --pg-pool, the most server connections per pool key (user, database and the "
        "other startup parameters)",
        metavar="N",
    ),
    _r(
        "pg_pool_min_idle",
        parse_int(0, 10000),
        0,
        "with --pg-pool, idle server connections kept open per pool key once it was used",
        metavar="N",
    ),
    _r(
        "pg_pool_idle_timeout",
        parse_duration,
        60.0,
        "with --pg-pool, close a server connection idle this long (beyond --pg-pool-min-idle)",
        metavar="DURATION",
    ),
    _r(
        "pg_pool_max_lifetime",
        parse_duration,
        3600.0,
        "with --pg-pool, close a server connection when it is returned after this long "
        "(minus up to 10% random jitter, so that connections do not all end together)",
        metavar="DURATION",
    ),
    _r(
        "pg_pool_wait",
        parse_duration,
        5.0,
        "with --pg-pool, how long an app waits for a free server connection before it "
        "gets ErrorResponse 53300 (too_many_connections)",
        metavar="DURATION",
    ),
    _r(
        "pg_pool_reset_query",
        str,
        "DISCARD ALL",
        "with --pg-pool session, the SQL run on a server connection when its app leaves "
        "(empty: none)",
        metavar="SQL",
    ),
    _r(
        "pg_pool_max_prepared",
        parse_int(0, 100000),
        200,
        "with --pg-pool transaction, the most protocol-level named prepared statements kept "
        "on each server connection: beyond it the least recently used is closed, and "
        "prepared again when an app needs it (pgbouncer's max_prepared_statements); 0: "
        "statements are not tracked, the app's names go to the server as they are",
        metavar="N",
    ),
    _r(
        "pg_pool_max_client_prepared",
        parse_int(1, 10_000_000),
        10000,
        "with --pg-pool transaction, the most named prepared statements one app connection "
        "may hold (not closed); the connection that prepares one more ends with FATAL 53400",
        metavar="N",
    ),
    _r(
        "pg_upstream_trust",
        parse_bool,
        False,
        "the server lets the ambassador in without a password (pg_hba trust or cert): "
        "what --pg-pool needs when no password source is given",
        flag=True,
    ),
)

ROUTE_OPTIONS = ROUTE_OPTIONS + PROTOCOL_OPTIONS + POOL_OPTIONS

AMBASSADOR_OPTIONS: tuple[Option[Any], ...] = RUNTIME_OPTIONS + ROUTE_OPTIONS


#: The sslmodes that verify the server's certificate.
VERIFIED_SSLMODES = ("verify-ca", "verify-full")

#: The options that take effect only with --pg-password-file or --pg-password-command.
_CREDENTIAL_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("pg_password_file", None),
    ("pg_password_command", None),
    ("pg_password_command_ttl", 600.0),
    ("pg_auth_methods", ()),
    ("pg_client_auth", "trust"),
    ("pg_client_auth_method", "scram-sha-256"),
    ("pg_client_password_file", None),
)


#: The options that take effect only with --pg-pool transaction: a session pool passes
#: the app's prepared statements to its own server connection untouched.
_TRANSACTION_POOL_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("pg_pool_max_prepared", 200),
    ("pg_pool_max_client_prepared", 10000),
)


#: The options of role-aware routing, --pg-target-session-attrs first.
_ROLE_DEFAULTS: tuple[tuple[str, Any], ...] = (
    ("pg_target_session_attrs", "any"),
    ("pg_health_user", None),
    ("pg_health_database", "postgres"),
    ("pg_close_on_role_change", False),
)


@dataclass(frozen=True)
class RouteConfig:
    """One listener and the upstream endpoints it forwards to. Validated on construction.

    Field meanings are the option help texts in :data:`ROUTE_OPTIONS`.
    """

    listen: ListenAddress
    upstream: tuple[HostPort, ...]
    name: str = "default"
    balance: str = "failover"
    connect_timeout: float = 5.0
    connect_retries: int = 3
    retry_backoff: float = 0.1
    retry_backoff_max: float = 2.0
    dns_refresh: float = 30.0
    fail_cooldown: float = 10.0
    health_check_interval: float | None = None
    health_check_timeout: float = 2.0
    max_connections: int = 0
    on_limit: str = "wait"
    idle_timeout: float | None = None
    half_close_timeout: float | None = None
    max_lifetime: float | None = None
    max_lifetime_jitter: float = 0.0
    upstream_tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    tls_insecure_skip_verify: bool = False
    proxy_protocol: str = "off"
    splice: str = "auto"
    buffer_size: int = 256 * 1024
    ready_requires_upstream: bool = False
    drain_close: str = "rst"
    tcp_keepalive: bool = True
    tcp_nodelay: bool = True
    protocol: str = "tcp"
    startup_timeout: float = 30.0
    pg_sslmode: str | None = None
    pg_tls_negotiation: str = "postgres"
    listen_tls_cert: Path | None = None
    listen_tls_key: Path | None = None
    pg_drain: str = "transaction"
    pg_metrics: bool = False
    pg_slow_query: float | None = None
    pg_password_file: Path | None = None
    pg_password_command: str | None = None
    pg_password_command_ttl: float = 600.0
    pg_auth_methods: tuple[str, ...] = ()
    pg_client_auth: str = "trust"
    pg_client_auth_method: str = "scram-sha-256"
    pg_client_password_file: Path | None = None
    pg_pool: str = "off"
    pg_pool_size: int = 20
    pg_pool_min_idle: int = 0
    pg_pool_idle_timeout: float = 60.0
    pg_pool_max_lifetime: float = 3600.0
    pg_pool_wait: float = 5.0
    pg_pool_reset_query: str = "DISCARD ALL"
    pg_pool_max_prepared: int = 200
    pg_pool_max_client_prepared: int = 10000
    pg_upstream_trust: bool = False

    def pool_settings(self) -> PoolSettings:
        """The ``--pg-pool*`` options, for :class:`~.pgpool.Pools`."""
        return PoolSettings(
            mode=self.pg_pool,
            size=self.pg_pool_size,
            min_idle=self.pg_pool_min_idle,
            idle_timeout=self.pg_pool_idle_timeout,
            max_lifetime=self.pg_pool_max_lifetime,
            wait=self.pg_pool_wait,
            reset_query=self.pg_pool_reset_query.strip(),
            connect_timeout=self.startup_timeout,
            max_prepared=self.pg_pool_max_prepared,
            max_client_prepared=self.pg_pool_max_client_prepared,
        )

    pg_target_session_attrs: str = "any"
    pg_health_user: str | None = None
    pg_health_database: str = "postgres"
    pg_close_on_role_change: bool = False

    @property
    def sslmode(self) -> str:
        """The PostgreSQL sslmode in effect: --pg-sslmode, else verify-full with
        --upstream-tls and disable without."""
        if self.pg_sslmode is not None:
            return self.pg_sslmode
        return "verify-full" if self.upstream_tls else "disable"

    def __post_init__(self) -> None:
        where = "" if self.name == "default" else f"route {self.name!r}: "
        if not self.upstream:
            raise ConfigError(f"{where}--upstream: missing (give at least one HOST:PORT)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(f"{where}--tls-cert and --tls-key: give both for mTLS, or neither")
        tls_only = ("tls_ca", "tls_cert", "tls_server_name", "tls_insecure_skip_verify")
        for name in tls_only:
            if getattr(self, name) and not self.upstream_tls:
                raise ConfigError(
                    f"{where}--{name.replace('_', '-')}: only applies with --upstream-tls"
                )
        if self.upstream_tls and self.splice == "on":
            raise ConfigError(
                f"{where}--splice: 'on' cannot apply to a TLS upstream leg (use auto or off)"
            )
        for name in ("connect_timeout", "dns_refresh", "health_check_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}--{name.replace('_', '-')}: must be > 0")
        if self.buffer_size < 4096:
            raise ConfigError(f"{where}--buffer-size: {self.buffer_size} is too small (>= 4KiB)")
        if self.retry_backoff_max < self.retry_backoff:
            raise ConfigError(f"{where}--retry-backoff-max: must be >= --retry-backoff")
        if self.startup_timeout <= 0:
            raise ConfigError(f"{where}--startup-timeout: must be > 0")
        self._check_postgres(where)

    def _check_postgres(self, where: str) -> None:
        if (self.listen_tls_cert is None) != (self.listen_tls_key is None):
            raise ConfigError(
                f"{where}--listen-tls-cert and --listen-tls-key: give both to terminate "
                "the app's TLS on the listener, or neither"
            )
        if self.listen_tls_cert is not None and self.protocol != "postgres":
            raise ConfigError(
                f"{where}--listen-tls-cert: only applies with --protocol postgres (a tcp "
                "route relays the app's bytes, TLS included, as they come)"
            )
        if self.protocol != "postgres":
            for name, default in (
                ("pg_sslmode", None),
                ("pg_tls_negotiation", "postgres"),
                ("pg_drain", "transaction"),
                ("pg_metrics", False),
                ("pg_slow_query", None),
                ("pg_pool", "off"),
                ("pg_upstream_trust", False),
                *_CREDENTIAL_DEFAULTS,
                *_ROLE_DEFAULTS,
            ):
                if getattr(self, name) != default:
                    raise ConfigError(
                        f"{where}--{name.replace('_', '-')}: only applies with --protocol postgres"
                    )
            return
        if self.pg_slow_query is not None and not self.pg_metrics:
            raise ConfigError(f"{where}--pg-slow-query: only applies with --pg-metrics")
        self._check_pool(where)
        mode = self.sslmode
        if mode == "disable" and self.upstream_tls:
            raise ConfigError(
                f"{where}--pg-sslmode: 'disable' contradicts --upstream-tls (drop one of them)"
            )
        if mode != "disable" and not self.upstream_tls:
            raise ConfigError(
                f"{where}--pg-sslmode: {mode!r} needs --upstream-tls (and --tls-ca to verify)"
            )
        if self.tls_insecure_skip_verify and mode != "require":
            raise ConfigError(
                f"{where}--tls-insecure-skip-verify: with --protocol postgres, say "
                "--pg-sslmode require (TLS without verification) instead"
            )
        if self.pg_tls_negotiation == "direct" and mode in ("disable", "prefer"):
            raise ConfigError(
                f"{where}--pg-tls-negotiation: 'direct' needs TLS (--upstream-tls with "
                "--pg-sslmode require, verify-ca or verify-full)"
            )
        self._check_credentials(where)
        self._check_roles(where)

    def _check_roles(self, where: str) -> None:
        """--pg-target-session-attrs and its health connection."""
        if self.pg_target_session_attrs == "any":
            for name, default in _ROLE_DEFAULTS[1:]:
                if getattr(self, name) != default:
                    raise ConfigError(
                        f"{where}--{name.replace('_', '-')}: only applies with "
                        "--pg-target-session-attrs (other than any)"
                    )
            return
        needs = f"{where}--pg-target-session-attrs {self.pg_target_session_attrs}: needs"
        if self.pg_password_file is None and self.pg_password_command is None:
            raise ConfigError(
                f"{needs} --pg-password-file or --pg-password-command (the ambassador's "
                "own health connection learns each server's role)"
            )
        if not self.pg_health_user:
            raise ConfigError(f"{needs} --pg-health-user (the role of its health connections)")
        if not self.health_check_interval:
            raise ConfigError(
                f"{needs} --health-check-interval (how often each server's role is checked, "
                "e.g. 2s)"
            )

    def _check_credentials(self, where: str) -> None:
        """--pg-password-* and what depends on them (docs/ambassador-postgres.md)."""
        if self.pg_password_file is not None and self.pg_password_command is not None:
            raise ConfigError(
                f"{where}--pg-password-file and --pg-password-command: give one of them"
            )
        if self.pg_password_file is None and self.pg_password_command is None:
            for name, default in _CREDENTIAL_DEFAULTS:
                if getattr(self, name) != default:
                    raise ConfigError(
                        f"{where}--{name.replace('_', '-')}: only applies with "
                        "--pg-password-file or --pg-password-command"
                    )
            return
        if self.pg_password_command is not None and not self.pg_password_command.strip():
            raise ConfigError(f"{where}--pg-password-command: empty command")
        if self.pg_password_command_ttl <= 0:
            raise ConfigError(f"{where}--pg-password-command-ttl: must be > 0")
        if "password" in self.pg_auth_methods and self.sslmode not in VERIFIED_SSLMODES:
            raise ConfigError(
                f"{where}--pg-auth-methods: 'password' (cleartext) needs verified TLS to "
                f"the server, not --pg-sslmode {self.sslmode} (use --upstream-tls with "
                "--pg-sslmode verify-full or verify-ca, or drop 'password')"
            )
        if (self.pg_client_auth == "password-file") != (self.pg_client_password_file is not None):
            raise ConfigError(
                f"{where}--pg-client-password-file: give it exactly with "
                "--pg-client-auth password-file"
            )
        if self.pg_client_auth == "trust" and self.pg_client_auth_method != "scram-sha-256":
            raise ConfigError(
                f"{where}--pg-client-auth-method: only applies with --pg-client-auth "
                "password-file (trust asks the app for nothing)"
            )

    def _check_pool(self, where: str) -> None:
        if self.pg_pool == "off":
            return
        sources = (self.pg_password_file, self.pg_password_command)
        if all(source is None for source in sources) and not self.pg_upstream_trust:
            raise ConfigError(
                f"{where}--pg-pool: {self.pg_pool!r} needs the ambassador to log in to the "
                "server itself: give --pg-password-file or --pg-password-command, or "
                "--pg-upstream-trust when the "
                "server's pg_hba trusts the ambassador (trust or cert)"
            )
        if self.pg_pool == "session":
            for name, default in _TRANSACTION_POOL_DEFAULTS:
                value = getattr(self, name)
                if value != default:
                    raise ConfigError(
                        f"{where}--{name.replace('_', '-')}: {value} only applies with "
                        "--pg-pool transaction (a session pool passes the app's prepared "
                        "statements to the server untouched); drop it"
                    )
        if self.pg_pool_min_idle > self.pg_pool_size:
            raise ConfigError(
                f"{where}--pg-pool-min-idle: {self.pg_pool_min_idle} is more than "
                f"--pg-pool-size {self.pg_pool_size}"
            )
        for name in ("pg_pool_idle_timeout", "pg_pool_max_lifetime", "pg_pool_wait"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{where}--{name.replace('_', '-')}: must be > 0")
        if self.pg_pool_wait >= self.startup_timeout:
            raise ConfigError(
                f"{where}--pg-pool-wait: {self.pg_pool_wait:g}s must be shorter than "
                f"--startup-timeout {self.startup_timeout:g}s"
            )


@dataclass(frozen=True)
class AmbassadorConfig:
    """The whole ambassador: runtime settings and one or more routes."""

    routes: tuple[RouteConfig, ...]
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if not self.routes:
            raise ConfigError(
                "--listen: missing (give --listen and --upstream, or routes in --config)"
            )
        names: list[object] = [r.name for r in self.routes]
        listens: list[object] = [r.listen for r in self.routes if not _is_any_port(r.listen)]
        for seen, label in ((names, "name"), (listens, "listen")):
            dupes = sorted({str(x) for x in seen if seen.count(x) > 1})
            if dupes:
                raise ConfigError(f"routes: duplicate {label} {dupes[0]!r}")


def _is_any_port(addr: ListenAddress) -> bool:
    return isinstance(addr, HostPort) and addr.port == 0


def _route_from(values: Mapping[str, Any], name: str) -> RouteConfig:
    if values.get("listen") is None:
        where = "" if name == "default" else f"route {name!r}: "
        raise ConfigError(f"{where}--listen: missing (HOST:PORT or unix:/path)")
    return RouteConfig(name=name, **{o.name: values[o.name] for o in ROUTE_OPTIONS})


def build(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    file: Mapping[str, Any],
    file_label: str = "config file",
) -> AmbassadorConfig:
    """Build the config from the three sources (flags > env > file > defaults).

    Raises:
        ConfigError: naming the flag, environment variable or file key at fault.
    """
    file = dict(file)
    routes_raw = file.pop("routes", None)
    values = resolve_with_file(AMBASSADOR_OPTIONS, flags, env, file, file_label)
    runtime = RuntimeConfig.from_values(values)
    if routes_raw is None:
        return AmbassadorConfig(routes=(_route_from(values, "default"),), runtime=runtime)
    if not isinstance(routes_raw, list) or not routes_raw:
        raise ConfigError(f"{file_label}: routes must be a non-empty list of mappings")
    for key in ("listen", "upstream"):
        if key in flags or f"PODPATTERNS_{key.upper()}" in env or key in file:
            raise ConfigError(
                f"--{key}: cannot be combined with routes in the config file (set it on each route)"
            )
    routes = []
    for i, entry in enumerate(routes_raw):
        label = f"{file_label}: routes[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{label}: must be a mapping")
        entry = dict(entry)
        name = str(entry.pop("name", f"route{i}"))
        routes.append(_route_from(resolve_entry(entry, ROUTE_OPTIONS, values, label), name))
    return AmbassadorConfig(routes=tuple(routes), runtime=runtime)
