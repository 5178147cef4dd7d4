"""Pushed-input benchmark: OTLP/HTTP and NDJSON records/s into a file sink, and the spool's
group commit.

- **HTTP input**: ``podpatterns adapter --http-listen`` pinned to core 1 (``taskset``),
  spooling to a temporary directory and shipping to a file sink. A client on core 0
  posts pre-encoded requests (``--records`` records in requests of ``--per-request``,
  ``--clients`` at a time; OTLP protobuf built with ``opentelemetry-proto``, or NDJSON)
  and the run ends when the sink file holds every record. Reported: records/s over the
  wall time, and records per CPU second of the adapter process (from /proc/PID/stat):
  the adapter is alone on its core, so the latter is "records/s on one core".
- **Group commit**: an in-process spool (its writer in a thread, as in the adapter),
  ``--appends`` appends of one record from N concurrent appenders: appends/s and appends
  per fdatasync.

With ``--baseline DIR`` (a checkout of another version, e.g. ``git worktree add
/tmp/base main``), that version's adapter runs too, interleaved round by round with this
one, and the table gives this one's figures against it (same run, same load).

Usage::

    .venv/bin/python bench/adapter_push.py [--records N] [--reps N] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.adapter import count_lines, proc_cpu  # noqa: E402

PIN_SUT = ["taskset", "-c", "1"] if shutil.which("taskset") else []
DEADLINE_S = 300.0


def otlp_requests(records: int, per_request: int) -> list[bytes]:
    """Protobuf ExportLogsServiceRequests holding ``records`` log records in all."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.logs.v1.logs_pb2 import SEVERITY_NUMBER_INFO

    out = []
    n = 0
    while n < records:
        req = ExportLogsServiceRequest()
        rl = req.resource_logs.add()
        kv = rl.resource.attributes.add()
        kv.key, kv.value.string_value = "service.name", "checkout"
        sl = rl.scope_logs.add()
        sl.scope.name = "shop.payments"
        for _ in range(min(per_request, records - n)):
            lr = sl.log_records.add()
            lr.time_unix_nano = 1_764_662_400_000_000_000 + n
            lr.severity_number = SEVERITY_NUMBER_INFO
            lr.severity_text = "INFO"
            lr.body.string_value = f"GET /api/cart/{n} 200 12ms user=u{n % 97}"
            lr.trace_id = n.to_bytes(16, "big")
            lr.span_id = n.to_bytes(8, "big")
            a = lr.attributes.add()
            a.key, a.value.int_value = "http.status_code", 200
            n += 1
        out.append(req.SerializeToString())
    return out


def ndjson_requests(records: int, per_request: int) -> list[bytes]:
    """NDJSON bodies of comparable records."""
    out = []
    for start in range(0, records, per_request):
        lines = [
            json.dumps(
                {
                    "message": f"GET /api/cart/{n} 200 12ms user=u{n % 97}",
                    "severity": "INFO",
                    "timestamp": "2026-12-02T08:00:00.000000001Z",
                    "trace_id": f"{n:032x}",
                    "http.status_code": 200,
                }
            )
            for n in range(start, min(records, start + per_request))
        ]
        out.append("\n".join(lines).encode() + b"\n")
    return out


async def post_all(url: str, bodies: list[bytes], ctype: str, clients: int) -> None:
    """POST every body (``clients`` at a time), retrying a 429 after its Retry-After."""
    queue = list(reversed(bodies))
    async with aiohttp.ClientSession() as session:

        async def client() -> None:
            while queue:
                body = queue.pop()
                while True:
                    async with session.post(
                        url, data=body, headers={"Content-Type": ctype}
                    ) as resp:
                        await resp.read()
                        if resp.status == 200:
                            break
                        if resp.status != 429:
                            raise RuntimeError(f"HTTP {resp.status}")
                        await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))

        await asyncio.gather(*(client() for _ in range(clients)))


def run_http(
    kind: str, records: int, per_request: int, clients: int, src: Path | None = None
) -> dict[str, float]:
    """One run: the adapter on core 1, the client here; wall and adapter CPU seconds.
    ``src``: run the ``podpatterns`` of that checkout instead of this one."""
    bodies = (
        otlp_requests(records, per_request)
        if kind == "otlp"
        else ndjson_requests(records, per_request)
    )
    ctype = "application/x-protobuf" if kind == "otlp" else "application/x-ndjson"
    path = "/v1/logs" if kind == "otlp" else "/v1/logs/ndjson"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.ndjson"
        cmd = [
            *PIN_SUT,
            sys.executable,
            "-m",
            "podpatterns",
            "adapter",
            "--http-listen",
            "127.0.0.1:0",
            "--spool-dir",
            str(Path(tmp) / "spool"),
            "--sink",
            "file",
            "--sink-path",
            str(out),
            "--admin",
            "off",
            "--shutdown-delay",
            "0",
            "--log-format",
            "json",
        ]
        env = None if src is None else {**os.environ, "PYTHONPATH": str(src)}
        p = subprocess.Popen(cmd, stderr=subprocess.PIPE, cwd=src or ROOT, env=env)
        try:
            assert p.stderr is not None
            port = 0
            for line in p.stderr:
                ev = json.loads(line)
                if ev.get("event") == "input_listening":
                    port = int(ev["address"].rsplit(":", 1)[1])
                if ev.get("event") == "adapter_started":
                    break
            cpu0, t0 = proc_cpu(p.pid), time.monotonic()
            asyncio.run(post_all(f"http://127.0.0.1:{port}{path}", bodies, ctype, clients))
            answered = time.monotonic() - t0
            while (out.exists() and count_lines(out)) < records:
                if time.monotonic() - t0 > DEADLINE_S:
                    raise RuntimeError("records did not all arrive")
                time.sleep(0.01)
            wall = time.monotonic() - t0
            cpu = proc_cpu(p.pid) - cpu0
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=60)
    return {"wall": wall, "answered": answered, "cpu": cpu}


def group_commit(appends: int, concurrency: int) -> dict[str, float]:
    """Appends/s and appends per sync with ``concurrency`` appenders of one record each."""
    from podpatterns.adapter.spool import Spool
    from podpatterns.tasks import TaskSet

    async def main(directory: Path) -> dict[str, float]:
        spool = Spool(directory, max_bytes=1 << 30, segment_bytes=16 << 20)
        spool.open({})
        tasks = TaskSet("bench")
        tasks.spawn(spool.run(), "writer", may_return=True)
        per = appends // concurrency

        async def appender(k: int) -> None:
            for i in range(per):
                await spool.append([{"message": f"record {k}/{i}", "pad": "x" * 80}], source="b")

        t0 = time.monotonic()
        await asyncio.gather(*(appender(k) for k in range(concurrency)))
        wall = time.monotonic() - t0
        c = spool.counters
        await spool.stop()
        await tasks.aclose()
        spool.close()
        return {"appends_per_s": c.appends / wall, "appends_per_sync": c.appends / c.syncs}

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_SPOOL_DIR")) as tmp:
        return asyncio.run(main(Path(tmp)))


def main() -> int:
    """Run and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--per-request", type=int, default=512, help="the SDK's batch size")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--appends", type=int, default=4000)
    parser.add_argument(
        "--baseline", type=Path, help="a checkout whose adapter runs interleaved, to compare"
    )
    args = parser.parse_args()
    rows: list[tuple[str, Any, Any, Any]] = []
    print(f"load before: {os.getloadavg()}", file=sys.stderr)
    versions: list[Path | None] = [None] if args.baseline is None else [None, args.baseline]
    for kind in ("otlp", "ndjson"):
        runs: dict[Path | None, list[dict[str, float]]] = {v: [] for v in versions}
        for rep in range(args.reps):
            for v in versions:
                r = run_http(kind, args.records, args.per_request, args.clients, v)
                runs[v].append(r)
                rate = args.records / r["cpu"]
                load = os.getloadavg()[0]
                print(
                    f"rep {rep + 1} {kind} {v or 'this'}: {rate:,.0f} records per CPU s "
                    f"(load {load:.2f})",
                    file=sys.stderr,
                )
        for v in versions:
            wall = statistics.median(r["wall"] for r in runs[v])
            cpu = statistics.median(r["cpu"] for r in runs[v])
            vs = ""
            if v is None and args.baseline is not None:
                base = statistics.median(r["cpu"] for r in runs[args.baseline])
                vs = f" ({base / cpu:.2f}x the baseline's records per CPU s)"
            rows.append(
                (
                    f"{kind} -> spool -> file sink" + ("" if v is None else f" [{v}]"),
                    f"{args.records / wall:,.0f} records/s",
                    f"{args.records / cpu:,.0f} records per CPU s{vs}",
                    f"{cpu / args.records * 1e6:.1f} µs CPU/record",
                )
            )
    for conc in (1, 8, 64):
        commits = [group_commit(args.appends, conc) for _ in range(args.reps)]
        rows.append(
            (
                f"spool appends, {conc} concurrent",
                f"{statistics.median(r['appends_per_s'] for r in commits):,.0f} appends/s",
                f"{statistics.median(r['appends_per_sync'] for r in commits):.1f} appends/sync",
                "",
            )
        )
    print("| case | rate | per CPU / per sync | cost |")
    print("|------|------|--------------------|------|")
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
