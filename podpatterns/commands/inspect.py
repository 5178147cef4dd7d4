"""``podpatterns inspect``: everything a ``kubectl debug`` session needs, one-shot, read-only.

It finds every podpatterns process of the Pod from ``/proc`` (the target's PID namespace,
or the Pod's when it shares one), the health directories they use (read through
``/proc/PID/root`` when the debug container does not mount the volume) and their admin
servers (from each process's ``--admin`` flag, ``PODPATTERNS_ADMIN``, ``--config`` file, or
the default), plus the ``--admin URL`` and ``--health-dir`` given. It asks each admin
server for ``GET /status`` and ``GET /readyz``, reads every health record once, prints
what it found (or JSON with ``--json``) and exits 0 when everything is healthy, 1 when
something is not. It changes nothing: no POST, no write, no signal.

A health record is judged on inspect's own wall clock (the containers of a Pod share the
node's clock): a record whose last heartbeat is older than
:data:`~podpatterns.health.records.STALE_AFTER` intervals is stale. One read cannot see a
heartbeat advance, so the readers' "unconfirmed" state does not apply here.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from podpatterns import logs
from podpatterns.commands.common import Command, Flags
from podpatterns.errors import ConfigError
from podpatterns.health.reader import State, Tracker
from podpatterns.health.records import STALE_AFTER, exit_summary
from podpatterns.options import (
    HostPort,
    Option,
    load_yaml,
    parse_bool,
    parse_duration,
    parse_hostport,
    parse_int,
    parse_path,
    resolve,
)
from podpatterns.runtime import RUNTIME_OPTIONS
from podpatterns.runtime.status import REDACTED, redact_text


def parse_admin_url(text: str) -> str:
    """``http://HOST:PORT`` or ``HOST:PORT`` -> the admin server's base URL."""
    text = text.strip().rstrip("/")
    if "://" not in text:
        hp = parse_hostport(text)
        return f"http://{hp}"
    parts = urlsplit(text)
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError("is not an admin server URL (e.g. http://127.0.0.1:9901)")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        raise ValueError("has no valid port (e.g. http://127.0.0.1:9901)")
    return f"http://{parts.netloc}"


INSPECT_OPTIONS: tuple[Option[Any], ...] = (
    Option(
        "admin",
        parse_admin_url,
        (),
        "an admin server to ask too (http://HOST:PORT); repeat for several",
        multiple=True,
        metavar="URL",
        scope="inspect",
    ),
    Option(
        "health_dir",
        parse_path,
        (),
        "a health directory to read too; repeat for several",
        multiple=True,
        metavar="DIR",
        scope="inspect",
    ),
    Option(
        "pid",
        parse_int(1),
        (),
        "look only at these processes (default: every podpatterns process in /proc)",
        multiple=True,
        metavar="PID",
        scope="inspect",
    ),
    Option(
        "json",
        parse_bool,
        False,
        "print JSON instead of text",
        flag=True,
        scope="inspect",
    ),
    Option(
        "timeout",
        parse_duration,
        2.0,
        "time each admin server request may take",
        metavar="DURATION",
        scope="inspect",
    ),
)

PROC = Path("/proc")
"""Where processes are found (the debug container's view of the PID namespace)."""

ADMIN_COMMANDS = ("ambassador", "adapter", "health", "reload", "demo")
"""The commands that serve an admin server."""

FOUND_COMMANDS = (*ADMIN_COMMANDS, "run", "wait")
"""The commands inspect looks for: every one but itself (``run`` and ``wait`` have no
admin server; tests/test_inspect.py checks this against the command table)."""

_DEFAULT_ADMIN = next(o for o in RUNTIME_OPTIONS if o.name == "admin")


@dataclass(frozen=True)
class InspectConfig:
    """``podpatterns inspect``'s config (see :data:`INSPECT_OPTIONS`)."""

    admin: tuple[str, ...] = ()
    health_dir: tuple[Path, ...] = ()
    pid: tuple[int, ...] = ()
    json: bool = False
    timeout: float = 2.0


def build(
    flags: Flags, env: Mapping[str, str], file: Mapping[str, Any], file_label: str = ""
) -> InspectConfig:
    """Build from flags > env > defaults (``inspect`` reads no config file).

    Raises:
        ConfigError: naming the flag or environment variable at fault.
    """
    values = resolve(INSPECT_OPTIONS, flags, env, file, file_label)
    if values["timeout"] <= 0:
        raise ConfigError(f"--timeout: {values['timeout']!r} must be > 0")
    return InspectConfig(**values)


# -- finding the processes -------------------------------------------------------------------


@dataclass
class Process:
    """A podpatterns process found in ``/proc``.

    Attributes:
        pid: its PID (in inspect's PID namespace).
        command: the subcommand (``ambassador``, ``run``...).
        argv: its command line (secrets in it redacted when shown).
        uid: its real user id, when readable.
        gid: its real group id, when readable.
        name: its ``--name`` (run, health).
        health_dir: its ``--health-dir`` as the process sees it.
        admin: the admin server's URL, when one could be worked out.
        unchecked: why its admin server could not be worked out, when it has one.
        notes: what could not be read or worked out, and why.
    """

    pid: int
    command: str
    argv: list[str]
    uid: int | None = None
    gid: int | None = None
    name: str | None = None
    health_dir: str | None = None
    admin: str | None = None
    unchecked: str | None = None
    notes: list[str] = field(default_factory=list)


def _subcommand(argv: Sequence[str], commands: Sequence[str]) -> tuple[str, int] | None:
    """(subcommand, its index) when ``argv`` runs podpatterns, else None."""
    for i, word in enumerate(argv[:-1]):
        # the executable (a console script, the copy-in executable) or ``-m podpatterns``
        if os.path.basename(word) == "podpatterns":
            sub = argv[i + 1]
            if sub in commands:
                return sub, i + 1
    return None


def _flag(args: Sequence[str], flag: str) -> str | None:
    """The last value of ``--flag VALUE`` / ``--flag=VALUE`` before ``--``."""
    value = None
    for i, word in enumerate(args):
        if word == "--":
            break
        if word == flag and i + 1 < len(args):
            value = args[i + 1]
        elif word.startswith(flag + "="):
            value = word[len(flag) + 1 :]
    return value


SECRET_FLAGS = ("--sink-header",)
"""Flags whose values are secret: ``NAME=VALUE`` is shown as ``NAME=<redacted>``."""


def redact_argv(words: Sequence[str]) -> list[str]:
    """A command line as inspect shows it: the values of :data:`SECRET_FLAGS` and any
    URL userinfo or authorization value redacted."""
    out = []
    secret_next = False
    for word in words:
        flag, eq, value = word.partition("=")
        if secret_next:
            name, sep, _ = word.partition("=")
            word = f"{name}={REDACTED}" if sep else REDACTED
        elif eq and flag in SECRET_FLAGS:
            name, sep, _ = value.partition("=")
            word = f"{flag}={name}={REDACTED}" if sep else f"{flag}={REDACTED}"
        secret_next = word in SECRET_FLAGS
        out.append(redact_text(word))
    return out


def _read_environ(pid: int) -> dict[str, str]:
    """The process's environment. Raises OSError (a permission, for another user's)."""
    raw = (PROC / str(pid) / "environ").read_bytes()
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key.startswith(b"PODPATTERNS_"):
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def _ids(pid: int) -> tuple[int | None, int | None]:
    """The real uid and gid from ``/proc/PID/status`` (readable by anyone)."""
    uid = gid = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
            elif line.startswith("Gid:"):
                gid = int(line.split()[1])
    return uid, gid


def in_target(pid: int, path: str) -> Path:
    """``path`` as process ``pid`` sees it: itself when this container sees the same
    directory (the volume is mounted here too), else through ``/proc/PID/root``."""
    if not path.startswith("/"):  # relative to the process's working directory
        return PROC / str(pid) / "cwd" / path
    local = Path(path)
    through = PROC / str(pid) / "root" / path.lstrip("/")
    try:
        here = local.is_dir()
    except PermissionError:
        here = True  # it is here, but not for this user: say so (read_records)
    return local if here and _same_dir(local, through) else through


def _same_dir(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return True  # the target's side cannot be read: the local copy is all we have
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _admin_of(proc: Process, args: Sequence[str], env: Mapping[str, str]) -> None:
    """Work out ``proc.admin`` as the process resolved it: flag > env > file > default."""
    raw = _flag(args, "--admin")
    where = "--admin"
    if raw is None and "PODPATTERNS_ADMIN" in env:
        raw, where = env["PODPATTERNS_ADMIN"], "PODPATTERNS_ADMIN"
    if raw is None:
        config = _flag(args, "--config") or env.get("PODPATTERNS_CONFIG")
        if config:
            try:
                file = load_yaml(in_target(proc.pid, config))
            except (ConfigError, OSError) as exc:
                proc.notes.append(f"its --config {config} cannot be read here ({exc})")
                file = {}
            if "admin" in file:
                raw, where = str(file["admin"]), f"{config}: admin"
    try:
        bind = _DEFAULT_ADMIN.parse_from(raw, where) if raw is not None else _DEFAULT_ADMIN.default
    except ConfigError as exc:
        proc.unchecked = str(exc)
        proc.notes.append(proc.unchecked)
        return
    if bind is None:
        proc.notes.append("its admin server is off (--admin off)")
        return
    if bind.port == 0:
        proc.unchecked = "its admin port was chosen at start (port 0): give --admin URL"
        proc.notes.append(proc.unchecked)
        return
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind.host, bind.host)
    proc.admin = f"http://{HostPort(host, bind.port)}"


def find_processes(pids: Sequence[int] = ()) -> list[Process]:
    """Every podpatterns process visible in ``/proc`` but this one (or those of ``pids``)."""
    own = os.getpid()
    candidates = pids or sorted(int(p.name) for p in PROC.iterdir() if p.name.isdigit())
    found = []
    for pid in candidates:
        if pid == own:
            continue
        try:
            argv = (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue  # gone, or hidden (hidepid)
        words = argv.rstrip("\0").split("\0")
        hit = _subcommand(words, FOUND_COMMANDS)
        if hit is None:
            continue
        command, at = hit
        args = words[at + 1 :]
        proc = Process(pid, command, redact_argv(words))
        proc.uid, proc.gid = _ids(pid)
        try:
            env = _read_environ(pid)
        except OSError as exc:
            env = {}
            proc.notes.append(
                f"its environment is not readable ({exc.strerror}): PODPATTERNS_* settings "
                f"unknown (run as uid {proc.uid})"
            )
        proc.name = _flag(args, "--name") or env.get("PODPATTERNS_NAME")
        proc.health_dir = _flag(args, "--health-dir") or env.get("PODPATTERNS_HEALTH_DIR")
        if command in ADMIN_COMMANDS:
            _admin_of(proc, args, env)
        found.append(proc)
    return found


# -- asking the admin servers ------------------------------------------------------------------


def fetch(url: str, path: str, timeout: float) -> tuple[int, Any]:
    """``GET url+path``: (HTTP status, parsed JSON body or text). Raises OSError."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Accept": "application/json"})
        resp = conn.getresponse()
        data = resp.read(4 * 1024 * 1024)
    except http.client.HTTPException as exc:
        raise OSError(f"bad HTTP answer: {exc}") from None
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, data.decode(errors="replace")[:200]


def ask_admin(url: str, timeout: float) -> dict[str, Any]:
    """``/status`` and ``/readyz`` of one admin server, and its problems."""
    out: dict[str, Any] = {"url": url, "problems": []}
    problems: list[str] = out["problems"]
    try:
        code, status = fetch(url, "/status", timeout)
        ready_code, _ = fetch(url, "/readyz", timeout)
    except OSError as exc:
        out["error"] = str(exc) or type(exc).__name__
        problems.append(f"{url}: unreachable ({out['error']})")
        return out
    out["readyz"] = ready_code
    if code == 403:
        problems.append(
            f"{url}: /status answers loopback peers only; run inspect inside the Pod "
            "(kubectl debug --target) or against 127.0.0.1"
        )
    elif code != 200 or not isinstance(status, dict):
        problems.append(f"{url}: /status answered HTTP {code} (an older podpatterns?)")
    else:
        out["status"] = status
        problems += [f"{url}: not ready: {why}" for why in status.get("not_ready", [])]
        for name, comp in (status.get("components") or {}).items():
            problems += [f"{url}: {name}: {w}" for w in comp.get("warnings", [])]
            if not comp.get("live", True):
                problems.append(f"{url}: {name}: not live (a background task died)")
    if ready_code != 200 and not any("not ready" in p for p in problems):
        problems.append(f"{url}: /readyz answered {ready_code}")
    return out


# -- reading the health records ----------------------------------------------------------------


def read_records(directory: Path, now: float) -> dict[str, Any]:
    """Every record of a health directory, judged once on this clock.

    Returns:
        ``{"path", "records": {name: {...}}, "problems": [...]}``, or with ``error``
        when the directory cannot be read (``denied`` for a permission).
    """
    out: dict[str, Any] = {"path": str(directory), "records": {}, "problems": []}
    try:
        os.listdir(directory)
    except OSError as exc:
        out["error"] = exc.strerror or str(exc)
        out["denied"] = isinstance(exc, PermissionError)
        out["problems"].append(f"{directory}: cannot read ({out['error']})")
        return out
    tracker = Tracker(directory, tombstone_grace=float("inf"), component="inspect")
    for name, st in tracker.statuses().items():
        rec = st.record
        entry: dict[str, Any] = {"state": st.state.value, "error": st.error}
        healthy = False
        if rec is not None:
            beat = now - rec.updated_at
            stale = (
                not rec.exited and rec.interval is not None and beat > STALE_AFTER * rec.interval
            )
            entry.update(
                phase=rec.phase.value,
                pid=rec.pid,
                instance=rec.instance,
                age=round(now - rec.started_at, 3),
                heartbeat_age=round(beat, 3),
                interval=rec.interval,
                stale=stale,
                reason=rec.reason,
                checks=[asdict(c) for c in rec.checks],
            )
            if rec.exited:
                entry["exit_code"] = rec.exit_code
                entry["signal"] = rec.signal
                entry["summary"] = "exited " + exit_summary(rec)
                healthy = rec.exit_code == 0
            elif stale:
                entry["state"] = State.STALE.value
                entry["summary"] = (
                    f"no heartbeat for {beat:.1f}s (every {rec.interval:g}s promised)"
                )
            else:
                entry["state"] = rec.phase.value  # one read: no heartbeat to confirm
                healthy = rec.phase.value == "ready"
                entry["summary"] = rec.phase.value + (f" ({rec.reason})" if rec.reason else "")
        else:
            entry["summary"] = st.describe()
        if st.state is State.UNKNOWN:
            healthy = False
        entry["healthy"] = healthy
        if not healthy:
            out["problems"].append(f"container {name}: {entry['summary']}")
        out["records"][name] = entry
    return out


def _mount_volume(pid: int, path: str) -> str | None:
    """The Pod volume mounted at ``path`` in process ``pid``'s container, from its
    mountinfo (kubelet's ``.../volumes/kubernetes.io~empty-dir/NAME``), if it shows."""
    with contextlib.suppress(OSError):
        for line in (PROC / str(pid) / "mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 4 and fields[4] == path.rstrip("/"):
                root = fields[3]
                if "/volumes/" in root:
                    return root.rsplit("/", 1)[-1]
    return None


def permission_help(proc: Process, path: str) -> dict[str, Any]:
    """What is missing to read ``proc``'s health directory, and the ``kubectl debug``
    custom profile that provides it (run as its user and mount the volume)."""
    volume = _mount_volume(proc.pid, path) or "VOLUME-NAME-FROM-THE-POD-SPEC"
    security: dict[str, Any] = {}
    if proc.uid is not None:
        security = {"runAsUser": proc.uid, "runAsNonRoot": proc.uid != 0}
        if proc.gid is not None:
            security["runAsGroup"] = proc.gid
    profile = {
        "securityContext": security,
        "volumeMounts": [{"name": volume, "mountPath": path, "readOnly": True}],
    }
    return {
        "pid": proc.pid,
        "path": path,
        "inspect_uid": os.getuid(),
        "target_uid": proc.uid,
        "custom_profile": profile,
    }


# -- the whole picture -------------------------------------------------------------------------


def inspect(config: InspectConfig) -> dict[str, Any]:
    """Find, ask and read everything; the report that :func:`render` prints."""
    now = time.time()
    procs = find_processes(config.pid)
    admins = list(dict.fromkeys([*(p.admin for p in procs if p.admin), *config.admin]))
    dirs: dict[str, tuple[Path, Process | None]] = {}
    for d in config.health_dir:
        dirs.setdefault(str(d), (d, None))
    for p in procs:
        if p.health_dir:
            dirs.setdefault(p.health_dir, (in_target(p.pid, p.health_dir), p))
    problems: list[str] = []
    for p in procs:
        # Its admin server could not be worked out: unless --admin URLs were given (one
        # of them may be it), its state is unknown, which is not "healthy".
        if p.unchecked and not config.admin:
            problems.append(f"PID {p.pid} ({p.command}): not checked: {p.unchecked}")
    health = []
    access = []
    for shown_path, (path, owner) in dirs.items():
        result = read_records(path, now)
        result["dir"] = shown_path
        if result.get("denied") and owner is not None:
            access.append(permission_help(owner, shown_path))
        health.append(result)
        problems += result["problems"]
    answers = [ask_admin(url, config.timeout) for url in admins]
    for a in answers:
        problems += a["problems"]
    if not procs and not admins and not dirs:
        problems.append(
            "no podpatterns process found in /proc and no --admin or --health-dir given "
            "(kubectl debug needs --target=CONTAINER, or the Pod shareProcessNamespace)"
        )
    return {
        "time": now,
        "processes": [asdict(p) for p in procs],
        "admins": answers,
        "health": health,
        "access": access,
        "problems": problems,
        "healthy": not problems,
    }


# -- printing ----------------------------------------------------------------------------------


def _ago(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.1f}s"


def _expires(cert: dict[str, Any]) -> str:
    """``expires 2027-03-01 (89 days)``, or why the certificate could not be read."""
    if "error" in cert:
        return str(cert["error"])
    when = time.strftime("%Y-%m-%d", time.gmtime(cert["not_after"]))
    return f"expires {when} ({cert['expires_in'] / 86400:.0f} days)"


def _route_lines(route: dict[str, Any]) -> list[str]:
    c = route["connections"]
    cap = c["cap"] if c["cap"] else "no cap"
    lines = [
        f"    route {route['name']}  listen {route['listen']}  {route['protocol']}/"
        f"{route['relay']}  {'ready' if route['ready'] else 'NOT READY'}"
        f"  connections {c['active']}/{cap}  accepted {c['accepted']}"
    ]
    lines += [f"      not ready: {why}" for why in route["not_ready"]]
    for e in route["endpoints"]:
        extra = f" ({e['cooldown_left']:.1f}s left)" if e["state"] == "cooldown" else ""
        fails = ", ".join(f"{k} {v}" for k, v in e["connect_failures"].items()) or "none"
        lines.append(
            f"      endpoint {e['address']}  {e['state']}{extra}  active {e['active']}  "
            f"connects {e['connects']}  connect failures: {fails}"
        )
    for what in ("refused", "failed"):
        if c[what]:
            lines.append(f"      {what}: " + ", ".join(f"{k} {v}" for k, v in c[what].items()))
    tls = route.get("tls")
    if tls:
        for which, cert in tls["certificates"].items():
            lines.append(f"      tls {which} {cert['path']}: {_expires(cert)}")
        for peer in tls.get("upstream", []):
            lines.append(f"      tls upstream {peer['server_name']} (last seen): {_expires(peer)}")
    return lines


def _adapter_lines(a: dict[str, Any]) -> list[str]:
    lines = [f"    files ({a['mode']}), lag {a['lag_bytes']} bytes:"]
    for f in a["files"]:
        lines.append(
            f"      {f['path']}  size {f['size']}  acked {f['acked']}  lag {f['lag_bytes']} "
            f"bytes / {f['lag_seconds']:.1f}s" + ("  (rotated)" if f["rotated"] else "")
        )
    cp = a["checkpoint"]
    if cp:
        lines.append(f"    checkpoint {cp['path']}  age {_ago(cp['age'])}  writes {cp['writes']}")
    else:
        lines.append("    checkpoint: none (--checkpoint-dir not set)")
    for s in a["sinks"]:
        state = f"FAILING for {s['failing_for']:.0f}s, retrying" if s["failing"] else "ok"
        counters = ", ".join(f"{k} {v}" for k, v in s["counters"].items())
        lines.append(
            f"    sink {s['name']}: {state}  records {s['records']}, "
            f"pending {s['pending_bytes']} bytes  ({counters})"
        )
    lines.append(f"    sink errors retried: {a['errors_retried']}")
    for name, counters in a.get("inputs", {}).items():
        shown = ", ".join(f"{k} {v}" for k, v in counters.items())
        lines.append(f"    input {name}: {shown}")
    if a.get("spool"):
        shown = ", ".join(f"{k} {v}" for k, v in a["spool"]["counters"].items())
        lines.append(f"    spool {a['spool']['directory']}: {shown}")
    dl = a["dead_letter"]
    lines.append(
        f"    dead letters: {dl['written']} written, {dl['dropped']} dropped"
        + (f"  ({dl['path']})" if dl["path"] else "")
    )
    return lines


def _component_lines(name: str, comp: dict[str, Any]) -> list[str]:
    state = "ready" if comp["ready"] else "NOT READY"
    lines = [f"  {name}: {state}  in flight {comp['in_flight']}"]
    lines += [f"    not ready: {why}" for why in comp.get("not_ready", []) if not comp["ready"]]
    for route in comp.get("routes", []):
        lines += _route_lines(route)
    if "files" in comp:
        lines += _adapter_lines(comp)
    for probe in comp.get("probes", []):
        lines.append(
            f"    probe {probe['probe']}: {'passing' if probe['passing'] else 'FAILING'}  "
            f"last: {probe['last']}"
        )
    if "pending" in comp:
        pending = comp["pending"]
        lines.append(
            f"    reload: version {comp['current']}, delivered {comp['delivered']}, "
            + (f"PENDING {pending['version']}" if pending else "nothing pending")
            + ("  (notify failing)" if comp["failing"] else "")
        )
    lines += [f"    warning: {w}" for w in comp.get("warnings", [])]
    return lines


def render(report: dict[str, Any]) -> str:
    """The report as text for a person."""
    out = [f"podpatterns inspect  {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}", ""]
    out.append(f"processes ({len(report['processes'])})")
    for p in report["processes"]:
        where = [
            f"admin {p['admin']}" if p["admin"] else "",
            f"name {p['name']}" if p["name"] else "",
        ]
        if p["health_dir"]:
            where.append(f"health-dir {p['health_dir']}")
        out.append(
            f"  PID {p['pid']:<6} {p['command']:<10} uid {p['uid']}  "
            + "  ".join(w for w in where if w)
        )
        out += [f"    note: {n}" for n in p["notes"]]
    for a in report["admins"]:
        out += ["", f"admin {a['url']}"]
        st = a.get("status")
        if st is None:
            out += [f"  {p}" for p in a["problems"]]
            continue
        state = "ready" if st["ready"] else "NOT READY"
        out.append(f"  PID {st['pid']}  phase {st['phase']}  {state}  /readyz {a['readyz']}")
        if not st["ready"]:
            out += [f"  why not ready: {why}" for why in st["not_ready"]]
        for name, comp in st["components"].items():
            out += _component_lines(name, comp)
    for h in report["health"]:
        out += [
            "",
            f"health records in {h['dir']}"
            + (f"  (read as {h['path']})" if h["path"] != h["dir"] else ""),
        ]
        if "error" in h:
            out.append(f"  cannot read: {h['error']}")
        for name, r in sorted(h["records"].items()):
            if "phase" not in r:
                out.append(f"  {name:<16} {r['state']:<10} {r['summary']}")
                continue
            beat = f"heartbeat {_ago(r['heartbeat_age'])} ago"
            beat += f" (every {r['interval']:g}s)" if r["interval"] else " (no heartbeat promised)"
            summary = "" if r["summary"] == r["state"] else f"  {r['summary']}"
            out.append(f"  {name:<16} {r['state']:<10} age {_ago(r['age'])}  {beat}{summary}")
            for c in r["checks"]:
                out.append(
                    f"    check {c['name']}: {'ok' if c['ok'] else 'FAILING'} {c['message']}"
                )
    for a in report["access"]:
        out += [
            "",
            f"cannot read {a['path']} of PID {a['pid']} (here, or through /proc/{a['pid']}/root): "
            f"inspect runs as uid {a['inspect_uid']}, the target as uid {a['target_uid']}.",
            "  Either run the debug container as the target's user, or mount the volume (or both):",
            "  kubectl debug -it POD --image=IMAGE --target=CONTAINER --custom=profile.json "
            "-- podpatterns inspect",
            "  with profile.json:",
            "  " + json.dumps(a["custom_profile"]),
        ]
    out.append("")
    if report["healthy"]:
        out.append("all healthy")
    else:
        out.append(f"{len(report['problems'])} problem(s):")
        out += [f"  - {p}" for p in report["problems"]]
    return "\n".join(out) + "\n"


def main(config: InspectConfig) -> int:
    """Inspect once and print; 0 when everything is healthy, 1 otherwise."""
    logs.configure("error", "json")  # the readers' warnings are in the report already
    report = inspect(config)
    if config.json:
        sys.stdout.write(json.dumps(report, indent=1) + "\n")
    else:
        sys.stdout.write(render(report))
    return 0 if report["healthy"] else 1


COMMAND = Command(
    name="inspect",
    help="print what every podpatterns process of the Pod is doing (for kubectl debug)",
    description="One-shot and read-only: find the podpatterns processes in /proc, read "
    "their health records (through /proc/PID/root when the volume is not mounted here), "
    "ask their admin servers for /status and /readyz, and print it all (--json for "
    "machines). Exit 0 when everything is healthy, 1 when something is not.",
    options=INSPECT_OPTIONS,
    build=build,
    main=main,
)
