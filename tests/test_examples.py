"""The Pod manifests in docs/examples/ are valid, run podpatterns as the code accepts it,
and follow the examples' security and operations policy.

Each manifest is checked three ways (see ``tests/manifests.py``): against the Kubernetes
JSON schemas in strict mode (unknown fields rejected), for the newest Kubernetes version
``kubernetes-validate`` ships (native sidecars need >= 1.29); every podpatterns
invocation through the real argument parser and configuration code; and the policy
(non-root, read-only root filesystem, no capabilities, resources, probes, grace period,
image names). The mutation tests at the end break a copy of an example in one way each
and assert that the check meant to catch it does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.manifests import (
    document_problems,
    load_documents,
    pod_specs,
    policy_problems,
    schema_problems,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"
PAGE = ROOT / "docs" / "examples.md"
FILES = sorted(EXAMPLES.glob("*.yaml")) + sorted(EXAMPLES.glob("*/*.yaml"))
EXPECTED = {
    "ambassador-postgres.yaml",
    "adapter-stdout.yaml",
    "job-with-sidecars.yaml",
    "startup-ordering.yaml",
    "health-records.yaml",
    "config-reload.yaml",
    "copy-in/job-with-sidecars.yaml",
}
K8S_VERSION = kubernetes_validate.latest_version()

Docs = list[dict[str, Any]]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2])


def all_problems(docs: Docs) -> list[str]:
    """Schema, podpatterns and policy problems of a file's documents."""
    found, problems = document_problems(docs)
    for doc in docs:
        problems += schema_problems(doc, K8S_VERSION)
        for where, pod in pod_specs(doc):
            mine = [c for c in found if c.where.startswith(f"{where} ")]
            problems += policy_problems(pod, where, mine)
    return problems


def test_the_examples_are_all_there() -> None:
    """docs/examples/ holds exactly the six manifests the page explains."""
    assert {str(f.relative_to(EXAMPLES)) for f in FILES} == EXPECTED


def test_schemas_know_native_sidecars() -> None:
    """The schemas used are for a Kubernetes with native sidecars (>= 1.29)."""
    assert _version(K8S_VERSION) >= (1, 29), K8S_VERSION


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_valid_against_kubernetes_schema(path: Path) -> None:
    """Every document validates strictly: right types, required fields, no unknown field."""
    docs = load_documents(path.read_text())
    assert docs
    problems = [p for doc in docs for p in schema_problems(doc, K8S_VERSION)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_podpatterns_invocations_are_accepted(path: Path) -> None:
    """Every podpatterns command line, probe, record name, volume and port is consistent."""
    found, problems = document_problems(load_documents(path.read_text()))
    assert not problems, "\n".join(problems)
    assert any(c.invocations for c in found), f"{path.name}: no podpatterns container found"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_policy(path: Path) -> None:
    """Non-root, read-only, no capabilities, resources, probes, grace period, image names."""
    docs = load_documents(path.read_text())
    found, _ = document_problems(docs)
    problems = [
        p
        for doc in docs
        for where, pod in pod_specs(doc)
        for p in policy_problems(pod, where, [c for c in found if c.where.startswith(f"{where} ")])
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_header_says_how_to_use_the_images(path: Path) -> None:
    """Each file opens with comments that say to push the images and replace their names."""
    header = path.read_text().split("\napiVersion:", 1)[0]
    assert all(line.startswith("#") for line in header.splitlines()), path.name
    assert "registry" in header, path.name
    assert "replace" in header, path.name


def test_every_subcommand_is_shown() -> None:
    """Between them the examples run every podpatterns component and tool."""
    tools = {
        inv.tool
        for path in FILES
        for c in document_problems(load_documents(path.read_text()))[0]
        for inv in c.invocations
    }
    assert tools == {"ambassador", "adapter", "run", "wait", "health", "reload"}


def test_page_includes_every_example() -> None:
    """docs/examples.md includes each manifest with a snippet in a yaml fence (the copy-in's
    is in docs/images.md), and copies none."""
    page = PAGE.read_text()
    images = (ROOT / "docs" / "images.md").read_text()  # the copy-in's page
    for path in FILES:
        rel = path.relative_to(ROOT)
        fence = f'```yaml\n--8<-- "{rel}"\n```'
        where = images if path.parent.name == "copy-in" else page
        assert where.count(fence) == 1, f"{rel} is not included once in a yaml fence"
    assert "apiVersion:" not in page, "a manifest copied into the page instead of included"


# -- a broken example must fail ----------------------------------------------------------


def _pod(docs: Docs, name: str | None = None) -> dict[str, Any]:
    """The (first, or named) Pod spec of a file, to change in place."""
    for doc in docs:
        for where, spec in pod_specs(doc):
            if name is None or where.endswith(f"/{name}"):
                return spec
    raise AssertionError(f"no pod {name}")


def _spec(docs: Docs, container: str, pod: str | None = None) -> dict[str, Any]:
    """A container's spec, by name (in the named Pod), to change in place."""
    for doc in docs:
        for where, spec in pod_specs(doc):
            if pod is not None and not where.endswith(f"/{pod}"):
                continue
            found: list[dict[str, Any]] = [
                *(spec.get("initContainers") or []),
                *(spec.get("containers") or []),
            ]
            for c in found:
                if c["name"] == container:
                    return c
    raise AssertionError(f"no container {container}")


Mutation = Callable[[Docs], None]


def _arg(container: str, old: str, new: str | None, pod: str | None = None) -> Mutation:
    def mutate(docs: Docs) -> None:
        args = _spec(docs, container, pod)["args"]
        i = next(i for i, a in enumerate(args) if a == old or a.startswith(old + "="))
        if new is None:
            del args[i]
        else:
            args[i] = new

    return mutate


def _field(container: str, path: str, value: Any, pod: str | None = None) -> Mutation:
    """Set (or with ``...`` delete) a dotted field of a container."""

    def mutate(docs: Docs) -> None:
        node: dict[str, Any] = _spec(docs, container, pod)
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is ...:
            del node[last]
        else:
            node[last] = value

    return mutate


def _pod_field(key: str, value: Any, pod: str | None = None) -> Mutation:
    def mutate(docs: Docs) -> None:
        spec = _pod(docs, pod)
        if value is ...:
            spec.pop(key, None)
        else:
            spec[key] = value

    return mutate


def _both(*mutations: Mutation) -> Mutation:
    def mutate(docs: Docs) -> None:
        for m in mutations:
            m(docs)

    return mutate


def _no_copy_in(docs: Docs) -> None:
    """The copy-in example without the init container that fills /podpatterns."""
    spec = _pod(docs)
    spec["initContainers"] = [c for c in spec["initContainers"] if c["name"] != "copy-podpatterns"]


MUTATIONS: list[tuple[str, str, Mutation, str]] = [
    # podpatterns from an app image: only from the tree a podpatterns image copied in
    ("copy-in-missing", "copy-in/job-with-sidecars.yaml", _no_copy_in,
     "runs podpatterns from 'busybox:1.36', not a podpatterns image"),
    ("copy-in-elsewhere", "copy-in/job-with-sidecars.yaml",
     _field("copy-podpatterns", "command", ["/podpatterns/bin/podpatterns-copy-into", "/tmp"]),
     "runs podpatterns from 'busybox:1.36', not a podpatterns image"),
    # schema
    ("unknown-field", "ambassador-postgres.yaml",
     _field("db-ambassador", "readinessProbe.periodSecond", 5), "'periodSecond' was unexpected"),
    ("wrong-type", "adapter-stdout.yaml",
     _field("log-adapter", "ports", [{"containerPort": "9901"}]), "is not of type 'integer'"),
    # podpatterns command lines
    ("unknown-flag", "ambassador-postgres.yaml",
     _arg("db-ambassador", "--upstream", "--upstrem=db.example.internal:5432"),
     "unrecognized arguments: --upstrem"),
    ("bad-duration", "adapter-stdout.yaml",
     _arg("log-adapter", "--drain-timeout", "--drain-timeout=soon"), "--drain-timeout"),
    ("bad-env", "ambassador-postgres.yaml",
     _field("db-ambassador", "env", [{"name": "PODPATTERNS_CONNECT_TIMEOUT", "value": "abc"}]),
     "PODPATTERNS_CONNECT_TIMEOUT"),
    ("unknown-parser", "adapter-stdout.yaml",
     _arg("log-adapter", "--parse", "--parse=nginx-combined"), "--parse"),
    ("run-without-dashes", "job-with-sidecars.yaml",
     _arg("main", "--", None), "the command must follow `--`"),
    ("nested-wait-bad", "job-with-sidecars.yaml",
     _arg("main", "--timeout", "--timeout=0s"), "--timeout"),
    ("reload-two-ways", "config-reload.yaml",
     _field("config-reload", "args", ["reload", "--watch=/etc/nginx/podpatterns",
                                      "--pid-file=/run/nginx/nginx.pid",
                                      "--exec=true", "--admin=0.0.0.0:9901"]),
     "give exactly one of"),
    ("reload-watches-a-file", "config-reload.yaml",
     _arg("config-reload", "--watch", "--watch=/etc/nginx/podpatterns/nginx.conf"),
     "is a file"),
    ("wait-for-a-path-not-served", "startup-ordering.yaml",
     _arg("wait-for-database", "--for", "--for=http://127.0.0.1:9901/ready"),
     "db-ambassador does not serve /ready"),
    ("probe-a-port-nobody-binds", "health-records.yaml",
     _arg("pod-health", "--probe", "--probe=http://127.0.0.1:8081/healthz"),
     "no container of the Pod binds port 8081"),
    ("reload-posts-nowhere", "config-reload.yaml",
     _field("config-reload", "args", ["reload", "--watch=/etc/nginx/podpatterns",
                                      "--http-post=http://127.0.0.1:9090/-/reload",
                                      "--admin=0.0.0.0:9901"]),
     "binds port 9090"),
    ("demo-in-a-pod", "job-with-sidecars.yaml",
     _field("main", "args", ["demo"]), "does not belong in a Pod"),
    ("unknown-podpatterns-image", "ambassador-postgres.yaml",
     _field("db-ambassador", "image", "podpatterns-proxy:0.1.0"), "unknown entrypoint"),
    ("health-without-probe", "health-records.yaml",
     _arg("pod-health", "--probe", None), "at least one probe"),
    # probes
    ("probe-path", "ambassador-postgres.yaml",
     _field("db-ambassador", "readinessProbe.httpGet.path", "/healthz"),
     "does not serve this path"),
    ("probe-port", "adapter-stdout.yaml",
     _field("log-adapter", "livenessProbe.httpGet.port", 9902),
     "not this container's admin port"),
    ("record-path-without-health-dir", "health-records.yaml",
     _arg("pod-health", "--health-dir", "--health-dir=/tmp", None),
     "not on a volume"),
    ("probe-unknown-record", "health-records.yaml",
     _field("worker", "readinessProbe.httpGet.path", "/readyz/wroker"),
     "no container writes the record 'wroker'"),
    ("admin-port-name", "ambassador-postgres.yaml",
     _field("db-ambassador", "ports", [{"name": "admin", "containerPort": 9902}]),
     "port 'admin' is 9902"),
    # records, volumes, ports
    ("exit-with-unknown", "job-with-sidecars.yaml",
     _arg("db-ambassador", "--exit-with", "--exit-with=mian"),
     "no container writes the record 'mian'"),
    ("exit-with-prober", "startup-ordering.yaml",
     _arg("db-health", "--drain-timeout", "--exit-with=database", "startup-ordering-records"),
     "never writes a tombstone"),
    ("wait-unknown-record", "startup-ordering.yaml",
     _arg("app", "--for", "--for=ready:db", "startup-ordering-records"),
     "no container writes the record 'db'"),
    ("job-sidecar-never-exits", "job-with-sidecars.yaml",
     _arg("log-adapter", "--exit-with", None), "needs --exit-with"),
    ("health-dir-unmounted", "job-with-sidecars.yaml",
     _field("db-ambassador", "volumeMounts", ...), "--health-dir /run/pod is not on a volume"),
    ("health-dir-read-only", "health-records.yaml",
     _field("worker", "volumeMounts", [{"name": "pod-health", "mountPath": "/run/pod",
                                        "readOnly": True},
                                       {"name": "worker-tmp", "mountPath": "/tmp"}]),
     "mounted read-only"),
    ("checkpoint-on-root", "adapter-stdout.yaml",
     _arg("log-adapter", "--checkpoint-dir", "--checkpoint-dir=/var/lib/podpatterns"),
     "--checkpoint-dir /var/lib/podpatterns is not on a writable volume"),
    ("tail-unmounted", "adapter-stdout.yaml",
     _arg("log-adapter", "--path", "--path=/var/log/app/*.log"), "is not on a volume"),
    ("admin-port-clash", "job-with-sidecars.yaml",
     _both(_arg("log-adapter", "--admin", "--admin=0.0.0.0:9901"),
           _field("log-adapter", "ports", [{"name": "admin", "containerPort": 9901}])),
     "port 9901 is also bound by db-ambassador"),
    ("listen-on-admin-port", "ambassador-postgres.yaml",
     _arg("db-ambassador", "--listen", "--listen=127.0.0.1:9901"), "9901"),
    ("admin-on-app-port", "adapter-stdout.yaml",
     _arg("log-adapter", "--admin", "--admin=0.0.0.0:8080"), "port 8080 is also bound"),
    ("watch-subpath", "config-reload.yaml",
     _field("config-reload", "volumeMounts", [{"name": "nginx-conf",
                                               "mountPath": "/etc/nginx/podpatterns",
                                               "subPath": "conf"},
                                              {"name": "nginx-run", "mountPath": "/run/nginx"}]),
     "subPath"),
    ("signal-without-shared-pids", "config-reload.yaml",
     _pod_field("shareProcessNamespace", ...), "shareProcessNamespace"),
    ("server-as-init-container", "ambassador-postgres.yaml",
     _field("db-ambassador", "restartPolicy", ...), "never finishes"),
    # policy
    ("root", "ambassador-postgres.yaml",
     _both(_field("app", "securityContext.runAsNonRoot", ...),
           _pod_field("securityContext", {})), "app: runAsNonRoot is not true"),
    ("uid-0", "adapter-stdout.yaml",
     _field("nginx", "securityContext.runAsUser", 0), "runAsUser is 0"),
    ("writable-root", "adapter-stdout.yaml",
     _field("log-adapter", "securityContext.readOnlyRootFilesystem", False),
     "readOnlyRootFilesystem is not true"),
    ("privileged", "job-with-sidecars.yaml",
     _field("main", "securityContext.privileged", True), "main: privileged"),
    ("escalation", "health-records.yaml",
     _field("web", "securityContext.allowPrivilegeEscalation", True),
     "allowPrivilegeEscalation is not false"),
    ("capabilities", "config-reload.yaml",
     _field("config-reload", "securityContext.capabilities", {"drop": ["NET_RAW"]}),
     "do not drop ALL"),
    ("capability-added", "config-reload.yaml",
     _field("nginx", "securityContext.capabilities", {"drop": ["ALL"], "add": ["KILL"]}),
     "capabilities add"),
    ("seccomp", "startup-ordering.yaml",
     _both(_field("wait-for-database", "securityContext.seccompProfile", ...),
           _pod_field("securityContext", {"runAsNonRoot": True}, "startup-ordering")),
     "seccompProfile is None"),
    ("no-limits", "ambassador-postgres.yaml",
     _field("db-ambassador", "resources.limits", ...), "no limits.memory"),
    ("no-startup-probe", "adapter-stdout.yaml",
     _field("log-adapter", "startupProbe", ...), "no startupProbe"),
    ("no-liveness-probe", "job-with-sidecars.yaml",
     _field("db-ambassador", "livenessProbe", ...), "no livenessProbe"),
    ("short-grace", "ambassador-postgres.yaml",
     _pod_field("terminationGracePeriodSeconds", 15), "does not cover"),
    ("image-name", "ambassador-postgres.yaml",
     _field("db-ambassador", "image", "podpatterns-ambassador:latest"), "is not written as"),
    ("untagged-image", "adapter-stdout.yaml",
     _field("nginx", "image", "nginx"), "has no fixed tag"),
    ("host-network", "health-records.yaml", _pod_field("hostNetwork", True), "hostNetwork"),
    ("other-uid", "job-with-sidecars.yaml",
     _field("db-ambassador", "securityContext.runAsUser", 1000), "runAsUser is not 65532"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("file", "mutate", "expected"),
    [pytest.param(f, m, e, id=i) for i, f, m, e in MUTATIONS],
)
def test_broken_example_is_caught(file: str, mutate: Mutation, expected: str) -> None:
    """An example broken in one way fails the checks, with a problem that says how."""
    docs = load_documents((EXAMPLES / file).read_text())
    assert not all_problems(docs), f"{file} must pass before it is broken"
    broken = copy.deepcopy(docs)
    mutate(broken)
    problems = all_problems(broken)
    assert any(expected in p for p in problems), (expected, problems)


def test_every_example_has_a_mutation() -> None:
    """Each example file is broken by at least one mutation test."""
    assert {f for _, f, _, _ in MUTATIONS} == EXPECTED
