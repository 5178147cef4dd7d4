"""Adapter throughput: lines per second and CPU per million lines, against ``cat``.

Each case writes its input once, starts ``podpatterns adapter`` on it with the stdout
sink redirected to a file, sends SIGTERM as soon as the adapter has started (a graceful
stop reads every open file to its end, ships it and exits), and reports the wall time
from that moment and the child's CPU time. ``cat`` of the same file is the physical
limit. Usage::

    .venv/bin/python bench/adapter.py [--lines N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


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


def run_cat(path: Path) -> tuple[float, float]:
    """Wall and CPU seconds of ``cat path > /dev/null``."""
    cpu0, t0 = cpu_children(), time.monotonic()
    with open(os.devnull, "wb") as null:
        subprocess.run(["cat", str(path)], stdout=null, check=True)
    return time.monotonic() - t0, cpu_children() - cpu0


def run_adapter(path: Path, out: Path, args: list[str]) -> tuple[float, float, int]:
    """Wall seconds after start, CPU seconds, and lines shipped."""
    cpu0 = cpu_children()
    with out.open("wb") as sink:
        p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "podpatterns",
                "adapter",
                "--path",
                str(path),
                "--admin",
                "off",
                "--shutdown-delay",
                "0",
                "--drain-timeout",
                "600",
                "--log-format",
                "json",
                *args,
            ],
            stdout=sink,
            stderr=subprocess.PIPE,
        )
        assert p.stderr is not None
        for line in p.stderr:
            if b"adapter_started" in line:
                break
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        p.stderr.read()
        code = p.wait()
        wall = time.monotonic() - t0
    assert code == 0, code
    with out.open("rb") as f:
        lines = sum(1 for _ in f)
    return wall, cpu_children() - cpu0, lines


CASES: list[tuple[str, str, list[str]]] = [
    ("raw passthrough -> stdout", "raw", []),
    ("nginx parse -> stdout", "nginx", ["--parse", "nginx"]),
    ("json parse only -> stdout", "json", ["--parse", "json"]),
    (
        "json parse + reshape + redact -> stdout",
        "json",
        [
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
        ],
    ),
]


def main() -> int:
    """Run every case and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=500_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        files = write_inputs(directory, args.lines)
        print("| case | lines/s | CPU s per 1M lines | vs cat (lines/s) |")
        print("|------|--------:|-------------------:|-----------------:|")
        for name, kind, extra in CASES:
            cat_wall, _ = run_cat(files[kind])
            wall, cpu, lines = run_adapter(files[kind], directory / "out", extra)
            assert lines == args.lines, (name, lines)
            rate = lines / wall
            print(
                f"| {name} | {rate:,.0f} | {cpu / lines * 1e6:.1f} | "
                f"{rate / (lines / cat_wall):.4f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
