"""The Pod manifests of docs/examples/, run for real by ``podman kube play``.

Each test takes a manifest as users copy it and changes only what a laptop-sized engine
needs, in :func:`podify`:

- the images become the ones built from this checkout (``postgres:15`` and ``nginx`` become
  a local stand-in with the PostgreSQL client and nginx);
- addresses and ports are replaced, each replacement asserted to match, so a manifest that
  changes under the test fails it instead of silently testing something else. The Pod
  shares the machine's network (``hostNetwork``) so traffic stays on loopback, and the
  external database is a real PostgreSQL on 127.0.0.1;
- podman 4.3 has no native sidecars and no Jobs: sidecars (``initContainers`` with
  ``restartPolicy: Always``) become ordinary containers, and a Job becomes its Pod
  template. Secrets are inlined as environment variables;
- ``emptyDir`` volumes become host directories with the mode a kubelet gives an emptyDir
  (0777): podman creates them owned by root and 0755, and ignores ``fsGroup``, so the
  images' non-root user could not write them;
- ``configMap`` volumes become host directories laid out the way the kubelet writes them
  (a ``..data`` symlink swapped atomically on update), which a test can update the same
  way (podman copies the files once);
- the kubelet's probes are dropped (podman would run them with curl inside the container);
  the tests call the same endpoints from outside instead. ``ports`` go too: podman
  refuses port mappings on the host network.

Then each test checks behaviour from outside: what the app and the helpers logged, what
the admin endpoints answer, and the exit codes after a SIGTERM to the whole Pod.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from tests.e2e import examples
from tests.e2e.engine import ROOT, VERSION, Engine, kube_play
from tests.e2e.examples import LateServer
from tests.kubelet import configmap_write
from tests.peers import PostgresServer, candidate_ports
from tests.waiting import wait_until

pytest_plugins = ("tests.peer_fixtures",)

EXAMPLES = ROOT / "docs" / "examples"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
STOP_TIMEOUT = 40  # seconds podman gives the Pod's containers after SIGTERM
#: a row of the app's query in ambassador-postgres.yaml (psql's aligned output): the
#: server address, then pg_stat_ssl.ssl of the app's own backend, ``t`` for TLS
TLS_ROW = re.compile(r"\| 127\.0\.0\.1\s+\| t\s*$", re.MULTILINE)


RUN = secrets.token_hex(3)


def pod_name(name: str) -> str:
    """The name a manifest's Pod ``name`` runs under: unique to this test session, so two
    sessions on one machine (or a leftover of a killed one) never meet."""
    return f"{name}-{RUN}"


def podify(
    path: Path,
    images: dict[str, str],
    app: str,
    replace: dict[str, str],
    workdir: Path,
    pod: str | None = None,
) -> str:
    """The manifest at ``path`` made runnable by ``podman kube play`` (module docstring).

    ``workdir`` holds the directories that stand in for the volumes (``workdir/volumes/
    NAME``); ``pod`` picks one Pod of a file that has several.
    """
    docs, secret_env, configmaps = manifest_documents(path, replace)
    out: list[dict[str, Any]] = []
    for doc in docs:
        if doc["kind"] == "Pod":
            if pod is not None and doc["metadata"]["name"] != pod:
                continue
            doc["metadata"]["name"] = pod_name(doc["metadata"]["name"])
            _podify_spec(doc["spec"], images, app, secret_env)
            podify_volumes(doc["spec"], workdir / "volumes", configmaps, secret_env)
        out.append(doc)
    return yaml.safe_dump_all(out, sort_keys=False)


def manifest_documents(
    path: Path, replace: dict[str, str]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """The documents of the manifest at ``path`` with the ``replace``ments made (each one
    asserted to match), a Job turned into its Pod; apart, the data of its Secrets and
    ConfigMaps by name, which podman cannot take as documents."""
    text = path.read_text()
    for old, new in replace.items():
        assert old in text, f"{path.name} no longer contains {old!r}: update this test"
        text = text.replace(old, new)
    docs = [d for d in yaml.safe_load_all(text) if d]
    secrets_data = {
        d["metadata"]["name"]: d.get("stringData", {}) for d in docs if d["kind"] == "Secret"
    }
    configmaps = {
        d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"
    }
    out: list[dict[str, Any]] = []
    for doc in docs:
        if doc["kind"] in ("Secret", "ConfigMap"):
            continue
        if doc["kind"] == "Job":
            template = copy.deepcopy(doc["spec"]["template"])
            doc = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {**template.get("metadata", {}), "name": doc["metadata"]["name"]},
                "spec": template["spec"],
            }
        out.append(doc)
    return out, secrets_data, configmaps


def _podify_spec(
    spec: dict[str, Any], images: dict[str, str], app: str, secret_env: dict[str, dict[str, str]]
) -> None:
    init = spec.pop("initContainers", [])
    sidecars = [c for c in init if c.get("restartPolicy") == "Always"]
    if rest := [c for c in init if c not in sidecars]:
        spec["initContainers"] = rest
    spec["containers"] = [*sidecars, *spec["containers"]]
    spec["hostNetwork"] = True
    ours = {f"podpatterns-{target}:{VERSION}": tag for target, tag in images.items()}
    for container in [*spec["containers"], *spec.get("initContainers", [])]:
        container.pop("restartPolicy", None)
        container["image"] = ours.get(container["image"], app)
        for probe in PROBES:
            container.pop(probe, None)
        container.pop("ports", None)  # podman refuses port mappings on the host network
        for source in container.pop("envFrom", []):
            values = secret_env[source["secretRef"]["name"]]
            container.setdefault("env", []).extend(
                {"name": k, "value": str(v)} for k, v in values.items()
            )


def podify_volumes(
    spec: dict[str, Any],
    root: Path,
    configmaps: dict[str, dict[str, str]],
    secret_data: dict[str, dict[str, str]],
) -> None:
    """Make each ``emptyDir``, ``configMap`` and ``secret`` volume of ``spec`` a
    ``hostPath`` on a directory ``root/NAME`` laid out as the kubelet would."""
    for volume in spec.get("volumes", []):
        path = root / volume["name"]
        if volume.pop("emptyDir", None) is not None:
            path.mkdir(parents=True)
            path.chmod(0o777)
        elif (source := volume.pop("configMap", None)) is not None:
            path.mkdir(parents=True)
            configmap_write(path, 1, configmaps[source["name"]])
        elif (source := volume.pop("secret", None)) is not None:
            # a Secret volume: its keys as files, readable as the kubelet's default 0644
            path.mkdir(parents=True)
            path.chmod(0o755)
            for key, value in secret_data[source["secretName"]].items():
                (path / key).write_text(str(value))
                (path / key).chmod(0o644)
        else:
            continue
        volume["hostPath"] = {"path": str(path), "type": "Directory"}


def http_get(port: int, path: str) -> tuple[int, bytes] | None:
    """Status and body of ``GET path`` on 127.0.0.1:port, or None when nothing answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), body
    except (OSError, ValueError, IndexError):
        return None


def status(port: int, path: str) -> int | None:
    """Just the status of ``GET path`` (None when nothing answers)."""
    got = http_get(port, path)
    return got[0] if got else None


def json_lines(text: str) -> Iterator[dict[str, Any]]:
    """The JSON objects among the lines of ``text`` (container logs mix streams)."""
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                yield value


def events(podman: Engine, container: str) -> list[str]:
    """The ``event`` names a podpatterns container logged, in order."""
    return [e["event"] for e in json_lines(podman.logs(container)) if "event" in e]


def stop_pod(podman: Engine, pod: str, sidecars: Sequence[str] = ()) -> None:
    """SIGTERM to the containers of ``pod`` in the kubelet's order when it deletes a Pod.

    The ordinary containers all at once, then the native ``sidecars`` one by one in
    reverse order. The infra container stays up meanwhile, as the kubelet's pause
    container does: ``podman pod stop`` may stop it first, and with
    ``shareProcessNamespace`` its exit (PID 1 of the shared namespace) SIGKILLs every
    other process of the Pod.
    """
    info = podman.inspect("pod", pod)
    infra = info.get("InfraContainerID")
    names = [c["Name"] for c in info["Containers"] if c["Id"] != infra]
    first = [n for n in names if n.removeprefix(f"{pod}-") not in sidecars]
    waves = [first, *([f"{pod}-{s}"] for s in reversed(sidecars))]
    for wave in waves:
        if wave:
            podman.run("stop", "--time", str(STOP_TIMEOUT), *wave, timeout=STOP_TIMEOUT + 30)


def assert_drained(podman: Engine, container: str) -> None:
    """``container`` (a podpatterns helper) drained on SIGTERM and exited 0, without its
    exit guard: a teardown that stalled exits 0 too, but logs which threads held it."""
    assert podman.wait_exited(container, 10) == 0, podman.logs(container)
    names = events(podman, container)
    assert "exit_stalled" not in names, podman.logs(container)
    assert "shutdown_requested" in names, names
    assert names.index("shutdown_requested") < names.index("drain_finished"), names


def test_ambassador_postgres(
    podman: Engine,
    images: dict[str, str],
    app_image: str,
    pg_ca: trustme.CA,
    postgres_tls: PostgresServer,
    tmp_path: Path,
) -> None:
    """psql in the app container, in plaintext to localhost, reaches a TLS-only SCRAM
    PostgreSQL through the ambassador, which verifies the server's certificate."""
    server = postgres_tls
    listen, admin = candidate_ports(2)
    manifest = podify(
        EXAMPLES / "ambassador-postgres.yaml",
        images,
        app_image,
        examples.ambassador_postgres(server, pg_ca, listen, admin),
        tmp_path,
    )
    pod = pod_name("ambassador-postgres")
    with kube_play(podman, manifest, tmp_path):
        # the app's first psql may race the ambassador's bind; it retries every 10 s.
        # `| t`: pg_stat_ssl.ssl of the app's own backend, so the server saw TLS
        try:
            wait_until(
                lambda: TLS_ROW.search(podman.logs(f"{pod}-app")),
                "a query answered over TLS through the ambassador",
                within=40,
            )
        except AssertionError as exc:
            logs = {c: podman.logs(f"{pod}-{c}") for c in ("app", "db-ambassador")}
            raise AssertionError(f"{exc}\n{logs}") from None
        app_log = podman.logs(f"{pod}-app")
        assert not re.search(r"\|\s*f\s*$", app_log, re.MULTILINE), app_log
        assert "FATAL" not in app_log, app_log
        routes = [
            e
            for e in json_lines(podman.logs(f"{pod}-db-ambassador"))
            if e.get("event") == "route_listening"
        ]
        assert [(r["protocol"], r["tls"]) for r in routes] == [("postgres", True)], routes
        assert status(admin, "/startupz") == 200
        assert status(admin, "/readyz") == 200
        metrics = http_get(admin, "/metrics")
        assert metrics is not None
        assert b"podpatterns_" in metrics[1]
        assert "connection_closed" in events(podman, f"{pod}-db-ambassador")
        stop_pod(podman, pod, sidecars=["db-ambassador"])
        assert podman.wait_exited(f"{pod}-app", 10) == 0
        assert_drained(podman, f"{pod}-db-ambassador")


def test_adapter_ships_nginx_access_logs(
    podman: Engine, images: dict[str, str], app_image: str, tmp_path: Path
) -> None:
    """nginx writes to the emptyDir; the adapter parses each line and ships JSON."""
    http, admin = candidate_ports(2)
    manifest = podify(
        EXAMPLES / "adapter-stdout.yaml",
        images,
        app_image,
        examples.nginx_and_sidecar(http, admin),
        tmp_path,
    )
    marker = f"/e2e-{secrets.token_hex(6)}"
    pod = pod_name("adapter-stdout")
    adapter = f"{pod}-log-adapter"
    with kube_play(podman, manifest, tmp_path):
        wait_until(lambda: status(http, "/") or None, "nginx answering", within=30)
        wait_until(lambda: status(admin, "/readyz") == 200 or None, "adapter ready", within=30)
        for _ in range(3):
            assert status(http, marker) == 404

        def shipped() -> list[dict[str, Any]] | None:
            found = [r for r in json_lines(podman.logs(adapter)) if r.get("path") == marker]
            return found if len(found) == 3 else None

        records = wait_until(shipped, "three parsed access-log records on stdout", within=30)
        for record in records:
            assert (record["method"], record["status"], record["remote_addr"]) == (
                "GET",
                404,
                "127.0.0.1",
            )
        stop_pod(podman, pod, sidecars=["log-adapter"])
        assert_drained(podman, adapter)


@pytest.mark.parametrize("exit_code", [0, 3])
def test_job_sidecars_exit_with_the_main_container(
    podman: Engine,
    images: dict[str, str],
    app_image: str,
    postgres: PostgresServer,
    tmp_path: Path,
    exit_code: int,
) -> None:
    """The Job's Pod completes: main's exit code stands, the helpers exit 0 on its tombstone."""
    listen, admin_a, admin_b = candidate_ports(3)
    upstream = f"{postgres.host}:{postgres.port}"
    manifest = podify(
        EXAMPLES / "job-with-sidecars.yaml",
        images,
        app_image,
        examples.job_with_sidecars(upstream, listen, admin_a, admin_b, exit_code),
        tmp_path,
    )
    pod = pod_name("job-with-sidecars")
    with kube_play(podman, manifest, tmp_path):
        assert podman.wait_exited(f"{pod}-main", 90) == exit_code, podman.logs(f"{pod}-main")
        assert podman.wait_exited(f"{pod}-db-ambassador", 30) == 0
        assert podman.wait_exited(f"{pod}-log-adapter", 30) == 0
        records = [r for r in json_lines(podman.logs(f"{pod}-log-adapter")) if "file_id" in r]
        shipped = [r.get("event") for r in records]
        # the adapter read the report to its end before it exited
        assert shipped == ["report_started", "database_answered", "report_finished"], shipped
        assert records[-1]["exit_code"] == exit_code
        for helper in ("db-ambassador", "log-adapter"):
            names = events(podman, f"{pod}-{helper}")
            assert names.index("exit_with_tombstone") < names.index("drain_finished"), names


def test_health_records_answer_503_then_200(
    podman: Engine, images: dict[str, str], app_image: str, tmp_path: Path
) -> None:
    """The aggregate endpoint: the worker's record is 503 while it warms up, then 200."""
    http, admin = candidate_ports(2)
    manifest = podify(
        EXAMPLES / "health-records.yaml",
        images,
        app_image,
        examples.health_records(http, admin),
        tmp_path,
    )
    pod = pod_name("health-records")
    with kube_play(podman, manifest, tmp_path):
        first = wait_until(lambda: status(admin, "/readyz/worker"), "health endpoint", within=30)
        assert first == 503  # the worker warms up for 5 s before its ready file appears
        assert status(admin, "/readyz") == 503  # so the Pod is not ready either
        wait_until(
            lambda: status(admin, "/readyz/worker") == 200 or None, "worker ready", within=30
        )
        wait_until(
            lambda: status(admin, "/readyz/web") == 200 or None, "web probed ready", within=30
        )
        wait_until(lambda: status(admin, "/readyz") == 200 or None, "Pod ready", within=30)
        got = http_get(admin, "/readyz")
        assert got is not None
        body = json.loads(got[1])
        assert body["status"] == "ok"
        assert {n: c["state"] for n, c in body["containers"].items()} == {
            "web": "ready",
            "worker": "ready",
        }
        record = json.loads((tmp_path / "volumes" / "pod-health" / "worker.json").read_text())
        assert record["phase"] == "ready"
        stop_pod(podman, pod, sidecars=["pod-health"])
        assert podman.wait_exited(f"{pod}-worker", 10) == 0
        assert_drained(podman, f"{pod}-pod-health")
    tombstone = json.loads((tmp_path / "volumes" / "pod-health" / "worker.json").read_text())
    assert (tombstone["phase"], tombstone["exit_code"]) == ("exited", 0)


def test_startup_ordering_app_waits_for_the_database(
    podman: Engine,
    images: dict[str, str],
    app_image: str,
    postgres: PostgresServer,
    tmp_path: Path,
) -> None:
    """The app starts only once the database is reachable through the ambassador.

    The second Pod of startup-ordering.yaml (without native sidecars); podman 4.3 cannot
    express the first, whose init container waits for a native sidecar.
    """
    listen, admin_a, admin_b = candidate_ports(3)
    pod = pod_name("startup-ordering-records")
    app = f"{pod}-app"
    # the real PostgreSQL, on a port of its own that answers only once opened
    with LateServer(postgres.port) as database:
        manifest = podify(
            EXAMPLES / "startup-ordering.yaml",
            images,
            app_image,
            examples.startup_ordering(f"127.0.0.1:{database.port}", listen, admin_a, admin_b),
            tmp_path,
            pod="startup-ordering-records",
        )
        with kube_play(podman, manifest, tmp_path):
            wait_until(lambda: status(admin_b, "/readyz/database"), "health endpoint", within=30)
            wait_until(lambda: status(admin_a, "/readyz"), "ambassador admin", within=30)
            # A few health checks and probes find no database. Lets time pass to prove
            # nothing turns ready without it; a slow machine runs fewer checks, which
            # weakens the check but cannot fail it.
            time.sleep(3)
            assert status(admin_a, "/readyz") == 503, podman.logs(f"{pod}-db-ambassador")
            assert status(admin_b, "/readyz/database") == 503
            assert "database answered" not in podman.logs(app)  # still waiting: not started
            database.open()
            wait_until(
                lambda: "database answered b'N'" in podman.logs(app) or None,
                "the app started and reached the database",
                within=30,
            )
            assert "unreachable" not in podman.logs(app)
            stop_pod(podman, pod)
            assert podman.wait_exited(app, 10) == 0
            assert_drained(podman, f"{pod}-db-ambassador")


def test_config_reload_from_a_configmap_swap(
    podman: Engine, images: dict[str, str], app_image: str, tmp_path: Path
) -> None:
    """A kubelet-style ConfigMap update reaches nginx through `podpatterns reload`."""
    http, admin = candidate_ports(2)
    manifest = podify(
        EXAMPLES / "config-reload.yaml",
        images,
        app_image,
        examples.nginx_and_sidecar(http, admin),
        tmp_path,
    )
    conf_dir = tmp_path / "volumes" / "nginx-conf"
    pod = pod_name("config-reload")
    with kube_play(podman, manifest, tmp_path):
        wait_until(lambda: http_get(http, "/version") or None, "nginx answering", within=30)
        assert http_get(http, "/version") == (200, b"v1\n")
        wait_until(lambda: status(admin, "/readyz") == 200 or None, "reload ready", within=30)
        conf = (conf_dir / "nginx.conf").read_text()
        assert 'return 200 "v1\\n";' in conf
        configmap_write(conf_dir, 2, {"nginx.conf": conf.replace('"v1\\n"', '"v2\\n"')})
        wait_until(
            lambda: http_get(http, "/version") == (200, b"v2\n") or None,
            "nginx serving the new config",
            within=30,
        )
        assert "reload_notified" in events(podman, f"{pod}-config-reload")
        stop_pod(podman, pod, sidecars=["config-reload"])
        assert_drained(podman, f"{pod}-config-reload")
