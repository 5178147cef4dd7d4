"""The delivery contract across real processes: SIGTERM, SIGKILL at random points, logrotate."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from podpatterns.adapter.checkpoint import CheckpointStore
from tests.adapter_harness import (
    SeqWriter,
    check_delivery,
    logrotate_binary,
    read_ndjson,
    seqs_of,
)
from tests.proc import Proc
from tests.waiting import wait_until

BATCH = 200


def adapter(tmp: Path, *extra: str) -> Proc:
    """``podpatterns adapter`` tailing tmp/logs/*.log into tmp/out.ndjson."""
    return Proc(
        "adapter",
        "--path",
        str(tmp / "logs" / "*.log"),
        "--checkpoint-dir",
        str(tmp / "cp"),
        "--sink",
        "file",
        "--sink-path",
        str(tmp / "out.ndjson"),
        "--admin",
        "off",
        "--shutdown-delay",
        "0",
        "--reconcile-interval",
        "50ms",
        "--rotate-wait",
        "300ms",
        "--batch-max-records",
        str(BATCH),
        *extra,
    )


def delivered(tmp: Path) -> list[int]:
    """Sequence numbers in the sink's file."""
    return seqs_of(str(r.get("message", "")) for r in read_ndjson(tmp / "out.ndjson"))


class _Arrivals:
    """The distinct sequence numbers in the sink's file, read incrementally.

    Re-parsing the whole file on every poll (~10 MB after the SIGKILL runs) kept a CPU
    busy in the test and starved the adapter it waits for on a loaded machine.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.seqs: set[int] = set()

    def count(self) -> int:
        """How many distinct lines have arrived (complete lines only; torn ones skipped)."""
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return 0
        end = data.rfind(b"\n") + 1
        self.offset += end
        messages = []
        for raw in data[:end].splitlines():
            try:
                messages.append(str(json.loads(raw).get("message", "")))
            except (ValueError, AttributeError):
                continue  # a line torn by a SIGKILL, merged with the next one
        self.seqs.update(seqs_of(messages))
        return len(self.seqs)


def wait_delivered(tmp: Path, n: int) -> None:
    """Wait until ``n`` distinct lines reached the sink."""
    arrivals = _Arrivals(tmp / "out.ndjson")
    try:
        wait_until(lambda: arrivals.count() >= n, f"{n} distinct lines in the sink", 120.0)
    except AssertionError as exc:
        missing = sorted(set(range(n)) - arrivals.seqs)
        raise AssertionError(f"{exc}; {len(missing)} missing, first {missing[:5]}") from None


def test_sigterm_reads_to_the_end_and_exits_0(tmp_path: Path) -> None:
    """SIGTERM: open files are read to their end, shipped and checkpointed, then exit 0."""
    (tmp_path / "logs").mkdir()
    w = SeqWriter(tmp_path / "logs" / "app.log")
    p = adapter(tmp_path)
    try:
        p.wait_event("adapter_started")
        w.write(100000)
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        p.stop()
    check_delivery(delivered(tmp_path), 100000, 0)
    [entry] = CheckpointStore(tmp_path / "cp").load().values()
    assert entry.offset == (tmp_path / "logs" / "app.log").stat().st_size


def test_a_file_created_just_before_sigterm_is_read(tmp_path: Path) -> None:
    """SIGTERM looks for new files once more: the main container's last file is shipped.

    Discovery is made slow here (polling every 60 s, no reconcile), so only that last
    look can find the file.
    """
    (tmp_path / "logs").mkdir()
    p = adapter(
        tmp_path, "--watch", "poll", "--poll-interval", "60s", "--reconcile-interval", "60s"
    )
    try:
        p.wait_event("adapter_started")
        SeqWriter(tmp_path / "logs" / "last.log").write(5000)
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        p.stop()
    check_delivery(delivered(tmp_path), 5000, 0)


def test_sigterm_with_sink_down_exits_0_within_the_drain_deadline(tmp_path: Path) -> None:
    """A sink that never answers does not hold the process past --drain-timeout; exit is 0."""
    (tmp_path / "logs").mkdir()
    SeqWriter(tmp_path / "logs" / "app.log").write(10)
    p = Proc(
        "adapter",
        "--path",
        str(tmp_path / "logs" / "*.log"),
        "--sink",
        "tcp",
        "--sink-address",
        "127.0.0.1:1",
        "--admin",
        "off",
        "--shutdown-delay",
        "0",
        "--drain-timeout",
        "500ms",
    )
    try:
        p.wait_event("sink_failing")
        started = time.monotonic()
        p.signal(signal.SIGTERM)
        assert p.wait(10) == 0
        assert time.monotonic() - started < 5
        p.wait_event("drain_deadline_cut")
    finally:
        p.stop()


MAX_KILL_RUN_LINES = 150_000


def _kill_run(tmp_path: Path, seed: int, kills: int) -> None:
    rng = random.Random(seed)
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "app.log"
    stop = threading.Event()
    written = [0]

    def app() -> None:
        w = SeqWriter(log)
        rotations = 0
        next_rotation = time.monotonic() + 1.0
        # Bounded in count as well as in time: on a loaded machine the kills take longer,
        # and an unbounded writer would leave more lines than the final wait allows for.
        while not stop.is_set() and w.next < MAX_KILL_RUN_LINES:
            w.write(rng.randint(1, 50))
            time.sleep(0.001)
            # Files are rotated whether or not an adapter has seen them yet: a generation
            # created and renamed while the adapter restarts is found among the siblings.
            if time.monotonic() >= next_rotation:
                rotations += 1
                os.rename(log, logs / f"app.log.{rotations}")
                w.write(10)
                w.reopen()
                next_rotation = time.monotonic() + 1.0
        w.close()
        written[0] = w.next

    writer = threading.Thread(target=app)
    writer.start()
    try:
        for _ in range(kills):
            p = adapter(tmp_path)
            try:
                p.wait_event("adapter_started")
                time.sleep(rng.uniform(0.05, 1.2))
                p.p.kill()
                p.wait()
            finally:
                p.stop()
    finally:
        stop.set()
        writer.join()
    p = adapter(tmp_path)
    try:
        wait_delivered(tmp_path, written[0])
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        p.stop()
    check_delivery(delivered(tmp_path), written[0], kills * BATCH)


@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_random_points_while_writing_and_rotating(tmp_path: Path, seed: int) -> None:
    """SIGKILL at random points while writing and rotating: 0 lost, <= 1 batch resent per kill."""
    _kill_run(tmp_path, seed, kills=4)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3, 4, 5, 6, 7])
def test_sigkill_at_random_points_more_seeds(tmp_path: Path, seed: int) -> None:
    """As above, with more seeds and more kills."""
    _kill_run(tmp_path, seed, kills=8)


@pytest.mark.parametrize("mode", ["create", "copytruncate"])
def test_real_logrotate(tmp_path: Path, mode: str) -> None:
    """Rotation by the real logrotate (create, copytruncate) while the app writes: nothing lost."""
    binary = logrotate_binary()
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "app.log"
    conf = tmp_path / "logrotate.conf"
    conf.write_text(f"{log} {{\n  rotate 50\n  {mode}\n  missingok\n  nocompress\n}}\n")
    p = adapter(tmp_path)
    w = SeqWriter(log)
    try:
        p.wait_event("adapter_started")
        for _ in range(5):
            for _ in range(20):
                w.write(50)
                time.sleep(0.002)
            if mode == "copytruncate":
                # Bytes written between logrotate's copy and its truncate cannot be
                # recovered by anyone (the contract counts them): wait for the reader first.
                wait_delivered(tmp_path, w.next)
            subprocess.run(
                [binary, "-f", "-s", str(tmp_path / "state"), str(conf)], check=True, timeout=30
            )
            if mode == "create":
                w.reopen()
        w.write(50)
        wait_delivered(tmp_path, w.next)
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        p.stop()
    check_delivery(delivered(tmp_path), w.next, 0)


def test_metrics_and_readiness_are_served(tmp_path: Path) -> None:
    """/readyz is 200 once started and /metrics shows the adapter's counters and watch mode."""
    import urllib.request

    (tmp_path / "logs").mkdir()
    SeqWriter(tmp_path / "logs" / "app.log").write(100)
    p = Proc(
        "adapter",
        "--path",
        str(tmp_path / "logs" / "*.log"),
        "--sink",
        "file",
        "--sink-path",
        str(tmp_path / "out.ndjson"),
        "--admin",
        "127.0.0.1:0",
        "--shutdown-delay",
        "0",
    )
    try:
        url = p.admin_url()
        wait_delivered(tmp_path, 100)
        with urllib.request.urlopen(url + "/readyz", timeout=5) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert "podpatterns_adapter_records_shipped_total 100.0" in text
        assert 'podpatterns_adapter_watch_mode{mode="watch"} 1.0' in text
        assert "podpatterns_adapter_files_open 1.0" in text
        p.signal(signal.SIGTERM)
        assert p.wait(15) == 0
    finally:
        p.stop()


@pytest.mark.parametrize("unusable", ["a-file", "read-only"])
def test_unusable_checkpoint_dir_is_a_one_line_config_error(tmp_path: Path, unusable: str) -> None:
    """A checkpoint directory it cannot create or write: exit 2 and one line, no traceback.

    Found at start, not at the first save (which would come after records shipped). The
    read-only case runs the adapter as an unprivileged user: root may write anywhere.
    """
    prefix: tuple[str, ...] = ()
    if unusable == "a-file":
        (tmp_path / "cp").write_text("not a directory\n")
    else:
        if os.geteuid() != 0 or not shutil.which("setpriv"):
            pytest.skip("needs root and setpriv to run as another user")
        # Not pytest's tmp_path: its root (/tmp/pytest-of-root) is 0700, so another user
        # would fail at the parent, not at the directory under test.
        tmp_path = Path(tempfile.mkdtemp(prefix="podpatterns-cp-", dir="/var/tmp"))
        tmp_path.chmod(0o755)
        (tmp_path / "cp").mkdir(mode=0o555)
        prefix = ("setpriv", "--reuid=65532", "--regid=65532", "--clear-groups")
    (tmp_path / "logs").mkdir(mode=0o755)
    p = Proc(
        "adapter",
        "--path",
        str(tmp_path / "logs" / "*.log"),
        "--checkpoint-dir",
        str(tmp_path / "cp"),
        "--admin",
        "off",
        prefix=prefix,
    )
    try:
        assert p.wait(30) == 2
    finally:
        p.stop()
        if unusable == "read-only":
            shutil.rmtree(tmp_path)
    errors = [line for line in p.lines if line.strip() and not line.startswith("{")]
    assert len(errors) == 1, p.lines
    assert "--checkpoint-dir" in errors[0]
    assert str(tmp_path / "cp") in errors[0]
    assert ("not a directory" if unusable == "a-file" else "permission denied") in errors[0].lower()
