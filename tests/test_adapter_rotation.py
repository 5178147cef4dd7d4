"""Hostile rotation, in real processes (issue 10, "Nothing lost, nothing frozen").

Real logrotate (create and copytruncate) while the HTTP sink is down and reading is
paused by backpressure, copytruncate while the adapter is stopped (SIGKILL or SIGTERM),
and more files than file descriptors: every line arrives, duplicates stay within one
batch per restart, and what cannot be recovered is counted.
"""

from __future__ import annotations

import random
import resource
import signal
import subprocess
from pathlib import Path

import pytest

from tests.adapter_harness import (
    Receiver,
    SeqWriter,
    check_delivery,
    logrotate_binary,
    read_ndjson,
    seqs_of,
)
from tests.proc import Proc
from tests.waiting import wait_until

BATCH = 200
COMMON = (
    "--admin",
    "off",
    "--shutdown-delay",
    "0",
    "--reconcile-interval",
    "100ms",
    "--rotate-wait",
    "300ms",
    "--batch-max-records",
    str(BATCH),
)


def rotator(tmp: Path, log: Path, mode: str) -> list[str]:
    """The command that rotates ``log`` now with the real logrotate (``-f``)."""
    conf = tmp / "logrotate.conf"
    conf.write_text(f"{log} {{\n  rotate 200\n  {mode}\n  missingok\n  nocompress\n}}\n")
    return [logrotate_binary(), "-f", "-s", str(tmp / "logrotate.state"), str(conf)]


def write_generation(w: SeqWriter, rng: random.Random) -> None:
    """One generation's worth of lines, in a few writes."""
    for _ in range(rng.randint(3, 6)):
        w.write(rng.randint(200, 800))


def caught_up(rx: Receiver, expected: int, p: Proc, within: float) -> None:
    """Wait until ``rx`` holds each of ``expected`` lines; failing, say which are missing
    and what the adapter logged last (a stalled catch-up is diagnosed from that)."""
    try:
        wait_until(lambda: rx.distinct() >= expected, f"{expected} distinct lines", within)
    except AssertionError as exc:
        got = set(rx.seqs())
        missing = [s for s in range(expected) if s not in got]
        raise AssertionError(
            f"{exc}: {len(missing)} missing, {missing[:1]} to {missing[-1:]}\n{p.log_text()}"
        ) from None


def _outage_run(tmp_path: Path, seed: int, mode: str, pattern: str) -> None:
    rng = random.Random(seed)
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "access.log"
    rotate = rotator(tmp_path, log, mode)
    rx = Receiver()
    w = SeqWriter(log)
    p = Proc(
        "adapter",
        "--path",
        str(logs / pattern),
        "--checkpoint-dir",
        str(tmp_path / "cp"),
        "--sink",
        "http",
        "--sink-url",
        rx.url,
        "--sink-backoff",
        "50ms",
        "--sink-backoff-max",
        "200ms",
        # A small queue: reading pauses early in the outage, so the files are the buffer.
        "--queue-max-bytes",
        "65536",
        "--batch-max-bytes",
        "16384",
        *COMMON,
    )
    try:
        p.wait_event("adapter_started")
        w.write(100)
        wait_until(lambda: rx.distinct() >= 100, "the first lines in the receiver")
        rx.down.set()
        mark = p.mark()
        write_generation(w, rng)
        p.wait_event("sink_failing", after=mark)
        for _ in range(rng.randint(3, 5)):  # rotations while the sink is down
            subprocess.run(rotate, check=True, timeout=30)
            if mode == "create":
                w.reopen()
            write_generation(w, rng)
        rx.down.clear()
        for _ in range(2):  # and after it came back, while the adapter catches up
            subprocess.run(rotate, check=True, timeout=30)
            if mode == "create":
                w.reopen()
            write_generation(w, rng)
        caught_up(rx, w.next, p, 180.0)
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        p.stop()
        rx.close()
        w.close()
    check_delivery(rx.seqs(), w.next, 0)
    stopped = p.wait_event("adapter_stopped")
    # Nothing is written between logrotate's copy and its truncate here: nothing lost.
    assert stopped.get("truncated_bytes_lost", 0) == 0, stopped
    assert not any(e.get("status") == 0 for e in p.events), "network errors logged as status 0"
    failing = p.wait_event("sink_failing")
    assert "error" in failing and "status" not in failing, failing


# The catch-up may take its whole bound on a loaded machine, and a failure must reach its
# own message (what is missing, the adapter's log) rather than the default per-test timeout.
OUTAGE_TIMEOUT = 300


@pytest.mark.timeout(OUTAGE_TIMEOUT)
@pytest.mark.parametrize("pattern", ["access.log", "access.log*"])
@pytest.mark.parametrize("mode", ["create", "copytruncate"])
def test_rotation_during_sink_outage_loses_nothing(tmp_path: Path, mode: str, pattern: str) -> None:
    """Real logrotate every generation while the HTTP sink is down: 0 lost, 0 duplicates."""
    _outage_run(tmp_path, 1, mode, pattern)


@pytest.mark.slow
@pytest.mark.timeout(OUTAGE_TIMEOUT)
@pytest.mark.parametrize("seed", [2, 3, 4])
@pytest.mark.parametrize("pattern", ["access.log", "access.log*"])
@pytest.mark.parametrize("mode", ["create", "copytruncate"])
def test_rotation_during_sink_outage_more_seeds(
    tmp_path: Path, mode: str, pattern: str, seed: int
) -> None:
    """As above, with more seeds."""
    _outage_run(tmp_path, seed, mode, pattern)


def file_adapter(tmp: Path, pattern: str) -> Proc:
    """``podpatterns adapter`` tailing tmp/logs/PATTERN into tmp/out.ndjson."""
    return Proc(
        "adapter",
        "--path",
        str(tmp / "logs" / pattern),
        "--checkpoint-dir",
        str(tmp / "cp"),
        "--sink",
        "file",
        "--sink-path",
        str(tmp / "out.ndjson"),
        *COMMON,
    )


def delivered(tmp: Path) -> list[int]:
    """Sequence numbers in the sink's file."""
    return seqs_of(str(r.get("message", "")) for r in read_ndjson(tmp / "out.ndjson"))


def _stopped_run(tmp_path: Path, seed: int, how: signal.Signals, pattern: str) -> None:
    rng = random.Random(seed)
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "app.log"
    rotate = rotator(tmp_path, log, "copytruncate")
    w = SeqWriter(log)
    restarts = 3
    for _ in range(restarts):
        p = file_adapter(tmp_path, pattern)
        try:
            p.wait_event("adapter_started")
            first = w.next
            write_generation(w, rng)
            wait_until(lambda: first in set(delivered(tmp_path)), f"line {first} shipped")  # noqa: B023
            p.signal(how)
            p.wait()
        finally:
            p.stop()
        # While it is stopped: lines it never read, then copytruncate moves them into
        # app.log.1, and the application goes on writing app.log from 0.
        write_generation(w, rng)
        subprocess.run(rotate, check=True, timeout=30)
        write_generation(w, rng)
    p = file_adapter(tmp_path, pattern)
    try:
        wait_until(lambda: len(set(delivered(tmp_path))) >= w.next, f"{w.next} lines", 90.0)
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        p.stop()
        w.close()
    check_delivery(delivered(tmp_path), w.next, restarts * BATCH)


@pytest.mark.parametrize("pattern", ["app.log", "*.log*"])
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_copytruncate_while_stopped_reads_the_copy(
    tmp_path: Path, how: signal.Signals, pattern: str
) -> None:
    """copytruncate while the adapter is stopped: the unread tail is read from the copy."""
    _stopped_run(tmp_path, 1, how, pattern)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_copytruncate_while_stopped_more_seeds(tmp_path: Path, seed: int) -> None:
    """As above (SIGKILL), with more seeds."""
    _stopped_run(tmp_path, seed, signal.SIGKILL, "app.log")


def test_more_files_than_file_descriptors(tmp_path: Path) -> None:
    """1,500 files under a hard limit of 1,024 descriptors: every line arrives, exit 0.

    Idle files read to their end are closed and reopened by identity when they grow;
    files waiting for a descriptor are counted.
    """
    logs = tmp_path / "logs"
    logs.mkdir()
    writers = [SeqWriter(logs / f"f{i:04d}.log", start=2 * i) for i in range(1500)]
    for w in writers:
        w.write(2)
        w.close()

    def hard_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    p = Proc(
        "adapter",
        "--path",
        str(logs / "*.log"),
        "--checkpoint-dir",
        str(tmp_path / "cp"),
        "--sink",
        "file",
        "--sink-path",
        str(tmp_path / "out.ndjson"),
        *COMMON,
        preexec_fn=hard_limit,
    )
    try:
        wait_until(lambda: len(set(delivered(tmp_path))) >= 3000, "3000 lines", 180.0)
        p.wait_event("open_files_limited")
        # Every file again: those closed to make room are reopened by identity.
        for i, w in enumerate(writers):
            again = SeqWriter(w.path, start=3000 + i)
            again.write(1)
            again.close()
        wait_until(lambda: len(set(delivered(tmp_path))) >= 4500, "4500 lines", 180.0)
        p.signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        p.stop()
    check_delivery(delivered(tmp_path), 4500, 0)
    stopped = p.wait_event("adapter_stopped")
    assert stopped.get("open_deferred", 0) > 0, stopped
    assert not any("Too many open files" in line for line in p.lines)


def _many_files_killed_run(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1100, 1400)
    logs = tmp_path / "logs"
    logs.mkdir()
    writers = [SeqWriter(logs / f"f{i:04d}.log", start=2 * i) for i in range(n)]
    for w in writers:
        w.write(2)
        w.close()

    def hard_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    argv = (
        "adapter", "--path", str(logs / "*.log"), "--checkpoint-dir", str(tmp_path / "cp"),
        "--sink", "file", "--sink-path", str(tmp_path / "out.ndjson"), *COMMON,
    )  # fmt: skip
    first = Proc(*argv, preexec_fn=hard_limit)
    try:
        # SIGKILL somewhere in the first round, with files closed to make room.
        first.wait_event("open_files_limited")
        at = rng.randint(BATCH, 2 * n - BATCH)
        wait_until(lambda: len(set(delivered(tmp_path))) >= at, f"{at} lines", 180.0)
        first.signal(signal.SIGKILL)
        first.wait(30)
    finally:
        first.stop()
    for i in rng.sample(range(n), n):  # every file grows again, in random order
        again = SeqWriter(writers[i].path, start=2 * n + i)
        again.write(1)
        again.close()
    second = Proc(*argv, preexec_fn=hard_limit)
    try:
        wait_until(lambda: len(set(delivered(tmp_path))) >= 3 * n, f"{3 * n} lines", 240.0)
        second.signal(signal.SIGTERM)
        assert second.wait(30) == 0
    finally:
        second.stop()
    # one restart after SIGKILL: at most the unacknowledged batch again
    check_delivery(delivered(tmp_path), 3 * n, BATCH)
    assert not any("Too many open files" in line for line in [*first.lines, *second.lines])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_more_files_than_file_descriptors_across_sigkill(tmp_path: Path, seed: int) -> None:
    """Over the descriptor limit and killed mid-read: after the restart every line of
    every file arrives, with at most one batch again."""
    _many_files_killed_run(tmp_path, seed)
