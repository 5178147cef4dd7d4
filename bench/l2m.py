"""Logs-to-metrics benchmark: the adapter's ``metrics:`` against mtail, on nginx access logs.

Both programs do the same work on the same pre-written nginx access log of ``--lines``
lines (varied methods, paths, statuses and request times, each line its own timestamp):
a counter of requests by method and status, and a histogram of ``request_time`` with the
same buckets. Two log formats, one case each:

- ``json``: nginx ``log_format ... escape=json`` with ``status`` and ``request_time`` as
  JSON numbers. The adapter parses the whole line (``parse: json``); mtail has no JSON
  parser, so its program is a regular expression that picks the three fields out of the
  line in nginx's field order (the way mtail users parse JSON logs). Not the same parsing
  work: the adapter's is the more general one.
- ``combined+rt``: the ``combined`` format with ``$request_time`` appended. Both run the
  same regular expression (named groups for every field; Python ``re`` in the adapter's
  ``parse: regex``, RE2 in mtail).

How a program is timed (the same for both): it is started on an empty file, pinned to
core 1 (``taskset``); once it is ready (the adapter logged ``adapter_started``, mtail
logged that it tails the file and listens), the benchmark (on core 0) appends the whole
pre-written log to the file in one copy, and polls the program's ``/metrics`` until the
counter summed over its labels equals the lines written. Wall time runs from the start of
the copy to that scrape; CPU seconds are the program's, from ``/proc/PID/stat``, over the
same span. Start-up is measured apart (start to ready). The adapter reads with
``--read-from beginning``, ``--sink none`` and no checkpoint directory (metrics in memory);
the ``adapter+ckpt`` program adds a checkpoint directory, so that the metric state is
written with every checkpoint generation (the exact-across-restarts mode). mtail polls the
file every ``--mtail-poll`` (default 50 ms; it has no inotify), and ``mtail --one_shot``
(reads the file from the start to its end, prints the metrics and exits; a debugging mode,
timed from start to exit) is recorded as mtail's fastest path.

Every run's final counts per (method, status), histogram buckets, count and sum are checked
against what the generator wrote (exact: request times are whole milliseconds, so bucket
membership is decided in integers); a difference is reported and fails the run. Rounds are
interleaved (every program of every case, then again), load average recorded. Usage::

    .venv/bin/python bench/l2m.py [--lines N] [--reps R] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PIN_SUT = ["taskset", "-c", "1"]
DEADLINE_S = 300.0  # no single measurement may take longer
POLL_S = 0.1  # /metrics scrape interval while waiting for the last line (<1% of a run)

BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
BUCKETS = [b / 1000 for b in BUCKETS_MS]
COUNTER = "http_requests_total"
HISTOGRAM = "http_request_duration_seconds"

METHODS = ("GET",) * 14 + ("POST",) * 3 + ("PUT", "DELETE", "HEAD")
STATUSES: tuple[int, ...] = (200,) * 30 + (201, 204, 301, 302, 304, 304, 400, 401, 403)
STATUSES += (404, 404, 404, 499, 500, 502, 503)
PATHS = ("/", "/api/v1/items/{}", "/api/v1/users/{}/orders", "/static/js/app.{}.js",
         "/search?q=term{}", "/health", "/img/{}.png")  # fmt: skip
AGENTS = (
    "Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/119.0 Safari/537.36",
    "curl/7.88.1",
    "kube-probe/1.28",
    "Prometheus/2.42.0",
)

# The combined format plus $request_time, one regular expression for both programs
# (RE2 and Python re agree on this syntax).
COMBINED_RT = (
    r"^(?P<remote_addr>\S+) \S+ (?P<remote_user>\S+) \[(?P<time_local>[^\]]+)\] "
    r'"(?P<method>[A-Z]+) (?P<path>\S+) (?P<protocol>[^"]+)" (?P<status>\d{3}) '
    r'(?P<bytes>\d+) "(?P<referer>[^"]*)" "(?P<user_agent>[^"]*)" '
    r"(?P<request_time>\d+\.\d+)$"
)
# mtail on nginx's JSON lines: the three fields, in nginx's order.
JSON_RE = (
    r'"method":"(?P<method>[A-Z]+)".*"status":(?P<status>\d{3}),'
    r'.*"request_time":(?P<request_time>\d+\.\d+)'
)


@dataclass
class Truth:
    """What the generator wrote: the exact answer both programs must give."""

    lines: int = 0
    by_method_status: Counter[tuple[str, str]] = field(default_factory=Counter)
    cumulative: dict[float, int] = field(default_factory=dict)  # le -> count, +Inf included
    sum_ms: int = 0
    zeros: int = 0  # lines with request_time 0.000


def request_ms(rng: random.Random) -> int:
    """A request time in whole milliseconds: mostly fast, a long tail, some exact bounds."""
    r = rng.random()
    if r < 0.05:
        return rng.choice(BUCKETS_MS)  # nginx's ms resolution makes values on a bound common
    if r < 0.75:
        return rng.randint(0, 60)
    if r < 0.97:
        return rng.randint(60, 1500)
    return rng.randint(1500, 15000)


def write_inputs(directory: Path, n: int, seed: int = 15) -> tuple[dict[str, Path], Truth]:
    """The JSON and combined+rt logs of ``n`` lines (the same requests) and their truth."""
    rng = random.Random(seed)
    truth = Truth(lines=n)
    per_bucket = Counter[float]()
    files = {"json": directory / "access.json.log", "combined+rt": directory / "access.log"}
    with files["json"].open("w") as fj, files["combined+rt"].open("w") as fc:
        for i in range(n):
            method, status = rng.choice(METHODS), rng.choice(STATUSES)
            path = rng.choice(PATHS).format(rng.randrange(20_000))
            ms = request_ms(rng)
            rt = f"{ms // 1000}.{ms % 1000:03d}"
            addr = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{rng.randrange(256)}"
            size = 0 if status in (204, 304) else rng.randrange(50, 80_000)
            agent = rng.choice(AGENTS)
            sec = 1_700_000_000 + i // 200
            t = time.gmtime(sec)
            iso = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", t)
            local = time.strftime("%d/%b/%Y:%H:%M:%S +0000", t)
            fj.write(
                f'{{"time":"{iso}","remote_addr":"{addr}","method":"{method}",'
                f'"uri":"{path}","protocol":"HTTP/1.1","status":{status},'
                f'"body_bytes_sent":{size},"request_time":{rt},'
                f'"http_referer":"","http_user_agent":"{agent}"}}\n'
            )
            fc.write(
                f'{addr} - - [{local}] "{method} {path} HTTP/1.1" {status} {size} '
                f'"-" "{agent}" {rt}\n'
            )
            truth.by_method_status[(method, str(status))] += 1
            truth.sum_ms += ms
            truth.zeros += ms == 0
            le = next((b for b in BUCKETS_MS if ms <= b), None)
            per_bucket[le / 1000 if le is not None else float("inf")] += 1
    acc = 0
    for b in [*BUCKETS, float("inf")]:
        acc += per_bucket[b]
        truth.cumulative[b] = acc
    return files, truth


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a live process, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass
class Scrape:
    """The two metrics as one scrape of /metrics shows them (mtail's ``prog`` label dropped)."""

    by_method_status: Counter[tuple[str, str]]
    cumulative: dict[float, int]
    count: int
    sum: float

    @property
    def total(self) -> int:
        """The counter summed over its labels."""
        return sum(self.by_method_status.values())


def scrape(url: str) -> Scrape:
    """GET ``url`` and pick out the counter and the histogram."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out = Scrape(Counter(), {}, 0, 0.0)
    for line in text.splitlines():
        if not line or line[0] == "#" or not (m := SAMPLE.match(line)):
            continue
        name, labels = m[1], dict(LABEL.findall(m[2] or ""))
        value = float(m[3])
        if name == COUNTER:
            out.by_method_status[(labels.get("method", ""), labels.get("status", ""))] += int(value)
        elif name == f"{HISTOGRAM}_bucket":
            out.cumulative[float(labels["le"])] = int(value)
        elif name == f"{HISTOGRAM}_count":
            out.count = int(value)
        elif name == f"{HISTOGRAM}_sum":
            out.sum = value
    return out


def differences(got: Scrape, truth: Truth) -> list[str]:
    """What ``got`` says that the generator did not write (empty: exact)."""
    diffs: list[str] = []
    for key in sorted(set(got.by_method_status) | set(truth.by_method_status)):
        g, w = got.by_method_status.get(key, 0), truth.by_method_status.get(key, 0)
        if g != w:
            diffs.append(f"{COUNTER}{{method={key[0]},status={key[1]}}} {g} != {w}")
    wrong = {
        le: got.cumulative.get(le)
        for le, w in truth.cumulative.items()
        if got.cumulative.get(le) != w
    }
    if wrong and all(
        got.cumulative.get(le) == w - truth.zeros for le, w in truth.cumulative.items()
    ):
        # Seen with mtail 3.0.0~rc50: an observation of 0 lands in no bucket at all.
        diffs.append(
            f"{HISTOGRAM}_bucket: the {truth.zeros} observations of 0 (request_time 0.000) are in "
            f"no bucket, not even +Inf (every bucket {truth.zeros} short; _count {got.count})"
        )
    else:
        for le, have in wrong.items():
            diffs.append(f"{HISTOGRAM}_bucket{{le={le}}} {have} != {truth.cumulative[le]}")
    if got.count != truth.lines:
        diffs.append(f"{HISTOGRAM}_count {got.count} != {truth.lines}")
    if abs(got.sum - truth.sum_ms / 1000) > 1e-6 * max(1.0, truth.sum_ms / 1000):
        diffs.append(f"{HISTOGRAM}_sum {got.sum} != {truth.sum_ms / 1000}")
    return diffs


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def append(src: Path, dst: Path) -> None:
    """Append all of ``src`` to ``dst`` in one copy (the benchmark's core)."""
    with src.open("rb") as f, dst.open("ab") as g:
        shutil.copyfileobj(f, g, 1 << 20)


def adapter_config(work: Path, case: str, log: Path, port: int, ckpt: bool) -> Path:
    """The adapter's YAML config for ``case`` (JSON is a subset of YAML: written as JSON)."""
    cfg: dict[str, Any] = {
        "path": [str(log)],
        "parse": "json" if case == "json" else "regex",
        "read_from": "beginning",
        "sink": ["none"],
        "admin": f"127.0.0.1:{port}",
        "log_format": "json",
        "metrics": [
            {"name": COUNTER, "type": "counter", "labels": ["method", "status"]},
            {
                "name": HISTOGRAM,
                "type": "histogram",
                "field": "request_time",
                "buckets": BUCKETS,
            },
        ],
    }
    if case != "json":
        cfg["regex"] = COMBINED_RT
    if ckpt:
        cfg["checkpoint_dir"] = str(work / "ckpt")
    path = work / "adapter.yaml"
    path.write_text(json.dumps(cfg, indent=1) + "\n")
    return path


def mtail_program(case: str) -> str:
    """The .mtail program: the same counter and histogram."""
    regex = (JSON_RE if case == "json" else COMBINED_RT).replace("/", "\\/")
    return (
        f"counter {COUNTER} by method, status\n"
        f"histogram {HISTOGRAM} buckets {', '.join(str(b) for b in BUCKETS)}\n"
        f"/{regex}/ {{\n"
        f"  {COUNTER}[$method][$status]++\n"
        f"  {HISTOGRAM} = $request_time\n"
        "}\n"
    )


class StderrWatch:
    """Reads a child's stderr in a thread; :meth:`wait_for` blocks until patterns appeared."""

    def __init__(self, p: subprocess.Popen[bytes]) -> None:
        self.text = ""
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, args=(p,), daemon=True)
        self.thread.start()

    def _run(self, p: subprocess.Popen[bytes]) -> None:
        assert p.stderr is not None
        for raw in p.stderr:
            with self.cond:
                self.text += raw.decode(errors="replace")[:2000]
                self.cond.notify_all()
        with self.cond:
            self.text += "\n<EOF>"
            self.cond.notify_all()

    def wait_for(self, *needles: str, timeout: float = 60.0) -> None:
        """Until every needle was logged; RuntimeError when the child exited or time ran out."""
        with self.cond:
            ok = self.cond.wait_for(
                lambda: all(n in self.text for n in needles) or "<EOF>" in self.text, timeout
            )
            if not ok or not all(n in self.text for n in needles):
                raise RuntimeError(f"not ready ({needles}): {self.text[-1500:]}")


def run_daemon(
    cmd: list[str],
    ready: tuple[str, ...],
    log: Path,
    src: Path,
    url: str,
    want: int,
    tree: Path | None = None,
) -> dict[str, Any]:
    """Start ``cmd`` on the empty ``log``, append ``src`` once it is ready, poll ``url``.
    ``tree``: run it from that checkout (its ``podpatterns`` package) instead of this one."""
    t_start = time.monotonic()
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(tree)}
    p = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tree or ROOT
    )
    try:
        StderrWatch(p).wait_for(*ready)
        t_ready = time.monotonic()
        cpu0, t0 = proc_cpu(p.pid), time.monotonic()
        append(src, log)
        scrapes, got = 0, Scrape(Counter(), {}, 0, 0.0)
        while True:
            got = scrape(url)
            scrapes += 1
            if got.total >= want or p.poll() is not None or time.monotonic() - t0 > DEADLINE_S:
                break
            time.sleep(POLL_S)
        wall, cpu = time.monotonic() - t0, proc_cpu(p.pid) - cpu0
        # Counter and histogram may be a few lines apart in one scrape: settle on both.
        deadline = time.monotonic() + 30
        while got.count < got.total and time.monotonic() < deadline:
            time.sleep(POLL_S)
            got = scrape(url)
        # The cost of a scrape to the program, to compare with the scrapes made while timed.
        c0 = proc_cpu(p.pid)
        for _ in range(20):
            scrape(url)
        scrape_cpu = (proc_cpu(p.pid) - c0) / 20
    finally:
        p.terminate()
        p.wait(timeout=30)
    return {
        "wall": wall,
        "cpu": cpu,
        "lines": got.total,
        "startup": t_ready - t_start,
        "scrapes": scrapes,
        "scrape_cpu": scrape_cpu,
        "final": got,
    }


def run_adapter(
    work: Path, case: str, src: Path, want: int, ckpt: bool, tree: Path | None = None
) -> dict[str, Any]:
    """One adapter measurement (of the checkout ``tree``, if given)."""
    log, port = work / "access.log", free_port()
    log.touch()
    config = adapter_config(work, case, log, port, ckpt)
    cmd = [*PIN_SUT, sys.executable, "-m", "podpatterns", "adapter", "--config", str(config)]
    url = f"http://127.0.0.1:{port}/metrics"
    return run_daemon(cmd, ("adapter_started", "admin_listening"), log, src, url, want, tree)


def run_mtail(work: Path, case: str, src: Path, want: int, poll: str) -> dict[str, Any]:
    """One mtail measurement (daemon mode, polling the file)."""
    log, port = work / "access.log", free_port()
    log.touch()
    progs = work / "progs"
    progs.mkdir()
    (progs / "nginx.mtail").write_text(mtail_program(case))
    cmd = [*PIN_SUT, "mtail", "--progs", str(progs), "--logs", str(log), "--logtostderr",
           "--address", "127.0.0.1", "--port", str(port), "--poll_interval", poll,
           "--poll_log_interval", poll]  # fmt: skip
    url = f"http://127.0.0.1:{port}/metrics"
    return run_daemon(cmd, ("Tailing", "Listening on"), log, src, url, want)


def run_mtail_one_shot(work: Path, case: str, src: Path) -> dict[str, Any]:
    """``mtail --one_shot`` on the complete file: start to exit, metrics from its output."""
    progs = work / "progs"
    progs.mkdir()
    (progs / "nginx.mtail").write_text(mtail_program(case))
    cmd = [*PIN_SUT, "mtail", "--progs", str(progs), "--logs", str(src), "--one_shot",
           "--one_shot_format", "prometheus"]  # fmt: skip
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, check=True, timeout=DEADLINE_S)
    wall = time.monotonic() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime
    metrics = work / "metrics.txt"
    metrics.write_bytes(out.stdout)
    got = scrape(metrics.as_uri())
    return {"wall": wall, "cpu": cpu, "lines": got.total, "final": got}


PROGRAMS = ("adapter", "adapter+ckpt", "mtail", "mtail --one_shot")
BASELINE = "adapter (baseline)"
"""The ``adapter`` program run from the ``--baseline`` checkout, in the same rounds."""
CASES = ("json", "combined+rt")


def measure(
    files: dict[str, Path],
    truth: Truth,
    tmp: Path,
    reps: int,
    poll: str,
    programs: list[str],
    baseline: Path | None = None,
) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], list[str]]:
    """Interleaved rounds; raw results per case and program, and every difference found.
    With ``baseline`` (a checkout), its adapter runs in every round too."""
    if baseline is not None:
        programs = [*programs[:1], BASELINE, *programs[1:]]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        c: {p: [] for p in programs} for c in CASES
    }
    problems: list[str] = []
    runners: dict[str, Callable[[Path, str, Path], dict[str, Any]]] = {
        "adapter": lambda w, c, s: run_adapter(w, c, s, truth.lines, False),
        "adapter+ckpt": lambda w, c, s: run_adapter(w, c, s, truth.lines, True),
        BASELINE: lambda w, c, s: run_adapter(w, c, s, truth.lines, False, baseline),
        "mtail": lambda w, c, s: run_mtail(w, c, s, truth.lines, poll),
        "mtail --one_shot": run_mtail_one_shot,
    }
    for rep in range(reps):
        for case in CASES:
            for prog in programs:
                work = Path(tempfile.mkdtemp(dir=tmp))
                try:
                    r = runners[prog](work, case, files[case])
                finally:
                    shutil.rmtree(work, ignore_errors=True)
                final: Scrape = r.pop("final")
                diffs = differences(final, truth)
                r.update(load1=os.getloadavg()[0], exact=not diffs, differences=diffs[:20])
                results[case][prog].append(r)
                problems += [f"{case} {prog} round {rep + 1}: {d}" for d in diffs[:20]]
                print(
                    f"round {rep + 1} {case:12} {prog:17} {r['lines'] / r['wall']:>10,.0f} lines/s"
                    f"  cpu {r['cpu']:.2f} s  {'exact' if not diffs else 'DIFFERENT'}",
                    file=sys.stderr,
                )
    return results, problems


def summarize(results: dict[str, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Median and range of lines/s, CPU s per 1M lines, ratios to mtail, per case and program."""
    rows: list[dict[str, Any]] = []
    for case, progs in results.items():
        meds: dict[str, float] = {}
        cpus: dict[str, float] = {}
        for prog, runs in progs.items():
            lps = [t["lines"] / t["wall"] for t in runs if t["lines"]]
            meds[prog] = statistics.median(lps)
            cpus[prog] = statistics.median(t["cpu"] / t["lines"] * 1e6 for t in runs if t["lines"])
            rows.append(
                {
                    "case": case,
                    "program": prog,
                    "lps": meds[prog],
                    "lps_min": min(lps),
                    "lps_max": max(lps),
                    "cpu_per_m": cpus[prog],
                    "startup": statistics.median(t["startup"] for t in runs)
                    if runs and "startup" in runs[0]
                    else None,
                    "scrapes": statistics.median(t["scrapes"] for t in runs)
                    if runs and "scrapes" in runs[0]
                    else None,
                    "scrape_cpu": statistics.median(t["scrape_cpu"] for t in runs)
                    if runs and "scrape_cpu" in runs[0]
                    else None,
                    "exact": all(t["exact"] for t in runs),
                    # The program's CPU spent answering the benchmark's scrapes (estimate).
                    "scrape_share": statistics.median(
                        t["scrapes"] * t["scrape_cpu"] / t["cpu"] for t in runs
                    )
                    if runs and "scrapes" in runs[0]
                    else None,
                }
            )
        for row in rows:
            if row["case"] == case and "mtail" in meds:
                row["vs_mtail"] = row["lps"] / meds["mtail"]
                row["cpu_vs_mtail"] = row["cpu_per_m"] / cpus["mtail"]
            if row["case"] == case and "mtail --one_shot" in cpus:
                row["cpu_vs_one_shot"] = row["cpu_per_m"] / cpus["mtail --one_shot"]
    return rows


def table(rows: list[dict[str, Any]], reps: int) -> str:
    """The Markdown table of ``rows``."""
    out = [
        f"| log format | program | lines/s (median of {reps}) | rounds range | CPU s per 1M lines "
        "| lines/s vs mtail | CPU vs mtail | CPU vs mtail --one_shot | start-up s "
        "| scrapes' CPU share | exact |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        start = f"{r['startup']:.2f}" if r["startup"] is not None else "—"
        share = f"{r['scrape_share']:.1%}" if r.get("scrape_share") is not None else "—"
        out.append(
            f"| {r['case']} | {r['program']} | {r['lps']:,.0f} "
            f"| {r['lps_min']:,.0f} to {r['lps_max']:,.0f} | {r['cpu_per_m']:.2f} "
            f"| {r.get('vs_mtail', float('nan')):.2f} | {r.get('cpu_vs_mtail', float('nan')):.2f} "
            f"| {r.get('cpu_vs_one_shot', float('nan')):.2f} "
            f"| {start} | {share} | {'yes' if r['exact'] else '**no**'} |"
        )
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Lines per CPU second (what one core can do) and wall lines/s, per log format and program.

    On a shared machine the wall rate is mostly the scheduler's share of the core; the
    CPU-based rate is the program's cost, so it comes first.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    progs = list(dict.fromkeys(r["program"] for r in rows))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(progs)
    for ax, what in zip(axes, ("cpu", "wall"), strict=True):
        for i, prog in enumerate(progs):
            sel = [next(r for r in rows if r["case"] == c and r["program"] == prog) for c in cases]
            xs = [x + (i - (len(progs) - 1) / 2) * width for x in range(len(cases))]
            if what == "cpu":
                ax.bar(xs, [1e6 / r["cpu_per_m"] for r in sel], width, label=prog)
            else:
                ax.bar(
                    xs,
                    [r["lps"] for r in sel],
                    width,
                    yerr=[
                        [r["lps"] - r["lps_min"] for r in sel],
                        [r["lps_max"] - r["lps"] for r in sel],
                    ],
                    capsize=3,
                    label=prog,
                )
        ax.set_xticks(list(range(len(cases))))
        ax.set_xticklabels([f"nginx {c}" for c in cases])
    axes[0].set_ylabel("lines per CPU second (median)")
    axes[0].set_title("Cost: lines per CPU second on one core")
    axes[1].set_ylabel("lines/s (median; bars: rounds' range)")
    axes[1].set_title("Wall rate on the shared machine")
    axes[0].legend(fontsize=8)
    fig.suptitle("Logs to metrics: podpatterns adapter vs mtail")
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


def mtail_version() -> str:
    """mtail's version line."""
    out = subprocess.run(["mtail", "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "?"


def main() -> int:
    """Measure; print the table; optionally write the raw results and the plot."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=500_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--mtail-poll", default="50ms", help="mtail's --poll_interval")
    parser.add_argument("--programs", default=",".join(PROGRAMS), help="comma-separated subset")
    parser.add_argument("--write-docs", action="store_true", help="write results and the plot")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout of another version (e.g. git archive of main, unpacked): its adapter "
        "runs in the same rounds as 'adapter (baseline)'",
    )
    parser.add_argument(
        "--from-json", type=Path, help="measure nothing: print the table, redraw the plot"
    )
    args = parser.parse_args()
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        plot(saved["summary"], ROOT / "docs" / "img" / "l2m-bench.png")
        print(table(saved["summary"], saved["reps"]))
        return 0
    if shutil.which("mtail") is None:
        print("l2m: mtail is not installed (./dev bench-l2m installs it)", file=sys.stderr)
        return 2
    programs = [p for p in args.programs.split(",") if p]
    os.sched_setaffinity(0, {0})
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmpname:
        tmp = Path(tmpname)
        files, truth = write_inputs(tmp, args.lines)
        results, problems = measure(
            files, truth, tmp, args.reps, args.mtail_poll, programs, args.baseline
        )
    rows = summarize(results)
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "mtail": mtail_version(),
        "command": "bench/l2m.py " + " ".join(sys.argv[1:]),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "lines": args.lines,
        "reps": args.reps,
        "buckets": BUCKETS,
        "mtail_poll": args.mtail_poll,
        "baseline": str(args.baseline) if args.baseline else None,
        "scrape_interval_s": POLL_S,
        "summary": rows,
        "raw": results,
        "differences": problems,
    }
    print(table(rows, args.reps))
    for p in problems:
        print("DIFFERENCE:", p)
    adapter_wrong = [p for p in problems if " adapter" in p]
    if args.write_docs:
        (ROOT / "bench" / "results" / "l2m.json").write_text(json.dumps(report, indent=1) + "\n")
        plot(rows, ROOT / "docs" / "img" / "l2m-bench.png")
    return 1 if adapter_wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
