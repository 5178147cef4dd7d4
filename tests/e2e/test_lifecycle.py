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
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.e2e import examples
from tests.e2e.engine import VERSION, Engine
from tests.e2e.examples import LateServer
from tests.e2e.kubelet_rules import Pod, Timeline
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
from tests.peers import PostgresServer, candidate_ports
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
    with Pod(podman, name, spec, ours, app_image, volumes, env_from) as running:
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
    assert passed.seq < running.seq, f"{container} started at {running.t}, before {passed}"


def assert_completed_before(tl: Timeline, init: str, container: str) -> None:
    """The init container ``init`` exited 0 before ``container`` started."""
    done = tl.first(init, "exited", code=0)
    running = tl.first(container, "running")
    assert running is not None, f"{container} never started"
    assert done is not None and done.seq < running.seq, f"{container} started before {init} ended"


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
    assert deleting is not None, "the Pod was not deleted"
    deadline = deleting.t + deleting.detail["grace"]
    last_exit = deleting.seq
    for name in [*apps, *reversed(sidecars)]:
        term = tl.first(name, "signal", signal="TERM")
        exits = tl.events(name, "exited")
        assert term is not None and exits, f"{name} was not stopped"
        code = exits[-1].detail["code"]
        assert code == 0, f"{name} exited {code}"
        assert exits[-1].t <= deadline, f"{name} outlived the grace period"
        if name in sidecars:
            assert term.seq > last_exit, f"{name} got SIGTERM before the containers due first"
            last_exit = exits[-1].seq
        else:
            last_exit = max(last_exit, exits[-1].seq)
    assert not tl.events(kind="signal", signal="KILL")


def delete_and_check(pod: Pod, apps: list[str], sidecars: list[str]) -> None:
    """Delete ``pod``; check the stop order (:func:`assert_stopped_in_order`) and that
    every probe answered in time (:func:`assert_probes_in_time`)."""
    pod.delete()
    assert_stopped_in_order(pod.timeline, apps, sidecars)
    assert_probes_in_time(pod.timeline)


# -- the examples -----------------------------------------------------------------------


Emulate = Callable[..., contextlib.AbstractContextManager[Pod]]


@pytest.fixture
def emulate(podman: Engine, images: dict[str, str], app_image: str, tmp_path: Path) -> Emulate:
    """``emulate(example, replace, pod=None, edit=None)``: :func:`emulated` with the
    engine, the images and the test's directory."""
    return partial(emulated, podman, images, app_image, workdir=tmp_path)


@pytest.mark.timeout(600)
def test_adapter_stdout(emulate: Emulate) -> None:
    """nginx starts once the adapter's startupProbe passed; requests made up to the
    deletion are all shipped, as nginx is stopped first and the adapter only after it."""
    http, admin = candidate_ports(2)
    marker = f"/e2e-{secrets.token_hex(6)}"
    with emulate("adapter-stdout.yaml", examples.nginx_and_sidecar(http, admin)) as pod:
        tl = pod.timeline
        tl.wait_for("nginx", "ready", START)
        tl.wait_for("log-adapter", "ready", START)
        assert_gated(tl, "nginx", "log-adapter")
        for _ in range(3):
            assert status(http, marker) == 404
        # deleted at once: the last requests may not be shipped yet
        delete_and_check(pod, apps=["nginx"], sidecars=["log-adapter"])
        shipped = [r for r in json_lines(pod.logs("log-adapter")) if r.get("path") == marker]
        assert len(shipped) == 3, shipped


def assert_first_query_answered(log: str) -> None:
    """psql's very first attempt succeeded: a row, and no error before it."""
    assert log.strip(), "psql printed nothing yet"
    first = log.strip().splitlines()[0]
    assert "error" not in log, log
    assert re.match(r"\s*\d{4}-\d\d-\d\d ", first), log  # now(): a timestamp


@pytest.mark.timeout(600)
def test_ambassador_postgres(
    emulate: Emulate, pg_ca: trustme.CA, postgres_tls: PostgresServer
) -> None:
    """The app starts once the ambassador's /startupz is 200, so even its first query
    reaches the TLS-only database; on deletion the app stops first, then the ambassador."""
    listen, admin = candidate_ports(2)
    replace = examples.ambassador_postgres(postgres_tls, pg_ca, listen, admin)
    with emulate("ambassador-postgres.yaml", replace) as pod:
        tl = pod.timeline
        wait_until(
            lambda: TLS_ROW.search(pod.logs("app")), "a query answered over TLS", within=START
        )
        assert_gated(tl, "app", "db-ambassador")
        assert_first_query_answered(pod.logs("app"))
        tl.wait_for("db-ambassador", "ready", START)
        delete_and_check(pod, apps=["app"], sidecars=["db-ambassador"])


@pytest.mark.timeout(600)
def test_job_with_sidecars(emulate: Emulate, postgres: PostgresServer) -> None:
    """The Job's Pod completes with nobody deleting it: main exits 3, the helpers see its
    tombstone and exit 0 on their own, no signal sent; the adapter shipped the report."""
    listen, admin_a, admin_b = candidate_ports(3)
    database = f"{postgres.host}:{postgres.port}"
    replace = examples.job_with_sidecars(database, listen, admin_a, admin_b, exit_code=3)
    with emulate("job-with-sidecars.yaml", replace) as pod:
        tl = pod.timeline
        tl.wait_for(None, "completed", START)
        codes = {c: tl.events(c, "exited")[-1].detail["code"] for c in pod.containers}
        assert codes == {"main": 3, "db-ambassador": 0, "log-adapter": 0}
        assert not tl.events(kind="signal")
        assert_probes_in_time(tl)
        records = [r for r in json_lines(pod.logs("log-adapter")) if "file_id" in r]
        shipped = [r.get("event") for r in records]
        assert shipped == ["report_started", "database_answered", "report_finished"], shipped


@pytest.fixture
def late_database(postgres: PostgresServer) -> Iterator[LateServer]:
    """The real PostgreSQL, reachable on a port of its own only once ``open()``ed."""
    with LateServer(postgres.port) as server:
        yield server


def startup_ordering(database: LateServer, postgres: PostgresServer) -> dict[str, str]:
    """startup-ordering.yaml against ``database``, logging in as ``postgres``'s user."""
    listen, admin_a, admin_b = candidate_ports(3)
    return examples.startup_ordering(
        f"127.0.0.1:{database.port}",
        listen,
        admin_a,
        admin_b,
        user=postgres.user,
        dbname=postgres.database,
    )


@pytest.mark.timeout(600)
def test_startup_ordering_native_sidecar(
    emulate: Emulate, postgres: PostgresServer, late_database: LateServer
) -> None:
    """Two gates: the ambassador's startupProbe, then the init container waiting for its
    /readyz; the app starts only once the database answers, so its first query does."""
    replace = startup_ordering(late_database, postgres)
    with emulate("startup-ordering.yaml", replace, pod="startup-ordering") as pod:
        tl = pod.timeline
        tl.wait_for("wait-for-database", "running", START)
        # the database is down: the ambassador is not ready, and nothing more starts
        tl.wait_for("db-ambassador", "probe", START, probe="readiness", ok=False)
        assert tl.first("app", "running") is None
        late_database.open()
        tl.wait_for("app", "running", START)
        assert_gated(tl, "wait-for-database", "db-ambassador")
        assert_completed_before(tl, "wait-for-database", "app")
        wait_until(lambda: pod.logs("app").strip(), "the app's first query", within=START)
        assert_first_query_answered(pod.logs("app"))
        tl.wait_for("db-ambassador", "ready", START)
        delete_and_check(pod, apps=["app"], sidecars=["db-ambassador"])


@pytest.mark.timeout(600)
def test_startup_ordering_records(
    emulate: Emulate, postgres: PostgresServer, late_database: LateServer
) -> None:
    """Plain containers all start at once; the app's command runs only once db-health
    has recorded the database ready; on deletion all get SIGTERM at once and exit 0."""
    replace = startup_ordering(late_database, postgres)
    with emulate("startup-ordering.yaml", replace, pod="startup-ordering-records") as pod:
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
        delete_and_check(pod, apps=["db-ambassador", "db-health", "app"], sidecars=[])


@pytest.mark.timeout(600)
def test_health_records(emulate: Emulate, tmp_path: Path) -> None:
    """pod-health's startupProbe passes before web and worker exist (its own record),
    so they start; worker is 503 while it warms up, then every container turns ready;
    on deletion worker leaves a tombstone with exit code 0."""
    http, admin = candidate_ports(2)
    with emulate("health-records.yaml", examples.health_records(http, admin)) as pod:
        tl = pod.timeline
        for name in ("web", "worker", "pod-health"):
            tl.wait_for(name, "ready", START)
        assert_gated(tl, "web", "pod-health")
        assert_gated(tl, "worker", "pod-health")
        warming = tl.first("worker", "probe", probe="readiness", ok=False)
        ready = tl.first("worker", "ready")
        assert warming is not None and ready is not None and warming.seq < ready.seq
        delete_and_check(pod, apps=["web", "worker"], sidecars=["pod-health"])
    tombstone = json.loads((tmp_path / "volumes" / "pod-health" / "worker.json").read_text())
    assert (tombstone["phase"], tombstone["exit_code"]) == ("exited", 0)


@pytest.mark.timeout(600)
def test_config_reload(emulate: Emulate, tmp_path: Path) -> None:
    """reload is watching before nginx starts; a ConfigMap swap reaches nginx; nginx
    stops first, then reload; every container exits 0."""
    http, admin = candidate_ports(2)
    conf_dir = tmp_path / "volumes" / "nginx-conf"
    with emulate("config-reload.yaml", examples.nginx_and_sidecar(http, admin)) as pod:
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
        delete_and_check(pod, apps=["nginx"], sidecars=["config-reload"])


# -- the checks can fail ----------------------------------------------------------------


def _without_wait_gate(spec: dict[str, Any]) -> None:
    spec["initContainers"] = [c for c in spec["initContainers"] if c["name"] != "wait-for-database"]


@pytest.mark.timeout(600)
def test_mutation_app_without_the_wait_gate_queries_too_early(
    emulate: Emulate, postgres: PostgresServer, late_database: LateServer
) -> None:
    """startup-ordering without its wait-for-database init container: the app starts
    while the database is down, and the check of its first query fails."""
    replace = startup_ordering(late_database, postgres)
    with emulate(
        "startup-ordering.yaml", replace, pod="startup-ordering", edit=_without_wait_gate
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
def test_mutation_failing_liveness_restarts_the_container(emulate: Emulate) -> None:
    """health-records with the worker's liveness probe aimed at a record nobody writes:
    the emulation kills and restarts the worker, and the probe check fails."""
    http, admin = candidate_ports(2)
    replace = examples.health_records(http, admin)
    with emulate("health-records.yaml", replace, edit=_worker_liveness_fails) as pod:
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
def test_mutation_grace_period_too_short_ends_in_sigkill(emulate: Emulate) -> None:
    """adapter-stdout with a grace period shorter than the adapter's shutdown: the
    emulation SIGKILLs the adapter at the deadline, and the stop check fails."""
    http, admin = candidate_ports(2)
    replace = examples.nginx_and_sidecar(http, admin)
    with emulate("adapter-stdout.yaml", replace, edit=_grace_too_short) as pod:
        tl = pod.timeline
        tl.wait_for("nginx", "running", START)
        pod.delete()
        assert tl.first("log-adapter", "signal", signal="KILL") is not None
        assert tl.events("log-adapter", "exited")[-1].detail["code"] == 137
        with pytest.raises(AssertionError):
            assert_stopped_in_order(tl, apps=["nginx"], sidecars=["log-adapter"])


def _timeline(*events: tuple[str | None, str, dict[str, Any]]) -> Timeline:
    tl = Timeline()
    for container, kind, detail in events:
        tl.add(container, kind, **detail)
    return tl


def test_each_check_fails_on_a_timeline_that_breaks_its_rule() -> None:
    """The timeline checks above, given events in a forbidden order, fail."""
    startup_ok: dict[str, Any] = {"probe": "startup", "ok": True, "result": "200"}
    with pytest.raises(AssertionError, match="before"):
        assert_gated(_timeline(("app", "running", {}), ("amb", "probe", startup_ok)), "app", "amb")
    with pytest.raises(AssertionError, match="before"):
        assert_completed_before(
            _timeline(("app", "running", {}), ("init", "exited", {"code": 0})), "init", "app"
        )
    with pytest.raises(AssertionError):
        late = {"probe": "readiness", "ok": False, "result": "timeout (200 after 1.2s)"}
        assert_probes_in_time(_timeline(("app", "probe", late)))
    stop: list[tuple[str | None, str, dict[str, Any]]] = [
        (None, "deleting", {"grace": 30}),
        ("amb", "signal", {"signal": "TERM"}),  # the sidecar first: wrong
        ("app", "signal", {"signal": "TERM"}),
        ("app", "exited", {"code": 0}),
        ("amb", "exited", {"code": 0}),
    ]
    with pytest.raises(AssertionError, match="amb got SIGTERM before"):
        assert_stopped_in_order(_timeline(*stop), apps=["app"], sidecars=["amb"])
    stop[1:3] = [stop[2], stop[1]]  # TERM to both before the app exited: still wrong
    with pytest.raises(AssertionError, match="amb got SIGTERM before"):
        assert_stopped_in_order(_timeline(*stop), apps=["app"], sidecars=["amb"])
    stop[1:4] = [stop[1], stop[3], stop[2]]  # the app, its exit, then the sidecar: right
    assert_stopped_in_order(_timeline(*stop), apps=["app"], sidecars=["amb"])


@pytest.mark.timeout(300)
def test_tcp_and_exec_probes(podman: Engine, app_image: str, tmp_path: Path) -> None:
    """The probe handlers no example uses: a tcpSocket readiness probe and an exec
    liveness probe (run with ``podman exec``) pass against a plain HTTP server, after
    its httpGet startup probe; an exec probe that exits 1 counts as a failure."""
    [port] = candidate_ports(1)
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": 2,
        "containers": [
            {
                "name": "web",
                "image": "stand-in",
                "command": ["python3", "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                "ports": [{"name": "http", "containerPort": port}],
                "startupProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
                "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 1},
                "livenessProbe": {"exec": {"command": ["test", "-d", "/"]}, "periodSeconds": 1},
            },
            {
                "name": "broken",
                "image": "stand-in",
                "command": ["sleep", "60"],
                "readinessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1},
            },
        ],
    }
    with Pod(podman, pod_name("probes"), spec, {}, app_image, {}, {}) as pod:
        tl = pod.timeline
        tl.wait_for("web", "ready", START)
        tl.wait_for("web", "probe", START, probe="liveness", ok=True, result="exit 0")
        tl.wait_for("broken", "probe", START, probe="readiness", ok=False, result="exit 1")
        started = tl.first("web", "started")
        passed = tl.first("web", "probe", probe="startup", ok=True)
        assert started is not None and passed is not None and passed.seq < started.seq
        assert tl.first("broken", "ready") is None
