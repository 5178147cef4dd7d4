"""The adapter's part of ``podpatterns demo``: an app writes access logs, the adapter ships them.

An embedded "app" appends nginx combined access-log lines to a file in a temporary
directory (the shared volume), rotating it once by rename+create midway; the adapter
tails the directory, parses each line and ships the records to a file sink, with a
checkpoint. The summary shows lines written and shipped, the lag and the checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from podpatterns.adapter import Adapter, AdapterConfig
from podpatterns.adapter.checkpoint import CheckpointStore


def _access_line(i: int) -> bytes:
    status = 404 if i % 17 == 0 else 200
    return (
        f'10.0.0.{i % 250} - - [01/May/2024:12:00:{i % 60:02d} +0000] "GET /items/{i} '
        f'HTTP/1.1" {status} {100 + i % 900} "-" "demo-client/1.0"\n'
    ).encode()


async def adapter_demo(lines: int = 20000) -> dict[str, Any]:
    """Run the app and the adapter on a temporary volume; return the figures."""
    with tempfile.TemporaryDirectory(prefix="podpatterns-demo-") as tmp:
        volume = Path(tmp)
        log = volume / "access.log"
        cfg = AdapterConfig(
            path=(str(volume / "*.log"),),
            parse="nginx",
            sink=("file",),
            sink_path=volume / "shipped.ndjson",
            checkpoint_dir=volume / ".podpatterns",
            reconcile_interval=0.1,
            rotate_wait=0.2,
        )
        adapter = Adapter(cfg)
        await adapter.start()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for i in range(0, lines, 500):
            os.write(fd, b"".join(_access_line(j) for j in range(i, min(lines, i + 500))))
            if i == lines // 2 // 500 * 500:  # rotate once, midway (rename + create)
                os.rename(log, volume / "access.log.1")
                os.close(fd)
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            await asyncio.sleep(0.005)
        os.close(fd)
        lag_while_running = adapter.lag_bytes()
        adapter.stop_accepting()  # as on SIGTERM: read every open file to its end
        async with asyncio.timeout(30):
            await adapter.wait_drained()
        await adapter.close()
        records = [json.loads(x) for x in (volume / "shipped.ndjson").read_bytes().splitlines()]
        checkpoint = CheckpointStore(volume / ".podpatterns").load()
        return {
            "written": lines,
            "shipped": len(records),
            "distinct": len({r["path"] for r in records}),  # /items/N: one per line
            "not_found": sum(1 for r in records if r.get("status") == 404),
            "parse_errors": adapter.counters.parse_errors,
            "rotations": adapter.counters.rotations,
            "lag_bytes_while_running": lag_while_running,
            "checkpoint": sorted((Path(e.path).name, e.offset) for e in checkpoint.values()),
            "mode": adapter.mode,
        }


def summary(r: dict[str, Any]) -> list[str]:
    """The adapter's lines of the demo summary."""
    cp = ", ".join(f"{name} @ {offset}" for name, offset in r["checkpoint"]) or "empty"
    return [
        f"  adapter            app wrote {r['written']} access-log lines (one rename+create "
        f"rotation); {r['shipped']} records shipped ({r['distinct']} distinct), "
        f"{r['parse_errors']} parse errors, {r['not_found']} with status 404",
        f"                     lag {r['lag_bytes_while_running']} bytes while writing, "
        f"{r['rotations']} rotation seen, file events: {r['mode']}; checkpoint: {cp}",
    ]
