"""The adapter: read files from a shared volume and records pushed over localhost, parse,
transform and ship them.

Use from Python, from objects (docs/library.md)::

    from podpatterns.adapter import Files, Pipeline, Rename
    from podpatterns.adapter.config import SinkConfig

    pipeline = Pipeline(
        sources=[Files(paths=["/var/log/app/*.log"])],
        parse="json",
        transforms=[Rename("msg", "message")],
        sinks=[SinkConfig(name="stdout", kind="stdout")],
        checkpoint_dir=...,
    )
    await pipeline.start()
    ...
    pipeline.stop_accepting()
    await pipeline.wait_drained()
    await pipeline.close()

or from the options (``Adapter(AdapterConfig(...))``, what ``podpatterns adapter`` runs),
either one alone or under a :class:`~podpatterns.runtime.Runtime`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from podpatterns.adapter.config import ADAPTER_ONLY_OPTIONS, ADAPTER_OPTIONS, AdapterConfig

if TYPE_CHECKING:
    from podpatterns.adapter.api import (
        Add,
        Drop,
        Emit,
        Exclude,
        Files,
        Keep,
        Multiline,
        Pipeline,
        RateLimit,
        Redact,
        Rename,
        Sample,
        Source,
        Timestamp,
    )
    from podpatterns.adapter.pipeline import Adapter

__all__ = [
    "ADAPTER_ONLY_OPTIONS",
    "ADAPTER_OPTIONS",
    "Adapter",
    "AdapterConfig",
    "Add",
    "Drop",
    "Emit",
    "Exclude",
    "Files",
    "Keep",
    "Multiline",
    "Pipeline",
    "RateLimit",
    "Redact",
    "Rename",
    "Sample",
    "Source",
    "Timestamp",
]

_API = frozenset(__all__) - {"ADAPTER_ONLY_OPTIONS", "ADAPTER_OPTIONS", "Adapter", "AdapterConfig"}


def __getattr__(name: str) -> Any:
    # The pipeline (watchfiles, aiohttp for the HTTP sink) is imported on first use, so
    # that `podpatterns ambassador`, which declares the adapter's options in its parser,
    # does not load it (about 10 MiB of resident memory).
    if name == "Adapter":
        from podpatterns.adapter.pipeline import Adapter

        return Adapter
    if name in _API:
        from podpatterns.adapter import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
