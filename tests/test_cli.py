"""The command line as a user runs it: exit codes, errors, signals, admin endpoints."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from podpatterns.health.writer import Writer
from tests.proc import Proc, run
from tests.waiting import wait_until

LOOP = "127.0.0.1"


def ambassador(
    procs: list[Proc],
    upstream: str,
    *extra: str,
    preexec_fn: Callable[[], object] | None = None,
) -> Proc:
    """Start an ambassador on port 0 with an admin server; later flags win over earlier."""
    p = Proc(
        "ambassador",
        "--listen",
        f"{LOOP}:0",
        "--upstream",
        upstream,
        "--admin",
        f"{LOOP}:0",
        "--shutdown-delay",
        "0",
        *extra,
        preexec_fn=preexec_fn,
    )
    procs.append(p)
    return p


def http(url: str, method: str = "GET") -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_version_and_help() -> None:
    """--version prints the version; --help lists flags with their env vars and exit codes."""
    out = run("--version")
    assert out.returncode == 0 and out.stdout.startswith("podpatterns ")
    helptext = run("ambassador", "--help").stdout
    assert "--upstream HOST:PORT" in helptext
    assert "PODPATTERNS_UPSTREAM" in helptext
    assert "exit codes:" in helptext


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--listen", "127.0.0.1:5432", "--upstream", "db:99999"],
            {},
            "--upstream: 'db:99999' is not a valid port (1-65535)",
        ),
        (
            ["--listen", "127.0.0.1:5432", "--upstream", "db"],
            {},
            "--upstream: 'db' is not HOST:PORT",
        ),
        (
            ["--listen", "127.0.0.1:5432"],
            {"PODPATTERNS_UPSTREAM": "db:5432", "PODPATTERNS_CONNECT_TIMEOUT": "soon"},
            "PODPATTERNS_CONNECT_TIMEOUT: 'soon' is not a duration",
        ),
        (["--upstream", "db:5432"], {}, "--listen: missing"),
        (
            ["--listen", "127.0.0.1:1", "--upstream", "db:1", "--balance", "random"],
            {},
            "--balance: 'random' is not one of failover, round_robin, least_conn",
        ),
        (
            ["--listen", "127.0.0.1:1", "--upstream", "db:1", "--tls-ca", "/x"],
            {},
            "--tls-ca: only applies with --upstream-tls",
        ),
        (
            ["--listen", "127.0.0.1:1", "--upstream", "db:1", "--max-connections", "-1"],
            {},
            "--max-connections: '-1' is out of range (>= 0)",
        ),
        (
            ["--listen", "127.0.0.1:1", "--upstream", "db:1", "--bogus"],
            {},
            "unrecognized arguments: --bogus",
        ),
    ],
)
def test_invalid_input_exits_2_with_one_line(
    args: list[str], env: dict[str, str], message: str
) -> None:
    """Each invalid value exits 2 with one line naming the option, the value and the fix."""
    out = run("ambassador", *args, env=env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert message in lines[0]


def test_config_file_errors_name_the_key(tmp_path: Path) -> None:
    """Config-file errors name the file and key; unknown keys suggest the right one."""
    cfg = tmp_path / "amb.yaml"
    cfg.write_text("listen: 127.0.0.1:0\nupstream: [db:5432]\nconect_timeout: 1s\n")
    out = run("ambassador", "--config", str(cfg))
    assert out.returncode == 2
    assert "unknown key 'conect_timeout' (did you mean 'connect_timeout'?)" in out.stderr
    cfg.write_text("routes:\n  - name: db\n    listen: 127.0.0.1:0\n    upstream: [db:0]\n")
    out = run("ambassador", "--config", str(cfg))
    assert out.returncode == 2
    assert "routes[0]: upstream: '0'" not in out.stderr
    assert "routes[0]: upstream: 'db:0' is not a valid port (1-65535)" in out.stderr


def test_bind_failure_exits_3() -> None:
    """A listen address already in use exits 3 with a clear message."""
    taken = socket.socket()
    taken.bind((LOOP, 0))
    taken.listen()
    try:
        out = run(
            "ambassador",
            "--listen",
            f"{LOOP}:{taken.getsockname()[1]}",
            "--upstream",
            "db:5432",
            "--admin",
            "off",
        )
    finally:
        taken.close()
    assert out.returncode == 3
    assert "cannot bind" in out.stderr and "Address already in use" in out.stderr


def _upstream_server() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind((LOOP, 0))
    s.listen(16)
    return s, s.getsockname()[1]


def test_sigterm_drains_open_connection_then_exits_0(procs: list[Proc]) -> None:
    """After SIGTERM, an open connection finishes its exchange and the process exits 0
    as soon as it closes, long before the drain deadline."""
    up, port = _upstream_server()
    p = ambassador(procs, f"{LOOP}:{port}", "--drain-timeout", "20s")
    c = socket.create_connection((LOOP, p.listen_port()))
    server_side, _ = up.accept()
    p.signal(signal.SIGTERM)
    p.wait_event("drain_started")
    assert http(p.admin_url() + "/readyz")[0] == 503 or p.p.poll() is not None
    # new connections are no longer accepted
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOP, p.listen_port()), timeout=2)
    c.sendall(b"in flight")
    assert server_side.recv(100) == b"in flight"
    server_side.sendall(b"reply")
    assert c.recv(100) == b"reply"
    t0 = time.monotonic()
    c.close()
    server_side.close()
    assert p.wait(10) == 0
    assert time.monotonic() - t0 < 5
    assert p.wait_event("drain_finished")
    up.close()


def test_drain_deadline_cuts_and_counts(procs: list[Proc]) -> None:
    """A connection still open at --drain-timeout is reset and counted; exit is 0."""
    up, port = _upstream_server()
    p = ambassador(procs, f"{LOOP}:{port}", "--drain-timeout", "0.5s")
    c = socket.create_connection((LOOP, p.listen_port()))
    server_side, _ = up.accept()
    p.signal(signal.SIGTERM)
    assert p.wait(10) == 0
    assert p.wait_event("drain_deadline_cut")["cut"] == 1
    c.settimeout(5)
    with pytest.raises(ConnectionResetError):
        while c.recv(100):
            pass
    c.close()
    server_side.close()
    up.close()


def test_accept_window_after_sigterm(procs: list[Proc]) -> None:
    """During --shutdown-delay, readiness is 503 but new connections are still relayed."""
    up, port = _upstream_server()
    p = ambassador(procs, f"{LOOP}:{port}", "--shutdown-delay", "3s", "--drain-timeout", "5s")
    listen, admin = p.listen_port(), p.admin_url()
    assert http(admin + "/readyz")[0] == 200
    p.signal(signal.SIGTERM)
    p.wait_event("shutdown_requested")
    assert http(admin + "/readyz")[0] == 503
    assert http(admin + "/livez")[0] == 200
    c = socket.create_connection((LOOP, listen), timeout=5)
    server_side, _ = up.accept()  # relayed although shutdown began
    c.sendall(b"late client")
    assert server_side.recv(100) == b"late client"
    c.close()
    server_side.close()
    assert p.wait(15) == 0
    up.close()


def test_quitquitquit_loopback_post_only(procs: list[Proc]) -> None:
    """/quitquitquit answers 405 to GET and shuts down gracefully on POST from loopback."""
    p = ambassador(procs, f"{LOOP}:9")
    admin = p.admin_url()
    assert http(admin + "/quitquitquit")[0] == 405
    assert http(admin + "/startupz")[0] == 200
    status, body = http(admin + "/quitquitquit", "POST")
    assert status == 200 and body["status"] == "shutting down"
    assert p.wait(10) == 0
    assert p.wait_event("shutdown_requested")["reason"] == "quitquitquit"


def test_metrics_endpoint_is_prometheus_text(procs: list[Proc]) -> None:
    """/metrics serves Prometheus text with the ambassador and process families."""
    p = ambassador(procs, f"{LOOP}:9")
    with urllib.request.urlopen(p.admin_url() + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
        assert resp.headers["Content-Type"].startswith("text/plain")
    assert "# TYPE podpatterns_ambassador_connections_total counter" in text
    assert "process_resident_memory_bytes" in text
    assert 'podpatterns_runtime_phase{phase="ready"} 1.0' in text


def test_second_sigint_forces_exit(procs: list[Proc]) -> None:
    """A second SIGINT exits at once with 130 while a drain is still waiting."""
    up, port = _upstream_server()
    p = ambassador(procs, f"{LOOP}:{port}", "--drain-timeout", "60s")
    c = socket.create_connection((LOOP, p.listen_port()))
    up.accept()[0].close()
    p.signal(signal.SIGINT)
    p.wait_event("drain_started")
    p.signal(signal.SIGINT)
    assert p.wait(10) == 130
    c.close()
    up.close()


def test_repeated_sigterm_still_exits_0(procs: list[Proc]) -> None:
    """SIGTERM again and again until the process is gone: every one after the first is
    ignored, also while the interpreter tears down after the drain (never 143)."""
    up, port = _upstream_server()
    p = ambassador(procs, f"{LOOP}:{port}", "--drain-timeout", "5s")
    p.wait_event("runtime_phase", lambda e: e.get("phase") == "ready")
    deadline = time.monotonic() + 30
    while p.p.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(ProcessLookupError):
            p.p.send_signal(signal.SIGTERM)
        time.sleep(0.001)  # a signal every millisecond: the teardown window is longer
    assert p.wait(10) == 0
    up.close()


def test_only_the_main_thread_takes_stop_signals(procs: list[Proc], tmp_path: Path) -> None:
    """Every other thread of a running ambassador (libuv's pool, the default executor,
    anyio's worker of a directory watch) blocks SIGTERM and SIGINT: one taken by a worker
    in the instant the exit swaps the handlers for SIG_IGN would kill the process (the
    repeated-SIGTERM test saw 143)."""
    up, port = _upstream_server()
    p = ambassador(procs, f"{LOOP}:{port}", "--health-dir", str(tmp_path), "--exit-with", "app")
    p.wait_event("runtime_phase", lambda e: e.get("phase") == "ready")
    p.wait_event("exit_with_watching")
    tasks = Path(f"/proc/{p.p.pid}/task")

    def comm(task: Path) -> str:
        return (task / "comm").read_text().strip()

    def watch_threads() -> bool:
        # notify's inotify thread (started by Rust from the event loop's thread, as
        # watchfiles' RustNotify is made: not by Thread.start, left; CHANGELOG, Fixed),
        # then anyio's worker thread that runs the watch, started right after it
        notify = [int(t.name) for t in tasks.iterdir() if comm(t).startswith("notify-rs")]
        return bool(notify) and any(
            int(t.name) > notify[0] and comm(t) == "python" for t in tasks.iterdir()
        )

    wait_until(watch_threads, "the directory watch's threads")
    stop = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGINT - 1))
    blocked = {}
    for task in tasks.iterdir():
        if comm(task).startswith("notify-rs"):
            continue
        status = (task / "status").read_text()
        mask = int(re.search(r"^SigBlk:\s*([0-9a-f]+)", status, re.M)[1], 16)  # type: ignore[index]
        blocked[int(task.name)] = mask & stop == stop
    assert len(blocked) > 1, blocked  # the thread pool was started
    assert blocked.pop(p.p.pid) is False  # the main thread takes them
    assert all(blocked.values()), blocked
    p.p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 0
    up.close()


def test_exit_with_tombstone_written_before_start(procs: list[Proc], tmp_path: Path) -> None:
    """--exit-with drains and exits 0 on a tombstone that existed before the process."""
    Writer(tmp_path, "app").mark_exited(0)
    p = ambassador(procs, f"{LOOP}:9", "--health-dir", str(tmp_path), "--exit-with", "app")
    assert p.wait(10) == 0
    assert p.wait_event("shutdown_requested")["reason"] == "exit-with:app"


def test_exit_with_tombstone_appearing_later(procs: list[Proc], tmp_path: Path) -> None:
    """--exit-with reacts to a tombstone written while running; partial files do not count."""
    p = ambassador(procs, f"{LOOP}:9", "--health-dir", str(tmp_path), "--exit-with", "app")
    p.wait_event("exit_with_watching")
    record = tmp_path / "app.json"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    stone = Writer(elsewhere, "app").mark_exited(3).to_json()  # the bytes, written below
    record.write_bytes(stone[: len(stone) // 2])  # torn write: not a tombstone
    record.write_text(json.dumps({"phase": "exited"}))  # not the schema: not a tombstone
    Writer(tmp_path, "app").set_ready()
    # Lets time pass to prove none of the writes above ends the process; a slow machine
    # can only make this check weaker, never fail a process that keeps running.
    time.sleep(0.3)
    assert p.p.poll() is None
    tmp = tmp_path / ".app.json.tmp"
    tmp.write_bytes(stone)
    tmp.replace(record)
    assert p.wait(10) == 0


def test_python_dash_m_runs_the_demo() -> None:
    """`python -m podpatterns demo` runs the whole demo, health records and tombstone too."""
    out = run("demo", "--connections", "20", "--megabytes", "4", timeout=60)
    assert out.returncode == 0, out.stderr
    assert "checksum OK" in out.stdout
    assert "503 while draining" in out.stdout
    assert "200 once its record says ready" in out.stdout and "exit-with:app" in out.stdout


async def test_admin_refuses_quit_from_non_loopback_peer() -> None:
    """POST /quitquitquit from a non-loopback peer gets 403 and no shutdown."""
    from aiohttp.test_utils import make_mocked_request

    from podpatterns.options import HostPort
    from podpatterns.runtime import Runtime, RuntimeConfig
    from podpatterns.runtime.admin import AdminServer, is_loopback_peer

    assert is_loopback_peer("127.0.0.5") and is_loopback_peer("::1")
    assert is_loopback_peer("::ffff:127.0.0.1")
    assert not is_loopback_peer("10.1.2.3") and not is_loopback_peer(None)
    runtime = Runtime(RuntimeConfig(), [])
    admin = AdminServer(runtime, HostPort(LOOP, 0))
    transport = _FakeTransport(("10.1.2.3", 40000))
    req = make_mocked_request("POST", "/quitquitquit", transport=transport)
    resp = await admin._quit(req)
    assert resp.status == 403
    assert runtime.shutdown_reason is None


class _FakeTransport:
    """The only state a peer address check can read; a real non-loopback peer needs a
    second host, which this machine does not have outside a network namespace."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self._peer = peer

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self._peer if name == "peername" else default


def test_two_routes_from_config_file(procs: list[Proc], tmp_path: Path) -> None:
    """A config file with two routes (TCP and unix socket) relays both in one process."""
    up_a, port_a = _upstream_server()
    up_b, port_b = _upstream_server()
    sock_path = tmp_path / "cache.sock"
    cfg = tmp_path / "ambassador.yaml"
    cfg.write_text(
        f"admin: {LOOP}:0\nshutdown_delay: 0s\nroutes:\n"
        f"  - name: db\n    listen: {LOOP}:0\n    upstream: [{LOOP}:{port_a}]\n"
        f"  - name: cache\n    listen: unix:{sock_path}\n    upstream: [{LOOP}:{port_b}]\n"
    )
    p = Proc("ambassador", "--config", str(cfg))
    procs.append(p)
    c1 = socket.create_connection((LOOP, p.listen_port()))
    p.wait_event("admin_listening")
    c2 = socket.socket(socket.AF_UNIX)
    c2.connect(str(sock_path))
    for client, up, word in ((c1, up_a, b"db"), (c2, up_b, b"cache")):
        server_side, _ = up.accept()
        client.sendall(word)
        assert server_side.recv(10) == word
        server_side.close()
        client.close()
    routes = {e["route"] for e in p.events if e.get("event") == "route_listening"}
    assert routes == {"db", "cache"}
    assert p.terminate() == 0
    up_a.close()
    up_b.close()


def test_out_of_fds_fails_connections_not_the_process(procs: list[Proc]) -> None:
    """With too few descriptors for splice pipes, the affected connections are reset and
    counted; the process neither spins nor stops serving."""
    import resource
    import threading

    up, port = _upstream_server()
    dialed: list[socket.socket] = []

    def echo_all() -> None:
        while True:
            try:
                conn, _ = up.accept()
            except OSError:
                return
            dialed.append(conn)
            threading.Thread(target=_echo_once, args=(conn,), daemon=True).start()

    threading.Thread(target=echo_all, daemon=True).start()

    def few_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    p = ambassador(procs, f"{LOOP}:{port}", "--splice", "on", preexec_fn=few_fds)
    listen, admin = p.listen_port(), p.admin_url()
    clients = []
    for _ in range(16):  # 2 sockets + 4 pipe fds each: more than 64 descriptors hold
        try:
            clients.append(socket.create_connection((LOOP, listen), timeout=5))
        except OSError:
            break
    # Pipes are taken on a connection's first bytes: before any, every connection is
    # accepted and dialed (2 descriptors each fit in 64).
    wait_until(lambda: len(dialed) == len(clients), "an upstream connection per client")
    for c in clients:  # all at once: every connection wants its pipes at the same time
        c.sendall(b"ping")
    outcomes = []
    for c in clients:
        try:
            outcomes.append(c.recv(10))
        except OSError:
            outcomes.append(b"reset")
        c.close()
    assert b"ping" in outcomes
    assert any(o in (b"reset", b"") for o in outcomes), outcomes
    cpu_before = _cpu_seconds(p.p.pid)
    # Lets time pass to prove the process does not spin; load only lowers the CPU
    # time it gets, so a slow machine cannot fail a process that is idle.
    time.sleep(1.0)
    assert _cpu_seconds(p.p.pid) - cpu_before < 0.3  # not spinning
    with urllib.request.urlopen(admin + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert 'reason="no_pipe"' in text
    c = socket.create_connection((LOOP, listen), timeout=5)  # still serving
    c.sendall(b"again")
    assert c.recv(10) == b"again"
    c.close()
    assert p.terminate() == 0
    up.close()


def _echo_once(conn: socket.socket) -> None:
    with conn, contextlib.suppress(ConnectionError):  # the proxy resets the failed ones
        while data := conn.recv(65536):
            conn.sendall(data)


def _cpu_seconds(pid: int) -> float:
    import os

    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_parser_does_not_load_the_heavy_dependencies() -> None:
    """Declaring every subcommand's options loads neither aiohttp nor watchfiles.

    `podpatterns ambassador --admin off` would otherwise carry them (about 11 MiB of idle
    RSS: 42.8 -> 31.9 MiB when they became lazy); they load when a command uses them.
    """
    probe = (
        "import sys\n"
        "from podpatterns.cli import build_parser\n"
        "build_parser()\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'aiohttp', 'watchfiles'}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
