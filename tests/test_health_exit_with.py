"""`--exit-with`: level-triggered tombstones, exit code, quit URLs, polling fallback."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest
import structlog
from aiohttp import web

from podpatterns import metrics
from podpatterns.dirwatch import DirWatcher
from podpatterns.health import exitwith
from podpatterns.health.coordination import pod_runtime
from podpatterns.health.exitwith import ExitWith, parse_quit_url
from podpatterns.health.writer import Writer
from podpatterns.options import HostPort
from podpatterns.runtime import Runtime, RuntimeConfig
from tests.proc import Proc, run
from tests.waiting import eventually

LOOP = "127.0.0.1"


def ambassador(procs: list[Proc], health: Path, *extra: str) -> Proc:
    p = Proc(
        "ambassador", "--listen", f"{LOOP}:0", "--upstream", f"{LOOP}:9",
        "--admin", f"{LOOP}:0", "--shutdown-delay", "0",
        "--health-dir", str(health), "--exit-with", "app", *extra,
    )  # fmt: skip
    procs.append(p)
    return p


def test_exit_code_is_configurable(procs: list[Proc], tmp_path: Path) -> None:
    """--exit-with-code sets the exit code of a tombstone-driven shutdown."""
    Writer(tmp_path, "app").mark_exited(signal=9)
    p = ambassador(procs, tmp_path, "--exit-with-code", "7")
    assert p.wait(10) == 7
    assert p.wait_event("exit_with_tombstone")["exit"] == "signal 9 (SIGKILL)"


def test_sigterm_still_exits_0_with_exit_with_code(procs: list[Proc], tmp_path: Path) -> None:
    """--exit-with-code applies to the tombstone only: SIGTERM still exits 0."""
    p = ambassador(procs, tmp_path, "--exit-with-code", "7")
    p.wait_event("exit_with_watching")
    p.signal(signal.SIGTERM)
    assert p.wait(10) == 0


def test_health_dir_created_later(procs: list[Proc], tmp_path: Path) -> None:
    """A health directory that does not exist yet is polled until the tombstone is there."""
    health = tmp_path / "later"
    p = ambassador(procs, health)
    assert p.wait_event("watch_fallback_polling")["path"] == str(health)
    health.mkdir()
    Writer(health, "app").mark_exited(0)
    assert p.wait(10) == 0


def test_ready_and_stale_peers_do_not_trigger(procs: list[Proc], tmp_path: Path) -> None:
    """Only a tombstone ends the process: ready, stale, or garbage records do not."""
    writer = Writer(tmp_path, "app", interval=0.01)  # goes stale at once: still not dead
    writer.set_ready()
    (tmp_path / ".app.json.99.tmp").write_text('{"phase": "exited"}')  # a temp name
    p = ambassador(procs, tmp_path)
    p.wait_event("exit_with_watching")
    for garbage in (b"", b"{", b"\x00" * 100, b'{"schema": 1, "phase": "exited"}'):
        (tmp_path / "app.json").write_bytes(garbage)
    writer.heartbeat()
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(0.5)
    writer.mark_exited(0)
    assert p.wait(10) == 0


async def test_quit_urls_are_posted_before_exit(procs: list[Proc], tmp_path: Path) -> None:
    """--exit-with-quit POSTs each loopback URL once before the drain; failures do not block."""
    posts: list[str] = []

    async def quit_handler(request: web.Request) -> web.Response:
        posts.append(request.method)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/quitquitquit", quit_handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, LOOP, 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        p = ambassador(
            procs, tmp_path,
            "--exit-with-quit", f"http://{LOOP}:{port}/quitquitquit",
            "--exit-with-quit", f"http://{LOOP}:1/unreachable",
        )  # fmt: skip
        await asyncio.to_thread(p.wait_event, "exit_with_watching")
        Writer(tmp_path, "app").mark_exited(0)
        assert await asyncio.to_thread(p.wait, 10) == 0
    finally:
        await runner.cleanup()
    assert posts == ["POST"]
    assert p.wait_event("exit_with_quit_sent")["status"] == 200
    assert p.wait_event("exit_with_quit_failed")["url"].endswith(":1/unreachable")


def test_quit_urls_must_be_loopback() -> None:
    """A quit URL outside the Pod is a configuration error (exit 2)."""
    with pytest.raises(ValueError, match="loopback"):
        parse_quit_url("http://10.0.0.1:9091/quitquitquit")
    assert parse_quit_url("http://[::1]:9091/q") == "http://[::1]:9091/q"
    out = run(
        "ambassador", "--listen", f"{LOOP}:0", "--upstream", f"{LOOP}:9",
        "--health-dir", ".", "--exit-with", "app", "--exit-with-quit", "http://example.com/q",
    )  # fmt: skip
    assert out.returncode == 2 and "--exit-with-quit" in out.stderr


async def test_forced_polling_still_triggers_and_is_exported(tmp_path: Path) -> None:
    """Without inotify the trigger polls, fires on the tombstone, and /metrics says polling."""

    def no_inotify(path: Path, resync: float) -> object:
        raise OSError(24, "inotify_init1 failed: Too many open files")

    trigger = ExitWith(tmp_path, "app", resync=0.02, watch=no_inotify)  # type: ignore[arg-type]
    runtime = Runtime(RuntimeConfig(), [], triggers=[trigger])
    runtime.registry.register(trigger.collector())
    task = asyncio.create_task(runtime.run())
    await runtime.wait_started()
    await eventually(lambda: trigger.watcher.mode == "polling")
    text = metrics.exposition(runtime.registry).decode()
    assert 'podpatterns_exit_with_watch_mode{mode="polling"} 1.0' in text
    assert "podpatterns_exit_with_watch_fallbacks_total 1.0" in text
    Writer(tmp_path, "app").mark_exited(0)
    async with asyncio.timeout(5):
        await task
    assert runtime.shutdown_reason == "exit-with:app"


async def test_inotify_mode_is_exported(tmp_path: Path) -> None:
    """With inotify, the watch-mode metric says inotify once events arrive."""
    trigger = ExitWith(tmp_path, "app", resync=0.05)
    task = asyncio.create_task(trigger())
    await eventually(lambda: trigger.watcher.mode == "inotify")
    Writer(tmp_path, "app").mark_exited(1)
    async with asyncio.timeout(5):
        assert await task == "exit-with:app"
    assert trigger.tombstone is not None and trigger.tombstone.record is not None
    assert json.loads(trigger.tombstone.record.to_json())["exit_code"] == 1


def test_exit_with_an_invalid_name_is_one_line_exit_2(tmp_path: Path) -> None:
    """--exit-with takes a container name: 'Main' is refused at start, one line, exit 2."""
    out = run(
        "ambassador", "--listen", f"{LOOP}:0", "--upstream", f"{LOOP}:9",
        "--health-dir", str(tmp_path), "--exit-with", "Main",
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and "--exit-with" in out.stderr and "Main" in out.stderr


async def test_a_dead_exit_with_watcher_is_an_error_and_livez_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trigger that dies (a bug) is a task_died error and turns /livez 503, never silence."""

    def broken(*args: object, **kwargs: object) -> DirWatcher:
        def bug(paths: object, tick: float) -> object:
            raise ValueError("bug in the watch")  # not OSError: no fallback hides it

        return DirWatcher(tmp_path, watch=bug)  # type: ignore[arg-type]

    monkeypatch.setattr(exitwith, "record_watcher", broken)
    config = RuntimeConfig(admin=HostPort(LOOP, 0), health_dir=tmp_path, exit_with="app")
    with structlog.testing.capture_logs() as events:
        runtime = pod_runtime(config, [])
        await runtime.start()
        try:
            await eventually(lambda: not runtime.is_live())
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"http://{runtime.admin_address}/livez") as resp,
            ):
                assert resp.status == 503
        finally:
            await runtime.shutdown()
    died = [e for e in events if e["event"] == "task_died"]
    assert len(died) == 1 and died[0]["log_level"] == "error"
    assert died[0]["error"] == "bug in the watch"
