"""``GET /status`` and ``podpatterns inspect`` against real processes.

The ambassador, the adapter, ``run`` and ``reload`` run as subprocesses started here,
with their health records in ``tmp_path``; upstreams and sinks are real sockets on
127.0.0.1. ``inspect`` is given the PIDs to look at (``--pid``), since the machine runs
other podpatterns processes; one test runs it with no filter inside a PID namespace of
its own, as ``kubectl debug --target`` does.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from podpatterns.ambassador.certinfo import expiry
from podpatterns.health.records import Phase, Record, write_atomic
from podpatterns.options import HostPort
from tests.peers import candidate_ports
from tests.proc import Proc, outputs, run
from tests.test_cli import _FakeTransport
from tests.waiting import wait_for_file, wait_until

LOOP = "127.0.0.1"
TOKEN = "tok-8f3a9c-SECRET"
HEADER_SECRET = "hdr-77d1e0-SECRET"
URL_SECRET = "pw-41b2-SECRET"


def get_json(url: str) -> tuple[int, Any]:
    """GET ``url``: (status, parsed JSON body)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def status_of(p: Proc) -> dict[str, Any]:
    """The process's ``GET /status`` body."""
    code, body = get_json(p.admin_url() + "/status")
    assert code == 200, body
    assert isinstance(body, dict)
    return body


def inspect(*args: str) -> subprocess.CompletedProcess[str]:
    """``podpatterns inspect ARGS`` to completion."""
    return run("inspect", *args, timeout=60)


def pids(*procs: Proc) -> list[str]:
    """``--pid`` flags for ``procs``."""
    return [f"--pid={p.p.pid}" for p in procs]


@pytest.fixture
def refusing() -> Iterator[HostPort]:
    """A bound, non-listening TCP port: connects to it are refused, and no one else can
    take the port while the test runs."""
    sock = socket.socket()
    sock.bind((LOOP, 0))
    try:
        yield HostPort(LOOP, sock.getsockname()[1])
    finally:
        sock.close()


class _Answers503(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def failing_sink() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 that answers every POST with 503."""
    server = http.server.ThreadingHTTPServer((LOOP, 0), _Answers503)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{LOOP}:{server.server_address[1]}/logs"
    finally:
        server.shutdown()
        server.server_close()


def start(procs: list[Proc], *args: str, env: dict[str, str] | None = None) -> Proc:
    """Start ``podpatterns ARGS`` and keep it for teardown (``-- CMD`` commands log JSON
    by the environment, so that nothing is appended to CMD)."""
    tail = () if "--" in args else ("--log-format", "json")
    p = Proc(*args, env=env, stdout=subprocess.DEVNULL, tail=tail)
    procs.append(p)
    return p


def start_adapter(procs: list[Proc], tmp_path: Path, *sink: str) -> tuple[Proc, Path]:
    """An adapter tailing ``tmp_path/logs/*.log``, whose ``app.log`` holds two lines (8
    bytes), with a checkpoint and the ``sink`` flags; (the process, the logs directory)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "app.log").write_text("one\ntwo\n")
    ad = start(
        procs,
        "adapter",
        f"--path={logs}/*.log",
        f"--checkpoint-dir={tmp_path / 'cp'}",
        *sink,
        "--admin=127.0.0.1:0",
    )
    return ad, logs


def test_status_shows_routes_endpoints_failures_and_certificate_expiry(
    tmp_path: Path, procs: list[Proc], refusing: HostPort
) -> None:
    """/status of an ambassador: the endpoint in cool-down after refused connects, the
    failures by reason, connections against the cap, and the client certificate's
    notAfter as the certificate says it."""
    ca = trustme.CA()
    not_after = datetime.datetime(2031, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
    leaf = ca.issue_cert("client.example", not_after=not_after)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    amb = start(
        procs,
        "ambassador",
        "--listen=127.0.0.1:0",
        f"--upstream={refusing}",
        "--upstream-tls",
        f"--tls-ca={tmp_path / 'ca.pem'}",
        f"--tls-cert={tmp_path / 'client.pem'}",
        f"--tls-key={tmp_path / 'client.key'}",
        "--max-connections=7",
        "--connect-retries=0",
        "--fail-cooldown=60s",
        "--admin=127.0.0.1:0",
    )
    with socket.create_connection((LOOP, amb.listen_port())) as client:
        client.settimeout(10)
        with contextlib.suppress(OSError):
            assert client.recv(1) == b""  # closed (or reset) once the connect failed
    amb.wait_event("upstream_connect_failed")
    body = status_of(amb)
    assert body["ready"] and body["phase"] == "ready" and body["not_ready"] == []
    (route,) = body["components"]["ambassador"]["routes"]
    assert route["connections"]["cap"] == 7
    assert route["connect_failures"] == {"refused": 1}
    (endpoint,) = route["endpoints"]
    assert endpoint["address"] == str(refusing)
    assert endpoint["state"] == "cooldown" and 0 < endpoint["cooldown_left"] <= 60
    assert endpoint["connect_failures"] == {"refused": 1}
    cert = route["tls"]["certificates"]["cert"]
    assert cert["path"] == str(tmp_path / "client.pem")
    assert cert["not_after"] == not_after.timestamp()
    assert (
        route["tls"]["certificates"]["ca"]["not_after"] == expiry(tmp_path / "ca.pem")["not_after"]
    )
    warnings = body["components"]["ambassador"]["warnings"]
    assert f"route default: endpoint {refusing} is cooldown" in warnings
    assert "BEGIN" not in json.dumps(body)  # paths, never contents


def test_status_shows_the_certificate_the_upstream_presented(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """After a connection through a TLS route, /status and inspect show when the
    certificate the upstream last presented expires."""
    from tests.test_ambassador_tls import echo, server_context, tls_server

    ca = trustme.CA()
    not_after = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    with tls_server(server_context(ca.issue_cert(LOOP, not_after=not_after)), echo) as server:
        amb = start(
            procs,
            "ambassador",
            "--listen=127.0.0.1:0",
            f"--upstream={LOOP}:{server.port}",
            "--upstream-tls",
            f"--tls-ca={tmp_path / 'ca.pem'}",
            "--admin=127.0.0.1:0",
        )
        with socket.create_connection((LOOP, amb.listen_port()), timeout=10) as client:
            client.sendall(b"ping")
            assert client.recv(4) == b"ping"
        (route,) = status_of(amb)["components"]["ambassador"]["routes"]
        (peer,) = route["tls"]["upstream"]
        assert peer["server_name"] == LOOP and peer["not_after"] == not_after.timestamp()
        out = inspect(*pids(amb), f"--admin={amb.admin_url()}")
    assert f"tls upstream {LOOP} (last seen): expires 2030-01-02" in out.stdout, outputs(out)


def test_status_shows_adapter_lag_checkpoint_sink_retries_and_redacts_secrets(
    tmp_path: Path, procs: list[Proc], failing_sink: str
) -> None:
    """/status of an adapter whose HTTP sink answers 503: the file's lag in bytes and
    seconds, the sink failing and retrying, the header value and the token file's content
    nowhere in /status or in inspect's output (text and JSON), the token file by its path."""
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    ad, logs = start_adapter(
        procs,
        tmp_path,
        "--sink=http",
        f"--sink-url={failing_sink}",
        f"--sink-header=X-Api-Key={HEADER_SECRET}",
        f"--sink-token-file={token}",
        "--sink-backoff=50ms",
        "--sink-backoff-max=200ms",
    )
    ad.wait_event("sink_failing")

    def lagging() -> dict[str, Any] | None:
        body = status_of(ad)
        (f,) = body["components"]["adapter"]["files"]
        return (
            body
            if f["lag_seconds"] > 0
            and body["components"]["adapter"]["sinks"][0]["counters"]["retries"]
            else None
        )

    body = wait_until(lagging, "lag_seconds > 0 and a retry")
    adapter = body["components"]["adapter"]
    (f,) = adapter["files"]
    assert f["path"] == str(logs / "app.log") and f["lag_bytes"] == 8 and f["acked"] == 0
    (sink,) = adapter["sinks"]
    assert sink["name"] == "http" and sink["failing"] is True and sink["failing_for"] >= 0
    assert sink["counters"]["requests"] >= 1
    assert any(w.startswith("sink http failing for ") for w in adapter["warnings"])
    assert adapter["dead_letter"] == {"path": None, "written": 0, "dropped": 0}
    assert adapter["config"]["sink_token_file"] == str(token)
    assert adapter["config"]["sink_header"] == [["X-Api-Key", "<redacted>"]]
    text = json.dumps(body)
    assert TOKEN not in text and HEADER_SECRET not in text
    for args in ((), ("--json",)):
        out = inspect(*pids(ad), f"--admin={ad.admin_url()}", *args)
        assert out.returncode == 1, outputs(out)
        assert TOKEN not in out.stdout + out.stderr
        assert HEADER_SECRET not in out.stdout + out.stderr
        if not args:
            assert "sink http: FAILING for " in out.stdout, out.stdout
    report = json.loads(out.stdout)
    (proc,) = report["processes"]
    assert "--sink-header=X-Api-Key=<redacted>" in proc["argv"]


def test_adapter_status_after_shipping_has_no_lag_and_a_checkpoint_age(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """Once the file sink acknowledged everything: lag 0 bytes and 0 s, a checkpoint
    age, and inspect's exit code 0 for that admin server."""
    ad, logs = start_adapter(procs, tmp_path, "--sink=file", f"--sink-path={tmp_path / 'o.json'}")

    def shipped() -> dict[str, Any] | None:
        adapter = status_of(ad)["components"]["adapter"]
        files = adapter["files"]
        done = files and files[0]["lag_bytes"] == 0 and adapter["checkpoint"]["writes"]
        return adapter if done else None

    adapter = wait_until(shipped, "every byte acknowledged and checkpointed")
    assert adapter["files"][0]["lag_seconds"] == 0.0 and adapter["files"][0]["acked"] == 8
    checkpoint = adapter["checkpoint"]
    assert checkpoint["writes"] >= 1 and checkpoint["age"] is not None
    (sink,) = adapter["sinks"]
    assert sink["name"] == "file" and sink["failing"] is False and sink["records"] == 2
    out = inspect(*pids(ad), f"--admin={ad.admin_url()}")
    assert out.returncode == 0, outputs(out)
    assert "all healthy" in out.stdout and str(logs / "app.log") in out.stdout


def test_status_shows_pending_reload_and_redacts_url_userinfo(
    tmp_path: Path, procs: list[Proc], refusing: HostPort
) -> None:
    """/status of reload: a changed version that cannot be delivered is pending, the
    reloader not ready and why; the notify URL's password never shows."""
    watched = tmp_path / "config"
    watched.mkdir()
    (watched / "a.conf").write_text("1")
    rl = start(
        procs,
        "reload",
        f"--watch={watched}",
        f"--http-post=http://app:{URL_SECRET}@{refusing}/reload",
        "--debounce=50ms",
        "--resync=200ms",
        "--retry-max=200ms",
        "--admin=127.0.0.1:0",
    )
    rl.wait_event("reload_watching")
    (watched / "a.conf").write_text("2")
    rl.wait_event("reload_notify_failed")
    body = status_of(rl)
    reload = body["components"]["reload"]
    assert reload["pending"] is not None and reload["failing"] is True
    assert not body["ready"]
    assert any("could not be delivered" in why for why in body["not_ready"])
    assert reload["config"]["notifier"] == f"http-post http://<redacted>@{refusing}/reload"
    assert URL_SECRET not in json.dumps(body)
    out = inspect(*pids(rl))
    assert out.returncode == 1, outputs(out)
    assert "not checked: its admin port was chosen at start" in out.stdout
    out = inspect(*pids(rl), f"--admin={rl.admin_url()}")
    assert out.returncode == 1, outputs(out)
    assert "PENDING" in out.stdout and URL_SECRET not in out.stdout
    # nor in its logs or metrics (the notifier's label names the target in both)
    assert URL_SECRET not in rl.log_text(last=10_000)
    with urllib.request.urlopen(rl.admin_url() + "/metrics", timeout=10) as resp:
        assert URL_SECRET not in resp.read().decode()


async def test_status_answers_loopback_peers_only() -> None:
    """GET /status from a non-loopback peer gets 403 and no state."""
    from aiohttp.test_utils import make_mocked_request

    from podpatterns.runtime import Runtime, RuntimeConfig
    from podpatterns.runtime.admin import AdminServer

    admin = AdminServer(Runtime(RuntimeConfig(), []), HostPort(LOOP, 0))
    req = make_mocked_request("GET", "/status", transport=_FakeTransport(("10.1.2.3", 40000)))
    resp = await admin._status(req)
    assert resp.status == 403
    assert b"phase" not in resp.body  # type: ignore[operator]
    local = make_mocked_request("GET", "/status", transport=_FakeTransport(("127.0.0.1", 40000)))
    assert (await admin._status(local)).status == 200


def test_inspect_finds_processes_reads_records_and_exits_0_when_healthy(
    tmp_path: Path, procs: list[Proc], refusing: HostPort
) -> None:
    """inspect finds an ambassador (admin from its --admin flag) and a run supervisor (no
    admin) from /proc, reads their health directory and prints every section; exit 0."""
    health = tmp_path / "health"
    health.mkdir()
    app = start(
        procs,
        "run",
        f"--health-dir={health}",
        "--name=app",
        "--heartbeat=1s",
        "--",
        "sleep",
        "300",
    )
    amb = start_on_fixed_admin(procs, refusing, health)
    wait_until(lambda: "ready" in (health / "app.json").read_text() or None, "app ready")
    out = inspect(*pids(app, amb))
    assert out.returncode == 0, outputs(out)
    text = out.stdout
    assert f"PID {app.p.pid}" in text and f"PID {amb.p.pid}" in text
    assert f"admin http://{amb_admin(amb)}" in text
    assert f"health records in {health}" in text
    assert "app" in text and "heartbeat" in text and "(every 1s)" in text
    assert "all healthy" in text
    report = json.loads(inspect(*pids(app, amb), "--json").stdout)
    assert report["healthy"] is True and report["problems"] == []
    by_command = {p["command"]: p for p in report["processes"]}
    assert by_command["run"]["name"] == "app" and by_command["run"]["admin"] is None
    assert by_command["ambassador"]["admin"] == f"http://{amb_admin(amb)}"
    (records,) = report["health"]
    assert records["records"]["app"]["state"] == "ready"
    assert records["records"]["app"]["pid"] == app.p.pid
    (admin,) = report["admins"]
    assert admin["readyz"] == 200 and admin["status"]["components"]["ambassador"]["ready"]


def amb_admin(p: Proc) -> str:
    """The ambassador's admin HOST:PORT from its log."""
    return str(p.wait_event("admin_listening")["address"])


def start_on_fixed_admin(
    procs: list[Proc], upstream: HostPort, health: Path, config: Path | None = None
) -> Proc:
    """An ambassador whose admin port is fixed in its settings (as in a Pod spec): set by
    ``PODPATTERNS_ADMIN``, or by the ``admin`` key of ``config`` when given; a random
    free port, tried again if taken."""
    for port in candidate_ports(5):
        env = {"PODPATTERNS_ADMIN": f"127.0.0.1:{port}"}
        extra = []
        if config is not None:
            config.write_text(f"admin: 127.0.0.1:{port}\n")
            env, extra = {}, [f"--config={config}"]
        p = start(
            procs,
            "ambassador",
            "--listen=127.0.0.1:0",
            f"--upstream={upstream}",
            f"--health-dir={health}",
            *extra,
            env=env,
        )
        try:
            p.wait_event("admin_listening")
            return p
        except AssertionError:
            p.stop()
    raise AssertionError("no free admin port among 5 candidates")


def test_inspect_reads_the_admin_address_from_the_config_file(
    tmp_path: Path, procs: list[Proc], refusing: HostPort
) -> None:
    """A process whose admin address is set in its --config file: inspect reads the file
    (through /proc/PID/root when it is not here) and asks that admin server."""
    amb = start_on_fixed_admin(procs, refusing, tmp_path, config=tmp_path / "amb.yaml")
    report = json.loads(inspect(*pids(amb), "--json").stdout)
    (proc,) = report["processes"]
    assert proc["admin"] == f"http://{amb_admin(amb)}", proc
    (admin,) = report["admins"]
    assert admin["readyz"] == 200 and admin["status"]["pid"] == amb.p.pid


def test_inspect_reports_a_tombstone_a_stale_record_and_an_unreachable_admin(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """exit 1, naming the problems: a container that exited with code 3 (its tombstone),
    a record whose heartbeat stopped, and an admin server nobody answers on."""
    health = tmp_path / "health"
    health.mkdir()
    job = start(procs, "run", f"--health-dir={health}", "--name=job", "--", "sh", "-c", "exit 3")
    assert job.wait() == 3
    now = time.time()
    write_atomic(
        health,
        Record("worker", "i1", 4242, Phase.READY, 7, 1.0, now - 60, now - 20),
    )
    sock = socket.socket()
    sock.bind((LOOP, 0))  # bound, not listening: refused
    with sock:
        dead = f"http://{LOOP}:{sock.getsockname()[1]}"
        # --pid of this test (no podpatterns process): none of the machine's other
        # podpatterns processes is looked at
        only = (f"--pid={os.getpid()}", f"--health-dir={health}", f"--admin={dead}")
        out = inspect(*only)
        report = json.loads(inspect(*only, "--json").stdout)
    assert out.returncode == 1, outputs(out)
    assert "exited code 3" in out.stdout
    assert "no heartbeat for" in out.stdout
    assert f"{dead}: unreachable" in out.stdout
    records = report["health"][0]["records"]
    assert records["job"]["exit_code"] == 3 and records["job"]["healthy"] is False
    assert records["worker"]["state"] == "stale" and records["worker"]["heartbeat_age"] >= 20
    assert report["healthy"] is False and len(report["problems"]) == 3


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--admin=ftp://127.0.0.1:1"], "--admin"),
        (["--timeout=0"], "--timeout"),
        (["--pid=zero"], "--pid"),
    ],
)
def test_inspect_usage_errors_exit_2_with_one_line(args: list[str], names: str) -> None:
    """A bad flag: one line naming it on stderr, exit 2, no traceback."""
    out = inspect(*args)
    assert out.returncode == 2, outputs(out)
    assert names in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_inspect_explains_a_permission_error_and_prints_the_custom_profile(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """Run as another user than the target, inspect cannot read the target's health
    directory: it says which uid it runs as and which the target has, and prints the
    kubectl debug custom profile JSON that runs as that user and mounts the volume."""
    if os.getuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run inspect as another user")
    health = tmp_path / "health"
    health.mkdir(mode=0o700)
    app = start(procs, "run", f"--health-dir={health}", "--name=app", "--", "sleep", "300")
    wait_for_file(health / "app.json")
    out = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-m", "podpatterns", "inspect", f"--pid={app.p.pid}"],
        capture_output=True, text=True, timeout=60, check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("PODPATTERNS_")},
    )  # fmt: skip
    assert out.returncode == 1, outputs(out)
    assert f"cannot read {health} of PID {app.p.pid} (here, or through /proc/" in out.stdout
    assert "inspect runs as uid 65534, the target as uid 0" in out.stdout
    profile = json.loads(out.stdout.split("with profile.json:\n", 1)[1].splitlines()[0])
    assert profile["securityContext"]["runAsUser"] == 0
    assert profile["volumeMounts"][0]["mountPath"] == str(health)
    assert "kubectl debug -it POD" in out.stdout


def test_inspect_finds_every_podpatterns_process_of_its_pid_namespace(tmp_path: Path) -> None:
    """With no --pid, inside a PID namespace of its own (what kubectl debug --target
    gives), inspect finds the podpatterns processes there from /proc and only those."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    health = tmp_path / "health"
    health.mkdir()
    py = sys.executable
    script = (
        f"{py} -m podpatterns run --health-dir {health} --name app --heartbeat 1s"
        " -- sleep 60 2>/dev/null &\n"
        f"while ! grep -q ready {health}/app.json 2>/dev/null; do sleep 0.05; done\n"
        f"{py} -m podpatterns inspect --json\n"
    )
    flags = [] if os.getuid() == 0 else ["--map-root-user"]
    out = subprocess.run(
        ["unshare", *flags, "--pid", "--fork", "--mount-proc", "--kill-child",
         "sh", "-c", script],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if out.returncode not in (0, 1) or not out.stdout.startswith("{"):
        pytest.skip(f"no PID namespace here: {out.stderr.strip()[:200]}")
    report = json.loads(out.stdout)
    (proc,) = report["processes"]
    assert proc["command"] == "run" and proc["name"] == "app"
    assert proc["health_dir"] == str(health)
    assert report["health"][0]["records"]["app"]["state"] == "ready"
    assert report["healthy"] is True and out.returncode == 0


def test_inspect_looks_for_every_other_command() -> None:
    """inspect's list of the commands to find is the command table, less itself."""
    from podpatterns.commands import COMMANDS
    from podpatterns.commands.inspect import FOUND_COMMANDS

    assert sorted(FOUND_COMMANDS) == sorted(c for c in COMMANDS if c != "inspect")


def test_shown_redacts_secrets_by_shape_and_by_name_and_keeps_paths() -> None:
    """Config values as /status shows them: URL userinfo and authorization values
    redacted wherever they stand, fields named like a secret redacted, header names kept,
    files by path, addresses as HOST:PORT; mapping keys (container names) are data."""
    import dataclasses

    from podpatterns.runtime.status import REDACTED, shown, shown_config

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        url: str = f"https://bob:{URL_SECRET}@logs.example:443/x"
        command: tuple[str, ...] = ("curl", "-H", f"Authorization: Bearer {TOKEN}")
        header: tuple[tuple[str, str], ...] = (("X-Key", HEADER_SECRET),)
        db_password: str = "hunter2"
        token_file: Path = Path("/secrets/token")
        listen: HostPort | None = None

    got = shown_config(Cfg(listen=HostPort("127.0.0.1", 5432)), secret=("header",))
    assert got["url"] == f"https://{REDACTED}@logs.example:443/x"
    assert got["command"] == ["curl", "-H", f"Authorization: {REDACTED}"]
    assert got["header"] == [["X-Key", REDACTED]]
    assert got["db_password"] == REDACTED
    assert got["token_file"] == "/secrets/token"
    assert got["listen"] == "127.0.0.1:5432"
    assert shown({"secret-sync": {"phase": "ready"}}) == {"secret-sync": {"phase": "ready"}}
    assert shown(shown(got)) == got  # redacting twice changes nothing
