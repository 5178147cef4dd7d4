"""The images: what they contain, how they run locked down, and PID 1 behaviour.

Each image is built from images/Containerfile on the local base, then run by podman the
way a restrictive Pod runs it: a read-only root filesystem, every capability dropped,
no privilege escalation, the image's own numeric user.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.engine import BASE, ROOT, VERSION, Engine, build, build_local, podman_build
from tests.peers import candidate_ports
from tests.waiting import wait_until

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
# What the builder stage adds on top of the base: the virtual environment (~36 MB).
MAX_ADDED_BYTES = 64 * 2**20


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
def test_image_has_no_installer_or_compiler(
    podman: Engine, images: dict[str, str], target: str
) -> None:
    """Neither pip (in the venv or the base interpreter) nor a compiler is in the image."""
    probe = (
        "import importlib.util, os, shutil, subprocess, sys\n"
        "found = [n for n in ('pip', 'pip3', 'gcc', 'cc', 'g++') if shutil.which(n)]\n"
        "found += [m for m in ('pip', 'ensurepip', 'setuptools', 'wheel')"
        " if importlib.util.find_spec(m)]\n"
        "found += ['python-wheels'] if os.path.exists('/usr/share/python-wheels') else []\n"
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


def test_image_sizes(podman: Engine, images: dict[str, str]) -> None:
    """What the images add to the base stays small (the venv, no build tools)."""
    base = podman.size(BASE)
    for target, tag in images.items():
        added = podman.size(tag) - base
        assert 0 < added < MAX_ADDED_BYTES, (target, added)


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
    """The tools image's args: ``sh -c SCRIPT`` under `podpatterns run`, record ``main``."""
    return ("run", "--health-dir", "/run/pod", "--name", "main", "--", "sh", "-c", script)


# The orphan is a grandchild whose parent exits at once: it is re-parented to PID 1.
# The checker (exec'd, so it never reaps) follows it until its /proc entry is gone
# ("reaped"); only at the deadline does it report what it still is ("zombie" or
# "still-running"): a slow reaper is waited for, not mistaken for none.
ZOMBIE_SCRIPT = """
sh -c 'sleep 0.2 & echo $! > /run/pod/orphan; exit 0'
exec python3 -c '
import time
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
'
"""


def test_run_as_pid1_reaps_orphans(podman: Engine, images: dict[str, str], tmp_path: Path) -> None:
    """`podpatterns run` as PID 1 reaps orphaned grandchildren; a plain PID 1 does not."""
    health = health_volume(tmp_path)
    common = ("--rm", *LOCKED_DOWN, *NO_NETWORK, "-v", f"{health}:/run/pod")
    supervised = podman.run("run", *common, images["tools"], *run_as_main(ZOMBIE_SCRIPT))
    assert "orphan=reaped" in supervised.stdout
    # The control: the same script as PID 1 itself leaves the orphan a zombie, so the
    # assertion above can fail.
    bare = podman.run("run", *common, "--entrypoint", "sh", images["tools"], "-c", ZOMBIE_SCRIPT)
    assert "orphan=zombie" in bare.stdout
    record = json.loads((health / "main.json").read_text())
    assert record["phase"] == "exited"
    assert record["exit_code"] == 0


SIGNAL_SCRIPT = """
trap 'echo got-HUP' HUP
trap 'echo got-TERM; exit 7' TERM
echo started
while :; do sleep 0.1; done
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
            "run", "--rm", *NO_NETWORK, "--entrypoint", "/usr/bin/python3", tag, "-c",
            "import importlib.util as u;"
            "print([m for m in ('pip', 'ensurepip') if u.find_spec(m)])",
        )  # fmt: skip
        assert done.stdout.strip() == "[]"
        assert podman.run("run", "--rm", *NO_NETWORK, tag, "--version").returncode == 0
    finally:
        podman.run("rmi", "-f", tag, check=False)
