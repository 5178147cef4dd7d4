"""``podpatterns inspect`` in a debug container joined to a running container's network
and PID namespaces (``podman run --pid container:X --network container:X``), the way
``kubectl debug --target`` joins an ephemeral container to a Pod.

The target runs the tools image as its non-root user: ``podpatterns run`` supervising an
ambassador, with the default admin address (``0.0.0.0:9901``) in a network namespace of
its own (``--network none``: loopback only), and its health directory on a tmpfs the
debug container does not mount. inspect must find both processes from ``/proc``, ask the
admin server it works out from the defaults, and read the record through
``/proc/PID/root``; run as another user, it must say what is missing instead.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator

import pytest

from tests.e2e.engine import Engine, build
from tests.waiting import wait_until

RUN = secrets.token_hex(3)
USER = "65532"  # the images' user


@pytest.fixture(scope="module")
def tools(podman: Engine, base: str) -> Iterator[str]:
    """The tools image built from this checkout, under a tag of this module's own."""
    tag = build(podman, "tools", base, tag=f"localhost/podpatterns-tools:inspect-{RUN}")
    yield tag
    podman.run("image", "rm", "--force", tag, check=False)


@pytest.fixture
def target(podman: Engine, tools: str) -> Iterator[str]:
    """A running container: ``run`` supervising an ambassador, record in a tmpfs."""
    name = f"inspect-target-{RUN}"
    podman.run(
        "run", "--detach", "--name", name, "--network", "none", "--user", USER,
        "--mount", "type=tmpfs,destination=/shared/health,tmpfs-mode=1777",
        tools,
        "run", "--health-dir", "/shared/health", "--name", "app", "--",
        "podpatterns", "ambassador", "--listen", "127.0.0.1:15432",
        "--upstream", "127.0.0.1:5432", "--health-dir", "/shared/health",
    )  # fmt: skip
    try:
        wait_until(lambda: '"admin_listening"' in podman.logs(name) or None, "ambassador admin up")
        yield name
    finally:
        podman.run("rm", "--force", "--time", "0", name, check=False)


def debug(podman: Engine, tools: str, target: str, *args: str, user: str = USER) -> tuple[int, str]:
    """``podpatterns inspect ARGS`` in a debug container joined to ``target``."""
    done = podman.run(
        "run", "--rm", "--pid", f"container:{target}", "--network", f"container:{target}",
        "--user", user, tools, "inspect", *args,
        check=False,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, done.stdout


def test_inspect_in_a_debug_container_sees_the_targets_processes_admin_and_records(
    podman: Engine, tools: str, target: str
) -> None:
    """Exit 0: both podpatterns processes found, the ambassador's admin server (from the
    default address) ready, the record read through /proc/PID/root."""

    def healthy() -> str | None:
        code, out = debug(podman, tools, target, "--json")
        return out if code == 0 else None

    out = wait_until(healthy, "inspect exit 0", within=60)
    report = json.loads(out)
    commands = sorted(p["command"] for p in report["processes"])
    assert commands == ["ambassador", "run"], report["processes"]
    (admin,) = report["admins"]
    assert admin["url"] == "http://127.0.0.1:9901" and admin["readyz"] == 200
    (route,) = admin["status"]["components"]["ambassador"]["routes"]
    assert route["listen"] == "127.0.0.1:15432"
    (health,) = report["health"]
    assert health["dir"] == "/shared/health"
    assert health["path"].startswith("/proc/") and health["path"].endswith("/root/shared/health")
    assert health["records"]["app"]["state"] == "ready"
    _, text = debug(podman, tools, target)
    assert "all healthy" in text and "admin http://127.0.0.1:9901" in text


def test_inspect_as_another_user_prints_what_is_missing(
    podman: Engine, tools: str, target: str
) -> None:
    """As another user, /proc/PID/root is refused: exit 1, both uids named, and the
    custom profile that runs as the target's user and mounts the volume."""
    code, out = debug(podman, tools, target, user="12345")
    assert code == 1, out
    assert "inspect runs as uid 12345, the target as uid 65532" in out
    profile = json.loads(out.split("with profile.json:\n", 1)[1].splitlines()[0])
    assert profile["securityContext"]["runAsUser"] == 65532
    assert profile["volumeMounts"][0]["mountPath"] == "/shared/health"
