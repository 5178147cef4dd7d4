"""`podpatterns wait`: each target kind, one deadline, fail-fast on a tombstone, real exec."""

from __future__ import annotations

import http.server
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from podpatterns.health.writer import Writer
from tests.proc import Proc, run

LOOP = "127.0.0.1"


def waiter(procs: list[Proc], *args: str) -> Proc:
    p = Proc("wait", "--progress-interval", "100ms", *args, tail=())
    procs.append(p)
    return p


def exec_check(tmp_path: Path) -> tuple[list[str], Path]:
    """A command that records its pid: after a real exec it is the waiter's pid."""
    out = tmp_path / "pid"
    return ["--", "sh", "-c", f'echo $$ > {out}; echo "ran $0 $1"', "a b", "c"], out


def test_file_target_then_real_exec(procs: list[Proc], tmp_path: Path) -> None:
    """wait blocks on a missing file, then execs the command as the same process."""
    flag = tmp_path / "flag"
    cmd, pid_file = exec_check(tmp_path)
    p = waiter(procs, "--for", f"file:{flag}", *cmd)
    blocked = p.wait_event("wait_blocked")
    assert blocked["target"] == f"file:{flag}" and blocked["reason"] == "does not exist"
    flag.touch()
    assert p.wait(10) == 0
    assert int(pid_file.read_text()) == p.p.pid  # exec, not a child
    assert p.p.stdout is not None and p.p.stdout.read() == b"ran a b c\n"


def test_tcp_target(procs: list[Proc], tmp_path: Path) -> None:
    """A tcp:// target blocks while connections are refused and passes once it listens."""
    sock = socket.socket()
    sock.bind((LOOP, 0))  # bound, not listening: connections are refused
    port = sock.getsockname()[1]
    try:
        p = waiter(procs, "--for", f"tcp://{LOOP}:{port}")
        assert "connect failed" in p.wait_event("wait_blocked")["reason"]
        sock.listen()
        assert p.wait(10) == 0
    finally:
        sock.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    status = 503

    def do_GET(self) -> None:
        self.send_response(type(self).status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_http_target(procs: list[Proc], tmp_path: Path) -> None:
    """An http:// target blocks on 503 and passes on 200."""

    class handler(_Handler):
        status = 503

    server = http.server.ThreadingHTTPServer((LOOP, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://{LOOP}:{server.server_address[1]}/healthz"
        p = waiter(procs, "--for", url)
        assert p.wait_event("wait_blocked")["reason"] == "HTTP 503"
        handler.status = 200
        assert p.wait(10) == 0
    finally:
        server.shutdown()
        server.server_close()


def test_ready_target_and_all_in_parallel(procs: list[Proc], tmp_path: Path) -> None:
    """Several targets are waited for together; ready:NAME passes when the peer is ready."""
    flag = tmp_path / "flag"
    writer = Writer(tmp_path, "db")
    writer.set_starting()
    p = waiter(procs, "--health-dir", str(tmp_path), "--for", "ready:db", "--for", f"file:{flag}")
    p.wait_event("wait_blocked")
    flag.touch()
    assert p.wait_event("wait_target_ready")["target"] == f"file:{flag}"
    assert p.p.poll() is None
    writer.set_ready()
    assert p.wait(10) == 0
    done = {e["target"] for e in p.events if e["event"] == "wait_target_ready"}
    assert done == {"ready:db", f"file:{flag}"}


def test_timeout_exits_124_without_running_the_command(tmp_path: Path) -> None:
    """At the deadline wait exits 124, names what blocked, and never runs the command."""
    marker = tmp_path / "ran"
    started = time.monotonic()
    out = run(
        "wait", "--timeout", "500ms", "--for", f"file:{tmp_path / 'never'}",
        "--", "touch", str(marker),
    )  # fmt: skip
    assert out.returncode == 124, out.stderr
    assert time.monotonic() - started < 10
    assert "timed out after 0.5s" in out.stderr and "does not exist" in out.stderr
    assert not marker.exists()


def test_peer_tombstone_fails_fast(procs: list[Proc], tmp_path: Path) -> None:
    """A waited-for peer's tombstone ends the wait at once with exit 4 naming the peer."""
    marker = tmp_path / "ran"
    writer = Writer(tmp_path, "db")
    writer.set_starting()
    p = waiter(
        procs, "--health-dir", str(tmp_path), "--timeout", "60s", "--for", "ready:db",
        "--", "touch", str(marker),
    )  # fmt: skip
    p.wait_event("wait_blocked")
    writer.mark_exited(3, reason="migration failed")
    assert p.wait(10) == 4
    assert p.wait_event("wait_peer_exited")["target"] == "ready:db"
    assert any("ready:db: peer exited code 3: migration failed" in line for line in p.lines)
    assert not marker.exists()


def test_sigterm_while_waiting_exits_promptly(procs: list[Proc], tmp_path: Path) -> None:
    """SIGTERM during the wait exits 143 at once; the command is not run."""
    marker = tmp_path / "ran"
    p = waiter(
        procs, "--timeout", "60s", "--for", f"file:{tmp_path / 'never'}",
        "--", "touch", str(marker),
    )  # fmt: skip
    p.wait_event("wait_blocked")
    p.signal(signal.SIGTERM)
    assert p.wait(5) == 143
    p.wait_event("wait_interrupted")
    assert not marker.exists()


def test_no_command_exits_0(tmp_path: Path) -> None:
    """Without a command, wait exits 0 once the targets are there."""
    (tmp_path / "f").touch()
    assert run("wait", "--for", f"file:{tmp_path / 'f'}").returncode == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--for", "nope"], "is not a target"),
        (["--for", "ready:Bad_Name", "--health-dir", "."], "container name"),
        (["--for", "ready:db"], "needs --health-dir"),
        (["--for", "tcp://host-without-port"], "HOST:PORT"),
        ([], "at least one target"),
    ],
)
def test_bad_targets_exit_2(args: list[str], message: str) -> None:
    """A bad --for gets one line naming the flag, and exit 2."""
    out = run("wait", *args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and out.stderr.count("\n") == 1


def test_exec_failure_is_127(tmp_path: Path) -> None:
    """A command that cannot be found exits 127 after the wait."""
    (tmp_path / "f").touch()
    out = run("wait", "--for", f"file:{tmp_path / 'f'}", "--", "no-such-cmd-x")
    assert out.returncode == 127 and "no-such-cmd-x" in out.stderr
