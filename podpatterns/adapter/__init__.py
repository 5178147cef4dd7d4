"""The adapter: tail files from a shared volume, parse, transform and ship the records.

Use from Python::

    from podpatterns.adapter import Adapter, AdapterConfig

    adapter = Adapter(AdapterConfig(path=("/var/log/app/*.log",), checkpoint_dir=...))
    await adapter.start()
    ...
    adapter.stop_accepting()
    await adapter.wait_drained()
    await adapter.close()

or run it under a :class:`~podpatterns.runtime.Runtime` (``podpatterns adapter``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from podpatterns.adapter.config import ADAPTER_ONLY_OPTIONS, ADAPTER_OPTIONS, AdapterConfig

if TYPE_CHECKING:
    from podpatterns.adapter.pipeline import Adapter

__all__ = ["ADAPTER_ONLY_OPTIONS", "ADAPTER_OPTIONS", "Adapter", "AdapterConfig"]


def __getattr__(name: str) -> Any:
    # The pipeline (watchfiles, aiohttp for the HTTP sink) is imported on first use, so
    # that `podpatterns ambassador`, which declares the adapter's options in its parser,
    # does not load it (about 10 MiB of resident memory).
    if name == "Adapter":
        from podpatterns.adapter.pipeline import Adapter

        return Adapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
