"""A real container engine for the end-to-end tests, set up by the tests themselves.

What works on a Debian 12 machine without a registry (../shared/CONTAINERS.md):
podman with runc, pointed at a containers.conf this module writes (crun fails in hybrid
cgroups, and the default rlimits cannot be raised); a base image made with debootstrap
from the machine's own apt mirror and imported; pip inside ``podman build`` reaching the
index with the machine's CA bundle mounted into the build.

Nothing is installed here: ``./dev test`` installs podman, runc, catatonit and
debootstrap. A missing tool, or not being root, skips locally and fails under ``CI=true``
(tests.peers).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.peers import missing, need
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
CONTAINERFILE = ROOT / "images" / "Containerfile"
APP_CONTAINERFILE = Path(__file__).with_name("app.Containerfile")
VERSION: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
TARGETS = ("ambassador", "adapter", "tools")
BASE = "localhost/podpatterns-base:test"
# pip on this machine may trust its own CA bundle (TLS to the index is intercepted here).
DEFAULT_CA = Path("/etc/ssl/certs/ca-certificates.crt")
LABEL = "podpatterns.test=e2e"  # on every image the tests build, to prune their leftovers
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=16384:16384", "nproc=32768:32768"]
[engine]
runtime = "runc"
"""
BUILD_TIMEOUT = 600.0


def image(target: str) -> str:
    """The local name of the image of ``target`` (what the manifests call it)."""
    return f"localhost/podpatterns-{target}:{VERSION}"


def debug_image(target: str) -> str:
    """The local name of the -debug variant of ``target`` (the image plus busybox)."""
    return f"{image(target)}-debug"


@dataclass(frozen=True)
class Engine:
    """podman, run with the project's containers.conf."""

    binary: str
    conf: Path

    def run(
        self, *args: str | Path, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``podman ARGS``; raises with podman's stderr when ``check`` and it fails."""
        done = subprocess.run(
            [self.binary, *map(str, args)],
            env={**os.environ, "CONTAINERS_CONF": str(self.conf)},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            command = " ".join(map(str, args))
            raise RuntimeError(f"podman {command} exited {done.returncode}:\n{done.stderr}")
        return done

    def exists(self, tag: str) -> bool:
        """True when the image ``tag`` is in local storage."""
        return self.run("image", "exists", tag, check=False).returncode == 0

    def inspect(self, kind: str, name: str) -> dict[str, Any]:
        """``podman KIND inspect NAME`` as a dict."""
        found = json.loads(self.run(kind, "inspect", name).stdout)
        # a list of one for containers and images; `pod inspect` of podman 4 gives the dict
        return found[0] if isinstance(found, list) else found  # type: ignore[no-any-return]

    def size(self, tag: str) -> int:
        """The size in bytes of image ``tag``, as ``podman images`` reports it."""
        return int(self.inspect("image", tag)["Size"])

    def logs(self, container: str) -> str:
        """Everything ``container`` wrote to stdout and stderr so far."""
        done = self.run("logs", container, check=False)
        return done.stdout + done.stderr

    def state(self, container: str) -> dict[str, Any]:
        """The ``State`` of ``container`` (Status, ExitCode, ...)."""
        state: dict[str, Any] = self.inspect("container", container)["State"]
        return state

    def wait_exited(self, container: str, timeout: float) -> int:
        """The exit code of ``container`` once it has exited.

        Raises:
            AssertionError: it still runs after ``timeout`` seconds.
        """

        def exited() -> tuple[int] | None:  # a tuple: exit code 0 is a result
            state = self.state(container)
            done = state["Status"] in ("exited", "stopped")
            return (int(state["ExitCode"]),) if done else None

        [code] = wait_until(exited, f"{container} to exit", timeout)
        return code


def engine(workdir: Path) -> Engine:
    """podman with a containers.conf in ``workdir``; skip (fail under CI) if missing."""
    if os.geteuid() != 0:
        missing("the end-to-end tests run rootful podman: root needed")
    binary = need("podman")
    need("runc")
    need("catatonit")  # podman builds the Pod's infra ("pause") image from it
    conf = workdir / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    return Engine(binary, conf)


def apt_mirror() -> str:
    """The Debian mirror apt on this machine uses for bookworm (never a hard-coded host)."""
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields: dict[str, str] = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.M))
            if "bookworm" in fields.get("Suites", "").split() and "URIs" in fields:
                return fields["URIs"].split()[0]
    for path in [Path("/etc/apt/sources.list"), *sorted(sources.glob("*.list"))]:
        if path.exists():
            found = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", path.read_text(), re.M)
            if found:
                return found.group(1)
    raise RuntimeError("no Debian bookworm mirror in /etc/apt/sources.list{,.d}")


def ensure_base(podman: Engine) -> str:
    """The local base image (python3 and venv on Debian 12), made once with debootstrap."""
    if podman.exists(BASE):
        return BASE
    debootstrap = need("debootstrap")
    with tempfile.TemporaryDirectory(prefix="podpatterns-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        done = subprocess.run(
            [
                debootstrap,
                "--variant=minbase",
                "--include=python3,python3-venv",
                "bookworm",
                str(rootfs),
                apt_mirror(),
            ],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"debootstrap exited {done.returncode}:\n{done.stdout[-4000:]}")
        # What a slim image leaves out too: documentation, locales, apt's caches.
        for junk in ("usr/share/doc", "usr/share/man", "usr/share/info", "var/lib/apt/lists"):
            for child in (rootfs / junk).glob("*"):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                [podman.binary, "import", "-", BASE],
                stdin=tar.stdout,
                env={**os.environ, "CONTAINERS_CONF": str(podman.conf)},
                capture_output=True,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait(timeout=60)
        if imported.returncode != 0:
            raise RuntimeError(f"podman import failed:\n{imported.stderr.decode()}")
    return BASE


def pip_ca() -> Path:
    """The CA bundle pip on this machine is configured with (``pip config``), if any."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.cert"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = Path(done.stdout.strip()) if done.returncode == 0 else DEFAULT_CA
    return found if found.is_file() else DEFAULT_CA


def podman_build(
    podman: Engine, containerfile: Path, context: Path, tag: str, *args: str | Path
) -> str:
    """``podman build`` with the host's network and the tests' label (see :func:`prune`);
    ``args`` are more build options. Returns ``tag``."""
    podman.run(
        "build",
        "--quiet",
        "--network",
        "host",
        "--label",
        LABEL,
        "--file",
        containerfile,
        *args,
        "--tag",
        tag,
        context,
        timeout=BUILD_TIMEOUT,
    )
    return tag


def build(podman: Engine, target: str, base: str, tag: str | None = None, *args: str) -> str:
    """Build ``target`` of images/Containerfile on ``base``; return its local name
    (``tag``, by default the name the manifests use). ``args`` are more build options.

    VERSION is not passed: the Containerfile's default must be the package's version
    (its builder stage checks), and the tests check the label.
    """
    return podman_build(
        podman,
        CONTAINERFILE,
        ROOT,
        tag or image(target),
        "--target",
        target,
        "--build-arg",
        f"BASE={base}",
        # pip reads PIP_CERT from the environment: the build argument becomes one
        "--volume",
        f"{pip_ca()}:/etc/ssl/certs/host-ca.crt:ro",
        "--build-arg",
        "PIP_CERT=/etc/ssl/certs/host-ca.crt",
        *args,
    )


def build_local(podman: Engine, containerfile: Path, base: str) -> str:
    """An image of the tests' own (``tests/e2e/NAME.Containerfile``) on ``base``.

    Built once per content of the file: its hash is the tag.
    """
    digest = hashlib.sha256(containerfile.read_bytes()).hexdigest()[:12]
    name = containerfile.name.removesuffix(".Containerfile")
    tag = f"localhost/podpatterns-test{name}:{digest}"
    if not podman.exists(tag):
        podman_build(
            podman, containerfile, containerfile.parent, tag, "--build-arg", f"BASE={base}"
        )
    return tag


def build_app(podman: Engine, base: str) -> str:
    """The stand-in application image: nginx and the PostgreSQL client on ``base``."""
    return build_local(podman, APP_CONTAINERFILE, base)


def prune(podman: Engine) -> None:
    """Remove the untagged images earlier builds of the tests left behind."""
    podman.run("image", "prune", "--force", "--filter", f"label={LABEL}", check=False)


@contextlib.contextmanager
def kube_play(podman: Engine, manifest: str, workdir: Path) -> Iterator[Path]:
    """``podman kube play`` the manifest text; ``podman kube down`` it on every exit path."""
    path = workdir / "pod.yaml"
    path.write_text(manifest)
    try:
        podman.run("kube", "play", path, timeout=180)
        yield path
    finally:
        podman.run("kube", "down", path, check=False, timeout=120)
