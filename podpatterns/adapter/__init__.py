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

from podpatterns.adapter.config import ADAPTER_ONLY_OPTIONS, ADAPTER_OPTIONS, AdapterConfig
from podpatterns.adapter.pipeline import Adapter

__all__ = ["ADAPTER_ONLY_OPTIONS", "ADAPTER_OPTIONS", "Adapter", "AdapterConfig"]
