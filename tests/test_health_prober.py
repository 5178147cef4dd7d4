"""`podpatterns health`: probes, thresholds, and the Pod's aggregate probe endpoints."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
from aiohttp import web

from podpatterns.health.aggregate import Aggregate
from podpatterns.health.coordination import pod_runtime
from podpatterns.health.prober import Prober, ProberConfig
from podpatterns.health.reader import read_record
from podpatterns.health.records import Phase
from podpatterns.health.targets import check_within, parse_target
from podpatterns.health.writer import Writer
from podpatterns.options import HostPort
from podpatterns.runtime import RuntimeConfig
from tests.proc import Proc, run
from tests.waiting import eventually, wait_until

LOOP = "127.0.0.1"


async def test_thresholds_like_the_kubelet(tmp_path: Path) -> None:
    """A probe passes after N successes and fails after M failures; the record follows."""
    flag = tmp_path / "up"
    cfg = ProberConfig(
        tmp_path, "app", (parse_target(f"file:{flag}"),), success_threshold=2, failure_threshold=2
    )
    prober = Prober(cfg)
    prober.writer.set_starting()
    assert await prober.probe_once() is Phase.STARTING
    flag.touch()
    assert await prober.probe_once() is Phase.STARTING  # 1 success of 2
    assert await prober.probe_once() is Phase.READY
    flag.unlink()
    assert await prober.probe_once() is Phase.READY  # 1 failure of 2
    assert await prober.probe_once() is Phase.NOT_READY
    rec = read_record(tmp_path, "app").record
    assert rec is not None and rec.phase is Phase.NOT_READY
    assert rec.reason == f"failing: file:{flag}" and rec.checks[0].message == "does not exist"
    assert rec.interval == cfg.interval


async def test_http_status_range_and_body_pattern() -> None:
    """HTTP probes check the status range and a body pattern."""
    answer = {"status": 204, "body": "ok"}

    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=answer["status"], text=answer["body"])  # type: ignore[arg-type]

    app = web.Application()
    app.router.add_get("/h", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, LOOP, 0)
    await site.start()
    url = f"http://{LOOP}:{runner.addresses[0][1]}/h"
    try:
        probe = parse_target(url + "#status=200-204&body=^ok$")
        answer.update(status=200, body="ok")
        assert (await check_within(probe, 2)).ok
        answer.update(status=200, body="not ok")
        out = await check_within(probe, 2)
        assert not out.ok and "body does not match" in out.reason
        answer.update(status=205, body="ok")
        assert (await check_within(probe, 2)).reason == "HTTP 205"
        assert (await check_within(parse_target(url), 2)).ok  # default range: 200-399
    finally:
        await runner.cleanup()


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except FileNotFoundError:
        return ""


async def test_exec_probe_timeout_kills_the_process_group(tmp_path: Path) -> None:
    """An exec probe over its timeout fails and its whole process group is killed."""
    pid_file = tmp_path / "pid"
    probe = parse_target(f"exec:sh -c 'sleep 30 & echo $! > {pid_file}; wait'")
    out = await check_within(probe, 0.5)
    assert not out.ok and "no answer within 0.5s" in out.reason
    pid = int(pid_file.read_text())
    # gone, or a zombie (killed, waiting for its new parent to reap it)
    await eventually(lambda: _proc_state(pid) in ("", "Z"))
    ok = await check_within(parse_target("exec:sh -c 'exit 0'"), 5)
    bad = await check_within(parse_target("exec:sh -c 'echo boom >&2; exit 3'"), 5)
    assert ok.ok and not bad.ok and bad.reason == "exit 3: boom"


async def test_file_max_age(tmp_path: Path) -> None:
    """file:PATH?max-age fails when the file was not modified recently enough."""
    beat = tmp_path / "beat"
    beat.touch()
    probe = parse_target(f"file:{beat}?max-age=30s")
    assert (await check_within(probe, 1)).ok
    old = time.time() - 60
    os.utime(beat, (old, old))
    out = await check_within(probe, 1)
    assert not out.ok and "max-age 30s" in out.reason


def test_bad_probes_exit_2(tmp_path: Path) -> None:
    """A probe the prober cannot run is a usage error naming the flag."""
    for probe, message in [
        ("ready:app", "not a probe"),
        ("http://127.0.0.1:1/#code=200", "unknown option"),
        ("file:/x?age=1", "unknown option"),
        ("exec:", "needs a command"),
    ]:
        out = run("health", "--health-dir", str(tmp_path), "--name", "app", "--probe", probe)
        assert out.returncode == 2 and message in out.stderr, (probe, out.stderr)
    out = run("health", "--health-dir", str(tmp_path), "--name", "app")
    assert out.returncode == 2 and "at least one probe" in out.stderr


async def test_aggregate_verdicts(tmp_path: Path) -> None:
    """Pod and per-container verdicts: ready, started, stale, exited, missing."""
    agg = Aggregate(tmp_path)
    agg.refresh()
    assert not agg.pod_ok("readyz") and agg.pod_ok("livez")  # nothing to vouch for
    app, db = Writer(tmp_path, "app"), Writer(tmp_path, "db", interval=0.05)
    app.set_ready()
    db.set_starting()
    agg.refresh()
    assert agg.container_ok("readyz", "app") and not agg.pod_ok("readyz")
    assert not agg.container_ok("startupz", "db")
    db.set_ready()
    agg.refresh()
    assert agg.pod_ok("readyz") and agg.pod_ok("startupz")
    db.set_not_ready("overloaded")
    agg.refresh()
    assert agg.container_ok("startupz", "db") and not agg.pod_ok("readyz")  # started stays
    await asyncio.sleep(0.2)  # > 3 heartbeat intervals of db on this reader's clock
    agg.refresh()
    assert not agg.container_ok("livez", "db") and not agg.pod_ok("livez")
    db.heartbeat()
    app.mark_exited(0)
    agg.refresh()
    assert agg.pod_ok("livez") and not agg.container_ok("livez", "app")
    assert not agg.container_ok("readyz", "nope")
    body = agg.body("readyz", False, "app")
    assert body["containers"]["app"]["state"] == "exited"


def test_expected_containers_count_before_their_first_record(tmp_path: Path) -> None:
    """--expect: the Pod is not ready while an expected container has written nothing."""
    Writer(tmp_path, "web").set_ready()
    plain, expecting = Aggregate(tmp_path), Aggregate(tmp_path, expected=["web", "worker"])
    for agg in (plain, expecting):
        agg.refresh()
    assert plain.pod_ok("readyz")  # worker is unknown to it: the Pod looks ready
    assert not expecting.pod_ok("readyz") and not expecting.pod_ok("startupz")
    assert expecting.pod_ok("livez")  # not started yet is not dead
    body = expecting.body("readyz", False)
    assert body["containers"]["worker"] == {"state": "missing"}
    Writer(tmp_path, "worker").set_ready()
    expecting.refresh()
    assert expecting.pod_ok("readyz") and expecting.pod_ok("startupz")


async def test_endpoint_under_concurrent_probing(tmp_path: Path) -> None:
    """Concurrent probes while a record flaps: each gets 200/503 with a consistent JSON body."""
    writers = [Writer(tmp_path, n) for n in ("app", "db", "cache")]
    for w in writers:
        w.set_ready()
    runtime = pod_runtime(RuntimeConfig(admin=HostPort(LOOP, 0), health_dir=tmp_path), [])
    await runtime.start()
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            writers[1].set_not_ready("flap")
            writers[1].set_ready()

    flapper = threading.Thread(target=churn)
    flapper.start()
    paths = ["/pod/readyz", "/pod/livez", "/pod/startupz", "/readyz/app", "/readyz/db"]
    try:
        async with aiohttp.ClientSession() as http:

            async def probe(path: str) -> tuple[int, dict[str, object]]:
                async with http.get(f"http://{runtime.admin_address}{path}") as resp:
                    return resp.status, await resp.json()

            results = await asyncio.gather(*(probe(paths[i % 5]) for i in range(300)))
    finally:
        stop.set()
        flapper.join(10)
    for (status, body), i in zip(results, range(300), strict=True):
        assert status in (200, 503) and body["status"] == ("ok" if status == 200 else "unavailable")
        if paths[i % 5] in ("/readyz/app", "/pod/livez", "/pod/startupz"):
            assert status == 200, (paths[i % 5], body)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{runtime.admin_address}/readyz/nope") as resp,
    ):
        assert resp.status == 503
    await runtime.shutdown()


def _get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_health_command_end_to_end(procs: list[Proc], tmp_path: Path) -> None:
    """`podpatterns health` probes, serves the Pod's /readyz, and says so on SIGTERM."""
    sock = socket.socket()
    sock.bind((LOOP, 0))
    sock.listen()
    port = sock.getsockname()[1]
    Writer(tmp_path, "db").set_ready()
    p = Proc(
        "health", "--health-dir", str(tmp_path), "--name", "app",
        "--probe", f"tcp://{LOOP}:{port}", "--probe-interval", "100ms",
        "--admin", f"{LOOP}:0", "--shutdown-delay", "0",
    )  # fmt: skip
    procs.append(p)
    try:
        url = p.admin_url()
        p.wait_event("record_phase")
        # the view refreshes itself
        wait_until(lambda: _get_status(f"{url}/readyz") == 200, "GET /readyz: 200")
        rec = read_record(tmp_path, "app").record
        assert rec is not None and rec.phase is Phase.READY
    finally:
        sock.close()
    p.signal(signal.SIGTERM)
    assert p.wait(10) == 0
    rec = read_record(tmp_path, "app").record
    assert rec is not None and rec.phase is Phase.NOT_READY and rec.reason == "prober stopped"
