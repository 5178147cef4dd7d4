"""``podpatterns adapter``: tail, parse, transform and ship logs from a shared volume."""

from __future__ import annotations

from podpatterns.adapter.config import ADAPTER_OPTIONS, AdapterConfig, build
from podpatterns.commands.common import Command
from podpatterns.runtime.process import serve


def main(config: AdapterConfig) -> int:
    """Ship until shutdown; the exit code."""
    from podpatterns.adapter import Adapter
    from podpatterns.health.coordination import pod_runtime

    return serve(config.runtime, lambda: pod_runtime(config.runtime, [Adapter(config)]))


COMMAND = Command(
    name="adapter",
    help="tail, parse, transform and ship logs from a shared volume",
    description="Tail files (globs), parse and transform each line, ship the records to "
    "a sink; at least once, checkpointed after the sink acknowledged.",
    options=ADAPTER_OPTIONS,
    build=build,
    main=main,
    handles_signals=True,
)
