"""A SIGTERM that reaches podpatterns while it is still starting is not lost.

In a container podpatterns is PID 1 of its PID namespace, and the kernel drops a signal
sent to a namespace's init that has no handler for it. Importing the commands takes a
good part of a second, so a Pod deleted as it started used to leave the container
running until the kubelet's SIGKILL (found by the emulated kubelet of
tests/e2e/test_lifecycle.py). The entry point now holds SIGTERM and SIGINT until the
command's handlers are in place; these tests run podpatterns as PID 1 (``unshare
--pid``), wait until it is starting with SIGTERM held and no handler yet, and signal it.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

from tests.proc import Proc, _descendants
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare"
    ),
]

AS_PID_1 = ("unshare", "--pid", "--fork", "--mount-proc")
TERM_BIT = 1 << (signal.SIGTERM - 1)  # in /proc/PID/status signal masks


def _masks(status: str) -> dict[str, int]:
    """The signal masks (SigBlk, SigCgt, ShdPnd...) of a /proc/PID/status text."""
    return {
        k: int(v, 16)
        for k, _, v in (line.partition(":\t") for line in status.splitlines())
        if k in ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")
    }


def _starting_with_sigterm_held(p: Proc) -> int | None:
    """The PID of podpatterns (unshare's child, PID 1 inside) while it holds SIGTERM
    and has no handler for it yet: the moment a lost signal used to be lost.

    Only once the child runs the interpreter: between its fork and its exec it is still
    unshare, with unshare's own mask (SIGTERM blocked, no handler), which it restores
    before the exec; a SIGTERM sent then is delivered to a PID 1 without a handler and
    dropped, whatever podpatterns does."""
    interpreter = os.path.realpath(sys.executable)
    for pid in _descendants(p.p.pid):
        try:
            if os.path.realpath(f"/proc/{pid}/exe") != interpreter:
                continue
            masks = _masks(Path(f"/proc/{pid}/status").read_text())
        except OSError:
            continue
        if masks["SigBlk"] & TERM_BIT and not masks["SigCgt"] & TERM_BIT:
            return pid
    return None


def test_sigterm_while_starting_as_pid_1_is_handled(procs: list[Proc]) -> None:
    """An ambassador SIGTERMed while still importing, as PID 1, shuts down cleanly
    (exit 0, drained) instead of ignoring the signal until SIGKILL."""
    p = Proc(
        "ambassador", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9",
        "--admin", "127.0.0.1:0", "--shutdown-delay", "0s", prefix=AS_PID_1,
    )  # fmt: skip
    procs.append(p)
    pid = wait_until(lambda: _starting_with_sigterm_held(p), "SIGTERM held while starting")
    os.kill(pid, signal.SIGTERM)
    assert p.wait() == 0, p.log_text()
    assert p.wait_event("shutdown_requested")["reason"] == "SIGTERM"
    p.wait_event("drain_finished")


def test_commands_exec_and_spawn_with_no_signal_held(procs: list[Proc], tmp_path: Path) -> None:
    """What ``wait`` execs and what ``run`` spawns start with no signal blocked: the
    held SIGTERM is not inherited by the app."""
    for name, args in {
        "wait": ["wait", "--for", f"file:{tmp_path}"],
        "run": ["run", "--health-dir", str(tmp_path), "--name", "app"],
    }.items():
        out = tmp_path / f"{name}.status"
        p = Proc(*args, "--", "sh", "-c", f"cat /proc/self/status > {out}", tail=())
        procs.append(p)
        assert p.wait() == 0, p.log_text()
        masks = _masks(out.read_text())
        assert masks["SigBlk"] == 0, (name, masks)
