"""``podpatterns reload``: watch mounted configuration and notify the app on change."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from podpatterns.commands.common import Command, Flags, resolve_runtime_tool
from podpatterns.errors import ConfigError
from podpatterns.reload import RELOAD_OPTIONS, ReloadConfig
from podpatterns.runtime import RUNTIME_OPTIONS, RuntimeConfig
from podpatterns.runtime.process import serve

OPTIONS = (*RUNTIME_OPTIONS, *RELOAD_OPTIONS)


@dataclass(frozen=True)
class ReloadCommandConfig:
    """``podpatterns reload``'s config: the runtime's and the reloader's."""

    runtime: RuntimeConfig
    reload: ReloadConfig


def build(
    flags: Flags, env: Mapping[str, str], file: Mapping[str, Any], file_label: str = "config file"
) -> ReloadCommandConfig:
    """Build from flags > env > file > defaults.

    Raises:
        ConfigError: naming the flag, environment variable or file key at fault.
    """
    runtime, values = resolve_runtime_tool(OPTIONS, flags, env, file, file_label)
    config = ReloadConfig.from_values(values)
    signal_given = "signal" in flags or "PODPATTERNS_SIGNAL" in env or "signal" in file
    if signal_given and values["pid_file"] is None:
        raise ConfigError(
            "--signal: only sent with --pid-file FILE; this reload notifies by "
            + ("--http-post" if values["http_post"] is not None else "--exec")
        )
    return ReloadCommandConfig(runtime, config)


def main(config: ReloadCommandConfig) -> int:
    """Watch and notify until shutdown; the exit code."""
    from podpatterns.health.coordination import pod_runtime
    from podpatterns.reload import Reloader

    return serve(config.runtime, lambda: pod_runtime(config.runtime, [Reloader(config.reload)]))


COMMAND = Command(
    name="reload",
    help="watch mounted configuration and notify the app when its content changes",
    description="Watch directories (ConfigMap and Secret volumes, git-sync roots); when "
    "their content changes, optionally validate it, then notify the app by HTTP POST, "
    "signal or command, with retries.",
    options=OPTIONS,
    build=build,
    main=main,
    handles_signals=True,
)
