"""Footprints of each component, idle and at stated loads, for resource requests and limits.

Runs the same entrypoints the images run (``podpatterns ambassador|adapter|health|run``),
from the venv's ``podpatterns`` script rather than from the images, each pinned to core 1
(``taskset``); peers (nginx, iperf3) and this script's load generators run on core 0.
For every window it reads, from /proc of the component's own process (not its children:
``run``'s supervised command is the app's, not ours):

- CPU: utime + stime from /proc/PID/stat before and after, divided by the wall time:
  millicores, the unit of a Kubernetes CPU request;
- memory: VmRSS at the end of the window and VmHWM (the peak so far), in MiB.

Loads, each bounded in count and time, from real peers, with the load actually achieved:

- ambassador -> nginx: N new connections/s (one HTTP/1.0 GET each, then close);
- ambassador -> iperf3 server: M MB/s of one iperf3 stream (``iperf3 -b``);
- adapter: K lines/s appended to a file it tails, to a file sink; and OTLP/HTTP
  (``--http-listen``, protobuf, 100 records per request) at R records/s, to a file sink;
  the window ends when every line/record is in the sink;
- health: P probes/s (``--probe-interval``; achieved counted in nginx's access log)
  against nginx, and P GETs/s of its admin
  ``/readyz`` on a new connection each (as the kubelet probes);
- run: idle only (it supervises ``sleep`` and rewrites its record every heartbeat);
- reload: idle only (watching a directory of one file);
- wait: idle only (waiting for a file that never appears, as an init container waits).

Then the ambassador's added latency under a CPU limit: a keep-alive HTTP client sends
GETs at a fixed rate, directly to nginx and through the ambassador, while a second
process drives a background load of new connections through the ambassador; the
ambassador sits in a cgroup v1 ``cpu`` group created here with ``cpu.cfs_quota_us`` set
to each cap (CFS period 100 ms; the kubelet turns a CPU limit into the same quota).
Added latency is the difference of the percentiles (through - direct).

The machine may be shared: the 1-minute load average before and after is recorded.
Usage::

    .venv/bin/python bench/resources.py [--idle-seconds 30] [--seconds 10] [--write-docs]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.adapter import count_lines, machine, proc_cpu  # noqa: E402
from bench.adapter_push import otlp_requests  # noqa: E402
from bench.ambassador import HOST, NGINX_CONF, Ports, Procs, log, status_kib  # noqa: E402

PODPATTERNS = str(Path(sys.executable).parent / "podpatterns")
SUT_CORE = "1"
PEER_CORE = "0"
DOC_PATH = ROOT / "docs" / "resources.md"
PLOT_PATH = ROOT / "docs" / "img" / "resources.png"
RESULTS = ROOT / "bench" / "results" / "resources-latest.json"
BEGIN = "<!-- measured:resources -->"
END = "<!-- end measured:resources -->"
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
PER_REQUEST = 100  # OTLP records per request


def mib(pid: int, key: str) -> float:
    """A /proc/PID/status memory line in MiB."""
    return status_kib(pid, key) / 1024


class Window:
    """CPU (millicores) and memory of one process over a stretch of wall time."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cpu0 = proc_cpu(pid)
        self.t0 = time.monotonic()

    def close(self, **extra: Any) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        return {
            "millicores": (proc_cpu(self.pid) - self.cpu0) / wall * 1000,
            "rss_mib": mib(self.pid, "VmRSS"),
            "hwm_mib": mib(self.pid, "VmHWM"),
            "seconds": wall,
            "load1": os.getloadavg()[0],
            **extra,
        }


def paced(rate: float, seconds: float) -> Iterator[int]:
    """Yield 0, 1, ... at ``rate`` per second for ``seconds`` (never more, never later)."""
    total = int(rate * seconds)
    start = time.monotonic()
    deadline = start + seconds + 5
    for i in range(total):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if time.monotonic() > deadline:
            return
        yield i


def short_get(port: int) -> bool:
    """One new connection: HTTP/1.0 GET of the small file, read to EOF, close."""
    try:
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(b"GET /s.txt HTTP/1.0\r\nHost: bench\r\n\r\n")
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            return got.startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def conn_load(port: int, rate: float, seconds: float) -> dict[str, float]:
    """New connections at ``rate``/s for ``seconds``: achieved rate and failures."""
    t0 = time.monotonic()
    ok = failed = 0
    for _ in paced(rate, seconds):
        if short_get(port):
            ok += 1
        else:
            failed += 1
    return {"achieved": ok / (time.monotonic() - t0), "failed": failed}


def start_nginx(procs: Procs, port: int, tmp: Path) -> None:
    """nginx serving a 128-byte file (and probe targets), on the peer core."""
    (tmp / "www").mkdir()
    for name in ("s.txt", "probe.txt"):
        (tmp / "www" / name).write_bytes(b"x" * 127 + b"\n")
    conf = tmp / "nginx.conf"
    # With an access log: the prober's requests are counted from it.
    access = f"access_log {tmp / 'access.log'};"
    conf.write_text(
        NGINX_CONF.replace("access_log off;", access).format(dir=tmp, host=HOST, port=port)
    )
    p = procs.start("nginx", ["nginx", "-p", str(tmp), "-c", str(conf)], PEER_CORE)
    procs.wait_listening("nginx", p, port)


def start_component(
    procs: Procs, name: str, args: list[str], ready: int | Path | None
) -> subprocess.Popen[bytes]:
    """``podpatterns ARGS`` on the component core, once port ``ready`` listens (or the
    file ``ready`` exists; None: ``wait``, which has neither, is given the settle time)."""
    p = procs.start(name, [PODPATTERNS, args[0], "--log-format=json", *args[1:]], SUT_CORE)
    if isinstance(ready, int):
        procs.wait_listening(name, p, ready)
    elif ready is not None:
        deadline = time.monotonic() + 15
        while not ready.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not write {ready}")
            time.sleep(0.05)
    return p


def probes_seen(tmp: Path, rate: float) -> int:
    """Requests for the probe file of ``rate`` in nginx's access log."""
    return (tmp / "access.log").read_bytes().count(f"/probe-{rate:g}.txt".encode())


def ambassador_args(listen: int, upstream: int, admin: int) -> list[str]:
    return [
        "ambassador",
        f"--listen={HOST}:{listen}",
        f"--upstream={HOST}:{upstream}",
        f"--admin={HOST}:{admin}",
        "--log-level=warning",
        "--shutdown-delay=0",
    ]


def health_args(
    health_dir: Path, nginx: int, admin: int, interval: str, target: str = "probe.txt"
) -> list[str]:
    return [
        "health",
        f"--health-dir={health_dir}",
        "--name=web",
        f"--probe=http://{HOST}:{nginx}/{target}",
        f"--probe-interval={interval}",
        f"--admin={HOST}:{admin}",
        "--log-level=warning",
        "--shutdown-delay=0",
    ]


# -- loads --------------------------------------------------------------------------------


def bulk_load(port: int, mb_s: float, seconds: float) -> dict[str, float]:
    """One iperf3 stream at ``mb_s`` MB/s through ``port``: achieved MB/s."""
    res = subprocess.run(
        [
            *("taskset", "-c", PEER_CORE, "iperf3", "-c", HOST, "-p", str(port), "-J"),
            *("-t", str(int(seconds)), "-b", f"{int(mb_s * 8)}M"),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
    )
    data = json.loads(res.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    end = data["end"]["sum_received"]
    return {"achieved": end["bytes"] / end["seconds"] / 1e6, "failed": 0}


def wait_lines(path: Path, want: int, timeout: float) -> int:
    """Poll ``path`` until it holds ``want`` lines or ``timeout`` passes; the count."""
    deadline = time.monotonic() + timeout
    got = 0
    while time.monotonic() < deadline:
        got = count_lines(path) if path.exists() else 0
        if got >= want:
            break
        time.sleep(0.1)
    return got


def tail_load(pid: int, log_path: Path, sink: Path, rate: float, seconds: float) -> dict[str, Any]:
    """Append ``rate`` lines/s (in 10 ms batches) to the tailed file; wait for the sink."""
    before = count_lines(sink) if sink.exists() else 0
    w = Window(pid)
    batch = max(1, int(rate / 100))
    written = 0
    with log_path.open("ab", buffering=0) as f:
        for _ in paced(rate / batch, seconds):
            f.write(
                b"".join(
                    b'ts=2026-12-02T09:00:00Z level=info seq=%d msg="GET /api/cart 200"\n'
                    % (written + k)
                    for k in range(batch)
                )
            )
            written += batch
    got = wait_lines(sink, before + written, 30) - before
    return w.close(achieved=got / (time.monotonic() - w.t0), offered=rate, lost=written - got)


def otlp_load(pid: int, port: int, sink: Path, rate: float, seconds: float) -> dict[str, Any]:
    """POST OTLP/HTTP protobuf requests of 100 records at ``rate`` records/s; wait for the sink."""
    before = count_lines(sink) if sink.exists() else 0
    total = int(rate * seconds)
    bodies = otlp_requests(total, PER_REQUEST)
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    w = Window(pid)
    sent = refused = 0
    for i in paced(rate / PER_REQUEST, seconds):
        conn.request(
            "POST", "/v1/logs", body=bodies[i], headers={"Content-Type": "application/x-protobuf"}
        )
        resp = conn.getresponse()
        resp.read()
        if resp.status == 200:
            sent += PER_REQUEST
        else:
            refused += 1
    conn.close()
    got = wait_lines(sink, before + sent, 30) - before
    return w.close(
        achieved=got / (time.monotonic() - w.t0), offered=rate, lost=sent - got, refused=refused
    )


def readyz_load(port: int, rate: float, seconds: float) -> dict[str, float]:
    """GET /readyz at ``rate``/s, a new connection each (like the kubelet): achieved rate."""
    t0 = time.monotonic()
    ok = failed = 0
    for _ in paced(rate, seconds):
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            conn.request("GET", "/readyz")
            resp = conn.getresponse()
            resp.read()
            ok += resp.status in (200, 503)
        except OSError:
            failed += 1
        finally:
            conn.close()
    return {"achieved": ok / (time.monotonic() - t0), "failed": failed}


def run_load(pid: int, fn: Any, *args: Any, offered: float) -> dict[str, Any]:
    """Measure ``pid`` while ``fn(*args)`` generates a load; merge what it achieved."""
    w = Window(pid)
    got = fn(*args)
    return w.close(offered=offered, **got)


# -- latency under a CPU limit ------------------------------------------------------------


class CpuCap:
    """A cgroup v1 ``cpu`` group of our own for one process; the quota set per window."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        # Where it was (cgroup v1 lines read "ID:CONTROLLERS:PATH"), to put it back.
        self.home = CGROUP_CPU
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "cpu" in controllers.split(","):
                self.home = CGROUP_CPU / path.lstrip("/")
        self.path = CGROUP_CPU / f"podpatterns-bench-resources-{os.getpid()}"
        self.path.mkdir()
        (self.path / "cgroup.procs").write_text(str(pid))

    def set(self, millicores: int | None) -> None:
        period = int((self.path / "cpu.cfs_period_us").read_text())
        quota = -1 if millicores is None else millicores * period // 1000
        (self.path / "cpu.cfs_quota_us").write_text(str(quota))

    def stat(self) -> dict[str, int]:
        return {
            k: int(v)
            for k, v in (line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        }

    def close(self) -> None:
        with contextlib.suppress(OSError):
            (self.home / "cgroup.procs").write_text(str(self.pid))
        with contextlib.suppress(OSError):
            self.path.rmdir()


def keepalive_latencies(port: int, rate: float, seconds: float) -> list[float]:
    """Microseconds per keep-alive GET of the small file at ``rate``/s."""
    out: list[float] = []
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    for _ in paced(rate, seconds):
        t = time.perf_counter_ns()
        conn.request("GET", "/s.txt")
        conn.getresponse().read()
        out.append((time.perf_counter_ns() - t) / 1000)
    conn.close()
    return out


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))]


def background(port: int, rate: float, seconds: float) -> subprocess.Popen[bytes]:
    """A process of its own (peer core) making new connections through ``port``."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); from bench.resources import conn_load; "
        f"print(conn_load({port}, {rate}, {seconds}))"
    )
    return subprocess.Popen(
        ["taskset", "-c", PEER_CORE, sys.executable, "-c", code], stdout=subprocess.PIPE
    )


def capped_latency(
    amb: subprocess.Popen[bytes], amb_port: int, nginx: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Added p50/p99 of the ambassador per CPU cap, under a background connection load."""
    try:
        cap = CpuCap(amb.pid)
    except OSError as e:
        log(f"no cgroup v1 cpu controller to write ({e}): no capped latency")
        return []
    rows = []
    try:
        for limit in [None, *args.caps]:
            cap.set(limit)
            row: dict[str, Any] = {"cap_millicores": limit}
            for target, port in (("direct", nginx), ("through", amb_port)):
                bg = background(amb_port, args.bg_rate, args.seconds)
                st0 = cap.stat()
                w = Window(amb.pid)
                lat = keepalive_latencies(port, args.latency_rate, args.seconds)
                out, _ = bg.communicate(timeout=args.seconds + 60)
                st1 = cap.stat()
                win = w.close()
                row[target] = {
                    "p50_us": pct(lat, 0.5),
                    "p99_us": pct(lat, 0.99),
                    "requests": len(lat),
                    "background": out.decode().strip(),
                }
                if target == "through":
                    row["ambassador_millicores"] = win["millicores"]
                    row["nr_throttled"] = st1["nr_throttled"] - st0["nr_throttled"]
                    row["nr_periods"] = st1["nr_periods"] - st0["nr_periods"]
                    row["throttled_ms"] = (st1["throttled_time"] - st0["throttled_time"]) / 1e6
            row["added_p50_us"] = row["through"]["p50_us"] - row["direct"]["p50_us"]
            row["added_p99_us"] = row["through"]["p99_us"] - row["direct"]["p99_us"]
            log(f"cap {limit}: {row}")
            rows.append(row)
    finally:
        cap.close()
    return rows


# -- the run ------------------------------------------------------------------------------


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Every component idle, then at each load; then the capped latency."""
    procs = Procs(tmp)
    ports = Ports()
    nginx, iperf_port = ports.take(), ports.take()
    p_amb, p_amb_bulk = ports.take(), ports.take()
    admin = {k: ports.take() for k in ("amb", "amb_bulk", "tail", "otlp", "health", "reload")}
    (tmp / "conf").mkdir()
    (tmp / "conf" / "app.conf").write_text("a = 1\n")
    otlp_port = ports.take()
    health_dir = tmp / "health"
    health_dir.mkdir()
    log_path, tail_sink, otlp_sink = tmp / "app.log", tmp / "tail.ndjson", tmp / "otlp.ndjson"
    log_path.write_bytes(b"")
    out: dict[str, Any] = {"idle": {}, "load": {}}
    try:
        start_nginx(procs, nginx, tmp)
        ip = procs.start("iperf3-server", ["iperf3", "-s", "-B", HOST, "-p", str(iperf_port)], "0")
        procs.wait_listening("iperf3-server", ip, iperf_port)
        comps = {
            "ambassador": start_component(
                procs, "ambassador", ambassador_args(p_amb, nginx, admin["amb"]), p_amb
            ),
            "ambassador (bulk route)": start_component(
                procs,
                "ambassador-bulk",
                ambassador_args(p_amb_bulk, iperf_port, admin["amb_bulk"]),
                p_amb_bulk,
            ),
            "adapter (file tail)": start_component(
                procs,
                "adapter-tail",
                [
                    *("adapter", f"--path={log_path}", "--sink=file", f"--sink-path={tail_sink}"),
                    *(f"--admin={HOST}:{admin['tail']}", "--log-level=warning"),
                ],
                admin["tail"],
            ),
            "adapter (OTLP/HTTP)": start_component(
                procs,
                "adapter-otlp",
                [
                    "adapter",
                    f"--http-listen={HOST}:{otlp_port}",
                    f"--spool-dir={tmp / 'spool'}",
                    "--sink=file",
                    f"--sink-path={otlp_sink}",
                    f"--admin={HOST}:{admin['otlp']}",
                    "--log-level=warning",
                ],
                otlp_port,
            ),
            "health": start_component(
                procs,
                "health",
                health_args(health_dir, nginx, admin["health"], "10s"),
                admin["health"],
            ),
            "run": start_component(
                procs,
                "run",
                [
                    *("run", f"--health-dir={health_dir}", "--name=app"),
                    *("--log-level=warning", "--", "sleep", "3600"),
                ],
                health_dir / "app.json",
            ),
            "reload": start_component(
                procs,
                "reload",
                [
                    *("reload", f"--watch={tmp / 'conf'}", f"--http-post=http://{HOST}:{nginx}/"),
                    *(f"--admin={HOST}:{admin['reload']}", "--log-level=warning"),
                ],
                admin["reload"],
            ),
            "wait": start_component(
                procs,
                "wait",
                ["wait", f"--for=file:{tmp / 'never'}", "--timeout=1h", "--log-level=warning"],
                None,
            ),
        }
        log(f"all started; idle for {args.idle_seconds} s")
        time.sleep(3)  # imports done, first heartbeats written
        windows = {name: Window(p.pid) for name, p in comps.items()}
        time.sleep(args.idle_seconds)
        for name, w in windows.items():
            out["idle"][name] = w.close()
            log(f"idle {name}: {out['idle'][name]}")
        s = args.seconds
        loads: list[tuple[str, str, int, Any, tuple[Any, ...], float]] = []
        for n in args.conn_rates:
            loads.append(
                ("ambassador", "new conn/s", comps["ambassador"].pid, conn_load, (p_amb, n, s), n)
            )
        for m in args.mb_rates:
            bulk_pid = comps["ambassador (bulk route)"].pid
            loads.append(("ambassador", "MB/s", bulk_pid, bulk_load, (p_amb_bulk, m, s), m))
        for p in args.readyz_rates:
            hp = comps["health"].pid
            loads.append(("health", "/readyz GETs/s", hp, readyz_load, (admin["health"], p, s), p))
        for name, unit, pid, fn, fargs, offered in loads:
            r = run_load(pid, fn, *fargs, offered=offered)
            out["load"].setdefault(name, []).append({"unit": unit, **r})
            log(f"{name} {offered} {unit}: {r}")
        for k in args.line_rates:
            pid = comps["adapter (file tail)"].pid
            r = tail_load(pid, log_path, tail_sink, k, s)
            out["load"].setdefault("adapter (file tail)", []).append({"unit": "lines/s", **r})
            log(f"tail {k} lines/s: {r}")
        for rr in args.record_rates:
            pid = comps["adapter (OTLP/HTTP)"].pid
            r = otlp_load(pid, otlp_port, otlp_sink, rr, s)
            out["load"].setdefault("adapter (OTLP/HTTP)", []).append({"unit": "records/s", **r})
            log(f"otlp {rr} records/s: {r}")
        for p in args.probe_rates:
            port = ports.take()
            (tmp / f"health-{p}").mkdir()
            (tmp / "www" / f"probe-{p:g}.txt").write_bytes(b"ok\n")
            hp2 = start_component(
                procs,
                f"health-{p}",
                health_args(
                    tmp / f"health-{p}", nginx, port, f"{int(1000 / p)}ms", f"probe-{p:g}.txt"
                ),
                port,
            )
            time.sleep(2)
            n0 = probes_seen(tmp, p)
            w = Window(hp2.pid)
            time.sleep(s)
            r = w.close(offered=p, achieved=(probes_seen(tmp, p) - n0) / s)
            out["load"].setdefault("health", []).append({"unit": "outbound probes/s", **r})
            log(f"health {p} probes/s: {r}")
            procs.stop(hp2)
        out["latency"] = capped_latency(comps["ambassador"], p_amb, nginx, args)
    finally:
        procs.stop_all()
    return out


# The headroom rule of docs/resources.md: requests from the measured figures.
CPU_HEADROOM, MEM_HEADROOM = 1.5, 1.25


def cpu_request(millicores: float) -> int:
    """Millicores x 1.5, rounded up to a multiple of 10m, at least 10m."""
    return max(10, -(-int(millicores * CPU_HEADROOM * 10) // 100) * 10)


def memory_request(mib_peak: float) -> int:
    """Peak RSS x 1.25, rounded up to a multiple of 16 MiB."""
    return -(-int(mib_peak * MEM_HEADROOM * 100) // 1600) * 16


def mc(v: float) -> str:
    return f"{v:.1f}" if v < 10 else f"{v:.0f}"


def rule(r: dict[str, Any]) -> str:
    """The requests the headroom rule gives for one measured row."""
    return f"{cpu_request(r['millicores'])}m / {memory_request(r['hwm_mib'])}Mi"


def tables(res: dict[str, Any]) -> str:
    """The Markdown tables of one run."""
    lines = [
        "| component | load (offered) | achieved | CPU (millicores) | RSS (MiB) | peak RSS (MiB) "
        "| request by the rule (CPU / memory) |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for name, r in res["idle"].items():
        lines.append(
            f"| {name} | idle ({r['seconds']:.0f} s) | — | {mc(r['millicores'])} "
            f"| {r['rss_mib']:.1f} | {r['hwm_mib']:.1f} | {rule(r)} |"
        )
    for name, rows in res["load"].items():
        for r in rows:
            lines.append(
                f"| {name} | {r['offered']:,.0f} {r['unit']} | {r['achieved']:,.0f} "
                f"| {mc(r['millicores'])} | {r['rss_mib']:.1f} | {r['hwm_mib']:.1f} | {rule(r)} |"
            )
    if res.get("latency"):
        lines += [
            "",
            "| ambassador CPU limit | ambassador CPU used (millicores) | periods throttled "
            "| added p50 (us) | added p99 (us) | direct p50 / p99 (us) |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for r in res["latency"]:
            cap = "none" if r["cap_millicores"] is None else f"{r['cap_millicores']}m"
            d = r["direct"]
            lines.append(
                f"| {cap} | {mc(r['ambassador_millicores'])} "
                f"| {r['nr_throttled']} of {r['nr_periods']} "
                f"| {r['added_p50_us']:,.0f} | {r['added_p99_us']:,.0f} "
                f"| {d['p50_us']:,.0f} / {d['p99_us']:,.0f} |"
            )
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    """CPU (millicores) per load step for each component; added p99 per CPU cap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.5), width_ratios=[2, 1])
    labels, cpu, rss = [], [], []
    for name, r in res["idle"].items():
        labels.append(f"{name}\nidle")
        cpu.append(r["millicores"])
        rss.append(r["rss_mib"])
    for name, rows in res["load"].items():
        for r in rows:
            labels.append(f"{name}\n{r['achieved']:,.0f} {r['unit']}")
            cpu.append(r["millicores"])
            rss.append(r["rss_mib"])
    xs = range(len(labels))
    ax.bar(xs, cpu, color="tab:blue")
    ax.set_ylabel("CPU (millicores)", color="tab:blue")
    ax.set_yscale("symlog", linthresh=1)
    axr = ax.twinx()
    axr.plot(list(xs), rss, "o", color="tab:red")
    axr.set_ylabel("RSS (MiB)", color="tab:red")
    axr.set_ylim(0, max(rss) * 1.2)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=70, ha="right", fontsize=7)
    ax.set_title("CPU (bars) and RSS (dots), idle and under load")
    lat = res.get("latency") or []
    if lat:
        caps = ["none" if r["cap_millicores"] is None else f"{r['cap_millicores']}m" for r in lat]
        ax2.bar(range(len(lat)), [max(r["added_p99_us"], 1) for r in lat], color="tab:orange")
        ax2.set_yscale("log")
        ax2.set_ylim(bottom=100)
        ax2.set_xticks(range(len(lat)))
        ax2.set_xticklabels(caps)
        ax2.set_xlabel("ambassador CPU limit (CFS quota)")
        ax2.set_ylabel("added p99 latency (us, log)")
        ax2.set_title("ambassador added p99 under a CPU limit")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def docs_section(report: dict[str, Any]) -> str:
    """The generated part of docs/resources.md."""
    lb, la = report["load_before"], report["load_after"]
    return (
        f"{BEGIN}\n\n"
        f"- **Command:** `.venv/bin/python {report['command']}`\n"
        f"- **Date:** {report['date']}\n"
        f"- **Machine:** {report['machine']}\n"
        f"- **Load:** shared machine; 1-minute load average {lb[0]:.2f} before, "
        f"{la[0]:.2f} after (each window's own in the raw results)\n"
        "- **Raw results:** `bench/results/resources-latest.json`\n\n"
        f"{tables(report)}\n\n"
        "![CPU and RSS per component and load; added p99 per CPU limit](img/resources.png)\n\n"
        f"{END}"
    )


def write_docs(report: dict[str, Any]) -> None:
    text = DOC_PATH.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    DOC_PATH.write_text(text[:start] + docs_section(report) + text[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=10.0, help="each load window")
    parser.add_argument("--conn-rates", type=float, nargs="+", default=[100, 500])
    parser.add_argument("--mb-rates", type=float, nargs="+", default=[10, 100])
    parser.add_argument("--line-rates", type=float, nargs="+", default=[1000, 10000])
    parser.add_argument("--record-rates", type=float, nargs="+", default=[1000, 10000])
    parser.add_argument("--probe-rates", type=float, nargs="+", default=[1, 10])
    parser.add_argument("--readyz-rates", type=float, nargs="+", default=[1, 50])
    parser.add_argument("--caps", type=int, nargs="+", default=[200, 100, 50], help="m")
    parser.add_argument("--latency-rate", type=float, default=200, help="GETs/s")
    parser.add_argument("--bg-rate", type=float, default=300, help="new conn/s")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--from-json", type=Path, help="measure nothing: rewrite docs from it")
    args = parser.parse_args()
    if args.from_json:
        report = json.loads(args.from_json.read_text())
    else:
        os.sched_setaffinity(0, {0})
        load_before = os.getloadavg()
        with tempfile.TemporaryDirectory() as tmp:
            res = measure(args, Path(tmp))
        report = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine(),
            "command": "bench/resources.py " + " ".join(sys.argv[1:]),
            "load_before": load_before,
            "load_after": os.getloadavg(),
            **res,
        }
    print(tables(report))
    if args.write_docs:
        if not args.from_json:
            RESULTS.write_text(json.dumps(report, indent=1) + "\n")
        plot(report, PLOT_PATH)
        write_docs(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
