"""Adapter benchmark: throughput, CPU, latency and idle cost, against ``cat`` and a peer.

One run, interleaved over ``--reps`` repetitions (each repetition runs every case with
every program in turn), measures for each case:

- ``podpatterns adapter`` with the stdout sink redirected to a file, or the HTTP sink
  POSTing to the receiver below. It is started on the complete input and sent SIGTERM as
  soon as it reports ``adapter_started`` (a graceful stop reads every open file to its
  end, ships it and exits); wall time runs from then until exit, CPU is the child's
  user + system time.
- ``cat`` of the same file to a file: the physical limit.
- a real peer doing the same work, timed from its start until every line arrived
  (output polled); CPU from ``/proc/PID/stat``:
  - rsyslog for the stdout cases: a separate ``rsyslogd -n`` with its own configuration
    in a temporary directory, ``imfile`` (inotify, ``freshStartTail="off"``), then
    ``mmjsonparse`` (JSON) or ``mmnormalize`` with a liblognorm rulebase (nginx), and
    ``omfile`` to a temporary file;
  - syslog-ng 3.38 for the HTTP cases (Debian 12 has no rsyslog ``omhttp``):
    ``file()`` -> ``json-parser()`` -> ``http()``. ``syslog-ng-core`` conflicts with
    rsyslog as a Debian package, so it runs from the unpacked .debs (``--syslog-ng-root``,
    by default ``.cache/syslog-ng/root``, which ``./dev bench-adapter`` prepares).

HTTP cases ship to ``bench/http_receiver.py``, a process of its own on core 0 that
decompresses and counts records; every line must arrive, and its CPU share is recorded.
The program under test runs on core 1 and the benchmark itself (generators, pollers) on
core 0 (``taskset``). It also measures write-to-emit latency (a writer appends
timestamped lines at a fixed rate; inotify and forced polling) and the CPU an adapter
idling on 100 files uses. Usage::

    .venv/bin/python bench/adapter.py [--lines N] [--reps N] [--write-docs]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PIN_SUT = ["taskset", "-c", "1"]
DEADLINE_S = 300.0  # no single measurement may take longer


LEVELS = ("info",) * 16 + ("debug", "debug", "warn", "error")


def write_inputs(directory: Path, n: int) -> dict[str, Path]:
    """raw (logfmt-ish), nginx combined and JSON inputs of ``n`` lines each.

    Like real logs, every line carries its own timestamp (millisecond steps), and the
    JSON lines a unique request id, varying paths, users and client addresses: a constant
    field would make the per-batch redaction memo look better than it is.
    """
    files = {name: directory / f"{name}.log" for name in ("raw", "nginx", "json")}

    def stamp(i: int) -> str:
        return f"2024-05-01T12:{i // 60_000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}Z"

    with files["raw"].open("wb") as f:
        for i in range(n):
            f.write(
                f"ts={stamp(i)} level={LEVELS[i % 20]} seq={i} "
                f'msg="handled" ms={i % 500}\n'.encode()
            )
    with files["nginx"].open("wb") as f:
        for i in range(n):
            f.write(
                f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255} - - "
                f'[17/May/2015:{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d} +0000] "GET '
                f'/api/items/{i % 10007}?page={i % 13} HTTP/1.1" '
                f"{(200, 200, 200, 304, 404)[i % 5]} {i % 5000} "
                f'"-" "Mozilla/5.0 seq={i}"\n'.encode()
            )
    with files["json"].open("wb") as f:
        for i in range(n):
            rec = {
                "ts": stamp(i),
                "level": LEVELS[i % 20],
                "seq": i,
                "request_id": f"{i * 0x9E3779B97F4A7C15 % (1 << 64):016x}",
                "path": f"/api/v1/users/{i % 9973}",
                "msg": f"user u{i % 5003}@example.com logged in from "
                f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            }
            f.write(json.dumps(rec).encode() + b"\n")
    return files


def cpu_children() -> float:
    """CPU seconds (user + system) of the waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a live process, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def count_lines(path: Path) -> int:
    """Newlines in ``path``."""
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def run_cat(path: Path, out: Path) -> tuple[float, float]:
    """Wall and CPU seconds of ``cat path > out`` on the program core."""
    cpu0, t0 = cpu_children(), time.monotonic()
    with out.open("wb") as sink:
        subprocess.run([*PIN_SUT, "cat", str(path)], stdout=sink, check=True, timeout=DEADLINE_S)
    return time.monotonic() - t0, cpu_children() - cpu0


def adapter_cmd(paths: str, args: list[str]) -> list[str]:
    """The pinned ``podpatterns adapter`` command line."""
    return [
        *PIN_SUT,
        sys.executable,
        "-m",
        "podpatterns",
        "adapter",
        "--path",
        paths,
        "--admin",
        "off",
        "--shutdown-delay",
        "0",
        "--drain-timeout",
        "600",
        "--log-format",
        "json",
        *args,
    ]


def wait_started(p: subprocess.Popen[bytes]) -> None:
    """Read the adapter's stderr until it reports it started."""
    assert p.stderr is not None
    for line in p.stderr:
        if b"adapter_started" in line:
            return
    raise RuntimeError("adapter exited before it started")


def run_adapter(path: Path, out: Path, args: list[str]) -> tuple[float, float, int]:
    """Wall seconds after start, CPU seconds, and lines shipped (to stdout, in ``out``)."""
    cpu0 = cpu_children()
    with out.open("wb") as sink:
        p = subprocess.Popen(adapter_cmd(str(path), args), stdout=sink, stderr=subprocess.PIPE)
        assert p.stderr is not None
        wait_started(p)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        p.stderr.read()
        code = p.wait(timeout=DEADLINE_S)
        wall = time.monotonic() - t0
    assert code == 0, code
    return wall, cpu_children() - cpu0, count_lines(out)


class Receiver:
    """The counting HTTP receiver (bench/http_receiver.py), a process of its own on core 0.

    The benchmark's own work (pollers) shares core 0 with it, so its CPU share per
    measurement is recorded: a receiver near 100% of a core would be the bottleneck.
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, str(ROOT / "bench" / "http_receiver.py")],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().decode()
        if not first.startswith("PORT "):
            raise RuntimeError(f"http_receiver did not start: {first!r}")
        self.port = int(first.split()[1])
        self.url = f"http://127.0.0.1:{self.port}/ingest"
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def _call(self, method: str, path: str) -> bytes:
        self.conn.request(method, path)
        resp = self.conn.getresponse()
        return resp.read()

    def reset(self) -> None:
        """Zero the counts."""
        self._call("POST", "/reset")

    def counts(self) -> dict[str, int]:
        """requests, gzip_requests, lines, wire_bytes, body_bytes so far."""
        counts: dict[str, int] = json.loads(self._call("GET", "/count"))
        return counts

    def sample(self) -> str:
        """The first record received since the last reset."""
        return self._call("GET", "/sample").decode(errors="replace")

    def cpu(self) -> float:
        """CPU seconds the receiver used so far."""
        return proc_cpu(self.proc.pid)

    def close(self) -> None:
        """Stop the receiver process."""
        self.conn.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def run_adapter_http(
    path: Path, rx: Receiver, args: list[str]
) -> tuple[float, float, int, dict[str, Any]]:
    """As :func:`run_adapter`, shipping to the receiver; lines are what it counted."""
    rx.reset()
    rx_cpu0 = rx.cpu()
    wall, cpu, _ = run_adapter(path, Path(os.devnull), [*args, "--sink-url", rx.url])
    counts = rx.counts()
    extra = {**counts, "receiver_cpu": rx.cpu() - rx_cpu0, "sample": rx.sample()}
    return wall, cpu, counts["lines"], extra


def run_peer(
    cmd: list[str],
    work: Path,
    progress: Callable[[], int],
    want: int,
    env: dict[str, str] | None = None,
) -> tuple[float, float, int]:
    """Run a peer until ``progress()`` reports ``want`` lines delivered; then stop it.

    Returns:
        Wall seconds from its start, its CPU seconds at that moment, and the lines.
    """
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while (lines := progress()) < want:
            if time.monotonic() - t0 > DEADLINE_S or p.poll() is not None:
                break
            time.sleep(0.005)
        wall = time.monotonic() - t0
        cpu = proc_cpu(p.pid)
    finally:
        p.terminate()
        p.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    return wall, cpu, lines


RSYSLOG_TEMPLATES = {
    "raw": 'template(name="out" type="string" string="%msg%\\n")',
    # mmnormalize puts the fields under $!; all-json-plain renders them without spaces.
    "nginx": 'template(name="out" type="string" string="%$!all-json-plain%\\n")',
    "json": """template(name="out" type="list" option.jsonf="on") {
  property(outname="ts" name="$!ts" format="jsonf")
  property(outname="level" name="$!level" format="jsonf")
  property(outname="seq" name="$!seq" format="jsonf")
  property(outname="request_id" name="$!request_id" format="jsonf")
  property(outname="message" name="$!msg" format="jsonf")
  constant(outname="env" value="prod" format="jsonf")
}""",
}

# nginx "combined" for liblognorm v2 (rsyslog mmnormalize): the same fields as the
# adapter's --parse nginx, status and bytes as JSON numbers. char-to needs at least one
# character, so an empty referer or user agent ("") would not match (nginx logs "-").
NGINX_RULEBASE = """version=2
rule=:%remote_addr:word% %ident:word% %remote_user:word% [%time:char-to{"extradata":"]"}%] \
"%method:word% %path:word% %protocol:char-to{"extradata":"\\""}%" \
%status:number{"format":"number"}% %bytes:number{"format":"number"}% \
"%referer:char-to{"extradata":"\\""}%" "%user_agent:char-to{"extradata":"\\""}%"
"""


def rsyslog_conf(work: Path, path: Path, out: Path, mode: str) -> str:
    """An rsyslog configuration: imfile on ``path`` -> (mmjsonparse|mmnormalize) -> omfile."""
    modules, parse = "", ""
    if mode == "json":
        modules, parse = 'module(load="mmjsonparse")', 'action(type="mmjsonparse" cookie="")'
    elif mode == "nginx":
        rulebase = work / "nginx.rb"
        rulebase.write_text(NGINX_RULEBASE)
        modules = 'module(load="mmnormalize")'
        parse = f'action(type="mmnormalize" ruleBase="{rulebase}")'
    return f"""global(workDirectory="{work}" maxMessageSize="64k")
module(load="imfile" mode="inotify")
{modules}
{RSYSLOG_TEMPLATES[mode]}
input(type="imfile" file="{path}" tag="bench" freshStartTail="off" readMode="0"
      ruleset="bench")
ruleset(name="bench") {{
  {parse}
  action(type="omfile" file="{out}" template="out" asyncWriting="off")
}}
"""


def run_rsyslog(path: Path, out: Path, mode: str, want: int) -> tuple[float, float, int]:
    """Wall seconds from start until ``want`` lines are in ``out``, CPU seconds, lines."""
    work = Path(tempfile.mkdtemp(prefix="rsyslog-", dir=out.parent))
    conf = work / "rsyslog.conf"
    conf.write_text(rsyslog_conf(work, path, out, mode))
    out.write_bytes(b"")
    with out.open("rb") as f:
        seen = 0

        def progress() -> int:
            nonlocal seen
            while chunk := f.read(1 << 22):
                seen += chunk.count(b"\n")
            return seen

        cmd = [*PIN_SUT, "rsyslogd", "-n", "-f", str(conf), "-i", str(work / "pid")]
        wall, cpu, lines = run_peer(cmd, work, progress, want)
    if mode == "nginx" and lines:
        with out.open("rb") as f:
            first = json.loads(f.readline())
        # mmnormalize must really have parsed (a line it cannot parse has no such fields).
        assert first.get("status") in (200, 304, 404) and "user_agent" in first, first
    return wall, cpu, lines


def syslog_ng_conf(work: Path, path: Path, url: str) -> str:
    """A syslog-ng configuration: file() on ``path`` -> json-parser -> http(), batched.

    The same reshape as the adapter's (rename msg, drop path, add env) via format-json;
    batches of up to 2000 lines or 1 MiB like the adapter's defaults. syslog-ng 3.38's
    http() cannot compress (content-compression() came in a later release).
    """
    return f"""@version: 3.38
options {{ stats-freq(0); }};
source s_in {{ file("{path}" follow-freq(0.1) flags(no-parse) log-msg-size(65536)
                    log-fetch-limit(1000) log-iw-size(100000)); }};
parser p_json {{ json-parser(prefix(".j.")); }};
destination d_http {{ http(url("{url}") method("POST") workers(1)
  batch-lines(2000) batch-bytes(1048576) batch-timeout(100)
  headers("Content-Type: application/x-ndjson") delimiter("\\n") body-suffix("\\n")
  body("$(format-json ts=${{.j.ts}} level=${{.j.level}} seq=int64(${{.j.seq}})
        request_id=${{.j.request_id}} message=${{.j.msg}} env=prod)")); }};
log {{ source(s_in); parser(p_json); destination(d_http); }};
"""


def run_syslog_ng(
    root: Path, path: Path, rx: Receiver, want: int, tmp: Path
) -> tuple[float, float, int, dict[str, Any]]:
    """Wall seconds from start until the receiver counted ``want`` lines, CPU, lines."""
    work = Path(tempfile.mkdtemp(prefix="syslog-ng-", dir=tmp))
    conf = work / "syslog-ng.conf"
    conf.write_text(syslog_ng_conf(work, path, rx.url))
    rx.reset()
    rx_cpu0 = rx.cpu()
    env = {**os.environ, "LD_LIBRARY_PATH": str(root / "usr" / "lib" / "syslog-ng")}
    cmd = [
        *PIN_SUT,
        str(root / "usr" / "sbin" / "syslog-ng"),
        "-F",
        "--no-caps",
        f"--module-path={root / 'usr' / 'lib' / 'syslog-ng' / '3.38'}",
        "-f",
        str(conf),
        "-R",
        str(work / "persist"),
        "-p",
        str(work / "pid"),
        "-c",
        str(work / "ctl"),
    ]
    wall, cpu, lines = run_peer(cmd, work, lambda: rx.counts()["lines"], want, env)
    extra = {**rx.counts(), "receiver_cpu": rx.cpu() - rx_cpu0, "sample": rx.sample()}
    return wall, cpu, lines, extra


RESHAPE_ARGS = [
    "--parse",
    "json",
    "--rename-field",
    "msg=message",
    "--drop-field",
    "path",
    "--add-field",
    "env=prod",
]
REDACT_ARGS = [*RESHAPE_ARGS, "--redact", "email", "--redact", "ipv4"]
HTTP_ARGS = ["--sink", "http"]


@dataclass(frozen=True)
class Case:
    """One row: the input, the adapter's arguments, and the peer doing the same work."""

    name: str
    kind: str  # which input file
    args: list[str]
    peer: str  # "rsyslog" or "syslog-ng"
    peer_mode: str  # rsyslog: raw, nginx or json; syslog-ng: http
    peer_does: str
    http: bool = False


CASES: list[Case] = [
    Case(
        "raw passthrough -> stdout",
        "raw",
        [],
        "rsyslog",
        "raw",
        "imfile -> omfile %msg% (same work)",
    ),
    Case(
        "nginx parse -> stdout",
        "nginx",
        ["--parse", "nginx"],
        "rsyslog",
        "nginx",
        "mmnormalize (liblognorm rulebase, 11 fields) -> $!all-json-plain",
    ),
    Case(
        "json parse only -> stdout",
        "json",
        ["--parse", "json"],
        "rsyslog",
        "json",
        "mmjsonparse + JSON template (parse + reshape)",
    ),
    Case(
        "json parse + reshape -> stdout",
        "json",
        RESHAPE_ARGS,
        "rsyslog",
        "json",
        "mmjsonparse + JSON template (parse + reshape)",
    ),
    Case(
        "json parse + reshape + redact -> stdout",
        "json",
        REDACT_ARGS,
        "rsyslog",
        "json",
        "mmjsonparse + reshape template; no redaction (rsyslog has none for e-mail)",
    ),
    Case(
        "json parse + reshape -> HTTP gzip",
        "json",
        [*RESHAPE_ARGS, *HTTP_ARGS, "--sink-gzip"],
        "syslog-ng",
        "http",
        "json-parser + format-json -> http() batches of 2000, **uncompressed** (3.38 cannot gzip)",
        http=True,
    ),
    Case(
        "json parse + reshape -> HTTP",
        "json",
        [*RESHAPE_ARGS, *HTTP_ARGS],
        "syslog-ng",
        "http",
        "json-parser + format-json -> http() batches of 2000 (same work)",
        http=True,
    ),
]


def measure_throughput(
    files: dict[str, Path], tmp: Path, reps: int, n: int, syslog_ng: Path | None
) -> dict[str, Any]:
    """Every case x {cat, adapter, peer}, interleaved over ``reps`` rounds."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        c.name: {"adapter": [], "cat": [], "peer": []} for c in CASES
    }
    have = {"rsyslog": shutil.which("rsyslogd") is not None, "syslog-ng": syslog_ng is not None}
    rx = Receiver()
    try:
        for rep in range(reps):
            for c in CASES:
                out = tmp / "out"
                wall, cpu = run_cat(files[c.kind], out)
                results[c.name]["cat"].append({"wall": wall, "cpu": cpu, "lines": n})
                extra: dict[str, Any] = {}
                if c.http:
                    wall, cpu, lines, extra = run_adapter_http(files[c.kind], rx, c.args)
                else:
                    wall, cpu, lines = run_adapter(files[c.kind], out, c.args)
                assert lines == n, (c.name, lines)
                results[c.name]["adapter"].append(
                    {"wall": wall, "cpu": cpu, "lines": lines, "load1": os.getloadavg()[0], **extra}
                )
                if have[c.peer]:
                    extra = {}
                    if c.peer == "syslog-ng":
                        assert syslog_ng is not None
                        wall, cpu, lines, extra = run_syslog_ng(
                            syslog_ng, files[c.kind], rx, n, tmp
                        )
                    else:
                        wall, cpu, lines = run_rsyslog(
                            files[c.kind], tmp / "rsys.out", c.peer_mode, n
                        )
                    assert lines == n, (c.name, c.peer, lines)
                    results[c.name]["peer"].append(
                        {"wall": wall, "cpu": cpu, "lines": lines, **extra}
                    )
                load = os.getloadavg()[0]
                print(f"rep {rep + 1}/{reps} {c.name}: done (load {load:.2f})", file=sys.stderr)
    finally:
        rx.close()
    return results


# -- syslog TCP input: the adapter vs rsyslog imtcp vs syslog-ng network() ----------------

SYSLOG_DOES = {
    "adapter (baseline)": "the same, the adapter of the --baseline checkout",
    "rsyslog": "imtcp -> RFC 5424 parser -> omfile, JSON template of the same fields "
    "(structured data as its text)",
    "syslog-ng": "network(tcp, syslog-protocol) -> file(), format-json of the same fields "
    "(structured data as its text)",
}


def syslog_payload(n: int) -> bytes:
    """``n`` RFC 5424 messages with structured data, LF-framed (RFC 6587 non-transparent,
    which all three programs read), as an app's syslog library sends them."""
    return b"".join(
        f"<{128 + 6 + (i % 20 == 19)}>1 2026-12-02T08:{i // 60_000 % 60:02d}:"
        f"{i // 1000 % 60:02d}.{i % 1000:03d}Z web-{i % 7} shop {1000 + i % 50} ORDER "
        f'[order@32473 id="{i}" user="u{i % 5003}"] order {i} paid seq={i}\n'.encode()
        for i in range(n)
    )


def send_tcp(port: int, payload: bytes) -> None:
    """Connect to ``port`` on loopback (retrying while it is not listening yet), send
    ``payload`` and close."""
    deadline = time.monotonic() + 30
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port))
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    with sock:
        sock.sendall(payload)


def timed_delivery(
    pid: int, port: int, payload: bytes, out: Path, want: int
) -> tuple[float, float, int, str]:
    """Send ``payload`` to ``port`` from this process (core 0) and poll ``out`` until it
    has ``want`` lines: wall seconds from the first byte, the program's CPU seconds during
    that time (from /proc), the lines, and the first line as a sample."""
    sender = threading.Thread(target=send_tcp, args=(port, payload), daemon=True)
    cpu0 = proc_cpu(pid)
    t0 = time.monotonic()
    sender.start()
    seen = 0
    with out.open("rb") as f:
        while seen < want and time.monotonic() - t0 < DEADLINE_S:
            chunk = f.read(1 << 22)
            if chunk:
                seen += chunk.count(b"\n")
            else:
                time.sleep(0.005)
    wall = time.monotonic() - t0
    cpu = proc_cpu(pid) - cpu0
    sender.join(timeout=30)
    with out.open() as f:
        sample = f.readline()
    return wall, cpu, seen, sample


@contextlib.contextmanager
def running(
    cmd: list[str],
    work: Path,
    env: dict[str, str] | None = None,
    stderr: Any = subprocess.DEVNULL,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a program under test; at the end stop it and remove its work directory."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=cwd)
    try:
        yield p
    finally:
        p.terminate()
        p.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def run_adapter_syslog(
    payload: bytes, n: int, tmp: Path, src: Path | None = None
) -> tuple[float, float, int, str]:
    """The adapter's --syslog-tcp input to a file sink (records spooled first); ``src``:
    the ``podpatterns`` of that checkout instead of this one."""
    work = Path(tempfile.mkdtemp(prefix="adapter-syslog-", dir=tmp))
    out = work / "out.ndjson"
    out.write_bytes(b"")
    cmd = [
        *PIN_SUT,
        *(sys.executable, "-m", "podpatterns", "adapter", "--syslog-tcp", "127.0.0.1:0"),
        *("--spool-dir", str(work / "spool"), "--sink", "file", "--sink-path", str(out)),
        *("--admin", "off", "--shutdown-delay", "0", "--log-format", "json"),
    ]
    # python -m puts its working directory first on sys.path: run in the checkout.
    env = None if src is None else {**os.environ, "PYTHONPATH": str(src)}
    with running(cmd, work, env=env, stderr=subprocess.PIPE, cwd=src or ROOT) as p:
        assert p.stderr is not None
        port = 0
        for raw in p.stderr:
            event = json.loads(raw)
            if event.get("event") == "input_listening":
                port = int(str(event["address"]).rsplit(":", 1)[1])
            if event.get("event") == "adapter_started":
                break
        threading.Thread(target=p.stderr.read, daemon=True).start()
        return timed_delivery(p.pid, port, payload, out, n)


def run_rsyslog_syslog(payload: bytes, n: int, tmp: Path) -> tuple[float, float, int, str]:
    """rsyslog: imtcp (port chosen by the kernel) -> omfile with a JSON template."""
    work = Path(tempfile.mkdtemp(prefix="rsyslog-tcp-", dir=tmp))
    out, portfile = work / "out.json", work / "port"
    out.write_bytes(b"")
    (work / "rsyslog.conf").write_text(
        f"""global(workDirectory="{work}" maxMessageSize="64k")
module(load="imtcp")
template(name="out" type="list" option.jsonf="on") {{
  property(outname="facility" name="syslogfacility-text" format="jsonf")
  property(outname="severity" name="syslogseverity-text" format="jsonf")
  property(outname="timestamp" name="timereported" dateFormat="rfc3339" format="jsonf")
  property(outname="hostname" name="hostname" format="jsonf")
  property(outname="app_name" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="structured_data" name="structured-data" format="jsonf")
  property(outname="message" name="msg" format="jsonf")
}}
input(type="imtcp" address="127.0.0.1" port="0" listenPortFileName="{portfile}"
      ruleset="bench")
ruleset(name="bench") {{
  action(type="omfile" file="{out}" template="out" asyncWriting="off")
}}
"""
    )
    cmd = [*PIN_SUT, "rsyslogd", "-n", "-f", str(work / "rsyslog.conf"), "-i", str(work / "pid")]
    with running(cmd, work) as p:
        deadline = time.monotonic() + 30
        while not (portfile.exists() and portfile.read_text().strip()):
            if time.monotonic() > deadline or p.poll() is not None:
                raise RuntimeError("rsyslog did not write its port file")
            time.sleep(0.01)
        return timed_delivery(p.pid, int(portfile.read_text()), payload, out, n)


def run_syslog_ng_syslog(
    root: Path, payload: bytes, n: int, tmp: Path
) -> tuple[float, float, int, str]:
    """syslog-ng: network(transport tcp, syslog-protocol) -> file() with format-json.

    syslog-ng must be told its port: a random one below the ephemeral range, the next
    one tried when it is taken (it then exits)."""
    for port in random.sample(range(20000, 30000), 8):
        work = Path(tempfile.mkdtemp(prefix="syslog-ng-tcp-", dir=tmp))
        out = work / "out.json"
        out.write_bytes(b"")
        (work / "syslog-ng.conf").write_text(
            f"""@version: 3.38
options {{ stats-freq(0); keep-hostname(yes); }};
source s_in {{ network(transport("tcp") ip("127.0.0.1") port({port})
    flags(syslog-protocol) log-msg-size(65536) log-iw-size(100000) log-fetch-limit(1000)); }};
destination d_out {{ file("{out}" template("$(format-json facility=$FACILITY
    severity=$LEVEL timestamp=$ISODATE hostname=$HOST app_name=$PROGRAM procid=$PID
    msgid=$MSGID structured_data=$SDATA message=$MSG)\\n")); }};
log {{ source(s_in); destination(d_out); }};
"""
        )
        env = {**os.environ, "LD_LIBRARY_PATH": str(root / "usr" / "lib" / "syslog-ng")}
        cmd = [
            *PIN_SUT,
            str(root / "usr" / "sbin" / "syslog-ng"),
            *("-F", "--no-caps", f"--module-path={root / 'usr' / 'lib' / 'syslog-ng' / '3.38'}"),
            *("-f", str(work / "syslog-ng.conf"), "-R", str(work / "persist")),
            *("-p", str(work / "pid"), "-c", str(work / "ctl")),
        ]
        with running(cmd, work, env) as p:
            deadline = time.monotonic() + 30
            while p.poll() is None and time.monotonic() < deadline:
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.01)
            if p.poll() is None:
                return timed_delivery(p.pid, port, payload, out, n)
            # it exited: the port was taken; try the next one
    raise RuntimeError("syslog-ng: no free port in 8 tries")


def measure_syslog(
    tmp: Path, reps: int, n: int, syslog_ng: Path | None, baseline: Path | None = None
) -> dict[str, Any]:
    """The adapter's syslog TCP input, rsyslog imtcp and syslog-ng network(), all fed the
    same LF-framed RFC 5424 traffic over one connection, interleaved over ``reps``; and
    the adapter of the ``baseline`` checkout, if given."""
    payload = syslog_payload(n)
    progs: dict[str, Callable[[], tuple[float, float, int, str]]] = {
        "adapter": lambda: run_adapter_syslog(payload, n, tmp)
    }
    if baseline is not None:
        progs["adapter (baseline)"] = lambda: run_adapter_syslog(payload, n, tmp, baseline)
    if shutil.which("rsyslogd"):
        progs["rsyslog"] = lambda: run_rsyslog_syslog(payload, n, tmp)
    if syslog_ng is not None:
        progs["syslog-ng"] = lambda: run_syslog_ng_syslog(syslog_ng, payload, n, tmp)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in progs}
    samples: dict[str, str] = {}
    for rep in range(reps):
        for name, run in progs.items():
            wall, cpu, lines, sample = run()
            assert lines == n, (name, lines)
            runs[name].append({"wall": wall, "cpu": cpu, "lines": lines})
            samples[name] = sample
            load = os.getloadavg()[0]
            print(f"rep {rep + 1}/{reps} syslog tcp {name}: {n / wall:,.0f} lines/s "
                  f"(load {load:.2f})", file=sys.stderr)  # fmt: skip
    return {"runs": runs, "samples": samples, "bytes": len(payload)}


def syslog_table(result: dict[str, Any]) -> str:
    """Median lines/s and CPU per 1M lines per program, and the adapter's ratios."""
    runs = result["runs"]

    def med(name: str, key: str) -> float:
        return float(statistics.median(t[key] / t["lines"] for t in runs[name]))

    a_lps, a_cpu = 1 / med("adapter", "wall"), med("adapter", "cpu") * 1e6
    out = [
        "| program | lines/s | CPU s/1M | adapter/program (lines/s) "
        "| adapter/program (CPU) | what it does |",
        "|---|--:|--:|--:|--:|---|",
        f"| adapter | {a_lps:,.0f} | {a_cpu:.2f} | 1.00 | 1.00 "
        "| --syslog-tcp -> spool (fdatasync'ed) -> file sink, structured data as a dict |",
    ]
    for name in runs:
        if name == "adapter":
            continue
        lps, cpu = 1 / med(name, "wall"), med(name, "cpu") * 1e6
        out.append(
            f"| {name} | {lps:,.0f} | {cpu:.2f} | {a_lps / lps:.2f} | {a_cpu / cpu:.2f} "
            f"| {SYSLOG_DOES[name]} |"
        )
    return "\n".join(out)


STAMP = re.compile(rb"t=(\d+)")


def measure_latency(tmp: Path, watch: str, rate: int, seconds: float) -> dict[str, float]:
    """p50/p99/max ms from write to emit, for ``rate`` lines/s over ``seconds``."""
    path = tmp / f"lat-{watch}.log"
    path.write_bytes(b"")
    p = subprocess.Popen(
        adapter_cmd(str(path), ["--watch", watch]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_started(p)
    assert p.stdout is not None and p.stderr is not None
    threading.Thread(target=p.stderr.read, daemon=True).start()
    lat: list[float] = []
    total = int(rate * seconds)

    def reader() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            now = time.time_ns()
            m = STAMP.search(line)
            if m:
                lat.append((now - int(m.group(1))) / 1e6)
            if len(lat) >= total:
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    time.sleep(0.5)
    with path.open("ab", buffering=0) as f:
        start = time.monotonic()
        for i in range(total):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            f.write(f"level=info seq={i} t={time.time_ns()}\n".encode())
    t.join(timeout=10)
    p.terminate()
    p.wait(timeout=30)
    lat.sort()
    got = len(lat)
    return {
        "lines": total,
        "emitted": got,
        "p50_ms": lat[got // 2] if got else float("nan"),
        "p99_ms": lat[min(got - 1, int(got * 0.99))] if got else float("nan"),
        "max_ms": lat[-1] if got else float("nan"),
    }


def measure_idle(tmp: Path, files: int, seconds: float) -> dict[str, float]:
    """CPU seconds per second of an adapter watching ``files`` idle files, by watch mode."""
    d = tmp / "idle"
    d.mkdir(exist_ok=True)
    for i in range(files):
        (d / f"f{i}.log").write_bytes(b"x\n")
    res: dict[str, float] = {}
    for watch in ("auto", "poll"):
        p = subprocess.Popen(
            adapter_cmd(str(d / "*.log"), ["--watch", watch]),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_started(p)
        assert p.stderr is not None
        threading.Thread(target=p.stderr.read, daemon=True).start()
        time.sleep(2.0)
        c0 = proc_cpu(p.pid)
        time.sleep(seconds)
        res[watch] = (proc_cpu(p.pid) - c0) / seconds
        p.terminate()
        p.wait(timeout=30)
    return res


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Median lines/s and CPU per 1M lines per case and program, with ratios."""
    rows: list[dict[str, Any]] = []
    for c in CASES:
        r = results[c.name]

        def med(prog: str, key: str, r: dict[str, list[dict[str, Any]]] = r) -> float:
            vals = [t[key] / t["lines"] for t in r[prog] if t["lines"]]
            return statistics.median(vals) if vals else float("nan")

        row: dict[str, Any] = {"case": c.name, "peer": c.peer, "peer_does": c.peer_does}
        for prog in ("adapter", "cat", "peer"):
            per_line = med(prog, "wall")
            row[f"{prog}_lps"] = 1 / per_line if per_line == per_line else float("nan")
            row[f"{prog}_cpu_per_m"] = med(prog, "cpu") * 1e6
        row["vs_cat"] = row["adapter_lps"] / row["cat_lps"]
        row["vs_peer"] = row["adapter_lps"] / row["peer_lps"]
        row["cpu_vs_peer"] = row["adapter_cpu_per_m"] / row["peer_cpu_per_m"]
        if c.http:
            # The receiver's CPU share while the program ran: far below 1 = not the bottleneck.
            for prog in ("adapter", "peer"):
                shares = [t["receiver_cpu"] / t["wall"] for t in r[prog] if "receiver_cpu" in t]
                row[f"receiver_share_{prog}"] = statistics.median(shares) if shares else None
                ratios = [t["body_bytes"] / t["wire_bytes"] for t in r[prog] if t.get("wire_bytes")]
                row[f"compression_{prog}"] = statistics.median(ratios) if ratios else None
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of ``rows``."""
    out = [
        "| case | adapter lines/s | adapter CPU s/1M | cat lines/s | peer | peer lines/s "
        "| peer CPU s/1M | adapter/cat | adapter/peer (lines/s) "
        "| adapter/peer (CPU) | what the peer does |",
        "|---|--:|--:|--:|---|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['case']} | {r['adapter_lps']:,.0f} | {r['adapter_cpu_per_m']:.2f} "
            f"| {r['cat_lps']:,.0f} | {r['peer']} | {r['peer_lps']:,.0f} "
            f"| {r['peer_cpu_per_m']:.2f} | {r['vs_cat']:.3f} | {r['vs_peer']:.2f} "
            f"| {r['cpu_vs_peer']:.2f} | {r['peer_does']} |"
        )
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars of lines/s per case (log scale) for adapter, peer and cat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5.5))
    width = 0.27
    xs = range(len(rows))
    for i, (prog, label) in enumerate(
        (("adapter", "adapter"), ("peer", "peer (rsyslog / syslog-ng)"), ("cat", "cat"))
    ):
        ax.bar(
            [x + (i - 1) * width for x in xs],
            [r[f"{prog}_lps"] for r in rows],
            width,
            label=label,
        )
    ax.axhline(150_000, color="red", ls="--", lw=1, label="target JSON (150k)")
    ax.axhline(100_000, color="orange", ls=":", lw=1, label="target nginx (100k)")
    ax.set_yscale("log")
    ax.set_ylabel("lines/s (median, log scale)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(
        [f"{r['case'].replace(' -> ', chr(10) + '-> ')}\n[{r['peer']}]" for r in rows], fontsize=7
    )
    ax.set_title("podpatterns adapter vs a peer vs cat (one core)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def machine() -> str:
    """CPU model and core count."""
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    py = platform.python_version()
    return f"{model}, {os.cpu_count()} cores, Linux {platform.release()}, Python {py}"


def main() -> int:
    """Run everything; print the table; optionally write docs, plot and raw JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=300_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--latency-rate", type=int, default=1000, help="lines/s")
    parser.add_argument("--latency-seconds", type=float, default=5.0)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument(
        "--syslog-ng-root",
        type=Path,
        default=ROOT / ".cache" / "syslog-ng" / "root",
        help="unpacked syslog-ng-core + syslog-ng-mod-http 3.38 .debs (./dev bench-adapter "
        "puts them under .cache/syslog-ng/root)",
    )
    parser.add_argument("--write-docs", action="store_true", help="update docs/ and results")
    parser.add_argument(
        "--syslog-only",
        action="store_true",
        help="measure only the syslog TCP input row (results: bench/results/adapter-syslog.json)",
    )
    parser.add_argument(
        "--from-json", type=Path, help="measure nothing: redraw the plot from a results file"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of another version: its adapter joins the syslog rounds (interleaved)",
    )
    args = parser.parse_args()
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        plot(saved["summary"], ROOT / "docs" / "img" / "adapter-bench.png")
        print(table(saved["summary"]))
        return 0
    os.sched_setaffinity(0, {0})
    cmd = "bench/adapter.py " + " ".join(sys.argv[1:])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmpname:
        tmp = Path(tmpname)
        files = write_inputs(tmp, args.lines)
        syslog_ng = args.syslog_ng_root
        if not (syslog_ng / "usr" / "sbin" / "syslog-ng").exists():
            print(f"no syslog-ng under {syslog_ng}: rows without that peer", file=sys.stderr)
            syslog_ng = None
        syslog = measure_syslog(tmp, args.reps, args.lines, syslog_ng, args.baseline)
        print(syslog_table(syslog))
        syslog_report = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(),
            "command": cmd,
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "lines": args.lines,
            "reps": args.reps,
            **syslog,
        }
        if args.write_docs:
            res = ROOT / "bench" / "results" / "adapter-syslog.json"
            res.write_text(json.dumps(syslog_report, indent=1) + "\n")
            (ROOT / "bench" / "results" / "adapter-syslog-table.md").write_text(
                syslog_table(syslog) + "\n"
            )
        if args.syslog_only:
            return 0
        results = measure_throughput(files, tmp, args.reps, args.lines, syslog_ng)
        latency = {
            w: measure_latency(tmp, w, args.latency_rate, args.latency_seconds)
            for w in ("auto", "poll")
        }
        idle = measure_idle(tmp, 100, args.idle_seconds)
    rows = summarize(results)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "command": cmd,
        "load_before": load_before,
        "lines": args.lines,
        "reps": args.reps,
        "raw": results,
        "summary": rows,
        "latency": latency,
        "idle_cpu_per_s": idle,
        "load_after": os.getloadavg(),
    }
    print(table(rows))
    print(json.dumps({"latency": latency, "idle_cpu_per_s": idle}, indent=1))
    if args.write_docs:
        res = ROOT / "bench" / "results" / "adapter-latest.json"
        res.write_text(json.dumps(report, indent=1) + "\n")
        plot(rows, ROOT / "docs" / "img" / "adapter-bench.png")
        (ROOT / "bench" / "results" / "adapter-table.md").write_text(table(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
