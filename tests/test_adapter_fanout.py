"""Several sinks at once: each ships every record; one down holds back only what it has
not acknowledged, within --queue-max-bytes; the checkpoint moves only on every sink's
acknowledgement; SIGKILL and restart lose nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from podpatterns.adapter import Adapter
from podpatterns.adapter.checkpoint import CheckpointStore
from podpatterns.metrics import exposition, new_registry
from tests.adapter_harness import (
    ListSink,
    Receiver,
    SeqWriter,
    check_delivery,
    config,
    line,
    read_ndjson,
    seqs_of,
)
from tests.proc import Proc
from tests.test_adapter_process import adapter
from tests.waiting import eventually, wait_until

LINE_COST = len(line(0)) + 64  # a harness line at least, plus the per-line overhead


class FailingSink(ListSink):
    """A sink whose send fails with an OS error while it is down (as a full disk does)."""

    async def send(self, records: list[dict[str, Any]]) -> None:
        if self.down:
            raise OSError(28, "No space left on device")
        await super().send(records)

    def set_down(self, down: bool) -> None:
        self.down = down


def scrape(adapter: Adapter) -> str:
    registry = new_registry()
    for c in adapter.collectors():
        registry.register(c)
    return exposition(registry).decode()


async def test_a_sink_down_holds_back_only_its_share_and_the_checkpoint(tmp_path: Path) -> None:
    """With b down, a keeps receiving until the queue's bytes are held for b; the checkpoint
    does not move; b is visible in metrics and readiness; once b is back both get every
    record exactly once and the checkpoint reaches the end of the file."""
    queue_max = 64 * 1024
    a, b = ListSink(), FailingSink()
    b.set_down(True)
    log = tmp_path / "app.log"
    w = SeqWriter(log)
    cfg = config(
        tmp_path,
        "*.log",
        queue_max_bytes=queue_max,
        batch_max_bytes=8 * 1024,
        batch_max_records=50,
        sink_unready_after=0.2,
    )
    adapter = Adapter(cfg, sinks={"a": a, "b": b})
    await adapter.start()
    try:
        w.write(3000)  # ~330 KB of queue cost: five times the bound
        # The reader pauses once the batches b holds fill the queue.
        await eventually(lambda: adapter.lanes[1].pending_bytes > queue_max - 8 * 1024)
        assert len(a.records) * LINE_COST <= queue_max + 8 * 1024
        assert len(a.records) > 0
        assert not b.records
        assert all(e.offset == 0 for e in adapter.acked.values())
        await eventually(lambda: not adapter.is_ready())
        assert adapter.unready_reason() is not None
        assert "sink b failing" in str(adapter.unready_reason())
        text = scrape(adapter)
        assert 'podpatterns_adapter_sink_failing{sink="b"} 1.0' in text
        assert 'podpatterns_adapter_sink_failing{sink="a"} 0.0' in text
        assert f'podpatterns_adapter_sink_records_total{{sink="a"}} {len(a.records)}.0' in text
        assert 'podpatterns_adapter_sink_records_total{sink="b"} 0.0' in text
        b.set_down(False)
        await eventually(lambda: len(a.records) >= 3000 and len(b.records) >= 3000)
        await eventually(lambda: adapter.is_ready())
        await eventually(lambda: [e.offset for e in adapter.acked.values()] == [log.stat().st_size])
    finally:
        adapter.stop_accepting()
        await adapter.wait_drained()
        await adapter.close()
    check_delivery(a.seqs(), 3000, 0)
    check_delivery(b.seqs(), 3000, 0)
    assert adapter.counters.records_shipped == 3000


async def test_acknowledgements_are_in_batch_order_per_source(tmp_path: Path) -> None:
    """b acknowledges late: the checkpoint never passes a record b has not acknowledged."""
    a, b = ListSink(), ListSink()
    log = tmp_path / "app.log"
    w = SeqWriter(log)
    seen: list[tuple[int, int]] = []  # (checkpoint offset, bytes b holds) at each check

    cfg = config(tmp_path, "*.log", batch_max_records=20)
    adapter = Adapter(cfg, sinks={"a": a, "b": b})
    await adapter.start()
    try:
        for _ in range(5):
            b.set_down(True)
            w.write(200)
            await eventually(lambda: len(a.records) >= w.next)
            offsets = [e.offset for e in adapter.acked.values()]
            seen.append((offsets[0] if offsets else 0, len(b.records)))
            b.set_down(False)
            await eventually(lambda: len(b.records) >= w.next)
    finally:
        adapter.stop_accepting()
        await adapter.wait_drained()
        await adapter.close()
    for offset, b_count in seen:
        # Every byte before the checkpoint is in a record b acknowledged.
        assert offset <= sum(len(line(s)) for s in range(b_count))
    check_delivery(b.seqs(), 1000, 0)


def _adapter(tmp: Path, receiver: Receiver) -> Proc:
    """The process tests' adapter (a file sink), with an HTTP sink besides."""
    return adapter(
        tmp,
        "--sink",
        "http",
        "--sink-url",
        receiver.url,
        "--sink-backoff",
        "20ms",
        "--sink-backoff-max",
        "200ms",
    )


def test_sigkill_with_one_sink_down_loses_nothing(tmp_path: Path) -> None:
    """The file sink gets everything while the HTTP sink is down; SIGKILL; the checkpoint
    had not moved; after a restart with the HTTP sink back, it gets every record exactly
    once, and the file sink gets at most the batches not acknowledged by both again."""
    (tmp_path / "logs").mkdir()
    n = 2000
    SeqWriter(tmp_path / "logs" / "app.log").write(n)
    receiver = Receiver()
    receiver.down.set()
    out = tmp_path / "out.ndjson"
    try:
        p = _adapter(tmp_path, receiver)
        try:
            wait_until(
                lambda: len(read_ndjson(out)) >= n and receiver.refused >= 1,
                "every line in the file sink, the HTTP sink refused",
            )
            p.signal(signal.SIGKILL)
            p.wait()
        finally:
            p.stop()
        assert all(e.offset == 0 for e in CheckpointStore(tmp_path / "cp").load().values())
        receiver.down.clear()
        p = _adapter(tmp_path, receiver)
        try:
            wait_until(lambda: receiver.distinct() >= n, f"{n} lines at the HTTP sink")
            assert p.terminate() == 0
        finally:
            p.stop()
        check_delivery(receiver.seqs(), n, 0)
        check_delivery(seqs_of(str(r.get("message", "")) for r in read_ndjson(out)), n, n)
        [entry] = CheckpointStore(tmp_path / "cp").load().values()
        assert entry.offset == (tmp_path / "logs" / "app.log").stat().st_size
    finally:
        receiver.close()


def test_readyz_says_which_sink_has_been_failing(tmp_path: Path) -> None:
    """--sink-unready-after: /readyz turns 503 and names the sink; back to 200 once it is
    up again, while the other sink shipped all along."""
    (tmp_path / "logs").mkdir()
    SeqWriter(tmp_path / "logs" / "app.log").write(100)
    receiver = Receiver()
    receiver.down.set()
    p = Proc(
        "adapter",
        "--path",
        str(tmp_path / "logs" / "*.log"),
        "--sink",
        "stdout",
        "--sink",
        "http",
        "--sink-url",
        receiver.url,
        "--sink-backoff",
        "20ms",
        "--sink-backoff-max",
        "100ms",
        "--sink-unready-after",
        "300ms",
        "--admin",
        "127.0.0.1:0",
        "--shutdown-delay",
        "0",
        stdout=subprocess.DEVNULL,
    )
    try:
        url = p.admin_url() + "/readyz"
        _, body = wait_until(lambda: _unready(url), "503 from /readyz")
        reason = body["components"]["adapter"]["reason"]
        assert reason.startswith("sink http failing for ")
        receiver.down.clear()
        wait_until(lambda: _ready(url)[0] == 200, "ready again")
        wait_until(lambda: receiver.distinct() >= 100)
        p.signal(signal.SIGTERM)
        assert p.wait(15) == 0
    finally:
        p.stop()
        receiver.close()


def _ready(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _unready(url: str) -> tuple[int, dict[str, Any]] | None:
    got = _ready(url)
    return got if got[0] == 503 else None
