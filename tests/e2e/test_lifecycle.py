"""The Pod manifests of docs/examples/, run by the kubelet's documented rules.

podman 4.3 runs neither native sidecars nor probes, so ``test_pods.py`` runs the examples
with their sidecars as plain containers and their probes dropped. Here
:mod:`tests.e2e.kubelet_rules`, an emulation of the documented rules (not a kubelet),
runs each example with its init containers, sidecars, probes and termination order,
and the tests assert what each example promises on the recorded timeline and on what
the containers did. The examples' own probe periods and thresholds are used unchanged.

Each manifest is changed only as ``test_pods.py`` changes it (images, addresses and
ports, each replacement asserted to match); the mutation tests at the end break a copy
in one way each and show that the assertion meant to catch it does.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import secrets
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.e2e.engine import VERSION, Engine
from tests.e2e.kubelet_rules import Pod, Timeline, running_pod
from tests.e2e.test_pods import (
    EXAMPLES,
    TLS_ROW,
    http_get,
    json_lines,
    manifest_documents,
    pod_name,
    podify_volumes,
    status,
)
from tests.kubelet import configmap_write
from tests.peers import PG_SERVER_NAME, PostgresServer, candidate_ports
from tests.waiting import wait_until

pytest_plugins = ("tests.peer_fixtures",)

START = 90.0  # seconds for a Pod's containers to start and turn ready on a loaded machine

Edit = Callable[[dict[str, Any]], None]


@contextlib.contextmanager
def emulated(
    podman: Engine,
    images: dict[str, str],
    app_image: str,
    example: str,
    replace: dict[str, str],
    workdir: Path,
    pod: str | None = None,
    edit: Edit | None = None,
) -> Iterator[Pod]:
    """The Pod of ``example`` (``pod`` picks one of several) run by the emulated rules.

    ``edit`` changes the Pod's spec first (the mutation tests). On a failure the Pod's
    timeline is added to the error.
    """
    docs, secrets_data, configmaps = manifest_documents(EXAMPLES / example, replace)
    [doc] = [d for d in docs if d["kind"] == "Pod" and pod in (None, d["metadata"]["name"])]
    spec = copy.deepcopy(doc["spec"])
    if edit is not None:
        edit(spec)
    podify_volumes(spec, workdir / "volumes", configmaps, secrets_data)
    volumes = {v["name"]: Path(v["hostPath"]["path"]) for v in spec.get("volumes", [])}
    ours = {f"podpatterns-{target}:{VERSION}": tag for target, tag in images.items()}
    name = pod_name(doc["metadata"]["name"])
    env_from = {**secrets_data, **configmaps}
    with running_pod(podman, name, spec, ours, app_image, volumes, env_from) as running:
        try:
            yield running
        except AssertionError as exc:
            exc.add_note(f"timeline of {name}:\n{running.timeline}")
            raise


# -- what the examples promise, checked on a timeline ------------------------------------


def assert_gated(tl: Timeline, container: str, gate: str) -> None:
    """``container`` started only after the sidecar ``gate``'s startup probe succeeded."""
    passed = tl.first(gate, "probe", probe="startup", ok=True)
    running = tl.first(container, "running")
    assert running is not None, f"{container} never started"
    assert passed is not None, f"{gate} has no startup probe that succeeded"
    assert passed.t <= running.t, f"{container} started at {running.t}, before {passed}"


def assert_completed_before(tl: Timeline, init: str, container: str) -> None:
    """The init container ``init`` exited 0 before ``container`` started."""
    done = tl.first(init, "exited", code=0)
    running = tl.first(container, "running")
    assert running is not None, f"{container} never started"
    assert done is not None and done.t <= running.t, f"{container} started before {init} ended"


def assert_probes_in_time(tl: Timeline) -> None:
    """Every probe got an answer within its timeoutSeconds, and no startup or liveness
    probe reached its failure threshold (which would have restarted a container)."""
    late = [e for e in tl.events(kind="probe") if str(e.detail["result"]).startswith("timeout")]
    assert not late, late
    assert not tl.events(kind="probe_failed")
    assert not tl.events(kind="restarting")


def assert_stopped_in_order(tl: Timeline, apps: list[str], sidecars: list[str]) -> None:
    """On deletion: SIGTERM to the app containers first; each sidecar's SIGTERM only once
    they have all exited, in reverse order of start (``sidecars`` in start order); every
    container exited 0 within the grace period, and none needed a SIGKILL."""
    deleting = tl.first(None, "deleting")
    assert deleting is not None
    deadline = deleting.t + deleting.detail["grace"]
    last_exit = deleting.t
    for name in [*apps, *reversed(sidecars)]:
        term = tl.first(name, "signal", signal="TERM")
        exited = tl.events(name, "exited")
        assert term is not None and exited, f"{name} was not stopped"
        assert exited[-1].detail["code"] == 0, f"{name} exited {exited[-1].detail['code']}"
        assert exited[-1].t <= deadline, f"{name} outlived the grace period"
        if name in sidecars:
            assert term.t >= last_exit, f"{name} got SIGTERM before its predecessors exited"
            last_exit = exited[-1].t
    for name in apps:
        last_exit = max(last_exit, tl.events(name, "exited")[-1].t)
    assert not tl.events(kind="signal", signal="KILL")


# -- the examples -----------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_adapter_stdout(
    podman: Engine, images: dict[str, str], app_image: str, tmp_path: Path
) -> None:
    """nginx starts once the adapter's startupProbe passed; requests made up to the
    deletion are all shipped, as nginx is stopped first and the adapter only after it."""
    http, admin = candidate_ports(2)
    replace = {
        "listen 8080;": f"listen 127.0.0.1:{http};",
        "containerPort: 8080": f"containerPort: {http}",
        "--admin=0.0.0.0:9901": f"--admin=127.0.0.1:{admin}",
        "containerPort: 9901": f"containerPort: {admin}",
    }
    marker = f"/e2e-{secrets.token_hex(6)}"
    with emulated(podman, images, app_image, "adapter-stdout.yaml", replace, tmp_path) as pod:
        tl = pod.timeline
        tl.wait_for("nginx", "ready", START)
        tl.wait_for("log-adapter", "ready", START)
        assert_gated(tl, "nginx", "log-adapter")
        for _ in range(3):
            assert status(http, marker) == 404
        pod.delete()  # at once: the last requests may not be shipped yet
        assert_stopped_in_order(tl, apps=["nginx"], sidecars=["log-adapter"])
        assert_probes_in_time(tl)
        shipped = [r for r in json_lines(pod.logs("log-adapter")) if r.get("path") == marker]
        assert len(shipped) == 3, shipped


@pytest.mark.timeout(600)
def test_ambassador_postgres(
    podman: Engine,
    images: dict[str, str],
    app_image: str,
    pg_ca: trustme.CA,
    postgres_tls: PostgresServer,
    tmp_path: Path,
) -> None:
    """The app starts once the ambassador's /startupz is 200, so even its first query
    reaches the TLS-only database; on deletion the app stops first, then the ambassador."""
    server = postgres_tls
    assert server.password is not None
    listen, admin = candidate_ports(2)
    ca_pem = "".join(f"    {line}\n" for line in pg_ca.cert_pem.bytes().decode().splitlines())
    replace = {
        "db.example.internal:5432": f"{server.host}:{server.port}",
        "- --tls-ca=/etc/db-tls/ca.crt\n": "- --tls-ca=/etc/db-tls/ca.crt\n"
        f"        - --tls-server-name={PG_SERVER_NAME}\n",
        "    -----BEGIN CERTIFICATE-----\n"
        "    REPLACE-WITH-THE-DATABASE-CA-CERTIFICATE\n"
        "    -----END CERTIFICATE-----\n": ca_pem,
        "--listen=127.0.0.1:5432": f"--listen=127.0.0.1:{listen}",
        "--admin=0.0.0.0:9901": f"--admin=127.0.0.1:{admin}",
        "containerPort: 9901": f"containerPort: {admin}",
        'value: "5432"': f'value: "{listen}"',
        "PGUSER: app": f"PGUSER: {server.user}",
        "PGPASSWORD: change-me": f"PGPASSWORD: {server.password}",
        "PGDATABASE: app": f"PGDATABASE: {server.database}",
    }
    with emulated(podman, images, app_image, "ambassador-postgres.yaml", replace, tmp_path) as pod:
        tl = pod.timeline
        wait_until(
            lambda: TLS_ROW.search(pod.logs("app")), "a query answered over TLS", within=START
        )
        assert_gated(tl, "app", "db-ambassador")
        assert_first_query_answered(pod.logs("app"))
        tl.wait_for("db-ambassador", "ready", START)
        pod.delete()
        assert_stopped_in_order(tl, apps=["app"], sidecars=["db-ambassador"])
        assert_probes_in_time(tl)


def assert_first_query_answered(log: str) -> None:
    """psql's very first attempt succeeded: a row, and no error before it."""
    assert log.strip(), "psql printed nothing yet"
    first = log.strip().splitlines()[0]
    assert "error" not in log, log
    assert re.match(r"\s*\d{4}-\d\d-\d\d ", first), log  # now(): a timestamp


@pytest.mark.timeout(600)
def test_job_with_sidecars(
    podman: Engine,
    images: dict[str, str],
    app_image: str,
    postgres: PostgresServer,
    tmp_path: Path,
) -> None:
    """The Job's Pod completes with nobody deleting it: main exits 3, the helpers see its
    tombstone and exit 0 on their own, no signal sent; the adapter shipped the report."""
    listen, admin_a, admin_b = candidate_ports(3)
    replace = {
        "db.example.internal:5432": "DATABASE",  # before every other 5432 is replaced
        "5432": str(listen),
        "DATABASE": f"{postgres.host}:{postgres.port}",
        "0.0.0.0:9901": f"127.0.0.1:{admin_a}",
        "containerPort: 9901": f"containerPort: {admin_a}",
        "0.0.0.0:9902": f"127.0.0.1:{admin_b}",
        "containerPort: 9902": f"containerPort: {admin_b}",
        'value: "0"': 'value: "3"',
    }
    with emulated(podman, images, app_image, "job-with-sidecars.yaml", replace, tmp_path) as pod:
        tl = pod.timeline
        tl.wait_for(None, "completed", START)
        codes = {c: tl.events(c, "exited")[-1].detail["code"] for c in pod.containers}
        assert codes == {"main": 3, "db-ambassador": 0, "log-adapter": 0}
        assert not tl.events(kind="signal")
        assert_probes_in_time(tl)
        records = [r for r in json_lines(pod.logs("log-adapter")) if "file_id" in r]
        shipped = [r.get("event") for r in records]
        assert shipped == ["report_started", "database_answered", "report_finished"], shipped


class Forwarder:
    """A TCP relay from 127.0.0.1:``port`` to a real server on ``target``, listening only
    from :meth:`open` on: the database "comes up" when the test says so."""

    def __init__(self, target: int) -> None:
        self.port = candidate_ports(1)[0]
        self.target = target
        self._stop = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []

    def open(self) -> None:
        """Start accepting connections."""
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.2)
        self._spawn(self._accept)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            self._sockets += [client, server]
            self._spawn(self._pump, client, server)
            self._spawn(self._pump, server, client)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Stop accepting, close every connection, join the threads."""
        self._stop.set()
        for sock in [*self._sockets, *([self._listener] if self._listener else [])]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=10)


@pytest.fixture
def late_database(postgres: PostgresServer) -> Iterator[Forwarder]:
    """The real PostgreSQL, reachable on a port of its own only once ``open()``ed."""
    forwarder = Forwarder(postgres.port)
    yield forwarder
    forwarder.close()


def startup_ordering(database: Forwarder, postgres: PostgresServer) -> tuple[dict[str, str], int]:
    """The replacements of startup-ordering.yaml, and the ambassador's admin port."""
    listen, admin_a, admin_b = candidate_ports(3)
    return {
        "db.example.internal:5432": f"127.0.0.1:{database.port}",
        "--listen=127.0.0.1:5432": f"--listen=127.0.0.1:{listen}",
        '{name: PGPORT, value: "5432"}': f'{{name: PGPORT, value: "{listen}"}}',
        '("127.0.0.1", 5432)': f'("127.0.0.1", {listen})',
        "{name: PGUSER, value: app}": f"{{name: PGUSER, value: {postgres.user}}}",
        "{name: PGDATABASE, value: app}": f"{{name: PGDATABASE, value: {postgres.database}}}",
        "0.0.0.0:9901": f"127.0.0.1:{admin_a}",
        "containerPort: 9901": f"containerPort: {admin_a}",
        "http://127.0.0.1:9901/readyz": f"http://127.0.0.1:{admin_a}/readyz",
        "0.0.0.0:9902": f"127.0.0.1:{admin_b}",
        "containerPort: 9902": f"containerPort: {admin_b}",
    }, admin_a


def start_ordering_pod(pod: Pod, database: Forwarder) -> None:
    """Hold the database back until the ambassador's readiness probe has failed for
    want of it; then open it and wait for the app's process."""
    tl = pod.timeline
    tl.wait_for("wait-for-database", "running", START)
    tl.wait_for("db-ambassador", "probe", START, probe="readiness", ok=False)
    assert tl.first("app", "running") is None
    database.open()
    tl.wait_for("app", "running", START)


@pytest.mark.timeout(600)
def test_startup_ordering_native_sidecar(
    podman: Engine,
    images: dict[str, str],
    app_image: str,
    postgres: PostgresServer,
    late_database: Forwarder,
    tmp_path: Path,
) -> None:
    """Two gates: the ambassador's startupProbe, then the init container waiting for its
    /readyz; the app starts only once the database answers, so its first query does."""
    replace, _ = startup_ordering(late_database, postgres)
    with emulated(
        podman,
        images,
        app_image,
        "startup-ordering.yaml",
        replace,
        tmp_path,
        pod="startup-ordering",
    ) as pod:
        tl = pod.timeline
        start_ordering_pod(pod, late_database)
        assert_gated(tl, "wait-for-database", "db-ambassador")
        assert_completed_before(tl, "wait-for-database", "app")
        wait_until(lambda: pod.logs("app").strip(), "the app's first query", within=START)
        assert_first_query_answered(pod.logs("app"))
        tl.wait_for("db-ambassador", "ready", START)
        pod.delete()
        assert_stopped_in_order(tl, apps=["app"], sidecars=["db-ambassador"])
        assert_probes_in_time(tl)


@pytest.mark.timeout(600)
def test_startup_ordering_records(
    podman: Engine,
    images: dict[str, str],
    app_image: str,
    postgres: PostgresServer,
    late_database: Forwarder,
    tmp_path: Path,
) -> None:
    """Plain containers all start at once; the app's command runs only once db-health
    has recorded the database ready; on deletion all get SIGTERM at once and exit 0."""
    replace, _ = startup_ordering(late_database, postgres)
    with emulated(
        podman,
        images,
        app_image,
        "startup-ordering.yaml",
        replace,
        tmp_path,
        pod="startup-ordering-records",
    ) as pod:
        tl = pod.timeline
        tl.wait_for("db-health", "probe", START, probe="readiness", ok=False)
        assert "database answered" not in pod.logs("app")
        late_database.open()
        tl.wait_for("db-health", "ready", START)
        wait_until(
            lambda: "database answered" in pod.logs("app") or None,
            "the app reached the database",
            within=START,
        )
        assert "unreachable" not in pod.logs("app")
        pod.delete()
        assert_stopped_in_order(tl, apps=["db-ambassador", "db-health", "app"], sidecars=[])
        assert_probes_in_time(tl)


@pytest.mark.timeout(600)
def test_health_records(
    podman: Engine, images: dict[str, str], app_image: str, tmp_path: Path
) -> None:
    """pod-health's startupProbe passes before web and worker exist (its own record),
    so they start; worker is 503 while it warms up, then every container turns ready;
    on deletion worker leaves a tombstone with exit code 0."""
    http, admin = candidate_ports(2)
    replace = {
        "listen 8080;": f"listen 127.0.0.1:{http};",
        "http://127.0.0.1:8080/healthz": f"http://127.0.0.1:{http}/healthz",
        "containerPort: 8080": f"containerPort: {http}",
        "--admin=0.0.0.0:9901": f"--admin=127.0.0.1:{admin}",
        "9901": str(admin),  # containerPort and the probes of web and worker
    }
    with emulated(podman, images, app_image, "health-records.yaml", replace, tmp_path) as pod:
        tl = pod.timeline
        for name in ("web", "worker", "pod-health"):
            tl.wait_for(name, "ready", START)
        assert_gated(tl, "web", "pod-health")
        assert_gated(tl, "worker", "pod-health")
        warming = tl.first("worker", "probe", probe="readiness", ok=False)
        ready = tl.first("worker", "ready")
        assert warming is not None and ready is not None and warming.t < ready.t
        pod.delete()
        assert_stopped_in_order(tl, apps=["web", "worker"], sidecars=["pod-health"])
        assert_probes_in_time(tl)
    tombstone = json.loads((tmp_path / "volumes" / "pod-health" / "worker.json").read_text())
    assert (tombstone["phase"], tombstone["exit_code"]) == ("exited", 0)


@pytest.mark.timeout(600)
def test_config_reload(
    podman: Engine, images: dict[str, str], app_image: str, tmp_path: Path
) -> None:
    """reload is watching before nginx starts; a ConfigMap swap reaches nginx; nginx
    stops first, then reload; every container exits 0."""
    http, admin = candidate_ports(2)
    replace = {
        "listen 8080;": f"listen 127.0.0.1:{http};",
        "containerPort: 8080": f"containerPort: {http}",
        "--admin=0.0.0.0:9901": f"--admin=127.0.0.1:{admin}",
        "containerPort: 9901": f"containerPort: {admin}",
    }
    conf_dir = tmp_path / "volumes" / "nginx-conf"
    with emulated(podman, images, app_image, "config-reload.yaml", replace, tmp_path) as pod:
        tl = pod.timeline
        tl.wait_for("nginx", "ready", START)
        tl.wait_for("config-reload", "ready", START)
        assert_gated(tl, "nginx", "config-reload")
        assert http_get(http, "/version") == (200, b"v1\n")
        conf = (conf_dir / "nginx.conf").read_text()
        configmap_write(conf_dir, 2, {"nginx.conf": conf.replace('"v1\\n"', '"v2\\n"')})
        wait_until(
            lambda: http_get(http, "/version") == (200, b"v2\n") or None,
            "nginx serving the new config",
            within=START,
        )
        pod.delete()
        assert_stopped_in_order(tl, apps=["nginx"], sidecars=["config-reload"])
        assert_probes_in_time(tl)


# -- the assertions can fail ------------------------------------------------------------


def _without_wait_gate(spec: dict[str, Any]) -> None:
    spec["initContainers"] = [c for c in spec["initContainers"] if c["name"] != "wait-for-database"]


@pytest.mark.timeout(600)
def test_mutation_app_without_the_wait_gate_queries_too_early(
    podman: Engine,
    images: dict[str, str],
    app_image: str,
    postgres: PostgresServer,
    late_database: Forwarder,
    tmp_path: Path,
) -> None:
    """startup-ordering without its wait-for-database init container: the app starts
    while the database is down, and the check of its first query fails."""
    replace, _ = startup_ordering(late_database, postgres)
    with emulated(
        podman,
        images,
        app_image,
        "startup-ordering.yaml",
        replace,
        tmp_path,
        pod="startup-ordering",
        edit=_without_wait_gate,
    ) as pod:
        tl = pod.timeline
        tl.wait_for("app", "running", START)
        assert_gated(tl, "app", "db-ambassador")  # the first gate still holds
        wait_until(lambda: pod.logs("app").strip(), "the app's first query", within=START)
        with pytest.raises(AssertionError):
            assert_first_query_answered(pod.logs("app"))


def _worker_liveness_fails(spec: dict[str, Any]) -> None:
    [worker] = [c for c in spec["containers"] if c["name"] == "worker"]
    probe = worker["livenessProbe"]
    probe["httpGet"]["path"] = "/livez/nobody"  # no such record: never live
    probe.update(periodSeconds=1, failureThreshold=2)


@pytest.mark.timeout(600)
def test_mutation_failing_liveness_restarts_the_container(
    podman: Engine, images: dict[str, str], app_image: str, tmp_path: Path
) -> None:
    """health-records with the worker's liveness probe aimed at a record nobody writes:
    the emulation kills and restarts the worker, and the probe check fails."""
    http, admin = candidate_ports(2)
    replace = {
        "listen 8080;": f"listen 127.0.0.1:{http};",
        "http://127.0.0.1:8080/healthz": f"http://127.0.0.1:{http}/healthz",
        "containerPort: 8080": f"containerPort: {http}",
        "--admin=0.0.0.0:9901": f"--admin=127.0.0.1:{admin}",
        "9901": str(admin),
    }
    with emulated(
        podman,
        images,
        app_image,
        "health-records.yaml",
        replace,
        tmp_path,
        edit=_worker_liveness_fails,
    ) as pod:
        tl = pod.timeline
        tl.wait_for("worker", "probe_failed", START, probe="liveness")
        tl.wait_for("worker", "signal", START, signal="TERM")
        tl.wait_for("worker", "running", START, attempt=2)  # after the 10 s back-off
        with pytest.raises(AssertionError):
            assert_probes_in_time(tl)


def _grace_too_short(spec: dict[str, Any]) -> None:
    spec["terminationGracePeriodSeconds"] = 1
    [adapter] = spec["initContainers"]
    adapter["args"].append("--shutdown-delay=10s")  # longer than any grace it gets


@pytest.mark.timeout(600)
def test_mutation_grace_period_too_short_ends_in_sigkill(
    podman: Engine, images: dict[str, str], app_image: str, tmp_path: Path
) -> None:
    """adapter-stdout with a grace period shorter than the adapter's shutdown: the
    emulation SIGKILLs the adapter at the deadline, and the stop check fails."""
    http, admin = candidate_ports(2)
    replace = {
        "listen 8080;": f"listen 127.0.0.1:{http};",
        "containerPort: 8080": f"containerPort: {http}",
        "--admin=0.0.0.0:9901": f"--admin=127.0.0.1:{admin}",
        "containerPort: 9901": f"containerPort: {admin}",
    }
    with emulated(
        podman,
        images,
        app_image,
        "adapter-stdout.yaml",
        replace,
        tmp_path,
        edit=_grace_too_short,
    ) as pod:
        tl = pod.timeline
        tl.wait_for("nginx", "running", START)
        pod.delete()
        assert tl.first("log-adapter", "signal", signal="KILL") is not None
        assert tl.events("log-adapter", "exited")[-1].detail["code"] == 137
        with pytest.raises(AssertionError):
            assert_stopped_in_order(tl, apps=["nginx"], sidecars=["log-adapter"])
