"""``podpatterns ambassador``: relay connections to upstream endpoints."""

from __future__ import annotations

from podpatterns.ambassador.config import AMBASSADOR_OPTIONS, AmbassadorConfig, build
from podpatterns.commands.common import Command
from podpatterns.runtime.process import serve


def main(config: AmbassadorConfig) -> int:
    """Serve the routes until shutdown; the exit code."""
    from podpatterns.ambassador import Ambassador
    from podpatterns.health.coordination import pod_runtime

    return serve(config.runtime, lambda: pod_runtime(config.runtime, [Ambassador(config)]))


COMMAND = Command(
    name="ambassador",
    help="local TCP proxy to external services",
    description="Relay TCP (or unix-socket) connections to upstream endpoints.",
    options=AMBASSADOR_OPTIONS,
    build=build,
    main=main,
    handles_signals=True,
)
