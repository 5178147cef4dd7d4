"""The readers' rules against a hostile health directory (issue 10): non-regular files,
ready records nobody heartbeats, tombstones of an earlier run, unreadable records.

Every reader (``wait``, ``--exit-with`` and the Pod's probe endpoints) shares the
``Tracker``; the tests go through real processes, because the failures they guard
against (a frozen event loop, another uid, a restart) cross processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from podpatterns.health.reader import State, Tracker
from podpatterns.health.records import TOMBSTONE_GRACE
from podpatterns.health.writer import Writer
from tests.proc import Proc

LOOP = "127.0.0.1"
HOUR = 3600.0


def waiter(procs: list[Proc], health: Path, *args: str, prefix: tuple[str, ...] = ()) -> Proc:
    """``podpatterns wait --health-dir HEALTH ARGS`` with fast progress events."""
    p = Proc(
        "wait", "--progress-interval", "100ms", "--health-dir", str(health), *args,
        tail=(), prefix=prefix,
    )  # fmt: skip
    procs.append(p)
    return p


def sidecar(procs: list[Proc], health: Path, *extra: str, prefix: tuple[str, ...] = ()) -> Proc:
    """An ambassador with an admin server that exits 7 on ``main``'s tombstone."""
    p = Proc(
        "ambassador", "--listen", f"{LOOP}:0", "--upstream", f"{LOOP}:9",
        "--admin", f"{LOOP}:0", "--shutdown-delay", "0", "--health-dir", str(health),
        "--exit-with", "main", "--exit-with-code", "7", *extra,
        prefix=prefix,
    )  # fmt: skip
    procs.append(p)
    return p


def get(url: str) -> tuple[int, dict[str, Any]]:
    """GET ``url``: the status and the JSON body."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- non-regular files (a FIFO, a directory) never block a reader ------------------------


def _plant(path: Path, kind: str) -> str:
    """Put a FIFO or a directory at ``path``; return how a reader should name it."""
    if kind == "fifo":
        os.mkfifo(path)
        return "not a regular file (a FIFO)"
    path.mkdir()
    return "not a regular file (a directory)"


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_non_regular_record_is_unknown_and_wait_keeps_its_deadline(
    procs: list[Proc], tmp_path: Path, kind: str
) -> None:
    """A FIFO or a directory named main.json is unknown, named as such; wait exits 124."""
    what = _plant(tmp_path / "main.json", kind)
    p = waiter(procs, tmp_path, "--for", "ready:main", "--timeout", "1s")
    assert what in p.wait_event("wait_blocked")["reason"]
    assert p.wait(10) == 124
    assert p.wait_event("record_unreadable")["error"] == what


def test_sigterm_ends_a_wait_beside_a_fifo(procs: list[Proc], tmp_path: Path) -> None:
    """With a FIFO as the record, the event loop still runs: SIGTERM ends wait with 143."""
    os.mkfifo(tmp_path / "main.json")
    p = waiter(procs, tmp_path, "--for", "ready:main", "--timeout", "60s")
    p.wait_event("wait_blocked")
    p.signal(signal.SIGTERM)
    assert p.wait(10) == 143


def test_admin_server_answers_beside_a_fifo(procs: list[Proc], tmp_path: Path) -> None:
    """A FIFO in the health directory: the admin server still answers, /livez included."""
    os.mkfifo(tmp_path / "main.json")
    p = Proc(
        "ambassador", "--listen", f"{LOOP}:0", "--upstream", f"{LOOP}:9",
        "--admin", f"{LOOP}:0", "--health-dir", str(tmp_path),
    )  # fmt: skip
    procs.append(p)
    url = p.admin_url()
    assert get(url + "/livez")[0] == 200
    status, body = get(url + "/readyz/main")
    main = body["containers"]["main"]
    assert status == 503 and main["state"] == "unknown"
    assert main["error"] == "not a regular file (a FIFO)"


# -- a ready record is trusted once its heartbeat has been seen to advance ---------------


def test_wait_does_not_pass_on_a_ready_record_nobody_heartbeats(
    procs: list[Proc], tmp_path: Path
) -> None:
    """The last `ready` of a dead container (written an hour ago) does not pass wait: 124."""
    old = Writer(tmp_path, "main", interval=5.0, clock=lambda: time.time() - HOUR)
    old.set_ready()
    p = waiter(procs, tmp_path, "--for", "ready:main", "--timeout", "1s")
    assert "no heartbeat seen yet" in p.wait_event("wait_blocked")["reason"]
    assert p.wait(10) == 124


def test_a_ready_record_found_passes_on_its_next_heartbeat(
    procs: list[Proc], tmp_path: Path
) -> None:
    """A record found ready passes wait once its heartbeat advances."""
    writer = Writer(tmp_path, "main", interval=60.0)
    writer.set_ready()
    p = waiter(procs, tmp_path, "--for", "ready:main", "--timeout", "60s")
    p.wait_event("wait_blocked")
    writer.heartbeat()
    assert p.wait(10) == 0


def test_becoming_ready_while_watched_passes_at_once(procs: list[Proc], tmp_path: Path) -> None:
    """starting -> ready, seen by the reader, passes without waiting for a heartbeat."""
    writer = Writer(tmp_path, "main", interval=60.0)  # no heartbeat comes within the test
    writer.set_starting()
    p = waiter(procs, tmp_path, "--for", "ready:main", "--timeout", "60s")
    p.wait_event("wait_blocked")
    writer.set_ready()
    assert p.wait(10) == 0


def test_probe_endpoints_do_not_trust_a_ready_record_found_at_start(
    procs: list[Proc], tmp_path: Path
) -> None:
    """/readyz/NAME is 503 for a ready record whose heartbeat this reader has not seen."""
    Writer(tmp_path, "main", interval=5.0, clock=lambda: time.time() - HOUR).set_ready()
    p = Proc(
        "ambassador", "--listen", f"{LOOP}:0", "--upstream", f"{LOOP}:9",
        "--admin", f"{LOOP}:0", "--health-dir", str(tmp_path),
    )  # fmt: skip
    procs.append(p)
    status, body = get(p.admin_url() + "/readyz/main")
    assert status == 503 and body["containers"]["main"]["state"] == "unconfirmed"


def test_reader_rules_for_ready_on_the_readers_clock(tmp_path: Path) -> None:
    """Found ready: unconfirmed, then ready on a new seq; no interval: trusted as written."""
    clock = [1000.0]
    tracker = Tracker(tmp_path, monotonic=lambda: clock[0])
    writer = Writer(tmp_path, "main", interval=1.0)
    writer.set_ready()
    assert tracker.status("main").state is State.UNCONFIRMED
    clock[0] += 3.1
    assert tracker.status("main").state is State.STALE  # never confirmed, now stale
    writer.heartbeat()
    assert tracker.status("main").ready
    Writer(tmp_path, "api").set_ready()  # no interval: no promise to wait for
    assert tracker.status("api").ready


# -- tombstones of an earlier run --------------------------------------------------------


def test_tombstone_of_an_earlier_run_is_ignored(procs: list[Proc], tmp_path: Path) -> None:
    """A sidecar restarted beside an old tombstone waits for the next instance's tombstone."""
    Writer(tmp_path, "main", interval=5.0, clock=lambda: time.time() - HOUR).mark_exited(1)
    p = sidecar(procs, tmp_path)
    ignored = p.wait_event("stale_tombstone_ignored")
    assert ignored["container"] == "main" and ignored["age"] > HOUR - 60
    assert p.p.poll() is None  # still running: the old tombstone did not end it
    retry = Writer(tmp_path, "main", interval=5.0)  # main's retry: a new instance
    retry.set_starting()
    retry.mark_exited(0)
    assert p.wait(10) == 7
    assert p.wait_event("exit_with_tombstone")["exit"] == "code 0"


def test_tombstone_written_just_before_the_sidecar_started_counts(
    procs: list[Proc], tmp_path: Path
) -> None:
    """main exited 1 s before the sidecar started (within the grace): the sidecar exits."""
    assert TOMBSTONE_GRACE > 1
    Writer(tmp_path, "main", clock=lambda: time.time() - 1).mark_exited(0)
    p = sidecar(procs, tmp_path)
    assert p.wait(10) == 7


def test_wait_is_not_failed_by_a_tombstone_of_an_earlier_run(
    procs: list[Proc], tmp_path: Path
) -> None:
    """wait --for ready:main ignores an old tombstone (no exit 4): it times out instead."""
    Writer(tmp_path, "main", clock=lambda: time.time() - HOUR).mark_exited(3)
    p = waiter(procs, tmp_path, "--for", "ready:main", "--timeout", "1s")
    assert "earlier run" in p.wait_event("wait_blocked")["reason"]
    assert p.wait(10) == 124


def test_tombstone_of_an_instance_seen_alive_counts_whatever_its_age(tmp_path: Path) -> None:
    """A tombstone counts when this reader saw its instance alive, even if it is old."""
    started = time.time() - HOUR
    tracker = Tracker(tmp_path)
    writer = Writer(tmp_path, "main", clock=lambda: started)
    writer.set_starting()
    assert tracker.status("main").state is State.STARTING
    writer.mark_exited(0)
    assert tracker.status("main").exited
    assert Tracker(tmp_path).status("main").state is State.EARLIER_RUN  # a new reader


# -- unreadable records ------------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A health directory another uid can reach. tmp_path's parents are private to this
    uid (0700), so the directory is made under the system temp directory instead."""
    path = Path(tempfile.mkdtemp(prefix="podpatterns-health-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def other_uid() -> tuple[str, ...]:
    """The prefix that runs a reader as another uid (as root), or nothing."""
    if os.geteuid() != 0:
        return ()
    if not shutil.which("setpriv"):
        pytest.skip("needs setpriv to run a reader as another uid")
    return ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups")


def test_records_are_readable_whatever_the_umask(tmp_path: Path) -> None:
    """Records are written 0644 under umask 077, so every container of the Pod reads them."""
    old = os.umask(0o077)
    try:
        Writer(tmp_path, "main").set_ready()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "main.json").stat().st_mode) == 0o644


def test_tombstone_of_run_under_umask_077_reaches_another_uid(
    procs: list[Proc], shared_dir: Path
) -> None:
    """`run` under umask 077; an --exit-with sidecar of another uid still sees the tombstone."""
    prefix = other_uid()
    if not prefix:
        pytest.skip("needs root to run the reader as another uid")
    p = sidecar(procs, shared_dir, prefix=prefix)
    p.wait_event("exit_with_watching")
    main = Proc(
        "run", "--health-dir", str(shared_dir), "--name", "main", "--", "true",
        tail=(), preexec_fn=lambda: os.umask(0o077),
    )  # fmt: skip
    procs.append(main)
    assert main.wait(10) == 0
    assert p.wait(10) == 7


def test_unreadable_record_is_reported(procs: list[Proc], shared_dir: Path) -> None:
    """A record the reader may not read: a record_unreadable warning and the reason in
    wait's progress events."""
    Writer(shared_dir, "main").set_ready()
    (shared_dir / "main.json").chmod(0o600 if os.geteuid() == 0 else 0o000)
    p = waiter(procs, shared_dir, "--for", "ready:main", "--timeout", "60s", prefix=other_uid())
    warning = p.wait_event("record_unreadable")
    assert warning["level"] == "warning" and "Permission denied" in warning["error"]
    assert "Permission denied" in p.wait_event("wait_blocked")["reason"]
    p.signal(signal.SIGTERM)
    assert p.wait(10) == 143
    assert len([e for e in p.events if e["event"] == "record_unreadable"]) == 1  # once
