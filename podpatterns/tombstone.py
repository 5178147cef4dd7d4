"""The ``--exit-with NAME`` trigger: return when NAME's tombstone is in the health dir.

A tombstone is ``DIR/NAME.json`` whose ``phase`` is ``exited``. The state on disk is
checked first (a tombstone written before this process started counts), then on every
file event in DIR and on a periodic re-check, because events can be lost. A missing,
partial or unreadable file means "not yet", never "exited".
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

from podpatterns import logs

RECHECK_SECONDS = 1.0


def read_phase(path: Path) -> str | None:
    """The ``phase`` of a record file, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    phase = data.get("phase") if isinstance(data, dict) else None
    return phase if isinstance(phase, str) else None


def exit_with_trigger(health_dir: Path, name: str) -> Callable[[], Awaitable[str]]:
    """Build a runtime trigger that completes when ``name`` has exited."""
    record = health_dir / f"{name}.json"
    log = logs.get("runtime")

    async def wait_for_tombstone() -> str:
        log.info("exit_with_watching", record=str(record))
        while read_phase(record) != "exited":
            try:
                import watchfiles  # lazily: most processes never watch files

                async for _ in watchfiles.awatch(
                    health_dir,
                    rust_timeout=int(RECHECK_SECONDS * 1000),
                    yield_on_timeout=True,
                    debounce=50,
                    step=10,
                    watch_filter=lambda _c, p: Path(p).name == record.name,
                ):
                    if read_phase(record) == "exited":
                        break
            except (OSError, RuntimeError) as exc:
                # directory not there yet, or no inotify: poll
                log.debug("exit_with_polling", error=str(exc))
                await asyncio.sleep(RECHECK_SECONDS)
        log.info("exit_with_tombstone", peer=name)
        return f"exit-with:{name}"

    return wait_for_tombstone
