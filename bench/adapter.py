"""Adapter benchmark: throughput, CPU, latency and idle cost, against ``cat`` and rsyslog.

One run, interleaved over ``--reps`` repetitions (each repetition runs every case with
every program in turn), measures for each case:

- ``podpatterns adapter`` with the stdout sink redirected to a file. It is started on the
  complete input and sent SIGTERM as soon as it reports ``adapter_started`` (a graceful
  stop reads every open file to its end, ships it and exits); wall time runs from then
  until exit, CPU is the child's user + system time.
- ``cat`` of the same file to a file: the physical limit.
- rsyslog, a real peer: a separate ``rsyslogd -n`` instance with its own configuration in
  a temporary directory, ``imfile`` (inotify, ``freshStartTail="off"``) on the same file
  and ``omfile`` to a temporary file. Wall time runs from start until the output holds
  every line (the output is polled); CPU comes from ``/proc/PID/stat``.

The program under test runs on core 1 and the benchmark itself (generators, pollers) on
core 0 (``taskset``). It also measures write-to-emit latency (a writer appends
timestamped lines at a fixed rate; inotify and forced polling) and the CPU an adapter
idling on 100 files uses. Usage::

    .venv/bin/python bench/adapter.py [--lines N] [--reps N] [--write-docs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PIN_SUT = ["taskset", "-c", "1"]
DEADLINE_S = 300.0  # no single measurement may take longer


def write_inputs(directory: Path, n: int) -> dict[str, Path]:
    """raw (logfmt-ish), nginx combined and JSON inputs of ``n`` lines each."""
    files = {name: directory / f"{name}.log" for name in ("raw", "nginx", "json")}
    with files["raw"].open("wb") as f:
        for i in range(n):
            f.write(
                f'ts=2024-05-01T12:00:00Z level=info seq={i} msg="handled" ms={i % 500}\n'.encode()
            )
    with files["nginx"].open("wb") as f:
        for i in range(n):
            f.write(
                f'10.0.{i % 256}.{i % 200} - - [17/May/2015:08:05:{i % 60:02d} +0000] "GET '
                f'/p/{i % 7} HTTP/1.1" 200 {i % 5000} "-" "Mozilla/5.0 seq={i}"\n'.encode()
            )
    with files["json"].open("wb") as f:
        for i in range(n):
            rec = {
                "ts": "2024-05-01T12:00:00Z",
                "level": "info",
                "seq": i,
                "path": "/api",
                "msg": "user bob@example.com logged in from 10.1.2.3",
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
    """Wall seconds after start, CPU seconds, and lines shipped."""
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


RSYSLOG_TEMPLATES = {
    "raw": 'template(name="out" type="string" string="%msg%\\n")',
    "json": """template(name="out" type="list" option.jsonf="on") {
  property(outname="ts" name="$!ts" format="jsonf")
  property(outname="level" name="$!level" format="jsonf")
  property(outname="seq" name="$!seq" format="jsonf")
  property(outname="message" name="$!msg" format="jsonf")
  constant(outname="env" value="prod" format="jsonf")
}""",
}


def rsyslog_conf(work: Path, path: Path, out: Path, mode: str) -> str:
    """An rsyslog configuration: imfile on ``path`` -> (mmjsonparse) -> omfile ``out``."""
    parse = 'action(type="mmjsonparse" cookie="")' if mode == "json" else ""
    return f"""global(workDirectory="{work}" maxMessageSize="64k")
module(load="imfile" mode="inotify")
{'module(load="mmjsonparse")' if mode == "json" else ""}
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
    t0 = time.monotonic()
    p = subprocess.Popen(
        [*PIN_SUT, "rsyslogd", "-n", "-f", str(conf), "-i", str(work / "pid")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lines, pos = 0, 0
    try:
        with out.open("rb") as f:
            while lines < want and time.monotonic() - t0 < DEADLINE_S and p.poll() is None:
                chunk = f.read(1 << 22)
                if chunk:
                    lines += chunk.count(b"\n")
                    pos += len(chunk)
                else:
                    time.sleep(0.005)
        wall = time.monotonic() - t0
        cpu = proc_cpu(p.pid)
    finally:
        p.terminate()
        p.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    return wall, cpu, lines


REDACT_ARGS = [
    "--parse",
    "json",
    "--rename-field",
    "msg=message",
    "--drop-field",
    "path",
    "--add-field",
    "env=prod",
    "--redact",
    "email",
    "--redact",
    "ipv4",
]

# name, input, adapter arguments, rsyslog mode, what the rsyslog case does
CASES: list[tuple[str, str, list[str], str, str]] = [
    ("raw passthrough -> stdout", "raw", [], "raw", "imfile -> omfile %msg% (same work)"),
    (
        "nginx parse -> stdout",
        "nginx",
        ["--parse", "nginx"],
        "raw",
        "raw passthrough only (no parse: not equivalent)",
    ),
    (
        "json parse only -> stdout",
        "json",
        ["--parse", "json"],
        "json",
        "mmjsonparse + JSON template (parse + reshape)",
    ),
    (
        "json parse + reshape + redact -> stdout",
        "json",
        REDACT_ARGS,
        "json",
        "mmjsonparse + reshape template; no redaction (rsyslog has none for e-mail)",
    ),
]


def measure_throughput(files: dict[str, Path], tmp: Path, reps: int, n: int) -> dict[str, Any]:
    """Every case x {adapter, cat, rsyslog}, interleaved over ``reps`` rounds."""
    results: dict[str, dict[str, list[dict[str, float]]]] = {
        c[0]: {"adapter": [], "cat": [], "rsyslog": []} for c in CASES
    }
    have_rsyslog = shutil.which("rsyslogd") is not None
    for rep in range(reps):
        for name, kind, extra, mode, _ in CASES:
            out = tmp / "out"
            wall, _cpu = run_cat(files[kind], out)
            results[name]["cat"].append({"wall": wall, "cpu": _cpu, "lines": n})
            wall, cpu, lines = run_adapter(files[kind], out, extra)
            assert lines == n, (name, lines)
            results[name]["adapter"].append({"wall": wall, "cpu": cpu, "lines": lines})
            if have_rsyslog:
                wall, cpu, lines = run_rsyslog(files[kind], tmp / "rsys.out", mode, n)
                results[name]["rsyslog"].append({"wall": wall, "cpu": cpu, "lines": lines})
            print(f"rep {rep + 1}/{reps} {name}: done", file=sys.stderr)
    return results


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
    for name, _kind, _extra, _mode, peer_note in CASES:
        r = results[name]

        def med(prog: str, key: str, r: dict[str, list[dict[str, float]]] = r) -> float:
            vals = [t[key] / t["lines"] for t in r[prog] if t["lines"]]
            return statistics.median(vals) if vals else float("nan")

        row: dict[str, Any] = {"case": name, "rsyslog_does": peer_note}
        for prog in ("adapter", "cat", "rsyslog"):
            per_line = med(prog, "wall")
            row[f"{prog}_lps"] = 1 / per_line if per_line == per_line else float("nan")
            row[f"{prog}_cpu_per_m"] = med(prog, "cpu") * 1e6
        row["vs_cat"] = row["adapter_lps"] / row["cat_lps"]
        row["vs_rsyslog"] = row["adapter_lps"] / row["rsyslog_lps"]
        row["cpu_vs_rsyslog"] = row["adapter_cpu_per_m"] / row["rsyslog_cpu_per_m"]
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of ``rows``."""
    out = [
        "| case | adapter lines/s | adapter CPU s/1M | cat lines/s | rsyslog lines/s "
        "| rsyslog CPU s/1M | adapter/cat | adapter/rsyslog (lines/s) "
        "| adapter/rsyslog (CPU) | what rsyslog does |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['case']} | {r['adapter_lps']:,.0f} | {r['adapter_cpu_per_m']:.2f} "
            f"| {r['cat_lps']:,.0f} | {r['rsyslog_lps']:,.0f} | {r['rsyslog_cpu_per_m']:.2f} "
            f"| {r['vs_cat']:.3f} | {r['vs_rsyslog']:.2f} | {r['cpu_vs_rsyslog']:.2f} "
            f"| {r['rsyslog_does']} |"
        )
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars of lines/s per case (log scale) for adapter, rsyslog and cat."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.27
    xs = range(len(rows))
    for i, prog in enumerate(("adapter", "rsyslog", "cat")):
        ax.bar(
            [x + (i - 1) * width for x in xs],
            [r[f"{prog}_lps"] for r in rows],
            width,
            label=prog,
        )
    ax.axhline(150_000, color="red", ls="--", lw=1, label="target JSON (150k)")
    ax.axhline(100_000, color="orange", ls=":", lw=1, label="target nginx (100k)")
    ax.set_yscale("log")
    ax.set_ylabel("lines/s (median, log scale)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["case"].replace(" -> ", "\n-> ") for r in rows], fontsize=8)
    ax.set_title("podpatterns adapter vs rsyslog vs cat (one core)")
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
    parser.add_argument("--write-docs", action="store_true", help="update docs/ and results")
    parser.add_argument(
        "--from-json", type=Path, help="measure nothing: redraw the plot from a results file"
    )
    args = parser.parse_args()
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        plot(saved["summary"], ROOT / "docs" / "img" / "adapter-bench.png")
        print(table(saved["summary"]))
        return 0
    os.sched_setaffinity(0, {0})
    cmd = "bench/adapter.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmpname:
        tmp = Path(tmpname)
        files = write_inputs(tmp, args.lines)
        results = measure_throughput(files, tmp, args.reps, args.lines)
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
        "lines": args.lines,
        "reps": args.reps,
        "raw": results,
        "summary": rows,
        "latency": latency,
        "idle_cpu_per_s": idle,
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
