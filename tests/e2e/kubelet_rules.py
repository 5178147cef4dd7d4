"""An emulation, over podman, of the kubelet's documented rules for a Pod's lifecycle.

This is **not a kubelet**, and it proves nothing about any kubelet's code. podman 4.3
(``kube play``) runs neither native sidecars (init containers with
``restartPolicy: Always``) nor probes, so the examples' promises about start order,
probes and stop order could not be run. This driver runs each container of a Pod
manifest with ``podman run`` semantics inside a ``podman pod`` and applies, itself, the
rules the Kubernetes documentation states, recording what happened on a
:class:`Timeline` that tests assert on.

Rules applied, and where the documentation states them:

- Init containers run one at a time, in order, each to successful completion before
  the next starts; one that fails is restarted unless the Pod's ``restartPolicy`` is
  ``Never``, which fails the Pod.
  https://kubernetes.io/docs/concepts/workloads/pods/init-containers/
- An init container with ``restartPolicy: Always`` is a sidecar: the next init
  container starts once it is *started*, at once when it has no ``startupProbe``, else
  when its startup probe has succeeded. It runs on beside the app containers, is
  restarted whenever it exits, whatever the Pod's ``restartPolicy``, and has readiness
  and liveness probes.
  https://kubernetes.io/docs/concepts/workloads/pods/sidecar-containers/
- Then the app containers start, in the order of the list, without waiting for one
  another. https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/
- Probes: the first after ``initialDelaySeconds`` (default 0), then one every
  ``periodSeconds`` (10), each failing after ``timeoutSeconds`` (1);
  ``successThreshold`` (1) successes in a row make it succeed, ``failureThreshold`` (3)
  failures in a row make it fail. ``httpGet`` succeeds on a status from 200 to 399,
  ``tcpSocket`` when the connection is accepted, ``exec`` on exit status 0 and ``grpc``
  on ``SERVING``. Readiness and liveness probes run only once the startup probe has
  succeeded; a container is not ready until its readiness probe succeeds. A failed
  startup or liveness probe kills the container, which is then restarted according to
  its restart policy; a failed readiness probe only marks it not ready.
  https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#container-probes and
  https://kubernetes.io/docs/tasks/configure-pod-container/configure-liveness-readiness-startup-probes/#configure-probes
- Restarts: ``restartPolicy`` ``Always`` (the default), ``OnFailure`` or ``Never``, after
  an exponential back-off of 10 s, 20 s, 40 s... capped at 5 min.
  https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#restart-policy
- Deletion: the app containers (and a still running init container) get SIGTERM at
  once; each sidecar gets SIGTERM only once every app container has exited, one at a
  time, in the reverse order of their start. A container still running when
  ``terminationGracePeriodSeconds`` (30) since the deletion have passed gets SIGKILL;
  as in the kubelet's code (``minimumGracePeriodInSeconds``), a container is given at
  least 2 s after its SIGTERM. When every app container of a Pod whose
  ``restartPolicy`` is not ``Always`` has terminated, the sidecars are stopped the same
  way (the Pod completes).
  https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/#pod-termination and
  https://kubernetes.io/docs/concepts/workloads/pods/sidecar-containers/#sidecar-containers-and-pod-lifecycle

What it does as podman does it, not as a cluster would: the Pod shares the machine's
network (``hostNetwork``, traffic on loopback), so probes go to 127.0.0.1 and a probe's
``host`` is not supported; ``emptyDir``, ``configMap`` and ``secret`` volumes are host
directories; a restarted container is the same podman container started again (its
logs continue). What it does not do: resources (no limits are applied), image pulls,
``fsGroup`` ownership (emptyDirs are mode 0777 as a kubelet makes them), lifecycle
hooks (no example has one), ``valueFrom`` in env. A manifest field the driver does not
know is an error, so an example that grows one fails loudly instead of being run
without it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from tests.e2e.engine import Engine
from tests.manifests import _probe_port

T = TypeVar("T")

DEFAULT_GRACE = 30  # terminationGracePeriodSeconds when the Pod does not set it
MIN_GRACE = 2.0  # the kubelet's minimumGracePeriodInSeconds
BACKOFF_FIRST, BACKOFF_MAX = 10.0, 300.0  # the kubelet's container restart back-off
# `podman exec` itself takes a fraction of a second on a loaded machine: an exec probe's
# timeoutSeconds is measured on top of it.
EXEC_OVERHEAD = 2.0
KILL_WAIT = 30.0  # seconds a SIGKILLed container may take to be reported exited
PROBE_KINDS = {
    "startupProbe": "startup",
    "readinessProbe": "readiness",
    "livenessProbe": "liveness",
}

POD_FIELDS = {
    "containers",
    "initContainers",
    "volumes",
    "restartPolicy",
    "terminationGracePeriodSeconds",
    "shareProcessNamespace",
    "securityContext",
    "automountServiceAccountToken",  # no service account here to mount
    "hostNetwork",
}
CONTAINER_FIELDS = {
    "name",
    "image",
    "command",
    "args",
    "env",
    "envFrom",
    "ports",  # used to resolve a probe's named port; the Pod is on the host network
    "volumeMounts",
    "workingDir",
    "securityContext",
    "restartPolicy",
    "resources",  # not applied: no limits are emulated
    "imagePullPolicy",  # images are local
    *PROBE_KINDS,
}


class UnsupportedManifest(Exception):
    """The manifest uses a field the emulation does not apply."""


@dataclass(frozen=True)
class Event:
    """One thing that happened to a Pod.

    ``kind`` is one of: ``running`` (the container's process was started, ``attempt``
    counts from 1), ``started`` (the kubelet's ``started``: the startup probe succeeded,
    or the container has none), ``probe`` (one probe: ``probe``, ``ok``, ``result``,
    ``seconds``), ``ready``, ``not_ready``, ``probe_failed`` (a startup or liveness
    probe reached its failure threshold), ``signal`` (``signal``, ``reason``),
    ``exited`` (``code``), ``restarting`` (``delay``), and for the whole Pod
    (``container`` None): ``initialized``, ``deleting``, ``completed``, ``failed``,
    ``terminated``.
    """

    seq: int  # its place on the timeline: what the driver saw first comes first
    t: float  # seconds since the Pod was started
    container: str | None
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)


class Timeline:
    """The events of a Pod in the order they happened; waits are woken by each new one."""

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._cond = threading.Condition(threading.RLock())
        self._t0 = time.monotonic()

    def add(self, container: str | None, kind: str, **detail: Any) -> Event:
        """Record an event now."""
        with self._cond:
            t = round(time.monotonic() - self._t0, 3)
            event = Event(len(self._events), t, container, kind, detail)
            self._events.append(event)
            self._cond.notify_all()
            return event

    def events(
        self, container: str | None = None, kind: str | None = None, **detail: Any
    ) -> list[Event]:
        """The events matching every given field (``container=None`` matches any)."""
        with self._cond:
            return [
                e
                for e in self._events
                if (container is None or e.container == container)
                and (kind is None or e.kind == kind)
                and all(e.detail.get(k) == v for k, v in detail.items())
            ]

    def first(self, container: str | None, kind: str, **detail: Any) -> Event | None:
        """The first matching event, or None."""
        found = self.events(container, kind, **detail)
        return found[0] if found else None

    def wait(self, check: Callable[[], T | None], what: str, within: float | None) -> T:
        """Block until ``check()`` (called under the timeline's lock, after every new
        event) returns a true value; return it. ``within`` None waits for ever.

        Raises:
            AssertionError: ``within`` seconds passed first; names ``what``.
        """
        deadline = None if within is None else time.monotonic() + within
        with self._cond:
            while not (value := check()):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise AssertionError(f"waited {within:g}s for {what}\n{self}")
                self._cond.wait(left)
            return value

    def wait_for(self, container: str | None, kind: str, within: float, **detail: Any) -> Event:
        """The first event matching, once there is one (see :meth:`wait`)."""
        return self.wait(
            lambda: self.first(container, kind, **detail),
            f"{kind} of {container or 'the Pod'} {detail or ''}",
            within,
        )

    def __str__(self) -> str:
        with self._cond:
            return "\n".join(
                f"{e.t:8.3f} {e.container or '<pod>'} {e.kind} "
                f"{json.dumps(e.detail, default=str) if e.detail else ''}"
                for e in self._events
            )


@dataclass(frozen=True)
class Probe:
    """A container's probe, its fields with the documented defaults."""

    kind: str  # startup, readiness or liveness
    handler: str  # httpGet, tcpSocket, exec or grpc
    spec: dict[str, Any]
    port: int | None
    initial_delay: float
    period: float
    timeout: float
    success_threshold: int
    failure_threshold: int

    @classmethod
    def parse(cls, key: str, spec: dict[str, Any], container: dict[str, Any]) -> Probe:
        """The probe ``spec`` of ``container`` under ``key`` (``readinessProbe``...)."""
        handlers = [h for h in ("httpGet", "tcpSocket", "exec", "grpc") if h in spec]
        if len(handlers) != 1:
            raise UnsupportedManifest(f"{container['name']}.{key}: one handler expected")
        handler = handlers[0]
        body = spec[handler]
        if handler in ("httpGet", "tcpSocket") and body.get("host"):
            raise UnsupportedManifest(f"{container['name']}.{key}: host is not emulated")
        port = None if handler == "exec" else _probe_port(container, body["port"])
        if handler != "exec" and port is None:
            raise UnsupportedManifest(f"{container['name']}.{key}: no port {body['port']!r}")
        return cls(
            kind=PROBE_KINDS[key],
            handler=handler,
            spec=body,
            port=port,
            initial_delay=float(spec.get("initialDelaySeconds", 0)),
            period=float(spec.get("periodSeconds", 10)),
            timeout=float(spec.get("timeoutSeconds", 1)),
            success_threshold=int(spec.get("successThreshold", 1)),
            failure_threshold=int(spec.get("failureThreshold", 3)),
        )


def run_probe(podman: Engine, container: str, probe: Probe) -> tuple[bool, str]:
    """One probe, as the kubelet runs it: ``(succeeded, what was seen)``."""
    try:
        if probe.handler == "httpGet":
            return _http_probe(probe)
        if probe.handler == "tcpSocket":
            assert probe.port is not None
            with socket.create_connection(("127.0.0.1", probe.port), timeout=probe.timeout):
                return True, "connected"
        if probe.handler == "exec":
            done = podman.run(
                "exec",
                container,
                *probe.spec["command"],
                check=False,
                timeout=probe.timeout + EXEC_OVERHEAD,
            )
            return done.returncode == 0, f"exit {done.returncode}"
        return _grpc_probe(probe)
    except subprocess.TimeoutExpired:
        return False, "timeout"
    except TimeoutError:
        return False, "timeout"
    except (OSError, http.client.HTTPException) as exc:
        return False, f"{type(exc).__name__}: {exc}"


def _http_probe(probe: Probe) -> tuple[bool, str]:
    assert probe.port is not None
    scheme = probe.spec.get("scheme", "HTTP")
    if scheme == "HTTPS":  # the kubelet does not verify the certificate
        import ssl

        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            "127.0.0.1", probe.port, timeout=probe.timeout, context=context
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", probe.port, timeout=probe.timeout)
    headers = {"User-Agent": "kube-probe/1.29", "Accept": "*/*"}
    headers |= {h["name"]: h["value"] for h in probe.spec.get("httpHeaders", [])}
    try:
        conn.request("GET", probe.spec.get("path", "/"), headers=headers)
        response = conn.getresponse()
        response.read(10 * 1024)  # the kubelet reads at most 10 KiB of the body
    finally:
        conn.close()
    return 200 <= response.status < 400, str(response.status)


def _grpc_probe(probe: Probe) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{probe.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=probe.spec.get("service", ""))
        try:
            reply = stub.Check(request, timeout=probe.timeout)
        except grpc.RpcError as exc:
            return False, str(exc.code())
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return status == "SERVING", status


@dataclass
class Container:
    """One container of the Pod and its current state."""

    spec: dict[str, Any]
    podman_name: str
    role: str  # "init", "sidecar" or "app"
    probes: list[Probe]
    attempt: int = 0
    running: bool = False
    started: bool = False
    ready: bool = False
    exit_code: int | None = None
    stop: threading.Event = field(default_factory=threading.Event)  # of this attempt

    @property
    def name(self) -> str:
        """The manifest's container name."""
        return str(self.spec["name"])

    def probe(self, kind: str) -> Probe | None:
        """This container's probe of ``kind``, if it has one."""
        return next((p for p in self.probes if p.kind == kind), None)


class Pod:
    """One Pod run by the rules of the module docstring.

    Args:
        podman: the engine.
        name: the podman Pod's name (its containers are ``NAME-CONTAINER``).
        spec: the Pod's ``spec``.
        images: image of the manifest -> local image (others become ``default_image``).
        default_image: the image for every container whose image is not in ``images``.
        volumes: volume name -> host directory standing in for it.
        env_from: Secret or ConfigMap name -> its data (for ``envFrom``).
    """

    def __init__(
        self,
        podman: Engine,
        name: str,
        spec: dict[str, Any],
        images: dict[str, str],
        default_image: str,
        volumes: dict[str, Path],
        env_from: dict[str, dict[str, str]],
    ) -> None:
        unknown = set(spec) - POD_FIELDS
        if unknown:
            raise UnsupportedManifest(f"Pod fields not emulated: {sorted(unknown)}")
        self.podman = podman
        self.name = name
        self.spec = spec
        self.timeline = Timeline()
        self.restart_policy: str = spec.get("restartPolicy", "Always")
        self.grace = float(spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE))
        self._images = images
        self._default_image = default_image
        self._volumes = volumes
        self._env_from = env_from
        self.containers: dict[str, Container] = {}
        for c in spec.get("initContainers", []):
            role = "sidecar" if c.get("restartPolicy") == "Always" else "init"
            self._add(c, role)
        for c in spec["containers"]:
            self._add(c, "app")
        self._threads: list[threading.Thread] = []
        self._start_lock = threading.Lock()  # no container starts once deleting is set
        self.deleting = False
        self._sidecar_order: list[Container] = []  # sidecars in the order they started
        self._stopping = threading.Lock()  # one termination sequence at a time

    def _add(self, spec: dict[str, Any], role: str) -> None:
        unknown = set(spec) - CONTAINER_FIELDS
        if unknown:
            raise UnsupportedManifest(f"{spec['name']}: fields not emulated: {sorted(unknown)}")
        probes = [Probe.parse(k, spec[k], spec) for k in PROBE_KINDS if k in spec]
        if role == "init" and probes:
            raise UnsupportedManifest(f"{spec['name']}: an init container takes no probes")
        self.containers[spec["name"]] = Container(spec, f"{self.name}-{spec['name']}", role, probes)

    def of(self, role: str) -> list[Container]:
        """The containers of ``role`` (``init``, ``sidecar``, ``app``) in manifest order."""
        return [c for c in self.containers.values() if c.role == role]

    # -- podman --------------------------------------------------------------------------

    def _create_argv(self, c: Container) -> list[str]:
        spec = c.spec
        pod_security = self.spec.get("securityContext") or {}
        security = {**pod_security, **(spec.get("securityContext") or {})}
        argv = ["create", "--pod", self.name, "--name", c.podman_name]
        if "runAsUser" in security:
            user = str(security["runAsUser"])
            if "runAsGroup" in security:
                user += f":{security['runAsGroup']}"
            argv += ["--user", user]
        if "fsGroup" in pod_security:  # the kubelet adds it to every container's groups
            argv += ["--group-add", str(pod_security["fsGroup"])]
        if security.get("readOnlyRootFilesystem"):
            argv.append("--read-only")
        capabilities = security.get("capabilities") or {}
        argv += [a for cap in capabilities.get("drop", []) for a in ("--cap-drop", cap)]
        argv += [a for cap in capabilities.get("add", []) for a in ("--cap-add", cap)]
        if security.get("allowPrivilegeEscalation") is False:
            argv += ["--security-opt", "no-new-privileges"]
        for source in spec.get("envFrom", []):
            ref = source.get("secretRef") or source.get("configMapRef")
            for k, v in self._env_from[ref["name"]].items():
                argv += ["--env", f"{k}={v}"]
        for var in spec.get("env", []):
            if "value" not in var:
                raise UnsupportedManifest(f"{c.name}: env {var['name']}: only value")
            argv += ["--env", f"{var['name']}={var['value']}"]
        for mount in spec.get("volumeMounts", []):
            if "subPath" in mount:
                raise UnsupportedManifest(f"{c.name}: subPath is not emulated")
            source = self._volumes[mount["name"]]
            options = ",ro" if mount.get("readOnly") else ""
            argv += ["--mount", f"type=bind,src={source},dst={mount['mountPath']}{options}"]
        if "workingDir" in spec:
            argv += ["--workdir", spec["workingDir"]]
        if "command" in spec:  # command replaces ENTRYPOINT, args replace CMD
            argv += ["--entrypoint", json.dumps(spec["command"])]
        argv.append(self._images.get(spec["image"], self._default_image))
        argv += [str(a) for a in spec.get("args", [])]
        return argv

    def logs(self, container: str) -> str:
        """What ``container`` (the manifest's name) wrote to stdout and stderr so far."""
        return self.podman.logs(self.containers[container].podman_name)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Create the Pod and its containers, then run the start sequence in the
        background (the kubelet's pod worker); returns at once."""
        argv = ["pod", "create", "--name", self.name, "--network", "host"]
        if self.spec.get("shareProcessNamespace"):
            argv += ["--share", "ipc,net,uts,pid"]
        self.podman.run(*argv)
        for c in self.containers.values():
            self.podman.run(*self._create_argv(c))
        self._spawn(self._pod_worker, "pod-worker")

    def _spawn(self, target: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=f"{self.name}-{name}")
        thread.daemon = True  # a bug in a test must not hang the interpreter at exit
        self._threads.append(thread)
        thread.start()

    def _pod_worker(self) -> None:
        tl = self.timeline
        for spec in self.spec.get("initContainers", []):
            box = self.containers[spec["name"]]
            if not self._start(box):
                return
            tl.wait(partial(self._init_done, box), f"{box.name} started or completed", None)
            if self.deleting or tl.first(None, "failed"):
                return
        tl.add(None, "initialized")
        for box in self.of("app"):
            if not self._start(box):
                return

    def _init_done(self, c: Container) -> bool:
        """May the next init container start? A sidecar must be started, another init
        container must have exited 0 (or the Pod is being deleted, or has failed)."""
        if self.deleting or self.timeline.first(None, "failed"):
            return True
        if c.role == "sidecar":
            return c.started
        return c.exit_code == 0 and not c.running

    def _start(self, c: Container) -> bool:
        """Start (or restart) ``c`` with fresh probe state; False once deleting."""
        with self._start_lock:
            if self.deleting:
                return False
            c.stop = threading.Event()
            c.attempt += 1
            c.started = c.ready = False
            c.exit_code = None
            done = self.podman.run("start", c.podman_name, check=False)
            if done.returncode != 0:
                self.timeline.add(c.name, "start_failed", error=done.stderr.strip())
                return False
            c.running = True
            if c.role == "sidecar" and c not in self._sidecar_order:
                self._sidecar_order.append(c)
            self.timeline.add(c.name, "running", attempt=c.attempt)
            if c.probe("startup") is None:
                c.started = True
                self.timeline.add(c.name, "started", attempt=c.attempt)
            stop = c.stop
            self._spawn(self._watch, f"{c.name}-wait-{c.attempt}", c, stop)
            for probe in c.probes:
                self._spawn(self._probe_loop, f"{c.name}-{probe.kind}-{c.attempt}", c, probe, stop)
            return True

    def _watch(self, c: Container, stop: threading.Event) -> None:
        """Wait for this attempt of ``c`` to exit; then apply the restart policy."""
        done = self.podman.run("wait", c.podman_name, check=False, timeout=24 * 3600)
        stop.set()
        try:
            code = int(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return  # the container was removed: the Pod is gone
        c.running = False
        c.ready = False
        c.exit_code = code
        self.timeline.add(c.name, "exited", code=code, attempt=c.attempt)
        if self.deleting:
            return
        if c.role == "init" and self.restart_policy == "Never" and code != 0:
            self.timeline.add(None, "failed", init=c.name, code=code)
            return
        restart = (
            c.role == "sidecar"
            or (c.role == "init" and code != 0)
            or (c.role == "app" and self.restart_policy == "Always")
            or (c.role == "app" and self.restart_policy == "OnFailure" and code != 0)
        )
        if restart:
            delay = min(BACKOFF_FIRST * 2 ** (c.attempt - 1), BACKOFF_MAX)
            self.timeline.add(c.name, "restarting", delay=delay)
            with contextlib.suppress(AssertionError):  # the back-off, cut short by deletion
                self.timeline.wait(lambda: self.deleting, "deletion", delay)
            self._start(c)
        elif c.role == "app" and all(
            a.exit_code is not None and not a.running for a in self.of("app")
        ):
            self.timeline.add(None, "completed")
            self._spawn(self._terminate, "complete", [])  # stops the sidecars

    def _probe_loop(self, c: Container, probe: Probe, stop: threading.Event) -> None:
        """Run ``probe`` of this attempt of ``c`` until it exits (or the probe is done)."""
        if probe.kind != "startup":  # readiness and liveness wait for the startup probe
            self.timeline.wait(lambda: c.started or stop.is_set(), f"{c.name} started", None)
        if stop.wait(probe.initial_delay):
            return
        successes = failures = 0
        while not stop.is_set():
            began = time.monotonic()
            ok, result = run_probe(self.podman, c.podman_name, probe)
            seconds = round(time.monotonic() - began, 3)
            if seconds > probe.timeout and probe.handler != "exec":
                ok, result = False, f"timeout ({result} after {seconds}s)"
            if stop.is_set():
                return  # the container exited meanwhile: the result is not about it
            self.timeline.add(
                c.name, "probe", probe=probe.kind, ok=ok, result=result, seconds=seconds
            )
            successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
            if probe.kind == "startup":
                if successes >= probe.success_threshold:
                    c.started = True
                    self.timeline.add(c.name, "started", attempt=c.attempt)
                    return
                if failures >= probe.failure_threshold:
                    self._probe_failed(c, probe, stop)
                    return
            elif probe.kind == "readiness":
                if ok and successes >= probe.success_threshold and not c.ready:
                    c.ready = True
                    self.timeline.add(c.name, "ready")
                elif not ok and failures >= probe.failure_threshold and c.ready:
                    c.ready = False
                    self.timeline.add(c.name, "not_ready", result=result)
            elif failures >= probe.failure_threshold and not self.deleting:
                self._probe_failed(c, probe, stop)
                return
            stop.wait(max(0.0, probe.period - (time.monotonic() - began)))

    def _probe_failed(self, c: Container, probe: Probe, stop: threading.Event) -> None:
        """A startup or liveness probe failed: kill the container (it is restarted)."""
        if self.deleting:
            return
        self.timeline.add(c.name, "probe_failed", probe=probe.kind)
        self._kill([c], time.monotonic() + self.grace, reason=f"{probe.kind} probe failed")

    def _kill(self, containers: list[Container], deadline: float, reason: str) -> None:
        """SIGTERM to ``containers``; SIGKILL to those still running at ``deadline``
        (at least :data:`MIN_GRACE` later). Returns once all have exited."""
        running = [c for c in containers if c.running]
        for c in running:
            self.podman.run("kill", "--signal", "TERM", c.podman_name, check=False)
            self.timeline.add(c.name, "signal", signal="TERM", reason=reason)
        deadline = max(deadline, time.monotonic() + MIN_GRACE)
        stops = [c.stop for c in running]
        with contextlib.suppress(AssertionError):
            self.timeline.wait(
                lambda: all(s.is_set() for s in stops) or None,
                "containers exited",
                max(0.0, deadline - time.monotonic()),
            )
        late = [c for c, s in zip(running, stops, strict=True) if not s.is_set()]
        for c in late:
            self.podman.run("kill", "--signal", "KILL", c.podman_name, check=False)
            self.timeline.add(c.name, "signal", signal="KILL", reason="grace period over")
        self.timeline.wait(
            lambda: all(s.is_set() for s in stops) or None, "containers killed", KILL_WAIT
        )

    def delete(self) -> None:
        """Delete the Pod by the termination rules; returns once every container exited."""
        with self._start_lock:
            self.deleting = True
        self.timeline.add(None, "deleting", grace=self.grace)
        self._terminate(list(self.containers.values()))

    def _terminate(self, also: list[Container]) -> None:
        """Stop the app containers (and ``also``, when deleting), then the sidecars in
        reverse order of their start, under one deadline."""
        with self._stopping:
            with self._start_lock:  # nothing starts or restarts from now on
                self.deleting = True
            deadline = time.monotonic() + self.grace
            first = [c for c in also if c.role != "sidecar"]
            self._kill(first, deadline, reason="pod deleted")
            for c in reversed(self._sidecar_order):
                if c.running:
                    self._kill([c], deadline, reason="sidecar stops after the app")
            if not self.timeline.first(None, "terminated"):
                self.timeline.add(None, "terminated")

    def __enter__(self) -> Pod:
        """Start the Pod (:meth:`start`); on exit, :meth:`close` it."""
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Delete the Pod if it was not, then remove it and join every thread."""
        try:
            if not self.timeline.first(None, "terminated"):
                self.delete()
        finally:
            self.podman.run("pod", "rm", "--force", "--time", "0", self.name, check=False)
        for thread in self._threads:
            thread.join(timeout=60)
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"driver threads still running: {alive}"
