"""`podpatterns run`: records, exit-code fidelity, signal forwarding, reaping, early signals."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from podpatterns.health.reader import Tracker, read_record
from podpatterns.health.records import Phase, Record
from podpatterns.health.supervisor import FORWARDED
from tests.proc import Proc, run
from tests.waiting import wait_for_file, wait_until


def supervise(
    procs: list[Proc],
    health: Path,
    *cmd: str,
    extra: Sequence[str] = (),
    prefix: Sequence[str] = (),
    preexec_fn: Callable[[], object] | None = None,
) -> Proc:
    """Start `podpatterns run --health-dir HEALTH --name app EXTRA -- CMD`."""
    args = ["run", "--health-dir", str(health), "--name", "app", *extra, "--", *cmd]
    p = Proc(*args, tail=(), prefix=prefix, preexec_fn=preexec_fn)
    procs.append(p)
    return p


def tombstone(health: Path) -> dict[str, object]:
    rec = read_record(health, "app").record
    assert rec is not None and rec.phase is Phase.EXITED, rec
    return {"exit_code": rec.exit_code, "signal": rec.signal, "reason": rec.reason}


@pytest.mark.parametrize("code", [0, 1, 3, 137])
def test_exit_code_is_the_childs(tmp_path: Path, code: int) -> None:
    """run exits with the command's exit code and writes it in the tombstone."""
    out = run(
        "run", "--health-dir", str(tmp_path), "--name", "app", "--", "sh", "-c", f"exit {code}"
    )
    assert out.returncode == code, out.stderr
    assert tombstone(tmp_path)["exit_code"] == code
    assert tombstone(tmp_path)["signal"] is None


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSEGV])
def test_killed_child_gives_128_plus_signal(tmp_path: Path, sig: signal.Signals) -> None:
    """A command killed by signal N makes run exit 128+N with the signal in the tombstone."""
    out = run(
        "run", "--health-dir", str(tmp_path), "--name", "app", "--",
        "sh", "-c", f"kill -{sig.name[3:]} $$",
    )  # fmt: skip
    assert out.returncode == 128 + sig, out.stderr
    assert tombstone(tmp_path)["signal"] == sig
    assert tombstone(tmp_path)["exit_code"] is None


_CATCHER = """
import os, signal, sys, time
log = open(sys.argv[1], "a", buffering=1)
names = sys.argv[2].split(",")
def on(sig, frame):
    log.write(signal.Signals(sig).name + "\\n")
    if sig == signal.SIGTERM:
        sys.exit(42)
for n in names:
    signal.signal(getattr(signal, n), on)
log.write("ready\\n")
while True:
    time.sleep(0.01)
"""


def test_every_catchable_signal_is_forwarded(procs: list[Proc], tmp_path: Path) -> None:
    """Each catchable signal sent to run reaches the command; the exit code is the command's."""
    sigs = sorted(s for s in FORWARDED if s not in (signal.SIGTERM,))
    names = [s.name for s in [*sigs, signal.SIGTERM]]
    log = tmp_path / "got.log"
    p = supervise(procs, tmp_path, sys.executable, "-c", _CATCHER, str(log), ",".join(names))
    wait_for_file(log)

    def caught(name: str) -> bool:
        return name in log.read_text().split()

    for sig in sigs:
        p.signal(sig)
        wait_until(functools.partial(caught, sig.name), f"{sig.name} forwarded")
    p.signal(signal.SIGTERM)
    assert p.wait(10) == 42
    assert set(log.read_text().split()) == {"ready", *names}
    assert tombstone(tmp_path)["exit_code"] == 42


def test_sigterm_marks_draining_then_tombstone(procs: list[Proc], tmp_path: Path) -> None:
    """A forwarded SIGTERM turns the record draining while the command shuts down."""
    go = tmp_path / "go"
    got = tmp_path / "got"
    script = (
        f"trap 'echo t > {got}; while [ ! -e {go} ]; do sleep 0.01; done; exit 0' TERM; "
        f"echo r > {got}.r; while :; do sleep 0.01; done"
    )
    p = supervise(procs, tmp_path, "sh", "-c", script)
    wait_for_file(Path(f"{got}.r"))
    p.signal(signal.SIGTERM)
    wait_for_file(got)
    # run forwards the signal first and writes the record after (supervisor.forward), so
    # the command's trap can run before the record changes: wait for the change.
    wait_until(
        lambda: (
            (r := read_record(tmp_path, "app").record) is not None and r.phase is not Phase.READY
        ),
        "the record to leave phase ready",
    )
    rec = read_record(tmp_path, "app").record
    assert rec is not None and rec.phase is Phase.DRAINING and rec.reason == "SIGTERM forwarded"
    go.touch()
    assert p.wait(10) == 0
    assert tombstone(tmp_path)["exit_code"] == 0


def test_signal_before_the_child_started_writes_a_tombstone(
    procs: list[Proc], tmp_path: Path
) -> None:
    """SIGTERM pending before the command starts: no command, tombstone, exit 143."""
    marker = tmp_path / "ran"

    def block_sigterm() -> None:  # the mask survives exec: the signal waits for run
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    p = supervise(procs, tmp_path, "touch", str(marker), preexec_fn=block_sigterm)
    p.signal(signal.SIGTERM)
    assert p.wait(10) == 143
    stone = tombstone(tmp_path)
    assert stone["signal"] == 15 and "before the command started" in str(stone["reason"])
    assert not marker.exists()


def test_ready_immediately_with_heartbeat(procs: list[Proc], tmp_path: Path) -> None:
    """Without a probe, the record is ready once the command runs, and heartbeats advance."""
    p = supervise(procs, tmp_path, "sleep", "30", extra=["--heartbeat", "50ms"])
    p.wait_event("run_ready")
    tracker = Tracker(tmp_path)
    # A reader trusts a record found ready once it sees the next heartbeat (issue 10).
    first = wait_until(lambda: (s := tracker.status("app")).ready and s, "ready, heartbeat seen")
    assert first.ready and first.record is not None
    start = first.record.seq

    def advanced() -> Record | None:
        rec = read_record(tmp_path, "app").record
        return rec if rec is not None and rec.seq >= start + 3 else None

    rec = wait_until(advanced, "three more heartbeats")
    assert rec.instance == first.record.instance and rec.interval == 0.05
    p.signal(signal.SIGTERM)
    assert p.wait(10) == 143


def test_ready_probe_gates_ready(procs: list[Proc], tmp_path: Path) -> None:
    """With --ready-probe, the record stays starting until the probe passes."""
    flag = tmp_path / "up"
    p = supervise(procs, tmp_path, "sleep", "30", extra=["--ready-probe", f"file:{flag}"])
    p.wait_event("run_spawned")

    def probed() -> Record | None:
        # The probe's first result is in the record: the flag is missing, so it failed.
        rec = read_record(tmp_path, "app").record
        return rec if rec is not None and rec.checks else None

    wait_until(probed, "the ready probe's first result in the record")
    rec = read_record(tmp_path, "app").record
    assert rec is not None and rec.phase is Phase.STARTING
    assert rec.checks and rec.checks[0].name == f"file:{flag}" and not rec.checks[0].ok
    flag.touch()
    p.wait_event("run_ready")
    rec = read_record(tmp_path, "app").record
    assert rec is not None and rec.phase is Phase.READY
    p.signal(signal.SIGINT)
    assert p.wait(10) == 130


def test_command_not_found_is_127_with_tombstone(tmp_path: Path) -> None:
    """A missing command exits 127 and still leaves a tombstone saying why."""
    out = run("run", "--health-dir", str(tmp_path), "--name", "app", "--", "no-such-cmd-x")
    assert out.returncode == 127
    assert "no-such-cmd-x" in str(tombstone(tmp_path)["reason"])


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    """No --name, no command or a missing directory: one line and exit 2, no record."""
    cases = [
        ["run", "--health-dir", str(tmp_path), "--", "true"],
        ["run", "--health-dir", str(tmp_path), "--name", "app"],
        ["run", "--health-dir", str(tmp_path / "nope"), "--name", "app", "--", "true"],
        ["run", "--health-dir", str(tmp_path), "--name", "Bad_Name", "--", "true"],
        [
            "run",
            "--health-dir",
            str(tmp_path),
            "--name",
            "app",
            "--ready-probe",
            "exec:true",
            "--",
            "true",
        ],
    ]
    for args in cases:
        out = run(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.count("\n") == 1 and "error" in out.stderr
    assert list(tmp_path.iterdir()) == []


_ORPHANS = (
    "( sleep 0.05 & ) ; ( sleep 0.05 & ) ; sleep 0.4 ; "
    "cat /proc/$PPID/task/$PPID/children > {out} ; exit 5"
)


def test_orphans_are_reaped_as_subreaper(procs: list[Proc], tmp_path: Path) -> None:
    """Orphaned grandchildren are re-parented to run and reaped: no zombies linger."""
    out = tmp_path / "children"
    p = supervise(procs, tmp_path, "sh", "-c", _ORPHANS.format(out=out))
    assert p.wait(10) == 5
    children = out.read_text().split()
    assert len(children) == 1  # only the sh itself; reaped orphans are gone
    assert p.wait_event("run_exited")["orphans_reaped"] >= 2


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root")
def test_reaps_zombies_as_pid_1(procs: list[Proc], tmp_path: Path) -> None:
    """As PID 1 of a PID namespace, run reaps orphans and forwards the exit code."""
    out = tmp_path / "children"
    script = "echo $PPID > {ppid} ; ".format(ppid=tmp_path / "ppid") + _ORPHANS.format(out=out)
    p = supervise(
        procs, tmp_path, "sh", "-c", script, prefix=["unshare", "--pid", "--fork", "--mount-proc"]
    )
    assert p.wait(10) == 5
    assert (tmp_path / "ppid").read_text().strip() == "1"
    assert len(out.read_text().split()) == 1
    assert p.wait_event("run_exited")["orphans_reaped"] >= 2
    assert json.loads((tmp_path / "app.json").read_text())["exit_code"] == 5


def test_ready_probe_writes_only_changes_and_heartbeats(tmp_path: Path) -> None:
    """While --ready-probe fails, the record is written when something changes or a
    heartbeat is due, not at every probe; each check carries its wall-clock time."""
    before = time.time()
    # The bounded run: the command lives 1 s while its probe keeps failing; with
    # --heartbeat 5s no heartbeat is due, so the writes are starting, the probe's first
    # result and the tombstone (probing every 50 ms used to write ~20 times here).
    out = run(
        "run", "--health-dir", str(tmp_path), "--name", "app", "--heartbeat", "5s",
        "--ready-probe", f"file:{tmp_path / 'never'}", "--", "sleep", "1",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    rec = read_record(tmp_path, "app").record
    assert rec is not None and rec.phase is Phase.EXITED
    assert rec.seq <= 3, f"{rec.seq + 1} writes in a 1 s run"
    (check,) = rec.checks
    assert not check.ok and before <= check.at <= rec.updated_at
