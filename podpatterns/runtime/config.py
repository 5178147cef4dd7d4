"""The options every runtime-based command shares, and the typed config built from them.

Each default is declared once, in :data:`RUNTIME_OPTIONS`; :class:`RuntimeConfig` takes
its defaults from there, except the two an embedded runtime deliberately changes
(:data:`EMBEDDED_DEFAULTS`): a library user gets no admin server and no accept window
unless asked, while the command binds its probes and waits for the kubelet to take the
Pod out of the Service's endpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from podpatterns import logs
from podpatterns.errors import ConfigError
from podpatterns.options import (
    HostPort,
    Option,
    default_of,
    parse_bind,
    parse_choice,
    parse_container_name,
    parse_duration,
    parse_int,
    parse_loopback_url,
    parse_path,
    takes_off,
)


@takes_off
def parse_admin(text: str) -> HostPort | None:
    """Parse the admin address; ``off`` disables the admin server."""
    return None if text.strip().lower() == "off" else parse_bind(text)


RUNTIME_OPTIONS: tuple[Option[Any], ...] = (
    Option(
        "config", parse_path, None, "YAML config file (keys are the option names)", metavar="FILE"
    ),
    # The kubelet probes the Pod IP, so the probes cannot be loopback-only by default;
    # /quitquitquit checks its peer and stays loopback-only whatever the bind address.
    Option(
        "admin",
        parse_admin,
        HostPort("0.0.0.0", 9901),
        "admin HTTP server (probes, /metrics, loopback-only /quitquitquit); 'off' disables it",
        metavar="HOST:PORT",
    ),
    Option(
        "drain_timeout",
        parse_duration,
        30.0,
        "longest time in-flight work may take to finish after shutdown starts",
        metavar="DURATION",
    ),
    Option(
        "shutdown_delay",
        parse_duration,
        2.0,
        "after SIGTERM, keep accepting new work this long (readiness is already 503)",
        metavar="DURATION",
    ),
    Option("log_level", parse_choice(*logs.LEVELS), "info", "minimum log level", metavar="LEVEL"),
    Option(
        "log_format",
        parse_choice("auto", "json", "console"),
        "auto",
        "log format on stderr; auto is console on a terminal, JSON otherwise",
        metavar="FORMAT",
    ),
    Option(
        "loop",
        parse_choice("auto", "uvloop", "asyncio"),
        "auto",
        "event loop implementation; auto uses uvloop when installed",
        metavar="LOOP",
    ),
    Option(
        "health_dir",
        parse_path,
        None,
        "shared directory of health records (used with --exit-with)",
        metavar="DIR",
    ),
    Option(
        "exit_with",
        parse_container_name,
        None,
        "drain and exit when this container's tombstone appears in --health-dir",
        metavar="NAME",
    ),
    Option(
        "exit_with_code",
        parse_int(0, 255),
        0,
        "exit code after an --exit-with shutdown",
        metavar="CODE",
    ),
    Option(
        "exit_with_quit",
        parse_loopback_url,
        (),
        "loopback URL of another sidecar to POST before an --exit-with shutdown "
        "(e.g. http://127.0.0.1:9091/quitquitquit)",
        multiple=True,
        metavar="URL",
    ),
)

EMBEDDED_DEFAULTS: dict[str, Any] = {"admin": None, "shutdown_delay": 0.0}
"""Where ``RuntimeConfig()`` in a program differs from the command's declared default:
no admin server (a library must not bind 0.0.0.0:9901 unasked) and no accept window
(there is no kubelet removing endpoints to wait for)."""


def _default(name: str) -> Any:
    if name in EMBEDDED_DEFAULTS:
        return EMBEDDED_DEFAULTS[name]
    return default_of(RUNTIME_OPTIONS, name)


@dataclass(frozen=True)
class RuntimeConfig:
    """Settings every component shares. Validated on construction.

    Attributes:
        admin: where the admin server binds, or ``None`` for no admin server.
        drain_timeout: seconds in-flight work may take after accepting stops.
        shutdown_delay: seconds new work is still accepted after shutdown starts.
        log_level: minimum log level (CLI only).
        log_format: ``auto``, ``json`` or ``console`` (CLI only).
        loop: ``auto``, ``uvloop`` or ``asyncio`` (CLI only).
        health_dir: the shared health-record directory.
        exit_with: name of the container whose tombstone ends this process.
        exit_with_code: the exit code after an ``exit_with`` shutdown.
        exit_with_quit: loopback URLs POSTed before an ``exit_with`` shutdown.

    ``health_dir`` and the ``exit_with`` settings take effect through
    :func:`podpatterns.health.pod_runtime`, which builds a runtime with the
    ``--exit-with`` trigger and the Pod's probe endpoints (every command uses it).
    """

    admin: HostPort | None = field(default=_default("admin"))
    drain_timeout: float = field(default=_default("drain_timeout"))
    shutdown_delay: float = field(default=_default("shutdown_delay"))
    log_level: str = field(default=_default("log_level"))
    log_format: str = field(default=_default("log_format"))
    loop: str = field(default=_default("loop"))
    health_dir: Path | None = field(default=_default("health_dir"))
    exit_with: str | None = field(default=_default("exit_with"))
    exit_with_code: int = field(default=_default("exit_with_code"))
    exit_with_quit: tuple[str, ...] = field(default=_default("exit_with_quit"))

    def __post_init__(self) -> None:
        if self.drain_timeout < 0:
            raise ConfigError(f"--drain-timeout: {self.drain_timeout!r} must be >= 0")
        if self.shutdown_delay < 0:
            raise ConfigError(f"--shutdown-delay: {self.shutdown_delay!r} must be >= 0")
        if self.exit_with and self.health_dir is None:
            raise ConfigError(f"--exit-with: {self.exit_with!r} needs --health-dir DIR")
        if (
            self.health_dir is not None
            and self.health_dir.exists()
            and not self.health_dir.is_dir()
        ):
            # A missing directory may still appear (a volume mounted late): --exit-with
            # then polls; a file in its place never becomes one.
            raise ConfigError(f"--health-dir: {str(self.health_dir)!r} is not a directory")
        if self.exit_with_quit and not self.exit_with:
            raise ConfigError("--exit-with-quit: needs --exit-with NAME")

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> RuntimeConfig:
        """Build from resolved option values (see :func:`podpatterns.options.resolve`)."""
        return cls(**{k: values[k] for k in cls.__dataclass_fields__ if k in values})
