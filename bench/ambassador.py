"""Benchmark the ambassador against HAProxy, socat and no proxy at all, on loopback.

Everything runs on 127.0.0.1. The load generators and the upstream servers are pinned
to core 0, the proxy under test alone to core 1, the same for every proxy. Each
repetition runs every test through every proxy, round-robin (the starting proxy
rotates), so slow drifts of the machine hit all proxies alike; the tables give medians.

Tests (see docs/benchmarks.md for the figures):

- bulk: one iperf3 stream through the proxy; Gbit/s, proxy CPU seconds per GB moved,
  peak RSS of the proxy process.
- http: wrk with keep-alive against nginx serving a tiny file; requests/s, p50/p99, proxy
  CPU per request.
- latency: wrk at a moderate, paced load (each connection waits 1 ms between
  requests); p50/p99 and what the proxy adds over direct.
- newconn: wrk with ``Connection: close``, so every request is a new TCP connection
  through the proxy; connections/s, p99, proxy CPU per connection.
- redis: redis-benchmark GET/SET, without and with pipelining (-P 16); requests/s.
- idle: RSS of a fresh proxy, with many idle connections held open through it, and
  with some connections that moved one byte each way ("warm": the splice relay then
  holds its pipes).

Proxy CPU is utime+stime (+cutime+cstime, which is how socat's forked children are
counted once reaped) from /proc/PID/stat before and after each test.

Usage: ``./dev bench [--quick] [--reps N]`` or ``.venv/bin/python bench/ambassador.py``.
A full run writes bench/results/ambassador-latest.json, docs/benchmarks.md and
docs/img/ambassador-bench.png; ``--quick`` writes bench/results/ambassador-quick.json only.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
LOAD_CORE = "0"  # load generators, upstream servers and this script
PROXY_CORE = "1"  # the proxy under test, alone
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

RESULTS_DIR = ROOT / "bench" / "results"
DOC_PATH = ROOT / "docs" / "benchmarks.md"
PLOT_PATH = ROOT / "docs" / "img" / "ambassador-bench.png"

# The targets from the issue; evaluated in docs/benchmarks.md.
TARGET_BULK_VS_HAPROXY = 1.5
TARGET_ADDED_P50_US = 100.0
TARGET_ADDED_P99_US = 500.0
TARGET_IDLE_RSS_MIB = 40.0
TARGET_10K_RSS_MIB = 150.0
IDLE_TARGET_CONNS = 10_000

# Other processes may share this machine: a trial during which they used more than this
# share of one core counts as contended (run_reps, usable).
FOREIGN_MAX_SHARE = 0.10


# -- settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How long and how often to measure (``--quick`` shrinks everything)."""

    reps: int
    quick: bool
    bulk_seconds: int = 3
    wrk_seconds: int = 2
    wrk_conns: int = 16
    latency_conns: int = 8
    latency_delay_ms: int = 1
    redis_conns: int = 16
    redis_requests: int = 40_000
    redis_pipelined_requests: int = 400_000
    redis_pipeline: int = 16
    idle_conns: int = IDLE_TARGET_CONNS
    idle_batch: int = 500
    http_file_bytes: int = 128
    load_phase_s: float = 600.0  # extra rounds and waits for quiet stop here
    min_clean: int = 3  # uncontended trials needed to leave contended ones out

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        if args.quick:
            return cls(
                reps=args.reps or 1,
                quick=True,
                bulk_seconds=1,
                wrk_seconds=1,
                redis_requests=20_000,
                redis_pipelined_requests=200_000,
                idle_conns=2_000,
                load_phase_s=150.0,
                min_clean=1,
            )
        return cls(reps=args.reps or 5, quick=False)


# -- /proc and processes ------------------------------------------------------------------


def log(msg: str) -> None:
    """Progress on stderr, with the time since start."""
    sys.stderr.write(f"[{time.monotonic() - _T0:7.1f}s] {msg}\n")
    sys.stderr.flush()


_T0 = time.monotonic()


def cpu_seconds(pid: int) -> float:
    """utime+stime of ``pid`` plus that of its reaped children (socat's forks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime, stime, cutime, cstime are fields 14-17
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` line of /proc/PID/status, e.g. VmRSS or VmHWM."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _proc_net_tcp() -> Iterator[tuple[int, str]]:
    """(local port, state hex) of every IPv4/IPv6 TCP socket."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(name) as f:
            next(f)
            for line in f:
                parts = line.split(None, 4)
                yield int(parts[1].rsplit(":", 1)[1], 16), parts[3]


def listening(port: int) -> bool:
    return any(p == port and st == "0A" for p, st in _proc_net_tcp())


def established(port: int) -> int:
    """Established sockets whose local port is ``port`` (server side of a listener)."""
    return sum(1 for p, st in _proc_net_tcp() if p == port and st == "01")


class Ports:
    """Hand out ports no socket uses, below the ephemeral range (so the thousands of
    client connections of the idle test can never collide with a listener)."""

    def __init__(self) -> None:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
        self._next = max(1024, min(21000, low - 2000))
        self._limit = low

    def take(self) -> int:
        used = {p for p, _ in _proc_net_tcp()}
        while self._next < self._limit:
            port = self._next
            self._next += 1
            if port not in used:
                return port
        raise RuntimeError("no free port below the ephemeral range")


class Procs:
    """Background processes started by the benchmark; stopped by PID, newest first."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: Sequence[str], core: str) -> subprocess.Popen[bytes]:
        logf = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            ["taskset", "-c", core, *argv],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C reaches only us; we stop them in order
        )
        logf.close()
        self.running.append((name, proc))
        return proc

    def wait_listening(self, name: str, proc: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + 15
        while not listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.logdir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} did not listen on {HOST}:{port}:\n{tail}")
            time.sleep(0.02)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.running = [(n, p) for n, p in self.running if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.running)):
            self.stop(proc)


def raise_nofile() -> int:
    """Raise the soft fd limit to the hard one (inherited by every child); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Foreign:
    """CPU used by processes outside this benchmark (other work on a shared machine).

    Per process, utime+stime plus the time of reaped children (cutime+cstime), so short
    interpreters a test suite starts and reaps within one trial count too; the earlier
    time of a child seen before the trial and reaped during it is taken off again. This
    benchmark's own process tree and kernel threads (softirq work for our own loopback
    traffic runs there) are left out.
    """

    def __init__(self, max_share: float) -> None:
        self.me = os.getpid()
        self.max_share = max_share  # of one core, averaged over a trial
        self.waited_s = 0.0

    def snapshot(self) -> dict[int, float]:
        """CPU seconds (own + reaped children) of every process that is not ours."""
        ppid: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ppid[pid] = int(fields[1])
            cpu[pid] = sum(int(x) for x in fields[11:15]) / CLK_TCK
        mine = {self.me}
        grew = True
        while grew:
            grew = False
            for pid, parent in ppid.items():
                if parent in mine and pid not in mine:
                    mine.add(pid)
                    grew = True
        return {
            pid: c
            for pid, c in cpu.items()
            if pid not in mine and pid != 2 and ppid[pid] != 2  # kthreadd and its threads
        }

    @staticmethod
    def used(before: dict[int, float], after: dict[int, float]) -> float:
        grown = sum(c - before.get(pid, 0.0) for pid, c in after.items())
        gone = sum(c for pid, c in before.items() if pid not in after)
        return max(0.0, grown - gone)

    def wait_quiet(self, until: float) -> None:
        """Sleep until others leave the CPUs alone for a second, or until ``until``."""
        start = time.monotonic()
        while time.monotonic() + 1.0 <= until:
            before = self.snapshot()
            time.sleep(1.0)
            if self.used(before, self.snapshot()) < self.max_share:
                break
        self.waited_s += time.monotonic() - start


def run_tool(argv: Sequence[str], timeout: float) -> str:
    """Run a load generator on the load core; return stdout, raise on failure."""
    res = subprocess.run(
        ["taskset", "-c", LOAD_CORE, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {res.returncode}: {res.stderr[-500:]}")
    return res.stdout


def tool_version(argv: Sequence[str], line: int = 0) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "missing"
    out = (res.stdout + res.stderr).strip().splitlines()
    return out[line] if len(out) > line else "?"


# -- upstream servers -------------------------------------------------------------------

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen {host}:{port} backlog=4096;
        root {dir}/www;
    }}
}}
"""

# An upstream that accepts and holds connections, echoing whatever arrives (the idle
# test's "warm" phase sends one byte each way).
HOLD_SERVER = """\
import resource, selectors, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
lst = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=4096)
lst.setblocking(False)
sel = selectors.DefaultSelector()
sel.register(lst, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is lst:
            for _ in range(256):
                try:
                    c, _ = lst.accept()
                except BlockingIOError:
                    break
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ)
            continue
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
        if data:
            try:
                s.send(data)
            except OSError:
                pass
        else:
            sel.unregister(s)
            s.close()
"""


@dataclass(frozen=True)
class Upstreams:
    """Ports of the servers every proxy forwards to."""

    iperf: int
    nginx: int
    redis: int


def start_upstreams(procs: Procs, ports: Ports, tmp: Path, cfg: Settings) -> Upstreams:
    ups = Upstreams(iperf=ports.take(), nginx=ports.take(), redis=ports.take())
    (tmp / "www").mkdir()
    (tmp / "www" / "s.txt").write_bytes(b"x" * (cfg.http_file_bytes - 1) + b"\n")
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=tmp, host=HOST, port=ups.nginx))
    started = [
        (
            "iperf3-server",
            ["iperf3", "-s", "-B", HOST, "-p", str(ups.iperf)],
            ups.iperf,
        ),
        (
            "nginx",
            ["nginx", "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "nginx-error.log")],
            ups.nginx,
        ),
        (
            "redis-server",
            [
                "redis-server",
                "--bind",
                HOST,
                "--port",
                str(ups.redis),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp),
            ],
            ups.redis,
        ),
    ]
    for name, argv, port in started:
        proc = procs.start(name, argv, LOAD_CORE)
        procs.wait_listening(name, proc, port)
    return ups


# -- proxies ----------------------------------------------------------------------------

HAPROXY_CONF = """\
global
    nbthread 1
    maxconn {maxconn}
{tune}
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend bench
    bind {host}:{listen}
    default_backend upstream
backend upstream
    server s1 {host}:{upstream}
"""


@dataclass(frozen=True)
class Proxy:
    """One contender. ``argv`` builds the command for (listen port, upstream port)."""

    key: str
    label: str
    argv: Callable[[int, int, Path], list[str]] | None  # None: no proxy (direct)
    peak_rss: bool = True  # False when the work happens in forked children


def podpatterns_argv(tree: Path = ROOT) -> list[str]:
    """The command that runs podpatterns from the source tree ``tree`` (this checkout by
    default), whichever checkout the virtualenv's editable install points at: ``-P``
    keeps the working directory off ``sys.path``, ``PYTHONPATH`` puts ``tree`` first."""
    return ["env", f"PYTHONPATH={tree}", sys.executable, "-P", "-m", "podpatterns"]


def _podpatterns(splice: str) -> Callable[[int, int, Path], list[str]]:
    def argv(listen: int, upstream: int, tmp: Path) -> list[str]:
        return [
            *podpatterns_argv(),
            "ambassador",
            "--listen",
            f"{HOST}:{listen}",
            "--upstream",
            f"{HOST}:{upstream}",
            "--admin",
            "off",
            "--log-level",
            "warning",
            "--splice",
            splice,
            "--shutdown-delay",
            "0",
            "--drain-timeout",
            "2s",
        ]

    return argv


def _haproxy(tune: str) -> Callable[[int, int, Path], list[str]]:
    def argv(listen: int, upstream: int, tmp: Path) -> list[str]:
        conf = tmp / f"haproxy-{listen}.cfg"
        # HAProxy refuses to start when 2 x maxconn fds exceed the limit it can raise to.
        maxconn = (resource.getrlimit(resource.RLIMIT_NOFILE)[1] - 64) // 2
        conf.write_text(
            HAPROXY_CONF.format(
                host=HOST, listen=listen, upstream=upstream, tune=tune, maxconn=maxconn
            )
        )
        return ["haproxy", "-db", "-f", str(conf)]

    return argv


def _socat(listen: int, upstream: int, tmp: Path) -> list[str]:
    return [
        "socat",
        f"TCP-LISTEN:{listen},bind={HOST},reuseaddr,fork,backlog=4096",
        f"TCP:{HOST}:{upstream}",
    ]


PROXIES: tuple[Proxy, ...] = (
    Proxy("direct", "direct (no proxy)", None),
    Proxy("pp-splice", "podpatterns --splice on", _podpatterns("on")),
    Proxy("pp-protocol", "podpatterns --splice off", _podpatterns("off")),
    Proxy("haproxy", "HAProxy 2.6 stock", _haproxy("")),
    Proxy("haproxy-tuned", "HAProxy tune.bufsize 256k", _haproxy("    tune.bufsize 262144")),
    Proxy("socat", "socat fork", _socat, peak_rss=False),
)
BY_KEY = {p.key: p for p in PROXIES}
BASES = ("haproxy", "haproxy-tuned", "direct")  # the ratio columns, in order


@dataclass
class Endpoint:
    """Where a test connects for one proxy and one upstream, and the PID to watch."""

    port: int
    proc: subprocess.Popen[bytes] | None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid


def start_proxy(
    procs: Procs, ports: Ports, tmp: Path, proxy: Proxy, upstream: int, tag: str
) -> Endpoint:
    if proxy.argv is None:
        return Endpoint(upstream, None)
    listen = ports.take()
    name = f"{proxy.key}-{tag}"
    proc = procs.start(name, proxy.argv(listen, upstream, tmp), PROXY_CORE)
    procs.wait_listening(name, proc, listen)
    return Endpoint(listen, proc)


# -- load runners -----------------------------------------------------------------------

WRK_REPORT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "errors": %d, '
      .. '"p50_us": %.1f, "p99_us": %.1f, "max_us": %.1f}\\n',
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def wrk(
    url: str, seconds: int, conns: int, script: Path, extra: Sequence[str] = ()
) -> dict[str, Any]:
    out = run_tool(
        [
            "wrk",
            "-t",
            "1",
            "-c",
            str(conns),
            "-d",
            f"{seconds}s",
            "--timeout",
            "2s",
            "-s",
            str(script),
            *extra,
            url,
        ],
        timeout=seconds + 30,
    )
    line = next(x for x in out.splitlines() if x.startswith("WRKJSON "))
    data: dict[str, Any] = json.loads(line[len("WRKJSON ") :])
    data["rate"] = data["requests"] / (data["duration_us"] / 1e6)
    return data


def iperf(port: int, seconds: int) -> dict[str, Any]:
    out = run_tool(
        [
            "iperf3",
            "-c",
            HOST,
            "-p",
            str(port),
            "-t",
            str(seconds),
            "-J",
            "--connect-timeout",
            "3000",
        ],
        timeout=seconds + 30,
    )
    data = json.loads(out)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    received = data["end"]["sum_received"]
    return {"gbit_s": received["bits_per_second"] / 1e9, "bytes": int(received["bytes"])}


def redis_bench(port: int, requests: int, conns: int, pipeline: int) -> dict[str, float]:
    out = run_tool(
        [
            "redis-benchmark",
            "-h",
            HOST,
            "-p",
            str(port),
            "-c",
            str(conns),
            "-n",
            str(requests),
            "-P",
            str(pipeline),
            "-t",
            "get,set",
            "--csv",
        ],
        timeout=120,
    )
    rates: dict[str, float] = {}
    for row in csv.reader(out.splitlines()):
        if row and row[0] in ("GET", "SET"):
            rates[row[0].lower()] = float(row[1])
    if set(rates) != {"get", "set"}:
        raise RuntimeError(f"redis-benchmark: unexpected output {out[:300]!r}")
    return rates


@contextlib.contextmanager
def proxy_cpu(pid: int | None, into: dict[str, Any]) -> Iterator[None]:
    """Put the proxy's CPU seconds spent inside the block into ``into["cpu_s"]``."""
    if pid is None:
        yield
        into["cpu_s"] = None
        return
    before = cpu_seconds(pid)
    yield
    time.sleep(0.3)  # let socat reap its children (their time lands in cutime)
    into["cpu_s"] = cpu_seconds(pid) - before


def per(cpu_s: float | None, count: float, scale: float) -> float | None:
    return None if cpu_s is None or count <= 0 else cpu_s / count * scale


# -- one repetition of each test ---------------------------------------------------------


@dataclass
class Bench:
    """The running peers, and the raw results: test -> proxy -> one dict per rep."""

    cfg: Settings
    ups: Upstreams
    tmp: Path
    foreign: Foreign
    endpoints: dict[str, dict[str, Endpoint]] = field(default_factory=dict)  # proxy, upstream
    raw: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)

    def record(self, test: str, proxy: str, result: dict[str, Any]) -> None:
        self.raw.setdefault(test, {}).setdefault(proxy, []).append(result)

    def bulk(self, proxy: str) -> dict[str, Any]:
        ep = self.endpoints[proxy]["iperf"]
        res: dict[str, Any] = {}
        with proxy_cpu(ep.pid, res):
            res.update(iperf(ep.port, self.cfg.bulk_seconds))
        res["cpu_s_per_gb"] = per(res["cpu_s"], res["bytes"] / 1e9, 1.0)
        return res

    def http(self, proxy: str) -> dict[str, Any]:
        ep = self.endpoints[proxy]["nginx"]
        res: dict[str, Any] = {}
        with proxy_cpu(ep.pid, res):
            res.update(
                wrk(
                    f"http://{HOST}:{ep.port}/s.txt",
                    self.cfg.wrk_seconds,
                    self.cfg.wrk_conns,
                    self.tmp / "report.lua",
                )
            )
        res["cpu_us_per_req"] = per(res["cpu_s"], res["requests"], 1e6)
        return res

    def latency(self, proxy: str) -> dict[str, Any]:
        ep = self.endpoints[proxy]["nginx"]
        return wrk(
            f"http://{HOST}:{ep.port}/s.txt",
            self.cfg.wrk_seconds,
            self.cfg.latency_conns,
            self.tmp / "paced.lua",
        )

    def newconn(self, proxy: str) -> dict[str, Any]:
        ep = self.endpoints[proxy]["nginx"]
        res: dict[str, Any] = {}
        with proxy_cpu(ep.pid, res):
            res.update(
                wrk(
                    f"http://{HOST}:{ep.port}/s.txt",
                    self.cfg.wrk_seconds,
                    self.cfg.wrk_conns,
                    self.tmp / "report.lua",
                    ["-H", "Connection: close"],
                )
            )
        res["cpu_us_per_conn"] = per(res["cpu_s"], res["requests"], 1e6)
        return res

    def redis(self, proxy: str) -> dict[str, Any]:
        ep = self.endpoints[proxy]["redis"]
        cfg = self.cfg
        res: dict[str, Any] = {}
        with proxy_cpu(ep.pid, res):
            plain = redis_bench(ep.port, cfg.redis_requests, cfg.redis_conns, 1)
        piped = redis_bench(
            ep.port, cfg.redis_pipelined_requests, cfg.redis_conns, cfg.redis_pipeline
        )
        res.update(
            get=plain["get"], set=plain["set"], get_piped=piped["get"], set_piped=piped["set"]
        )
        res["cpu_us_per_op"] = per(res["cpu_s"], 2 * cfg.redis_requests, 1e6)
        return res


TESTS: tuple[str, ...] = ("bulk", "http", "latency", "newconn", "redis")


def trial(bench: Bench, test: str, key: str, rep: int) -> float:
    """Run one test through one proxy and record it with the share of a core that other
    processes used meanwhile (``foreign_cpu_share``, also returned)."""
    foreign = bench.foreign
    before = foreign.snapshot()
    start = time.monotonic()
    result: dict[str, Any] = getattr(bench, test)(key)
    share = foreign.used(before, foreign.snapshot()) / (time.monotonic() - start)
    result["foreign_cpu_share"] = round(share, 3)
    result["rep"] = rep
    bench.record(test, key, result)
    time.sleep(0.2)
    return share


def clean(reps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in reps if r["foreign_cpu_share"] <= FOREIGN_MAX_SHARE]


def run_reps(bench: Bench, procs: Procs, ports: Ports, deadline: float) -> None:
    """``reps`` interleaved rounds of every test; then, until ``deadline``, extra rounds
    of the tests that still lack ``reps`` uncontended trials for some proxy. After a
    contended trial, wait for quiet while the time left allows."""
    for proxy in PROXIES:
        bench.endpoints[proxy.key] = {
            name: start_proxy(procs, ports, bench.tmp, proxy, port, name)
            for name, port in (
                ("iperf", bench.ups.iperf),
                ("nginx", bench.ups.nginx),
                ("redis", bench.ups.redis),
            )
        }
    order = [p.key for p in PROXIES]
    cfg = bench.cfg
    base_trials = cfg.reps * len(TESTS) * len(order)
    done = 0
    started = time.monotonic()
    last_share = 0.0

    def run_round(test: str, rep: int, base: bool) -> bool:
        nonlocal done, last_share
        rotated = order[rep % len(order) :] + order[: rep % len(order)]
        for key in rotated:
            now = time.monotonic()
            if not base and now >= deadline:
                return False
            if last_share > FOREIGN_MAX_SHARE:
                per_trial = (now - started) / max(1, done)
                slack = deadline - now - per_trial * max(0, base_trials - done)
                bench.foreign.wait_quiet(now + min(10.0, slack))
            last_share = trial(bench, test, key, rep)
            done += 1
        return True

    for rep in range(cfg.reps):
        for test in TESTS:
            run_round(test, rep, base=True)
            log(f"rep {rep + 1}/{cfg.reps} {test}: " + _brief(bench, test, rep))
    rep = cfg.reps
    while time.monotonic() < deadline:
        short = [t for t in TESTS if any(len(clean(bench.raw[t][k])) < cfg.reps for k in order)]
        if not short:
            break
        for test in short:
            if not run_round(test, rep, base=False):
                break
            log(f"extra round {rep + 1} {test}: " + _brief(bench, test, rep))
        rep += 1
    for key, eps in bench.endpoints.items():
        for name, ep in eps.items():
            if ep.pid is not None and BY_KEY[key].peak_rss:
                bench.record("peak_rss", key, {name: status_kib(ep.pid, "VmHWM") / 1024})


def _brief(bench: Bench, test: str, rep: int) -> str:
    headline = {
        "bulk": "gbit_s",
        "http": "rate",
        "latency": "p50_us",
        "newconn": "rate",
        "redis": "get",
    }[test]
    parts = []
    for key, reps in bench.raw[test].items():
        mine = [r for r in reps if r["rep"] == rep]
        if not mine:
            continue
        v, share = mine[-1].get(headline), mine[-1]["foreign_cpu_share"]
        mark = "*" if share > FOREIGN_MAX_SHARE else ""
        parts.append(f"{key}={v:.4g}{mark}" if isinstance(v, float | int) else f"{key}=?")
    return " ".join(parts) + "  (* = contended)"


# -- idle connections ---------------------------------------------------------------------


def idle_test(
    procs: Procs,
    ports: Ports,
    tmp: Path,
    hold_port: int,
    proxy: Proxy,
    n: int,
    n_warm: int,
    batch: int,
) -> dict[str, Any]:
    """RSS of a fresh proxy; with ``n`` idle connections; and (a second fresh process)
    with ``n_warm`` connections that each moved one byte both ways."""
    res: dict[str, Any] = {}
    ep = start_proxy(procs, ports, tmp, proxy, hold_port, "idle")
    assert ep.proc is not None
    try:
        time.sleep(1.0)
        res["idle_rss_mib"] = status_kib(ep.proc.pid, "VmRSS") / 1024
        res["idle_fds"] = fd_count(ep.proc.pid)
        opened, error = _open_idle(ep.port, hold_port, n, batch, warm=False)
        time.sleep(1.0)
        res["conns"] = len(opened)
        res["conns_error"] = error
        res["conns_rss_mib"] = status_kib(ep.proc.pid, "VmRSS") / 1024
        res["conns_fds"] = fd_count(ep.proc.pid)
        _close_all(opened)
    finally:
        procs.stop(ep.proc)
    _wait_drained(hold_port)
    ep = start_proxy(procs, ports, tmp, proxy, hold_port, "warm")
    assert ep.proc is not None
    try:
        time.sleep(1.0)
        base = status_kib(ep.proc.pid, "VmRSS") / 1024
        opened, error = _open_idle(ep.port, hold_port, n_warm, batch, warm=True)
        time.sleep(1.0)
        res["warm_conns"] = len(opened)
        res["warm_error"] = error
        res["warm_base_rss_mib"] = base
        res["warm_rss_mib"] = status_kib(ep.proc.pid, "VmRSS") / 1024
        res["warm_fds"] = fd_count(ep.proc.pid)
        _close_all(opened)
    finally:
        procs.stop(ep.proc)
    _wait_drained(hold_port)
    per_conn = (res["conns_rss_mib"] - res["idle_rss_mib"]) / max(1, res["conns"])
    res["kib_per_conn"] = per_conn * 1024
    res["rss_10k_mib"] = res["idle_rss_mib"] + per_conn * IDLE_TARGET_CONNS
    res["fds_per_conn"] = (res["conns_fds"] - res["idle_fds"]) / max(1, res["conns"])
    res["warm_fds_per_conn"] = (res["warm_fds"] - res["idle_fds"]) / max(1, res["warm_conns"])
    return res


def _open_idle(
    port: int, hold_port: int, n: int, batch: int, warm: bool
) -> tuple[list[socket.socket], str]:
    """Open up to ``n`` connections through the proxy in batches, each batch waited for
    at the upstream; with ``warm``, echo one byte through each. Returns the sockets and
    the first error (empty when all went through)."""
    socks: list[socket.socket] = []
    start_est = established(hold_port)
    try:
        while len(socks) < n:
            for _ in range(min(batch, n - len(socks))):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(5)
                try:
                    s.connect((HOST, port))
                except OSError:
                    s.close()
                    raise
                socks.append(s)
            deadline = time.monotonic() + 20
            while established(hold_port) - start_est < len(socks):
                if time.monotonic() > deadline:
                    got = established(hold_port) - start_est
                    return socks, f"only {got} of {len(socks)} reached the upstream"
                time.sleep(0.05)
        if warm:
            for s in socks:
                s.sendall(b"x")
            for s in socks:
                if s.recv(1) != b"x":
                    return socks, "echo failed"
    except OSError as exc:
        return socks, f"{type(exc).__name__}: {exc} after {len(socks)} connections"
    return socks, ""


def _close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


def _wait_drained(hold_port: int) -> None:
    deadline = time.monotonic() + 30
    while established(hold_port) and time.monotonic() < deadline:
        time.sleep(0.1)


IDLE_PROXIES = ("pp-splice", "pp-protocol", "haproxy", "haproxy-tuned")


def run_idle(procs: Procs, ports: Ports, tmp: Path, cfg: Settings, nofile: int) -> dict[str, Any]:
    """The memory tests for each proxy in turn, against one accept-and-hold upstream."""
    # Each idle connection costs the proxy 2 fds (6 for a warm splice connection: two
    # pipes); the same counts are used for every proxy.
    headroom = 256
    n = min(cfg.idle_conns, (nofile - headroom) // 2 // 100 * 100)
    n_warm = min(n, (nofile - headroom) // 6 // 100 * 100)
    hold_port = ports.take()
    hold = procs.start(
        "hold-server", [sys.executable, "-c", HOLD_SERVER, HOST, str(hold_port)], LOAD_CORE
    )
    procs.wait_listening("hold-server", hold, hold_port)
    out: dict[str, Any] = {
        "conns_target": cfg.idle_conns,
        "nofile": nofile,
        "n": n,
        "n_warm": n_warm,
    }
    try:
        for key in IDLE_PROXIES:
            res = idle_test(procs, ports, tmp, hold_port, BY_KEY[key], n, n_warm, cfg.idle_batch)
            out[key] = res
            log(
                f"idle {key}: idle {res['idle_rss_mib']:.1f} MiB, {res['conns']} conns "
                f"{res['conns_rss_mib']:.1f} MiB, warm {res['warm_conns']} "
                f"{res['warm_rss_mib']:.1f} MiB {res['warm_fds_per_conn']:.1f} fds/conn "
                f"{res['conns_error'] or res['warm_error']}"
            )
    finally:
        procs.stop(hold)
    return out


# -- aggregation ---------------------------------------------------------------------------


def median(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


Raw = dict[str, dict[str, list[dict[str, Any]]]]


def usable(reps: Sequence[dict[str, Any]], min_clean: int) -> list[dict[str, Any]]:
    """The uncontended trials when there are enough of them, else all."""
    ok = clean(reps)
    return ok if len(ok) >= min_clean else list(reps)


def medians(raw: Raw, min_clean: int) -> dict[str, dict[str, dict[str, float | None]]]:
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for test, by_proxy in raw.items():
        for proxy, reps in by_proxy.items():
            if test == "peak_rss":
                keys, use = list(reps[0]), reps
            else:
                keys = [k for k in reps[0] if k not in ("rep", "foreign_cpu_share")]
                use = usable(reps, min_clean)
            out.setdefault(test, {})[proxy] = {k: median([r.get(k) for r in use]) for k in keys}
    return out


def samples(raw: Raw, min_clean: int) -> dict[str, dict[str, dict[str, int]]]:
    """Per test and proxy: trials run, uncontended, and used for the medians."""
    return {
        test: {
            p: {
                "trials": len(reps),
                "clean": len(clean(reps)),
                "used": len(usable(reps, min_clean)),
            }
            for p, reps in by_proxy.items()
        }
        for test, by_proxy in raw.items()
        if test in TESTS
    }


def added_latency(raw: Raw, min_clean: int) -> dict[str, dict[str, float | None]]:
    """p50/p99 over direct, paired within each round (uncontended pairs when there are
    enough), then the median."""
    lat = raw["latency"]
    direct = {r["rep"]: r for r in lat["direct"]}
    out: dict[str, dict[str, float | None]] = {}
    for proxy, reps in lat.items():
        pairs = [(r, direct[r["rep"]]) for r in reps if r["rep"] in direct]
        calm = [
            (a, b)
            for a, b in pairs
            if max(a["foreign_cpu_share"], b["foreign_cpu_share"]) <= FOREIGN_MAX_SHARE
        ]
        use = calm if len(calm) >= min_clean else pairs
        out[proxy] = {q: median([a[q] - b[q] for a, b in use]) for q in ("p50_us", "p99_us")}
    return out


# -- report -------------------------------------------------------------------------------


Med = dict[str, dict[str, dict[str, float | None]]]


def get(med: Med, test: str, proxy: str, metric: str) -> float | None:
    return med.get(test, {}).get(proxy, {}).get(metric)


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 10_000:
        return f"{v / 1000:.1f}k"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}"


@dataclass(frozen=True)
class Column:
    title: str
    value: Callable[[str], float | None]
    ratio_bases: tuple[str, ...] = ()  # add a "÷ HAProxy / tuned / direct" column


def table(
    columns: Sequence[Column], proxies: Sequence[str], counts: dict[str, dict[str, int]]
) -> list[str]:
    """Rows of proxies; the last column is uncontended / all trials of each cell."""
    heads = ["proxy"]
    for c in columns:
        heads.append(c.title)
        if c.ratio_bases:
            names = {"haproxy": "HAProxy", "haproxy-tuned": "tuned", "direct": "direct"}
            heads.append(
                f"{c.title.split(' ')[0]} ÷ " + " / ".join(names[b] for b in c.ratio_bases)
            )
    heads.append("clean / run")
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for p in proxies:
        n = counts[p]
        cells = [BY_KEY[p].label + (" †" if n["used"] > n["clean"] else "")]
        for c in columns:
            v = c.value(p)
            cells.append(fmt(v))
            if c.ratio_bases:
                cells.append(" / ".join(ratio(v, c.value(b)) for b in c.ratio_bases))
        cells.append(f"{n['clean']} / {n['trials']}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(
    cfg: Settings,
    med: Med,
    added: dict[str, dict[str, float | None]],
    idle: dict[str, Any],
    meta: dict[str, Any],
    targets: list[dict[str, Any]],
    counts: dict[str, dict[str, dict[str, int]]],
) -> str:
    all_p = [p.key for p in PROXIES]
    hb = ("haproxy", "haproxy-tuned", "direct")
    hh = ("haproxy", "haproxy-tuned")

    def m(test: str, metric: str, scale: float = 1.0) -> Callable[[str], float | None]:
        def value(p: str) -> float | None:
            v = get(med, test, p, metric)
            return None if v is None else v * scale

        return value

    def peak(p: str) -> float | None:
        return get(med, "peak_rss", p, "iperf")

    def add(q: str) -> Callable[[str], float | None]:
        return lambda p: None if p == "direct" else added.get(p, {}).get(q)

    lat_rate = get(med, "latency", "direct", "rate")
    fr = meta["foreign"]
    out = [
        "# Ambassador benchmarks",
        "",
        "Produced by `bench/ambassador.py` (do not edit by hand; re-run it). "
        "Medians of interleaved repetitions; ratios are this proxy's figure divided by "
        "stock HAProxy's / tuned HAProxy's / direct's (for CPU and latency lower is better, "
        "so a ratio below 1 is a win there).",
        "",
        f"- Command: `{meta['command']}` (the same as `.venv/bin/python "
        "bench/ambassador.py` with those arguments)",
        f"- Date: {meta['date']}",
        f"- Machine: 2 vCPU ({meta['cpu']}), {meta['mem_gib']:.0f} GiB RAM, Linux "
        f"{meta['kernel']}, loopback only; load generators and upstreams pinned to core "
        f"{LOAD_CORE}, the proxy under test alone on core {PROXY_CORE}.",
        f"- Repetitions: {cfg.reps}{' (--quick)' if cfg.quick else ''}, round-robin over "
        "proxies with the starting proxy rotated each repetition.",
        f"- Peers: {meta['versions']['haproxy']}; {meta['versions']['socat']}; "
        f"{meta['versions']['iperf3']}; {meta['versions']['wrk']}; "
        f"{meta['versions']['nginx']}; {meta['versions']['redis']}; Python "
        f"{meta['python']}, uvloop {meta['uvloop']}.",
        f"- Contention: the machine is shared; {fr['contended']} of {fr['trials']} trials "
        f"ran while other processes used more than {fr['max_share']:.0%} of a core "
        "(from /proc, per trial). Medians use only the uncontended trials of a cell when "
        f"it has at least {cfg.min_clean}; {fr['cells_with_contended']} of {fr['cells']} "
        "cells had fewer and use all their trials (marked † below). "
        f"Extra rounds: {fr['extra_rounds']}; {fr['waited_s']} s went to waiting "
        "for quiet, within the time limit.",
        f"- podpatterns code at {meta['commit']} (bench at {meta['head']}); "
        "`--splice auto` currently means "
        f"{'splice' if meta['splice_by_default'] else 'the Protocol relay'} "
        "(SPLICE_BY_DEFAULT in podpatterns/ambassador/route.py).",
        "",
        "[![bulk throughput and CPU per GB (click for full size)](img/ambassador-bench.png)]"
        "(img/ambassador-bench.png)",
        "",
        f"## Bulk throughput (iperf3, 1 stream, {cfg.bulk_seconds} s)",
        "",
        "Direct is iperf3 client and server sharing core 0; through a proxy the proxy "
        "gets core 1 to itself. Peak RSS is VmHWM of the proxy process that carried "
        "only this test.",
        "",
        *table(
            [
                Column("Gbit/s", m("bulk", "gbit_s"), hb),
                Column("CPU s/GB", m("bulk", "cpu_s_per_gb"), hh),
                Column("peak RSS MiB", peak),
            ],
            all_p,
            counts["bulk"],
        ),
        "",
        f"## Small HTTP requests (wrk -t1 -c{cfg.wrk_conns}, keep-alive, "
        f"{cfg.http_file_bytes}-byte file from nginx, {cfg.wrk_seconds} s)",
        "",
        "Core 0 (wrk plus nginx) saturates first, so the rates sit close together; the "
        "proxy's CPU per request is where designs differ.",
        "",
        *table(
            [
                Column("req/s", m("http", "rate"), hb),
                Column("p50 us", m("http", "p50_us")),
                Column("p99 us", m("http", "p99_us"), hh),
                Column("CPU us/req", m("http", "cpu_us_per_req"), hh),
            ],
            all_p,
            counts["http"],
        ),
        "",
        f"## New connections (wrk -t1 -c{cfg.wrk_conns}, `Connection: close`, {cfg.wrk_seconds} s)",
        "",
        "Every request is a new TCP connection through the proxy (and a new one from the "
        "proxy to nginx).",
        "",
        *table(
            [
                Column("conn/s", m("newconn", "rate"), hb),
                Column("p50 us", m("newconn", "p50_us")),
                Column("p99 us", m("newconn", "p99_us"), hh),
                Column("CPU us/conn", m("newconn", "cpu_us_per_conn"), hh),
            ],
            all_p,
            counts["newconn"],
        ),
        "",
        f"## Added latency at moderate load (wrk -t1 -c{cfg.latency_conns}, "
        f"{cfg.latency_delay_ms} ms pause between requests per connection, "
        f"≈{fmt(lat_rate)} req/s direct)",
        "",
        "Added = this proxy's percentile minus direct's, paired within each repetition.",
        "",
        *table(
            [
                Column("req/s", m("latency", "rate")),
                Column("p50 us", m("latency", "p50_us")),
                Column("p99 us", m("latency", "p99_us")),
                Column("added p50 us", add("p50_us"), hh),
                Column("added p99 us", add("p99_us"), hh),
            ],
            all_p,
            counts["latency"],
        ),
        "",
        f"## Redis (redis-benchmark -c{cfg.redis_conns}, GET/SET, "
        f"{cfg.redis_requests} requests; pipelined -P {cfg.redis_pipeline}, "
        f"{cfg.redis_pipelined_requests} requests)",
        "",
        *table(
            [
                Column("GET/s", m("redis", "get"), hb),
                Column("SET/s", m("redis", "set"), hb),
                Column("GET/s -P16", m("redis", "get_piped"), hb),
                Column("SET/s -P16", m("redis", "set_piped"), hb),
                Column("CPU us/op (no -P)", m("redis", "cpu_us_per_op"), hh),
            ],
            all_p,
            counts["redis"],
        ),
        "",
        *idle_section(idle),
        "",
        "## Targets",
        "",
        "| target | podpatterns --splice on | podpatterns --splice off |",
        "|---|---|---|",
        *[
            f"| {t['target']} | {_verdict(t['pp-splice'])} | {_verdict(t['pp-protocol'])} |"
            for t in targets
        ],
        "",
        *splice_section(med, added),
        "",
        "## Method notes",
        "",
        "- Proxy CPU is utime+stime+cutime+cstime of the proxy PID from /proc/PID/stat "
        "before and after each test (0.3 s after the load ends). socat forks a child per "
        "connection; its children's time reaches the parent's cutime/cstime when reaped, "
        "so socat's CPU is included this way; its peak RSS (per child) is not measured.",
        "- Each proxy runs one process per upstream (iperf3, nginx, redis), all pinned to "
        "core 1; only one carries traffic at a time. HAProxy runs `nbthread 1`, "
        "`mode tcp`, no other tuning except where named. socat runs "
        "`TCP-LISTEN:...,fork,reuseaddr TCP:...` (default 8 KiB buffer).",
        "- The podpatterns ambassador runs with `--admin off --log-level warning` and its "
        "defaults otherwise (uvloop, TCP_NODELAY and keepalive on both legs, 256 KiB "
        "buffer/pipe per direction).",
        "- Raw per-repetition figures: `bench/results/ambassador-latest.json`.",
    ]
    return "\n".join(out) + "\n"


def _verdict(t: dict[str, Any]) -> str:
    return f"{'**pass**' if t['ok'] else '**FAIL**'}: {t['detail']}"


def idle_section(idle: dict[str, Any]) -> list[str]:
    n, n_warm, nofile = idle["n"], idle["n_warm"], idle["nofile"]
    rows = []
    for key in IDLE_PROXIES:
        r = idle[key]
        err = r["conns_error"] or r["warm_error"]
        rows.append(
            f"| {BY_KEY[key].label} | {r['idle_rss_mib']:.1f} | {r['conns']} | "
            f"{r['conns_rss_mib']:.1f} | {r['kib_per_conn']:.2f} | {r['rss_10k_mib']:.1f} | "
            f"{r['fds_per_conn']:.1f} | {r['warm_conns']} | "
            f"{r['warm_rss_mib'] - r['warm_base_rss_mib']:+.1f} | {r['warm_fds_per_conn']:.1f} | "
            f"{err or 'none'} |"
        )
    short = (
        f" The fd limit here is {nofile} (hard), and each connection costs the proxy two "
        f"fds, so {n} is the most that fits; the 10k column extrapolates linearly from "
        "the measured per-connection cost."
        if n < idle["conns_target"]
        else ""
    )
    return [
        "## Memory",
        "",
        "Idle RSS: VmRSS of a fresh proxy process 1 s after start. Then connections "
        "are opened through it in batches of "
        "500 (each waited for at an accept-and-hold upstream) and held idle; RSS 1 s "
        f"after the last.{short} Warm: a second fresh process, {n_warm} connections "
        "that each echo one byte both ways (the splice relay then holds a pipe per "
        "direction: kernel memory, not in RSS, and 4 more fds per connection, which is "
        "why the warm count is limited to what six fds per connection allow).",
        "",
        "| proxy | idle RSS MiB | idle conns | RSS MiB | KiB/conn | RSS at 10k MiB (est.) "
        "| fds/conn | warm conns | warm RSS Δ MiB | warm fds/conn | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def splice_section(med: Med, added: dict[str, dict[str, float | None]]) -> list[str]:
    rows = [
        ("bulk Gbit/s", "bulk", "gbit_s", True),
        ("bulk CPU s/GB", "bulk", "cpu_s_per_gb", False),
        ("HTTP req/s", "http", "rate", True),
        ("HTTP p99 us", "http", "p99_us", False),
        ("HTTP CPU us/req", "http", "cpu_us_per_req", False),
        ("new conn/s", "newconn", "rate", True),
        ("new conn CPU us/conn", "newconn", "cpu_us_per_conn", False),
        ("redis GET/s", "redis", "get", True),
        ("redis SET/s -P16", "redis", "set_piped", True),
        ("redis CPU us/op", "redis", "cpu_us_per_op", False),
    ]
    lines = [
        "## Splice or Protocol relay for `--splice auto`",
        "",
        "Rates and CPU costs vary by about ±3 % between rounds (a tie below), p99 "
        "latencies by far more (see the raw JSON).",
        "",
        "| metric | --splice on | --splice off | on ÷ off | better |",
        "|---|---|---|---|---|",
    ]
    for label, test, metric, higher in rows:
        a, b = get(med, test, "pp-splice", metric), get(med, test, "pp-protocol", metric)
        better = "—"
        if a is not None and b is not None and b:
            better = "splice" if (a > b) == higher else "protocol"
            if abs(a / b - 1) <= 0.03:
                better = f"tie ({better})"
        lines.append(f"| {label} | {fmt(a)} | {fmt(b)} | {ratio(a, b)} | {better} |")
    for q in ("p50_us", "p99_us"):
        a, b = added.get("pp-splice", {}).get(q), added.get("pp-protocol", {}).get(q)
        better = "—" if a is None or b is None else ("splice" if a < b else "protocol")
        if a is not None and b is not None and b and abs(a / b - 1) <= 0.03:
            better = f"tie ({better})"
        lines.append(
            f"| added latency {q[:3]} us | {fmt(a)} | {fmt(b)} | {ratio(a, b)} | {better} |"
        )
    return lines


def evaluate(
    med: Med, added: dict[str, dict[str, float | None]], idle: dict[str, Any]
) -> list[dict[str, Any]]:
    """One entry per target, with a verdict for each podpatterns relay."""

    def both(check: Callable[[str], tuple[bool, str]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("pp-splice", "pp-protocol"):
            ok, detail = check(key)
            out[key] = {"ok": ok, "detail": detail}
        return out

    def v(test: str, p: str, metric: str) -> float:
        x = get(med, test, p, metric)
        return float("nan") if x is None else x

    def bulk(p: str) -> tuple[bool, str]:
        r = v("bulk", p, "gbit_s") / v("bulk", "haproxy", "gbit_s")
        rt = v("bulk", p, "gbit_s") / v("bulk", "haproxy-tuned", "gbit_s")
        return r >= TARGET_BULK_VS_HAPROXY, f"{r:.2f}x stock ({rt:.2f}x tuned)"

    def cpu(p: str) -> tuple[bool, str]:
        a, h, t = (v("bulk", x, "cpu_s_per_gb") for x in (p, "haproxy", "haproxy-tuned"))
        return a < h, f"{a:.2f} vs {h:.2f} s/GB stock ({t:.2f} tuned)"

    def rate(test: str) -> Callable[[str], tuple[bool, str]]:
        def check(p: str) -> tuple[bool, str]:
            r = v(test, p, "rate") / v(test, "haproxy", "rate")
            a99, h99 = v(test, p, "p99_us"), v(test, "haproxy", "p99_us")
            rt = v(test, p, "rate") / v(test, "haproxy-tuned", "rate")
            return (
                r >= 1.0 and a99 <= h99,
                f"{r:.2f}x rate ({rt:.2f}x tuned), p99 {a99:.0f} vs {h99:.0f} us",
            )

        return check

    def latency(p: str) -> tuple[bool, str]:
        a50 = added.get(p, {}).get("p50_us")
        a99 = added.get(p, {}).get("p99_us")
        if a50 is None or a99 is None:
            return False, "n/a"
        return (
            a50 <= TARGET_ADDED_P50_US and a99 <= TARGET_ADDED_P99_US,
            f"+{a50:.0f} us p50, +{a99:.0f} us p99",
        )

    def idle_rss(p: str) -> tuple[bool, str]:
        r = idle[p]["idle_rss_mib"]
        return r < TARGET_IDLE_RSS_MIB, f"{r:.1f} MiB"

    why = "fd limit" if idle["n"] < idle["conns_target"] else "fewer with --quick"

    def conns_rss(p: str) -> tuple[bool, str]:
        r = idle[p]
        if r["conns"] >= IDLE_TARGET_CONNS:
            return r["conns_rss_mib"] < TARGET_10K_RSS_MIB, f"{r['conns_rss_mib']:.1f} MiB"
        return (
            r["rss_10k_mib"] < TARGET_10K_RSS_MIB,
            f"{r['rss_10k_mib']:.1f} MiB est. ({r['conns_rss_mib']:.1f} MiB measured at "
            f"{r['conns']}: {why})",
        )

    return [
        {"target": "bulk >= 1.5x HAProxy", **both(bulk)},
        {"target": "CPU per GB below HAProxy (splice path)", **both(cpu)},
        {"target": "small-request rate >= HAProxy, p99 no worse", **both(rate("http"))},
        {"target": "new-conn rate >= HAProxy, p99 no worse", **both(rate("newconn"))},
        {"target": "added latency <= 100 us p50, <= 500 us p99", **both(latency)},
        {"target": "idle RSS < 40 MiB", **both(idle_rss)},
        {"target": "10k idle connections < 150 MiB RSS", **both(conns_rss)},
    ]


def plot(med: Med, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [p.key for p in PROXIES]
    labels = [BY_KEY[k].label.replace(" ", "\n", 1) for k in keys]
    colors = {
        "direct": "#999999",
        "pp-splice": "#1f77b4",
        "pp-protocol": "#6baed6",
        "haproxy": "#d62728",
        "haproxy-tuned": "#ff9896",
        "socat": "#8c564b",
    }
    panels = [
        ("bulk", "gbit_s", "bulk throughput, Gbit/s (higher is better)"),
        ("bulk", "cpu_s_per_gb", "proxy CPU s per GB (lower is better)"),
        ("newconn", "rate", "new connections/s (higher is better)"),
        ("http", "cpu_us_per_req", "proxy CPU us per HTTP request (lower is better)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (test, metric, title) in zip(axes.flat, panels, strict=True):
        vals = [get(med, test, k, metric) for k in keys]
        xs = [i for i, x in enumerate(vals) if x is not None]
        ys = [x for x in vals if x is not None]
        bars = ax.bar(xs, ys, color=[colors[keys[i]] for i in xs])
        ax.bar_label(bars, labels=[fmt(y) for y in ys], fontsize=8)
        ax.set_xticks(range(len(keys)), labels, fontsize=7)
        ax.set_title(title, fontsize=10)
    fig.suptitle("podpatterns ambassador vs HAProxy / socat, loopback, 2 vCPU (medians)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------


def git(*args: str) -> str:
    """The output of a git command in this checkout, or ``?``."""
    res = subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
    )
    return res.stdout.strip() or "?"


def code_commit() -> str:
    """The code under test: the last commit touching podpatterns/ in this checkout, and
    whether podpatterns/ has uncommitted changes."""
    commit = git("log", "-1", "--format=%h", "--", "podpatterns")
    if git("status", "--porcelain", "--", "podpatterns") != "?":
        commit += " + uncommitted changes"
    return commit


def metadata(argv: Sequence[str]) -> dict[str, Any]:
    from podpatterns.ambassador import route

    try:
        uv = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uv = "not installed"
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    commit = code_commit()
    return {
        "command": shlex.join(["./dev", "bench", *argv]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uv,
        "commit": commit,
        "head": git("describe", "--always", "--dirty"),
        "splice_by_default": route.SPLICE_BY_DEFAULT,
        "versions": {
            "haproxy": tool_version(["haproxy", "-v"]).split(" - ")[0],
            "socat": tool_version(["socat", "-V"], line=1).split(" on ")[0],
            "iperf3": tool_version(["iperf3", "--version"]).split(" (")[0],
            "wrk": tool_version(["wrk", "-v"]).split(" [")[0],
            "nginx": tool_version(["nginx", "-v"]),
            "redis": " ".join(tool_version(["redis-server", "--version"]).split()[:3]),
        },
    }


#: Sections of docs/benchmarks.md that other benchmarks write (bench/postgres.py,
#: bench/pgpool.py); a rewrite of the file by this one keeps them, in their order, after
#: its own.
OTHER_SECTIONS = ("## PostgreSQL through the ambassador", "## PostgreSQL connection pooling")


def doc_section(text: str, heading: str) -> tuple[int, int] | None:
    """Where the ``## `` section ``heading`` starts and ends in ``text``, or None."""
    start = text.find("\n" + heading + "\n")
    if start < 0:
        return None
    end = text.find("\n## ", start + 1)
    return start + 1, len(text) if end < 0 else end + 1


def kept_sections(path: Path) -> str:
    """The sections named in :data:`OTHER_SECTIONS` as they are in ``path`` now."""
    text = path.read_text() if path.exists() else ""
    out = ""
    for heading in OTHER_SECTIONS:
        where = doc_section(text, heading)
        if where is not None:
            out += "\n" + text[where[0] : where[1]].rstrip("\n") + "\n"
    return out


def check_environment() -> None:
    missing = [
        t
        for t in (
            "haproxy",
            "socat",
            "iperf3",
            "wrk",
            "nginx",
            "redis-server",
            "redis-benchmark",
            "taskset",
        )
        if shutil.which(t) is None
    ]
    if missing:
        raise SystemExit(f"bench: missing {' '.join(missing)} (./dev bench installs them)")
    if not (VENV_BIN / "podpatterns").exists():
        raise SystemExit(f"bench: {VENV_BIN / 'podpatterns'} not found (run ./dev bench)")
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("bench: needs two CPUs (load on core 0, proxy on core 1)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1 repetition, short durations")
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions (default 5; 1 with --quick)"
    )
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(args_list)
    if args.reps is not None and args.reps < 1:
        parser.error(f"--reps: {args.reps} is not a positive number of repetitions")
    cfg = Settings.from_args(args)
    check_environment()
    # A SIGTERM unwinds like Ctrl-C, so every process we started is stopped by PID.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    nofile = raise_nofile()
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    meta = metadata(args_list)
    log(f"settings {asdict(cfg)}; fd limit {nofile}")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="podpatterns-bench-") as tmpname:
        tmp = Path(tmpname)
        (tmp / "report.lua").write_text(WRK_REPORT)
        (tmp / "paced.lua").write_text(
            f"delay = function() return {cfg.latency_delay_ms} end\n" + WRK_REPORT
        )
        procs = Procs(tmp)
        ports = Ports()
        try:
            ups = start_upstreams(procs, ports, tmp, cfg)
            bench = Bench(cfg, ups, tmp, Foreign(FOREIGN_MAX_SHARE))
            bench.foreign.wait_quiet(time.monotonic() + 30)
            run_reps(bench, procs, ports, time.monotonic() + cfg.load_phase_s)
            for eps in bench.endpoints.values():
                for ep in eps.values():
                    if ep.proc is not None:
                        procs.stop(ep.proc)
            idle = run_idle(procs, ports, tmp, cfg, nofile)
        finally:
            procs.stop_all()
    med = medians(bench.raw, cfg.min_clean)
    added = added_latency(bench.raw, cfg.min_clean)
    counts = samples(bench.raw, cfg.min_clean)
    targets = evaluate(med, added, idle)
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    trials = [r for t in TESTS for reps in bench.raw[t].values() for r in reps]
    meta["foreign"] = {
        "max_share": FOREIGN_MAX_SHARE,
        "trials": len(trials),
        "contended": sum(r["foreign_cpu_share"] > FOREIGN_MAX_SHARE for r in trials),
        "cells": sum(len(by) for by in counts.values()),
        "cells_with_contended": sum(
            c["used"] > c["clean"] for by in counts.values() for c in by.values()
        ),
        "waited_s": round(bench.foreign.waited_s, 1),
        "extra_rounds": max(r["rep"] for r in trials) + 1 - cfg.reps,
    }
    doc = report(cfg, med, added, idle, meta, targets, counts)
    results = {
        "meta": meta,
        "settings": asdict(cfg),
        "medians": med,
        "added_latency": added,
        "idle": idle,
        "targets": targets,
        "samples": counts,
        "raw": bench.raw,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    name = "ambassador-quick.json" if cfg.quick else "ambassador-latest.json"
    (RESULTS_DIR / name).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if not cfg.quick:
        DOC_PATH.parent.mkdir(parents=True, exist_ok=True)
        DOC_PATH.write_text(doc + kept_sections(DOC_PATH))
        plot(med, PLOT_PATH)
    sys.stdout.write(doc)
    log(f"done in {meta['elapsed_s']} s; results in {RESULTS_DIR / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
