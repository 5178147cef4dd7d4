"""The runtime every component shares: its options and config, the lifecycle
(start -> ready -> serve -> drain -> stopped), the admin server and the process entry.

The runtime knows no feature: components plug in through the :class:`Component`
Protocol, shutdown triggers are plain async callables, and the admin server sees the Pod's
health only through :class:`~podpatterns.runtime.admin.PodView`.
"""

from podpatterns.runtime.config import EMBEDDED_DEFAULTS, RUNTIME_OPTIONS, RuntimeConfig
from podpatterns.runtime.lifecycle import (
    Component,
    NothingToDrain,
    Phase,
    Runtime,
    Shutdown,
    Trigger,
)

__all__ = [
    "EMBEDDED_DEFAULTS",
    "RUNTIME_OPTIONS",
    "Component",
    "NothingToDrain",
    "Phase",
    "Runtime",
    "RuntimeConfig",
    "Shutdown",
    "Trigger",
]
