"""``podpatterns health``: probe the main container, write its record, serve the Pod's
probes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from podpatterns.commands.common import Command, Flags, resolve_runtime_tool
from podpatterns.health.prober import PROBE_OPTIONS, ProberConfig
from podpatterns.runtime import RUNTIME_OPTIONS, RuntimeConfig
from podpatterns.runtime.process import serve

HEALTH_OPTIONS = (*RUNTIME_OPTIONS, *PROBE_OPTIONS)


@dataclass(frozen=True)
class HealthConfig:
    """``podpatterns health``'s config: the runtime's and the prober's."""

    runtime: RuntimeConfig
    prober: ProberConfig


def build(
    flags: Flags, env: Mapping[str, str], file: Mapping[str, Any], file_label: str = "config file"
) -> HealthConfig:
    """Build from flags > env > file > defaults.

    Raises:
        ConfigError: naming the flag, environment variable or file key at fault.
    """
    runtime, values = resolve_runtime_tool(HEALTH_OPTIONS, flags, env, file, file_label)
    return HealthConfig(runtime, ProberConfig.from_values(values))


def main(config: HealthConfig) -> int:
    """Probe and serve until shutdown; the exit code."""
    from podpatterns.health.coordination import pod_runtime
    from podpatterns.health.prober import Prober

    return serve(
        config.runtime,
        lambda: pod_runtime(
            config.runtime,
            [Prober(config.prober)],
            expected=config.prober.expect,
            pod_probes=True,
        ),
    )


COMMAND = Command(
    name="health",
    help="probe the main container, write its record, serve the Pod's probes",
    description="Probe a container (HTTP, TCP, exec, file freshness) with kubelet-like "
    "thresholds, write HEALTH_DIR/NAME.json, and answer /livez, /readyz, /startupz "
    "for the whole Pod and /readyz/NAME etc. per container on the admin server.",
    options=HEALTH_OPTIONS,
    build=build,
    main=main,
    handles_signals=True,
)
