"""The images: what they contain, how they run locked down, and PID 1 behaviour.

Each image is built from images/Containerfile on the local base, then run by podman the
way a restrictive Pod runs it: a read-only root filesystem, every capability dropped,
no privilege escalation, the image's own numeric user. The images are FROM scratch: no
shell, so the commands the tests run inside them are Python.
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import pytest
import trustme
from fluent import sender as fluent_sender

from tests.e2e import examples
from tests.e2e.engine import ROOT, VERSION, Engine, build, build_local, kube_play, podman_build
from tests.e2e.test_pods import events, json_lines, pod_name, podify
from tests.peers import PostgresServer, candidate_ports
from tests.waiting import wait_until

# the postgres fixture of the copy-in test, also when this file runs alone
pytest_plugins = ("tests.peer_fixtures",)

# As readOnlyRootFilesystem: podman's --read-only alone would still mount writable tmpfs
# on /tmp, /var/tmp and /run.
LOCKED_DOWN = (
    "--read-only",
    "--read-only-tmpfs=false",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
)
NO_NETWORK = ("--network", "none")  # for the tests that need none
ENTRYPOINTS = {
    "ambassador": ["podpatterns", "ambassador"],
    "adapter": ["podpatterns", "adapter"],
    "tools": ["podpatterns"],
}
# Every image, -debug variants included (docs/images.md has the measured sizes).
MAX_IMAGE_BYTES = 60 * 10**6
# Container start to the first 200 from /startupz (the target is 500 ms; the bound is
# generous for a loaded machine, the measured figure is printed and in docs/images.md).
MAX_READY_SECONDS = 5.0


@pytest.mark.parametrize("target", sorted(ENTRYPOINTS))
def test_image_metadata(podman: Engine, images: dict[str, str], target: str) -> None:
    """Numeric non-root user, exec-form entrypoint, OCI labels with the package version."""
    config = podman.inspect("image", images[target])["Config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ENTRYPOINTS[target]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.title"] == f"podpatterns-{target}"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.description"]


@pytest.mark.parametrize("target", sorted(ENTRYPOINTS))
def test_image_has_no_installer_compiler_or_shell(
    podman: Engine, images: dict[str, str], target: str
) -> None:
    """Neither pip, a compiler, a shell, apt nor dpkg is in the image."""
    probe = (
        "import importlib.util, os, shutil, subprocess, sys\n"
        "tools = ('pip', 'pip3', 'gcc', 'cc', 'g++', 'sh', 'bash', 'apt', 'apt-get', 'dpkg')\n"
        "found = [n for n in tools if shutil.which(n)]\n"
        "found += [m for m in ('pip', 'ensurepip', 'setuptools', 'wheel')"
        " if importlib.util.find_spec(m)]\n"
        "paths = ('/bin/sh', '/usr/bin', '/var/lib/dpkg', '/usr/share/python-wheels')\n"
        "found += [p for p in paths if os.path.lexists(p)]\n"
        "base = os.path.realpath(sys._base_executable)\n"
        "base = subprocess.run([base, '-c', 'import pip'], capture_output=True)\n"
        "found += ['base pip'] if base.returncode == 0 else []\n"
        "print(found)\n"
    )
    done = podman.run(
        "run",
        "--rm",
        *LOCKED_DOWN,
        *NO_NETWORK,
        "--entrypoint",
        "python3",
        images[target],
        "-c",
        probe,
    )
    assert done.stdout.strip() == "[]"


def test_image_sizes(podman: Engine, images: dict[str, str], debug_images: dict[str, str]) -> None:
    """Every image, -debug variants included, is at most 60 MB."""
    sizes = {tag: podman.size(tag) for tag in [*images.values(), *debug_images.values()]}
    print("image sizes (MB):", {t: round(n / 1e6, 1) for t, n in sizes.items()})
    assert all(0 < size <= MAX_IMAGE_BYTES for size in sizes.values()), sizes


@pytest.mark.parametrize("target", sorted(ENTRYPOINTS))
def test_debug_variant_has_a_shell(
    podman: Engine, debug_images: dict[str, str], target: str
) -> None:
    """The -debug variant is the same image plus busybox: a shell, on PATH."""
    config = podman.inspect("image", debug_images[target])["Config"]
    assert config["Entrypoint"] == ENTRYPOINTS[target]
    done = podman.run(
        "run", "--rm", *LOCKED_DOWN, *NO_NETWORK, "--entrypoint", "sh", debug_images[target],
        "-c", "id -u && podpatterns --version",
    )  # fmt: skip
    assert done.stdout.split() == ["65532", "podpatterns", VERSION]


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1 in a thread; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@contextlib.contextmanager
def container(podman: Engine, *args: str) -> Iterator[str]:
    """``podman run -d ARGS``; yields the container ID and removes it on every exit path."""
    cid = podman.run("run", "-d", *args).stdout.strip()
    try:
        yield cid
    finally:
        podman.run("rm", "-f", "-t", "0", cid, check=False)


def http_status(port: int, path: str) -> int | None:
    """The status of ``GET path`` on 127.0.0.1:port, or None when nothing answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            head = sock.recv(64).split(b" ", 2)
            return int(head[1])
    except (OSError, ValueError, IndexError):
        return None


def started_at(podman: Engine, cid: str) -> float:
    """When the container's process was started, as ``time.time()`` counts (podman's
    ``State.StartedAt``, RFC 3339 with nanoseconds)."""
    text = str(podman.state(cid)["StartedAt"])
    found = re.fullmatch(r"(.*T[\d:]+)(?:\.(\d+))?(Z|[+-][\d:]+)?", text.split(" m=")[0])
    assert found, text
    whole, fraction, zone = found.groups()
    stamp = datetime.datetime.fromisoformat(whole + (zone or "Z").replace("Z", "+00:00"))
    return stamp.timestamp() + float(f"0.{fraction or 0}")


def first_200(port: int, path: str, within: float) -> float:
    """``time.time()`` of the first 200 from ``GET path`` on 127.0.0.1:port, polled every
    5 ms (not :func:`wait_until`, whose growing pauses would blur the figure)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if http_status(port, path) == 200:
            return time.time()
        time.sleep(0.005)
    raise AssertionError(f"no 200 from {path} on port {port} within {within} s")


# A component of each image with its own arguments: the ambassador, the adapter, and
# `reload` from the tools image; DIR is a writable volume.
READY_ARGS = {
    "ambassador": ("--listen", "127.0.0.1:{listen}", "--upstream", "127.0.0.1:9"),
    "adapter": ("--path", "/data/*.log", "--sink", "stdout", "--checkpoint-dir", "/data/cp"),
    "tools": ("reload", "--watch", "/data", "--signal", "hup", "--pid-file", "/data/app.pid"),
}


@pytest.mark.parametrize("target", sorted(READY_ARGS))
def test_component_ready_soon_after_start(
    podman: Engine, images: dict[str, str], tmp_path: Path, target: str
) -> None:
    """Locked down, each image's component answers /startupz 200 soon after its start."""
    listen, admin = candidate_ports(2)
    data = health_volume(tmp_path)
    args = [a.format(listen=listen) for a in READY_ARGS[target]]
    with container(
        podman,
        "--network",
        "host",
        *LOCKED_DOWN,
        "-v",
        f"{data}:/data",
        images[target],
        *args,
        "--admin",
        f"127.0.0.1:{admin}",
        "--log-format",
        "json",
    ) as cid:
        ready = first_200(admin, "/startupz", within=30)
        took = ready - started_at(podman, cid)
        print(f"ready: {target} {took * 1000:.0f} ms from container start to /startupz 200")
        assert 0 < took < MAX_READY_SECONDS, took


def test_adapter_image_takes_the_fluent_forward_protocol(
    podman: Engine, images: dict[str, str], tmp_path: Path
) -> None:
    """The default extras carry msgpack: the adapter image, locked down, accepts events
    from fluent-logger on ``--forward-listen`` and writes them to its sink."""
    listen, admin = candidate_ports(2)
    data = health_volume(tmp_path)
    with container(
        podman,
        "--network",
        "host",
        *LOCKED_DOWN,
        "-v",
        f"{data}:/data",
        images["adapter"],
        "--forward-listen",
        f"127.0.0.1:{listen}",
        "--sink",
        "stdout",
        "--spool-dir",
        "/data/spool",
        "--admin",
        f"127.0.0.1:{admin}",
        "--log-format",
        "json",
    ) as cid:
        wait_until(lambda: http_status(admin, "/readyz") == 200 or None, "adapter ready", 30)
        sender = fluent_sender.FluentSender("app", host="127.0.0.1", port=listen)
        try:
            assert sender.emit("web", {"message": "from fluent-logger", "n": 7}), sender.last_error
        finally:
            sender.close()

        def arrived() -> dict[str, object] | None:
            found = [r for r in json_lines(podman.logs(cid)) if r.get("tag") == "app.web"]
            return found[0] if found else None

        record = wait_until(arrived, "the forwarded event on stdout", within=30)
        assert record["message"] == "from fluent-logger" and record["n"] == 7


def test_ambassador_runs_locked_down_and_drains_on_sigterm(
    podman: Engine, images: dict[str, str]
) -> None:
    """Read-only root, no capabilities: the ambassador proxies, is ready, exits 0 on TERM."""
    listen, admin = candidate_ports(2)
    with (
        echo_server() as upstream,
        container(
            podman,
            "--network",
            "host",
            *LOCKED_DOWN,
            images["ambassador"],
            "--listen",
            f"127.0.0.1:{listen}",
            "--upstream",
            f"127.0.0.1:{upstream}",
            "--admin",
            f"127.0.0.1:{admin}",
            "--shutdown-delay",
            "0s",
            "--log-format",
            "json",
        ) as cid,
    ):
        wait_until(
            lambda: http_status(admin, "/readyz") == 200 or None, "ambassador ready", within=30
        )
        with socket.create_connection(("127.0.0.1", listen), timeout=5) as conn:
            conn.sendall(b"through the ambassador container\n")
            conn.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := conn.recv(65536):
                got += chunk
        assert got == b"through the ambassador container\n"
        # exec-form entrypoint: SIGTERM reaches podpatterns itself, which drains and exits 0
        podman.run("stop", "-t", "20", cid)
        assert podman.state(cid)["ExitCode"] == 0
        events = [json.loads(line) for line in podman.logs(cid).splitlines() if line[:1] == "{"]
        names = [e.get("event") for e in events]
        assert "connection_closed" in names
        assert names.index("shutdown_requested") < names.index("drain_finished")


def health_volume(tmp_path: Path) -> Path:
    """A host directory the images' user can write, mounted as the health directory."""
    health = tmp_path / "health"
    health.mkdir()
    health.chmod(0o777)
    return health


def run_as_main(script: str) -> tuple[str, ...]:
    """The tools image's args: ``python3 -c SCRIPT`` under `podpatterns run`, record
    ``main`` (the image has no shell)."""
    return ("run", "--health-dir", "/run/pod", "--name", "main", "--", "python3", "-c", script)


# The orphan is a grandchild whose parent exits at once: it is re-parented to PID 1.
# The checker (the script, which never reaps it) follows it until its /proc entry is
# gone ("reaped"); only at the deadline does it report what it still is ("zombie" or
# "still-running"): a slow reaper is waited for, not mistaken for none.
ZOMBIE_SCRIPT = """
import subprocess, sys, time
subprocess.run([sys.executable, "-c",
    "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; "
    "time.sleep(0.2)']); open('/run/pod/orphan', 'w').write(str(p.pid))"], check=True)
pid = open("/run/pod/orphan").read().strip()
deadline = time.monotonic() + 10
state = "?"
while time.monotonic() < deadline:
    try:
        state = open("/proc/%s/stat" % pid).read().rsplit(")", 1)[1].split()[0]
    except OSError:
        print("orphan=reaped", flush=True)
        break
    time.sleep(0.02)
else:
    print("orphan=zombie" if state == "Z" else "orphan=still-running", flush=True)
"""


def test_run_as_pid1_reaps_orphans(podman: Engine, images: dict[str, str], tmp_path: Path) -> None:
    """`podpatterns run` as PID 1 reaps orphaned grandchildren; a plain PID 1 does not."""
    health = health_volume(tmp_path)
    common = ("--rm", *LOCKED_DOWN, *NO_NETWORK, "-v", f"{health}:/run/pod")
    supervised = podman.run("run", *common, images["tools"], *run_as_main(ZOMBIE_SCRIPT))
    assert "orphan=reaped" in supervised.stdout
    # The control: the same script as PID 1 itself leaves the orphan a zombie, so the
    # assertion above can fail.
    bare = podman.run(
        "run", *common, "--entrypoint", "python3", images["tools"], "-c", ZOMBIE_SCRIPT
    )
    assert "orphan=zombie" in bare.stdout
    record = json.loads((health / "main.json").read_text())
    assert record["phase"] == "exited"
    assert record["exit_code"] == 0


SIGNAL_SCRIPT = """
import signal, sys, time
signal.signal(signal.SIGHUP, lambda *_: print("got-HUP", flush=True))
def term(*_):
    print("got-TERM", flush=True)
    sys.exit(7)
signal.signal(signal.SIGTERM, term)
print("started", flush=True)
while True:
    time.sleep(0.1)
"""


def test_run_as_pid1_forwards_signals_and_keeps_the_exit_code(
    podman: Engine, images: dict[str, str], tmp_path: Path
) -> None:
    """Signals sent to the container reach the command; its exit code is the container's."""
    health = health_volume(tmp_path)
    with container(
        podman,
        *LOCKED_DOWN,
        *NO_NETWORK,
        "-v",
        f"{health}:/run/pod",
        images["tools"],
        *run_as_main(SIGNAL_SCRIPT),
    ) as cid:
        wait_until(lambda: "started" in podman.logs(cid) or None, "command started", within=30)
        podman.run("kill", "--signal", "HUP", cid)
        wait_until(lambda: "got-HUP" in podman.logs(cid) or None, "HUP forwarded", within=10)
        started = time.monotonic()
        podman.run("stop", "-t", "20", cid)
        assert time.monotonic() - started < 10  # TERM was handled, not a timeout's KILL
        assert "got-TERM" in podman.logs(cid)
        assert podman.state(cid)["ExitCode"] == 7
    record = json.loads((health / "main.json").read_text())
    assert (record["phase"], record["exit_code"]) == ("exited", 7)


CUSTOM = ROOT / "docs" / "examples" / "custom-adapter"


def test_custom_adapter_image_from_the_docs(
    podman: Engine, images: dict[str, str], tmp_path: Path
) -> None:
    """docs/examples/custom-adapter builds FROM the adapter image and its transform runs."""
    tag = "localhost/podpatterns-custom-adapter:test"
    # no ADAPTER_IMAGE: the documented default names the image the fixture built
    podman_build(podman, CUSTOM / "Containerfile", CUSTOM, tag)
    logs = tmp_path / "logs"
    logs.mkdir()
    logs.chmod(0o777)
    (logs / "app.log").write_text(
        '{"level": "info", "msg": "order placed", "order_id": "A-17", "cents": 1999}\n'
        '{"level": "info", "msg": "probe", "path": "/healthz"}\n'
        '{"level": "info", "msg": "order placed", "order_id": "A-18", "cents": 5}\n'
    )
    try:
        with container(
            podman,
            *LOCKED_DOWN,
            *NO_NETWORK,
            "-v",
            f"{logs}:/var/log/app",
            tag,
            "--path",
            "/var/log/app/*.log",
            "--read-from",
            "beginning",
            "--parse",
            "json",
            "--transform",
            "shop_transforms:enrich",
            "--sink",
            "stdout",
            "--admin",
            "off",
        ) as cid:

            def shipped() -> dict[str, dict[str, object]] | None:
                records = {}
                for line in podman.run("logs", cid, check=False).stdout.splitlines():
                    with contextlib.suppress(ValueError):
                        record = json.loads(line)
                        records[str(record.get("order_id", record.get("path")))] = record
                return records if "A-18" in records else None

            records = wait_until(shipped, "the transformed records on stdout", within=30)
            assert records["A-17"]["amount"] == "19.99 EUR"
            assert records["A-18"]["amount"] == "0.05 EUR"
            assert "/healthz" not in records  # dropped by the transform (it returned None)
            podman.run("stop", "-t", "20", cid)
            assert podman.state(cid)["ExitCode"] == 0
    finally:
        podman.run("rmi", "-f", tag, check=False)


def test_pip_is_removed_from_a_base_that_has_it(podman: Engine, base: str) -> None:
    """On a base whose interpreter has pip (the official images; Debian's python3-pip,
    which refuses a plain uninstall), the final stage still carries none."""
    pip_base = build_local(podman, Path(__file__).with_name("pipbase.Containerfile"), base)
    tag = "localhost/podpatterns-tools-pipbase:test"
    try:
        build(podman, "tools", pip_base, tag)
        done = podman.run(
            "run", "--rm", *NO_NETWORK, "--entrypoint", "python3", tag, "-c",
            "import importlib.util as u;"
            "print([m for m in ('pip', 'ensurepip') if u.find_spec(m)])",
        )  # fmt: skip
        assert done.stdout.strip() == "[]"
        assert podman.run("run", "--rm", *NO_NETWORK, tag, "--version").returncode == 0
    finally:
        podman.run("rmi", "-f", tag, check=False)


COPY_IN = ROOT / "docs" / "examples" / "copy-in" / "job-with-sidecars.yaml"


def test_copy_in_runs_podpatterns_in_an_app_image_without_python(
    podman: Engine,
    images: dict[str, str],
    base: str,
    postgres: PostgresServer,
    tmp_path: Path,
) -> None:
    """docs/examples/copy-in: an init container copies podpatterns into an emptyDir, and
    an app image with no Python and no dynamic loader runs `run` and `wait` from it; the
    Job's exit code stands and the helpers exit on its tombstone."""
    app = build_local(podman, Path(__file__).with_name("staticapp.Containerfile"), base)
    absent = ("/lib64", "/lib", "/usr", "/podpatterns", "/bin/python3")
    found = podman.run(
        "run", "--rm", *NO_NETWORK, app, "sh", "-c",
        f"for p in {' '.join(absent)}; do [ -e $p ] && echo $p; done; true",
    )  # fmt: skip
    assert found.stdout.split() == []  # neither a loader, libraries nor Python
    listen, admin_a, admin_b = candidate_ports(3)
    manifest = podify(
        COPY_IN,
        images,
        app,
        examples.job_with_sidecars(f"{postgres.host}:{postgres.port}", listen, admin_a, admin_b, 3),
        tmp_path,
    )
    pod = pod_name("job-with-sidecars-copy-in")
    with kube_play(podman, manifest, tmp_path):
        main = f"{pod}-main"
        assert podman.wait_exited(main, 90) == 3, podman.logs(main)
        assert podman.wait_exited(f"{pod}-db-ambassador", 30) == 0
        assert podman.wait_exited(f"{pod}-log-adapter", 30) == 0
        adapter = podman.logs(f"{pod}-log-adapter")
        records = [r for r in json_lines(adapter) if "file_id" in r]
        shipped = [r.get("event") for r in records]
        assert shipped == ["report_started", "database_answered", "report_finished"]
        assert records[-1]["exit_code"] == 3
        names = events(podman, f"{pod}-log-adapter")
        assert names.index("exit_with_tombstone") < names.index("drain_finished"), names
    tombstone = json.loads((tmp_path / "volumes" / "pod-health" / "main.json").read_text())
    assert (tombstone["phase"], tombstone["exit_code"]) == ("exited", 3)
    tree = tmp_path / "volumes" / "podpatterns"
    size = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    print(f"copy-in: {size / 1e6:.1f} MB in the emptyDir")


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def https_server(ca: trustme.CA) -> Iterator[int]:
    """An HTTPS server on 127.0.0.1 (200 to every GET) with a certificate that ``ca``
    issued for 127.0.0.1, in a thread; yields its port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_copy_in_verifies_tls_in_an_app_image_without_ca_certificates(
    podman: Engine, images: dict[str, str], base: str, tmp_path: Path
) -> None:
    """In an app image with no CA certificates, the copied tree's podpatterns verifies
    TLS with the tree's own bundle, or with the app image's
    /etc/ssl/certs/ca-certificates.crt if it has one; SSL_CERT_FILE set in the container
    wins over both, and the app's command inherits no SSL_* variable from podpatterns."""
    app = build_local(podman, Path(__file__).with_name("staticapp.Containerfile"), base)
    tree = tmp_path / "podpatterns"
    tree.mkdir()
    tree.chmod(0o777)
    podman.run(
        "run", "--rm", *LOCKED_DOWN, *NO_NETWORK, "-v", f"{tree}:/copy",
        "--entrypoint", "/podpatterns/bin/podpatterns-copy-into", images["tools"], "/copy",
    )  # fmt: skip
    bundle = tree / "etc" / "ssl" / "ca-certificates.crt"
    assert bundle.read_text().count("BEGIN CERTIFICATE") > 100  # the builder's bundle
    # The tree's bundle and the app image's are each a CA of the test's own, so that
    # verifying the server of one CA shows which bundle was used.
    tree_ca, app_ca = trustme.CA(), trustme.CA()
    tree_ca.cert_pem.write_to_path(str(bundle))
    app_bundle = tmp_path / "app-ca.pem"
    app_ca.cert_pem.write_to_path(str(app_bundle))

    def wait_for(port: int, *options: str, timeout: str = "20s") -> tuple[int, str, str]:
        done = podman.run(
            "run", "--rm", "--network", "host", *LOCKED_DOWN,
            "-v", f"{tree}:/podpatterns:ro", *options, app,
            "/podpatterns/bin/podpatterns", "wait", f"--for=https://127.0.0.1:{port}/",
            f"--timeout={timeout}", "--", "/bin/env",
            check=False,
        )  # fmt: skip
        return done.returncode, done.stdout, done.stderr

    with https_server(tree_ca) as tree_port, https_server(app_ca) as app_port:
        code, env, err = wait_for(tree_port)
        assert code == 0, err
        assert "SSL_" not in env
        code, _, err = wait_for(app_port, timeout="2s")
        assert code != 0 and "CERTIFICATE_VERIFY_FAILED" in err, err
        # the app image's own bundle, where it keeps one, is used instead of the tree's
        app_mount = ("-v", f"{app_bundle}:/etc/ssl/certs/ca-certificates.crt:ro")
        code, _, err = wait_for(app_port, *app_mount)
        assert code == 0, err
        code, _, err = wait_for(tree_port, *app_mount, timeout="2s")
        assert code != 0 and "CERTIFICATE_VERIFY_FAILED" in err, err
        # an explicit SSL_CERT_FILE is not overridden (here: one without the tree's CA)
        code, _, err = wait_for(tree_port, "-e", "SSL_CERT_FILE=/nonexistent.pem", timeout="2s")
        assert code != 0 and "CERTIFICATE_VERIFY_FAILED" in err, err


def test_stdlib_all_keeps_the_whole_standard_library(
    podman: Engine, images: dict[str, str], base: str
) -> None:
    """--build-arg STDLIB=all (docs/images.md: for transforms that import other standard
    modules) keeps modules the default subset leaves out, and stays within 60 MB."""
    probe = (
        "import importlib.util as u\n"
        "names = ('sqlite3', 'xml.etree.ElementTree', 'zoneinfo', 'unicodedata', 'tomllib')\n"
        "print([n for n in names if u.find_spec(n) is None])\n"
        "import sqlite3, unicodedata, xml.etree.ElementTree as et\n"
        "print(sqlite3.connect(':memory:').execute('select 1').fetchone()[0],"
        " unicodedata.name('a'), et.fromstring('<a/>').tag)\n"
    )
    lean = podman.run(
        "run", "--rm", *NO_NETWORK, "--entrypoint", "python3", images["tools"], "-c",
        "import importlib.util as u; print(u.find_spec('sqlite3') is None)",
    )  # fmt: skip
    assert lean.stdout.strip() == "True"  # the default subset has no sqlite3: the probe can fail
    tag = "localhost/podpatterns-tools-stdlib-all:test"
    try:
        build(podman, "tools", base, tag, "--build-arg", "STDLIB=all")
        size = podman.size(tag)
        print(f"image sizes (MB): {tag} {size / 1e6:.1f}")
        assert size <= MAX_IMAGE_BYTES, size
        done = podman.run(
            "run", "--rm", *LOCKED_DOWN, *NO_NETWORK, "--entrypoint", "python3", tag, "-c", probe
        )
        assert done.stdout.split("\n")[:2] == ["[]", "1 LATIN SMALL LETTER A a"], done.stdout
    finally:
        podman.run("rmi", "-f", tag, check=False)


@contextlib.contextmanager
def grpc_health_server() -> Iterator[int]:
    """A real gRPC server with the standard health service, SERVING, on 127.0.0.1."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def test_tools_with_the_grpc_extra(podman: Engine, base: str) -> None:
    """EXTRAS=grpc: the slimmed tree keeps what grpcio imports, the image stays within
    60 MB, and `wait --for grpc://` passes against a real gRPC health server."""
    tag = "localhost/podpatterns-tools-grpc:test"
    try:
        build(podman, "tools", base, tag, "--build-arg", "EXTRAS=grpc")
        size = podman.size(tag)
        print(f"image sizes (MB): {tag} {size / 1e6:.1f}")
        assert size <= MAX_IMAGE_BYTES, size
        with grpc_health_server() as port:
            done = podman.run(
                "run", "--rm", "--network", "host", *LOCKED_DOWN, tag,
                "wait", f"--for=grpc://127.0.0.1:{port}", "--timeout=20s",
                "--", "python3", "-c", "print('serving')",
            )  # fmt: skip
        assert done.stdout.strip() == "serving", done.stderr
    finally:
        podman.run("rmi", "-f", tag, check=False)
