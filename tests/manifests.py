"""Check Kubernetes manifests that run podpatterns, with the code the command line runs.

Used by ``test_docs.py`` (every ```` ```yaml ```` manifest in the docs) and
``test_examples.py`` (``docs/examples/*.yaml``). Every check returns a list of problems,
each naming the document, the container and what is wrong, so a test can assert that
there are none and a negative test can assert which one a broken manifest has.

A container runs podpatterns when its ``command`` is ``podpatterns SUB ...``, or when it
has no ``command`` and its image is one of the podpatterns images, whose entrypoints are
fixed (see ``IMAGE_ENTRYPOINTS``): then ``args`` are what follows the entrypoint. A
``run`` or ``wait`` whose command is ``podpatterns ...`` again is checked as well.

What :func:`pod_problems` checks, for every podpatterns invocation of a Pod:

- the arguments are accepted by the real parser (``podpatterns.cli.build_parser``) and
  the options resolve and build the same configuration objects the command builds, with
  the container's ``PODPATTERNS_*`` environment variables; paths are looked up in a
  scratch copy of the container's file system that holds only its volume mounts (and a
  ConfigMap's keys as files, when the ConfigMap is in the same file: a ``--config`` file
  is checked when it is one of them);
- every HTTP probe aimed at a podpatterns admin port asks for a path that server serves,
  and a podpatterns container's probes are aimed at its own admin port;
- the records a Pod refers to (``/readyz/NAME``, ``wait --for ready:NAME``,
  ``--exit-with NAME``) are written by a ``run`` or ``health`` of the same Pod (a
  tombstone, for ``--exit-with``, only by ``run``), through the same volume;
- ``--health-dir``, ``--checkpoint-dir``, the adapter's files and ``--watch`` are on
  volumes (written ones not read-only; a watched ConfigMap not mounted with ``subPath``,
  which never updates);
- no two containers bind the same port, and a port named ``admin`` is the admin port;
- a loopback URL a tool probes, waits for or posts to, on a podpatterns admin port,
  asks for a path that server serves;
- a run-to-completion init container does not run a server, and the long-running
  podpatterns containers of a Job exit with the main container (``--exit-with``).

:func:`policy_problems` holds the stricter rules the published examples follow
(security context, resources, probes, grace period, image names, and every loopback
port a tool connects to bound by a container of the Pod), and
:func:`schema_problems` validates against the Kubernetes JSON schemas.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import yaml

import podpatterns
from podpatterns.ambassador.config import AmbassadorConfig, UnixAddress
from podpatterns.cli import build_parser
from podpatterns.commands import COMMANDS
from podpatterns.errors import PodpatternsError
from podpatterns.health.coordination import pod_runtime
from podpatterns.health.targets import GrpcTarget, HttpTarget, ReadyTarget, TcpTarget
from podpatterns.options import HostPort, load_yaml, parse_path, resolve
from podpatterns.runtime import RuntimeConfig

IMAGE_ENTRYPOINTS: dict[str, tuple[str, ...]] = {
    "podpatterns-ambassador": ("ambassador",),
    "podpatterns-adapter": ("adapter",),
    "podpatterns-tools": (),
}
"""ENTRYPOINT after ``podpatterns`` of each image built in images/ (args follow it)."""

RUNTIME_TOOLS = frozenset({"ambassador", "adapter", "health", "reload"})
"""Sub-commands that run until stopped and serve the admin server."""

PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
DEFAULT_GRACE = 30  # terminationGracePeriodSeconds when a Pod does not set it


class ManifestError(Exception):
    """A container's podpatterns invocation is not accepted; the message says why."""


@dataclass
class Invocation:
    """One ``podpatterns SUB ...`` in a container, as the command line would configure it."""

    tool: str
    runtime: RuntimeConfig | None = None
    values: dict[str, Any] = field(default_factory=dict)
    command: tuple[str, ...] = ()
    listens: tuple[Any, ...] = ()
    adapter_paths: tuple[str, ...] = ()


@dataclass
class Container:
    """A container of a Pod and what podpatterns runs in it (outermost first)."""

    spec: dict[str, Any]
    role: str  # "init" (runs to completion), "sidecar" (native) or "main"
    where: str
    invocations: list[Invocation]

    @property
    def name(self) -> str:
        """The container's name."""
        return str(self.spec.get("name", "?"))

    @property
    def server(self) -> Invocation | None:
        """The invocation that serves the admin server, if any."""
        for inv in self.invocations:
            if inv.tool in RUNTIME_TOOLS and inv.runtime is not None:
                return inv
        return None

    @property
    def admin_port(self) -> int | None:
        """The port of this container's admin server, or ``None``."""
        inv = self.server
        if inv is None or inv.runtime is None or inv.runtime.admin is None:
            return None
        return inv.runtime.admin.port


def load_documents(text: str) -> list[dict[str, Any]]:
    """The YAML documents of a manifest (empty documents left out)."""
    return [d for d in yaml.safe_load_all(text) if d is not None]


def pod_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(label, pod spec)`` of a Pod, a workload's template, or a CronJob's job template."""
    kind = doc.get("kind", "?")
    label = f"{kind}/{doc.get('metadata', {}).get('name', '?')}"
    spec = doc.get("spec") or {}
    if kind == "Pod":
        return [(label, spec)]
    if kind == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    template = spec.get("template")
    if isinstance(template, dict):
        return [(label, template.get("spec") or {})]
    return []


def _image_base(image: str) -> str:
    """``registry/x/podpatterns-tools:0.1.0`` -> ``podpatterns-tools``."""
    last = image.rsplit("/", 1)[-1]
    return last.split("@", 1)[0].split(":", 1)[0]


def podpatterns_argv(spec: dict[str, Any]) -> list[str] | None:
    """The container's podpatterns argv from the sub-command on, or ``None``.

    Raises:
        ManifestError: the image is a podpatterns image this module does not know.
    """
    command = [str(c) for c in spec.get("command") or []]
    args = [str(a) for a in spec.get("args") or []]
    if command:
        if PurePosixPath(command[0]).name == "podpatterns":
            return [*command[1:], *args]
        return None
    base = _image_base(str(spec.get("image", "")))
    if base in IMAGE_ENTRYPOINTS:
        return [*IMAGE_ENTRYPOINTS[base], *args]
    if base.startswith("podpatterns"):
        raise ManifestError(f"image {spec.get('image')!r}: unknown entrypoint; give a command")
    return None


def _parse(argv: list[str]) -> dict[str, Any]:
    """The parser's flags for ``argv`` (``command`` included), or ManifestError."""
    if not argv:
        raise ManifestError("no podpatterns sub-command")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = build_parser().parse_args(argv)
    except SystemExit:
        raise ManifestError(f"`podpatterns {' '.join(argv)}`: {err.getvalue().strip()}") from None
    return vars(ns)


def _in_root(root: Path, raw: Any) -> Any:
    """A raw flag or environment value of a path option, moved into the scratch root."""
    if isinstance(raw, list):
        return [_in_root(root, r) for r in raw]
    if isinstance(raw, str) and raw.startswith("/"):
        return ",".join(str(root / p.lstrip("/")) for p in raw.split(","))
    return raw


def _configure(tool: str, flags: dict[str, Any], env: dict[str, str], root: Path) -> Invocation:
    """Build the configuration the sub-command builds (its public ``build``, as the
    command line calls it); raise what it would raise."""
    if tool not in (*RUNTIME_TOOLS, "run", "wait"):
        raise ManifestError(f"`podpatterns {tool}` does not belong in a Pod")
    file: dict[str, Any] = {}
    if flags.get("config"):
        # Checked when it is a ConfigMap key of the same file, mounted in the container.
        found = root / str(flags["config"]).lstrip("/")
        if not found.is_file():
            raise ManifestError(
                f"--config: {flags['config']} is not a key of a ConfigMap of this file "
                "mounted in the container (other config files are not checked here)"
            )
        file = load_yaml(found)
    flags = {k: v for k, v in flags.items() if k not in ("command", "config")}
    argv = tuple(flags.get("argv") or ())
    command: tuple[str, ...] = ()
    if tool in ("run", "wait"):
        # `run` needs a command; `wait` may have none, but what it has follows `--`
        if (tool == "run" or argv) and (not argv or argv[0] != "--"):
            raise ManifestError(f"{tool}: the command must follow `--`")
        command = argv[1:]
    cmd = COMMANDS[tool]
    # Paths are checked in the scratch copy of the container's file system.
    paths = [o for o in cmd.options if o.parse is parse_path]
    scratch_flags = {
        k: _in_root(root, v) if any(o.name == k for o in paths) else v for k, v in flags.items()
    }
    scratch_env = {
        k: _in_root(root, v) if any(o.env == k for o in paths) else v for k, v in env.items()
    }
    config = cmd.build(scratch_flags, scratch_env, file, "config file")
    values = resolve(cmd.options, flags, env, file)
    runtime = RuntimeConfig.from_values(values) if tool in RUNTIME_TOOLS else None
    if isinstance(config, AmbassadorConfig):
        return Invocation(tool, runtime, values, listens=tuple(r.listen for r in config.routes))
    if tool == "adapter":
        return Invocation(tool, runtime, values, adapter_paths=values["path"])
    return Invocation(tool, runtime, values, command=command)


def invocations(argv: list[str], env: dict[str, str], root: Path) -> list[Invocation]:
    """Every podpatterns invocation of ``argv``: the outer one, then nested ones.

    Raises:
        ManifestError: the parser or the configuration rejects one of them.
    """
    out: list[Invocation] = []
    while True:
        flags = _parse(argv)
        tool = str(flags["command"])
        try:
            inv = _configure(tool, flags, env, root)
        except PodpatternsError as exc:
            raise ManifestError(f"podpatterns {tool}: {exc}") from None
        out.append(inv)
        if not inv.command or PurePosixPath(inv.command[0]).name != "podpatterns":
            return out
        argv = list(inv.command[1:])


def _env(spec: dict[str, Any]) -> dict[str, str]:
    """The container's ``PODPATTERNS_*`` variables given by value.

    Raises:
        ManifestError: one comes from a Secret or ConfigMap, which cannot be checked.
    """
    env = {}
    for item in spec.get("env") or []:
        name = str(item.get("name", ""))
        if not name.startswith("PODPATTERNS_"):
            continue
        if "value" not in item:
            raise ManifestError(f"env {name}: only values given inline can be checked")
        env[name] = str(item["value"])
    return env


@contextlib.contextmanager
def _scratch_root(
    pod: dict[str, Any], spec: dict[str, Any], config_maps: dict[str, dict[str, str]]
) -> Iterator[Path]:
    """A directory standing for the container's file system: only its volume mounts."""
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    with tempfile.TemporaryDirectory(prefix="manifest-") as tmp:
        root = Path(tmp)
        for mount in spec.get("volumeMounts") or []:
            target = root / str(mount["mountPath"]).lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            cm = (volumes.get(mount.get("name")) or {}).get("configMap")
            if cm and not mount.get("subPath"):
                for key, value in config_maps.get(cm.get("name", ""), {}).items():
                    (target / key).write_text(str(value))
        yield root


@dataclass(frozen=True)
class Mount:
    """A container's volume mount and the volume behind it."""

    path: PurePosixPath
    volume: str
    kind: str  # emptyDir, configMap, secret, projected, ...
    read_only: bool
    sub_path: bool


def _mounts(pod: dict[str, Any], spec: dict[str, Any]) -> list[Mount]:
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    out = []
    for m in spec.get("volumeMounts") or []:
        volume = volumes.get(m.get("name")) or {}
        kind = next((k for k in volume if k != "name"), "missing")
        out.append(
            Mount(
                PurePosixPath(str(m.get("mountPath", "/"))),
                str(m.get("name")),
                kind,
                bool(m.get("readOnly")),
                bool(m.get("subPath")),
            )
        )
    return out


def _mount_of(mounts: list[Mount], path: PurePosixPath) -> Mount | None:
    """The (deepest) mount ``path`` is on, or ``None`` when it is on the root filesystem."""
    best = None
    for m in mounts:
        if (path == m.path or m.path in path.parents) and (
            best is None or len(m.path.parts) > len(best.path.parts)
        ):
            best = m
    return best


def _glob_dir(pattern: str) -> PurePosixPath:
    """The directory a glob's files are in, up to its first wildcard."""
    path = PurePosixPath(pattern)
    fixed: list[str] = []
    for part in path.parts:
        if any(c in part for c in "*?["):
            return PurePosixPath(*fixed)
        fixed.append(part)
    return path.parent


def containers(
    pod: dict[str, Any], where: str, config_maps: dict[str, dict[str, str]]
) -> tuple[list[Container], list[str]]:
    """The Pod's containers with their podpatterns invocations, and the problems found."""
    out: list[Container] = []
    problems: list[str] = []
    for key in ("initContainers", "containers"):
        for spec in pod.get(key) or []:
            role = "main"
            if key == "initContainers":
                role = "sidecar" if spec.get("restartPolicy") == "Always" else "init"
            at = f"{where} container {spec.get('name', '?')}"
            invs: list[Invocation] = []
            try:
                argv = podpatterns_argv(spec)
                if argv is not None:
                    with _scratch_root(pod, spec, config_maps) as root:
                        invs = invocations(argv, _env(spec), root)
            except ManifestError as exc:
                problems.append(f"{at}: {exc}")
            out.append(Container(spec, role, at, invs))
    return out, problems


def _probe_port(spec: dict[str, Any], port: Any) -> int | None:
    """A probe's port as a number (a name is looked up in the container's ports)."""
    if isinstance(port, int):
        return port
    for p in spec.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    return int(port) if str(port).isdigit() else None


def _routes(runtime: RuntimeConfig) -> list[re.Pattern[str]]:
    """The GET paths the admin server of ``runtime`` serves, as patterns."""
    admin = pod_runtime(runtime, []).admin_server(HostPort("127.0.0.1", 0)).app()
    patterns = []
    for route in admin.router.routes():
        if route.method in ("GET", "*") and route.resource is not None:
            canonical = route.resource.canonical
            patterns.append(
                re.compile("^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(canonical)) + "$")
            )
    return patterns


_RECORD_PATH = re.compile(r"^/(?:livez|readyz|startupz)/(?P<name>[^/]+)$")


def pod_problems(
    pod: dict[str, Any], where: str, kind: str, config_maps: dict[str, dict[str, str]]
) -> tuple[list[Container], list[str]]:
    """The containers of one Pod spec and everything wrong with their use of podpatterns."""
    found, problems = containers(pod, where, config_maps)
    servers = {c.admin_port: c for c in found if c.admin_port}

    # Records: who writes which, and through which volume.
    writers: dict[str, tuple[str, Container]] = {}
    health_volumes: dict[str, str] = {}
    for c in found:
        mounts = _mounts(pod, c.spec)
        for inv in c.invocations:
            hd = inv.values.get("health_dir") or (inv.runtime.health_dir if inv.runtime else None)
            if hd is not None:
                m = _mount_of(mounts, PurePosixPath(str(hd)))
                if m is None:
                    problems.append(f"{c.where}: --health-dir {hd} is not on a volume")
                else:
                    health_volumes[c.name] = m.volume
                    if inv.tool in ("run", "health") and m.read_only:
                        problems.append(f"{c.where}: --health-dir {hd} is mounted read-only")
            if inv.tool in ("run", "health"):
                writers[str(inv.values["name"])] = (inv.tool, c)
    if len(set(health_volumes.values())) > 1:
        problems.append(f"{where}: --health-dir on different volumes: {health_volumes}")

    def needs_record(c: Container, name: str, what: str, tool: str | None = None) -> None:
        writer = writers.get(name)
        if writer is None:
            problems.append(f"{c.where}: {what}: no container writes the record {name!r}")
        elif tool is not None and writer[0] != tool:
            problems.append(
                f"{c.where}: {what}: {name!r} is written by `{writer[0]}`, which never "
                f"writes a tombstone (use `podpatterns {tool}`)"
            )

    for c in found:
        mounts = _mounts(pod, c.spec)
        for inv in c.invocations:
            if inv.runtime is not None and inv.runtime.exit_with:
                needs_record(c, inv.runtime.exit_with, "--exit-with", "run")
            for target in inv.values.get("for", ()):
                if isinstance(target, ReadyTarget):
                    needs_record(c, target.name, f"--for {target.label}")
            if inv.tool == "adapter":
                for pattern in inv.adapter_paths:
                    if _mount_of(mounts, _glob_dir(pattern)) is None:
                        problems.append(f"{c.where}: --path {pattern} is not on a volume")
                cp = inv.values.get("checkpoint_dir")
                if cp is not None:
                    m = _mount_of(mounts, PurePosixPath(str(cp)))
                    if m is None or m.read_only:
                        problems.append(
                            f"{c.where}: --checkpoint-dir {cp} is not on a writable volume"
                        )
            if inv.tool == "reload":
                for watched in inv.values.get("watch", ()):
                    m = _mount_of(mounts, PurePosixPath(str(watched)))
                    if m is None:
                        problems.append(f"{c.where}: --watch {watched} is not on a volume")
                    elif m.sub_path:
                        problems.append(
                            f"{c.where}: --watch {watched} is a subPath mount, which the "
                            "kubelet never updates"
                        )
                if inv.values.get("pid_file") is not None and not pod.get("shareProcessNamespace"):
                    problems.append(f"{c.where}: --pid-file needs shareProcessNamespace: true")

        # Probes: the right server, a path it serves, records that exist.
        own = c.admin_port
        for probe in PROBES:
            get = (c.spec.get(probe) or {}).get("httpGet")
            if not get:
                continue
            port = _probe_port(c.spec, get.get("port"))
            path = str(get.get("path", "/"))
            at = f"{c.where} {probe} {path} on port {get.get('port')}"
            if own is not None and port != own:
                problems.append(f"{at}: not this container's admin port {own}")
                continue
            target = servers.get(port) if port is not None else None
            if target is None:
                continue  # the app's own server: not ours to check
            runtime = target.server.runtime if target.server else None
            assert runtime is not None
            if not any(p.match(path) for p in _routes(runtime)):
                problems.append(f"{at}: {target.name}'s admin server does not serve this path")
            record = _RECORD_PATH.match(path)
            if record and runtime.health_dir is not None:
                needs_record(c, record.group("name"), f"{probe} {path}")

        # What never finishes cannot be a run-to-completion init container, nor keep a Job.
        server = c.server
        if server is not None and server.runtime is not None and not server.runtime.exit_with:
            if c.role == "init":
                problems.append(f"{c.where}: `{server.tool}` in an init container never finishes")
            elif c.role == "main" and kind in ("Job", "CronJob"):
                problems.append(
                    f"{c.where}: `{server.tool}` in a Job needs --exit-with, or the Job "
                    "never completes"
                )

    bound, port_problems = bound_ports(found)
    problems += port_problems
    problems += [p for p in target_problems(found, bound) if "binds port" not in p]
    return found, problems


def bound_ports(found: list[Container]) -> tuple[dict[int, str], list[str]]:
    """``{port: container}`` of what a Pod binds (declared ports, admin servers and
    ambassador listeners), and the clashes: a Pod has one network namespace."""
    bound: dict[int, str] = {}
    problems: list[str] = []
    for c in found:
        ports: set[int] = {int(p["containerPort"]) for p in c.spec.get("ports") or []}
        named = {p.get("name"): int(p["containerPort"]) for p in c.spec.get("ports") or []}
        if c.admin_port is not None:
            ports.add(c.admin_port)
            if "admin" in named and named["admin"] != c.admin_port:
                problems.append(
                    f"{c.where}: port 'admin' is {named['admin']}, the admin server {c.admin_port}"
                )
        for inv in c.invocations:
            for listen in inv.listens:
                if isinstance(listen, UnixAddress):
                    continue
                if listen.port == c.admin_port:
                    problems.append(f"{c.where}: --listen {listen} is the admin port")
                ports.add(listen.port)
        for port in sorted(ports):
            if port in bound and bound[port] != c.name:
                problems.append(f"{c.where}: port {port} is also bound by {bound[port]}")
            bound.setdefault(port, c.name)
    return bound, problems


def target_problems(found: list[Container], bound: dict[int, str]) -> list[str]:
    """What the tools probe or notify on the Pod's loopback must be there: a bound port
    (Kubernetes does not require an app to declare its ports, so :func:`pod_problems`
    leaves that rule to the policy) and, on a podpatterns admin server, a served path."""
    servers = {c.admin_port: c for c in found if c.admin_port}
    problems = []
    for c in found:
        for inv in c.invocations:
            for target in _targets(inv):
                port, path = _local_endpoint(target)
                if port is None:
                    continue
                at = f"{c.where}: {inv.tool} target {getattr(target, 'label', target)}"
                server = servers[port].server if port in servers else None
                if port not in bound:
                    problems.append(f"{at}: no container of the Pod binds port {port}")
                elif (
                    path is not None
                    and server is not None
                    and server.runtime is not None
                    and not any(p.match(path) for p in _routes(server.runtime))
                ):
                    problems.append(f"{at}: {servers[port].name} does not serve {path}")
    return problems


def _targets(inv: Invocation) -> list[Any]:
    """What an invocation connects to: probes, wait targets, the ready probe, the reload URL."""
    targets = [*inv.values.get("probe", ()), *inv.values.get("for", ())]
    if inv.values.get("ready_probe") is not None:
        targets.append(inv.values["ready_probe"])
    if inv.values.get("http_post") is not None:
        targets.append(HttpTarget(url=inv.values["http_post"], label=inv.values["http_post"]))
    return targets


def _local_endpoint(target: Any) -> tuple[int | None, str | None]:
    """``(port, HTTP path)`` of a target on the Pod's loopback; ``(None, None)`` otherwise."""
    path: str | None = None
    if isinstance(target, TcpTarget | GrpcTarget):
        host, port = target.host, target.port
    elif isinstance(target, HttpTarget):
        url = urlsplit(target.url)
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
        path = url.path or "/"
    else:
        return None, None
    if host == "localhost" or host.startswith("127.") or host == "::1":
        return port, path
    return None, None


def config_maps(docs: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """The ConfigMaps of a file: ``{name: data}``."""
    return {
        str(d.get("metadata", {}).get("name")): dict(d.get("data") or {})
        for d in docs
        if d.get("kind") == "ConfigMap"
    }


def document_problems(
    docs: list[dict[str, Any]],
) -> tuple[list[Container], list[str]]:
    """:func:`pod_problems` of every Pod spec in a file's documents."""
    cms = config_maps(docs)
    found: list[Container] = []
    problems: list[str] = []
    for doc in docs:
        for where, pod in pod_specs(doc):
            cs, ps = pod_problems(pod, where, str(doc.get("kind")), cms)
            found += cs
            problems += ps
    return found, problems


# -- the published examples' policy ---------------------------------------------------


def schema_problems(doc: dict[str, Any], version: str) -> list[str]:
    """Strict validation against the Kubernetes JSON schema of ``version``."""
    label = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return [f"{label}: {path}: {exc.message}"]
    return []


def _effective(pod: dict[str, Any], spec: dict[str, Any], key: str) -> Any:
    own = spec.get("securityContext") or {}
    return own[key] if key in own else (pod.get("securityContext") or {}).get(key)


def _seconds(runtime: RuntimeConfig) -> float:
    return runtime.shutdown_delay + runtime.drain_timeout


COPY_IN = "/podpatterns"
"""Where the copy-in tree lives in an app image without Python (docs/images.md)."""


def _copied_in(pod: dict[str, Any], spec: dict[str, Any]) -> bool:
    """``spec`` runs the copy-in tree: its command is ``/podpatterns/bin/podpatterns``, from
    a volume mounted at ``/podpatterns`` that an init container of a podpatterns image fills
    with ``podpatterns-copy-into``."""
    command = [*(spec.get("command") or []), *(spec.get("args") or [])]
    if not command or command[0] != f"{COPY_IN}/bin/podpatterns":
        return False
    mounts = {m.get("mountPath"): m.get("name") for m in spec.get("volumeMounts") or []}
    volume = mounts.get(COPY_IN)
    if volume is None:
        return False
    for init in pod.get("initContainers") or []:
        argv = [*(init.get("command") or []), *(init.get("args") or [])]
        if _image_base(str(init.get("image", ""))) not in IMAGE_ENTRYPOINTS or len(argv) != 2:
            continue
        if argv[0] != f"{COPY_IN}/bin/podpatterns-copy-into":
            continue
        into = {m.get("mountPath"): m.get("name") for m in init.get("volumeMounts") or []}
        if into.get(argv[1]) == volume:
            return True
    return False


def policy_problems(pod: dict[str, Any], where: str, found: list[Container]) -> list[str]:
    """The rules every published example follows (beyond being correct)."""
    problems = []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(f"{where}: {flag}")
    for v in pod.get("volumes") or []:
        if "hostPath" in v:
            problems.append(f"{where}: volume {v.get('name')} is a hostPath")
    grace = pod.get("terminationGracePeriodSeconds", DEFAULT_GRACE)
    bound, _ = bound_ports(found)
    problems += [p for p in target_problems(found, bound) if "binds port" in p]
    version = podpatterns.__version__
    for c in found:
        spec, at = c.spec, c.where
        sc = spec.get("securityContext") or {}
        if _effective(pod, spec, "runAsNonRoot") is not True:
            problems.append(f"{at}: runAsNonRoot is not true")
        if _effective(pod, spec, "runAsUser") == 0:
            problems.append(f"{at}: runAsUser is 0")
        seccomp = (_effective(pod, spec, "seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{at}: seccompProfile is {seccomp!r}, not RuntimeDefault")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{at}: privileged")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            problems.append(f"{at}: capabilities do not drop ALL")
        if caps.get("add"):
            problems.append(f"{at}: capabilities add {caps['add']}")
        resources = spec.get("resources") or {}
        for kind in ("requests", "limits"):
            for res in ("cpu", "memory"):
                if res not in (resources.get(kind) or {}):
                    problems.append(f"{at}: no {kind}.{res}")
        image = str(spec.get("image", ""))
        base = _image_base(image)
        if base in IMAGE_ENTRYPOINTS and image != f"{base}:{version}":
            problems.append(f"{at}: image {image!r} is not written as {base}:{version}")
        if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
            problems.append(f"{at}: image {image!r} has no fixed tag")
        if c.invocations and base not in IMAGE_ENTRYPOINTS and not _copied_in(pod, spec):
            problems.append(f"{at}: runs podpatterns from {image!r}, not a podpatterns image")
        if c.invocations:
            if _effective(pod, spec, "runAsUser") != 65532:
                problems.append(f"{at}: runAsUser is not 65532 (the images' user)")
            if _effective(pod, spec, "runAsGroup") != 65532:
                problems.append(f"{at}: runAsGroup is not 65532 (the images' group)")
        server = c.server
        if server is None or server.runtime is None:
            continue
        wanted = ["readinessProbe", "livenessProbe"]
        if c.role == "sidecar":
            wanted.append("startupProbe")  # what holds the main containers back
        for probe in wanted:
            if probe not in spec:
                problems.append(f"{at}: no {probe}")
        if grace <= _seconds(server.runtime):
            problems.append(
                f"{at}: terminationGracePeriodSeconds {grace} does not cover "
                f"--shutdown-delay + --drain-timeout ({_seconds(server.runtime):g} s)"
            )
    return problems
