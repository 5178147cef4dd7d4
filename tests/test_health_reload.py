"""`podpatterns reload`: ConfigMap swaps, rename and in-place writes, coalescing, validate."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from podpatterns.reload import ReloadConfig, Reloader
from podpatterns.reload.notify import Exec, HttpPost, SignalPid
from podpatterns.reload.snapshot import take
from podpatterns.runtime.process import EXIT_GRACE
from tests.kubelet import configmap_write
from tests.proc import Proc, run
from tests.waiting import eventually, wait_for_file, wait_until

LOOP = "127.0.0.1"


class Target:
    """An HTTP reload endpoint that counts POSTs and can be made to fail."""

    def __init__(self) -> None:
        self.posts = 0
        self.status = 200
        self.got = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.posts += 1
        self.got.set()
        return web.Response(status=self.status)


@asynccontextmanager
async def target() -> AsyncIterator[Target]:
    t = Target()
    app = web.Application()
    app.router.add_post("/-/reload", t.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, LOOP, 0)
    await site.start()
    t.url = f"http://{LOOP}:{runner.addresses[0][1]}/-/reload"
    try:
        yield t
    finally:
        await runner.cleanup()


@asynccontextmanager
async def reloader(config: ReloadConfig) -> AsyncIterator[Reloader]:
    r = Reloader(config)
    await r.start()
    try:
        yield r
    finally:
        await r.close()


async def settle(r: Reloader, seconds: float = 0.5) -> None:
    """Let the reloader see a quiet directory for a while (used to prove a non-event)."""
    await asyncio.sleep(seconds)


async def test_configmap_data_swap_notifies_once(tmp_path: Path) -> None:
    """A kubelet-style ..data symlink swap is one change and one notification."""
    configmap_write(tmp_path, 1, {"app.yaml": "a: 1\n", "extra.txt": "x"})
    async with (
        target() as t,
        reloader(ReloadConfig((tmp_path,), HttpPost(t.url), debounce=0.05)) as r,
    ):
        configmap_write(tmp_path, 2, {"app.yaml": "a: 2\n", "extra.txt": "x"})
        async with asyncio.timeout(10):
            await t.got.wait()
        await settle(r)
        assert t.posts == 1 and r.counts["changes"] == 1
        assert r.delivered is not None and r.delivered.digest == take([tmp_path]).digest


async def test_rename_replace_and_in_place_writes(tmp_path: Path) -> None:
    """A temp-file rename and an in-place rewrite both notify; same bytes do not."""
    cfg = tmp_path / "app.conf"
    cfg.write_text("one")
    async with (
        target() as t,
        reloader(ReloadConfig((tmp_path,), HttpPost(t.url), debounce=0.05)) as r,
    ):
        tmp = tmp_path / ".app.conf.tmp"
        tmp.write_text("two")
        tmp.replace(cfg)
        async with asyncio.timeout(10):
            await t.got.wait()
        t.got.clear()
        await asyncio.to_thread(_write_in_place, cfg, "six")
        async with asyncio.timeout(10):
            await t.got.wait()
        cfg.write_text("six")  # identical content, new mtime: no notification
        os.utime(cfg)
        await settle(r)
        assert t.posts == 2 and r.counts["changes"] == 2


def _write_in_place(path: Path, text: str) -> None:
    with open(path, "r+") as fh:  # same inode: no rename, no new file
        fh.write(text)


async def test_burst_is_coalesced_into_one_notification(tmp_path: Path) -> None:
    """A burst of writes within the debounce is acted on once, with the newest content."""
    cfg = tmp_path / "app.conf"
    cfg.write_text("0")
    async with (
        target() as t,
        reloader(ReloadConfig((tmp_path,), HttpPost(t.url), debounce=0.3)) as r,
    ):
        for i in range(1, 30):
            cfg.write_text(str(i))
            await asyncio.sleep(0.005)
        async with asyncio.timeout(10):
            await t.got.wait()
        await settle(r)
        assert t.posts == 1
        assert r.delivered is not None and r.delivered.digest == take([tmp_path]).digest


async def test_validate_failure_blocks_notification(tmp_path: Path) -> None:
    """A failing --validate blocks that version; a valid later version is notified."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "app.conf").write_text("good")
    code = f"import sys; sys.exit(open({str(conf / 'app.conf')!r}).read() != 'good2')"
    check = [sys.executable, "-c", code]
    async with (
        target() as t,
        reloader(ReloadConfig((conf,), HttpPost(t.url), validate=tuple(check), debounce=0.05)) as r,
    ):
        (conf / "app.conf").write_text("broken")
        await eventually(lambda: r.counts["validate_failed"] >= 1)
        assert t.posts == 0
        (conf / "app.conf").write_text("good2")
        async with asyncio.timeout(10):
            await t.got.wait()
        assert t.posts == 1 and r.counts["validate_failed"] == 1


async def test_failed_notifications_retry_and_clear_readiness(tmp_path: Path) -> None:
    """A failing target is retried with backoff; readiness is false until it succeeds."""
    (tmp_path / "a").write_text("1")
    async with (
        target() as t,
        reloader(ReloadConfig((tmp_path,), HttpPost(t.url), debounce=0.05, retry_max=0.2)) as r,
    ):
        t.status = 503
        (tmp_path / "a").write_text("2")
        await eventually(lambda: t.posts >= 3)
        assert not r.is_ready() and r.counts["notify_failed"] >= 2
        t.status = 200
        await eventually(r.is_ready)
        assert r.counts["notify_ok"] == 1 and r.wanted is None


async def test_newer_version_replaces_one_being_retried(tmp_path: Path) -> None:
    """While a version is retried, a newer one supersedes it; the newest is delivered last."""
    (tmp_path / "a").write_text("1")
    log = tmp_path.parent / f"{tmp_path.name}-notified"
    script = f"cat {tmp_path / 'a'} >> {log}; grep -q 3 {tmp_path / 'a'}"
    async with reloader(
        ReloadConfig((tmp_path,), Exec(("sh", "-c", script)), debounce=0.05, retry_max=0.1)
    ) as r:
        (tmp_path / "a").write_text("2")  # exec fails for "2": retried
        await eventually(lambda: r.counts["notify_failed"] >= 2)
        (tmp_path / "a").write_text("3")
        await eventually(lambda: r.counts["notify_ok"] >= 1)
        await settle(r, 0.3)
    # the app read "2" only on failed attempts; the last delivered version is the newest
    notified = log.read_text()
    assert notified.startswith("22") and notified.endswith("3") and r.is_ready()
    assert r.delivered is not None and r.delivered.digest == take([tmp_path]).digest


def test_signal_to_pid_file_end_to_end(procs: list[Proc], tmp_path: Path) -> None:
    """`podpatterns reload --signal hup --pid-file` signals the app on a ConfigMap swap."""
    conf = tmp_path / "conf"
    conf.mkdir()
    configmap_write(conf, 1, {"app.yaml": "a: 1"})
    got = tmp_path / "got"
    script = f"trap 'echo hup >> {got}' HUP; echo ready > {got}.r; while :; do sleep 0.05; done"
    # A non-interactive shell cannot trap a signal that was ignored when it started
    # (POSIX), and a test run under nohup ignores SIGHUP: start the app with the
    # default disposition, as a container's own init would.
    app = Proc(
        "-c", script, program=("sh",), tail=(),
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )  # fmt: skip
    procs.append(app)
    pid_file = tmp_path / "app.pid"
    pid_file.write_text(str(app.p.pid))
    wait_for_file(Path(f"{got}.r"))
    p = Proc(
        "reload", "--watch", str(conf), "--signal", "hup", "--pid-file", str(pid_file),
        "--debounce", "50ms", "--admin", "off", "--shutdown-delay", "0",
    )  # fmt: skip
    procs.append(p)
    p.wait_event("reload_watching")
    configmap_write(conf, 2, {"app.yaml": "a: 2"})
    assert p.wait_event("reload_notified")["attempt"] == 1
    wait_until(lambda: got.exists() and got.read_text() == "hup\n", "the app's SIGHUP trap")
    assert got.read_text() == "hup\n"
    p.signal(signal.SIGTERM)
    assert p.wait(10) == 0


def test_usage_errors(tmp_path: Path) -> None:
    """A single file, no notifier or two notifiers: one line and exit 2."""
    f = tmp_path / "app.conf"
    f.write_text("x")
    cases = [
        (["--watch", str(f), "--exec", "true"], "is a file; watch its directory"),
        (["--watch", str(tmp_path)], "exactly one of"),
        (["--watch", str(tmp_path), "--exec", "true", "--http-post", "http://x/"], "exactly one"),
        (["--watch", str(tmp_path), "--http-post", "ftp://x/"], "not an HTTP URL"),
    ]
    for args, message in cases:
        out = run("reload", "--admin", "off", *args)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)


def test_snapshot_follows_symlinks_and_skips_hidden(tmp_path: Path) -> None:
    """The hash covers visible names (through symlinks), not ..data internals or temp files."""
    configmap_write(tmp_path, 1, {"a": "1"})
    before = take([tmp_path])
    (tmp_path / ".swap.tmp").write_text("editor junk")
    assert take([tmp_path]).digest == before.digest
    configmap_write(tmp_path, 2, {"a": "1"})  # same content, new version directory
    assert take([tmp_path]).digest == before.digest and before.files == 1
    configmap_write(tmp_path, 3, {"a": "2"})
    assert take([tmp_path]).digest != before.digest


def test_signal_notifier_refuses_pid_1(tmp_path: Path) -> None:
    """A pid file naming PID 1 (or garbage) is a failed notification, never a signal."""
    from podpatterns.reload.notify import NotifyError

    for content in ("1", "garbage", ""):
        (tmp_path / "pid").write_text(content)
        with pytest.raises(NotifyError):
            asyncio.run(SignalPid(signal.SIGHUP, tmp_path / "pid").notify())


async def test_slow_target_never_blocks_watching(tmp_path: Path) -> None:
    """While a notification hangs, new changes are still seen; the newest is delivered next."""
    (tmp_path / "a").write_text("1")
    release = asyncio.Event()
    seen: list[str] = []

    async def slow(request: web.Request) -> web.Response:
        seen.append((tmp_path / "a").read_text())
        if len(seen) == 1:
            await release.wait()
        return web.Response()

    app = web.Application()
    app.router.add_post("/-/reload", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, LOOP, 0)
    await site.start()
    url = f"http://{LOOP}:{runner.addresses[0][1]}/-/reload"
    try:
        async with reloader(ReloadConfig((tmp_path,), HttpPost(url), debounce=0.05)) as r:
            (tmp_path / "a").write_text("2")
            await eventually(lambda: seen)
            (tmp_path / "a").write_text("3")
            await eventually(lambda: r.counts["changes"] >= 2)
            assert r.counts["notify_ok"] == 0  # the first is still in flight
            release.set()
            await eventually(lambda: r.counts["notify_ok"] >= 2)
            assert seen[-1] == "3" and r.wanted is None
    finally:
        await runner.cleanup()


async def test_reload_without_inotify_polls(tmp_path: Path) -> None:
    """When no inotify watch can be created, reload polls and still notifies."""

    def no_inotify(path: Path, tick: float) -> object:
        raise OSError(24, "inotify_init1: too many open files")

    (tmp_path / "a").write_text("1")
    async with target() as t:
        config = ReloadConfig((tmp_path,), HttpPost(t.url), debounce=0.05, resync=0.1)
        r = Reloader(config, watch=no_inotify)  # type: ignore[arg-type]
        await r.start()
        try:
            (tmp_path / "a").write_text("2")
            async with asyncio.timeout(10):
                await t.got.wait()
            assert r.watcher.mode == "polling" and t.posts == 1
        finally:
            await r.close()


# A program that embeds podpatterns and leaves a thread behind that never returns (a
# library's worker blocked in a call): the interpreter's exit joins it, forever.
WITH_STUCK_THREAD = """
import sys, threading
threading.Thread(target=threading.Event().wait, name="stuck-worker").start()
from podpatterns.__main__ import main
main()
"""


def _reload_until_stopped(
    procs: list[Proc], conf: Path, *, program: tuple[str, ...] | None = None
) -> Proc:
    """`podpatterns reload` on the ConfigMap-style ``conf``, SIGTERMed as a swap lands
    (the watch is active and the change not yet settled); returns once it logged
    ``phase: stopped``."""
    configmap_write(conf, 1, {"app.yaml": "a: 1"})
    args = ("reload", "--watch", str(conf), "--exec", "true", "--debounce", "50ms",
            "--admin", f"{LOOP}:0", "--shutdown-delay", "0")  # fmt: skip
    p = Proc(*args) if program is None else Proc(*args, program=program)
    procs.append(p)
    p.wait_event("runtime_phase", lambda e: e.get("phase") == "ready")
    configmap_write(conf, 2, {"app.yaml": "a: 2"})
    p.signal(signal.SIGTERM)
    p.wait_event("runtime_phase", lambda e: e.get("phase") == "stopped")
    return p


def test_stop_during_a_swap_exits_at_once(procs: list[Proc], tmp_path: Path) -> None:
    """SIGTERM while a ConfigMap swap is being watched: exit 0 once stopped, and the
    teardown never reaches the exit guard's deadline."""
    p = _reload_until_stopped(procs, tmp_path)
    # the bound runs from the `stopped` event: the guard would end a stalled exit then
    assert p.wait(EXIT_GRACE) == 0
    assert p.find("exit_stalled") < 0, p.log_text()


def test_thread_that_never_ends_cannot_hold_the_exit(procs: list[Proc], tmp_path: Path) -> None:
    """A non-daemon thread still blocked after the runtime stopped: the process still
    exits with its code within EXIT_GRACE of `phase: stopped`, naming the thread and
    its stack in `exit_stalled` (before the guard it ran until SIGKILL)."""
    p = _reload_until_stopped(procs, tmp_path, program=(sys.executable, "-c", WITH_STUCK_THREAD))
    assert p.wait(EXIT_GRACE + 5) == 0
    stalled = p.wait_event("exit_stalled")
    assert stalled["exit_code"] == 0 and stalled["threads"] == ["stuck-worker"], stalled
    [stack] = [s for name, s in stalled["stacks"].items() if name.startswith("stuck-worker ")]
    assert "in wait" in stack, stack


# A program whose teardown blocks where no thread can act any more: a finalizer of a
# module global, run while the interpreter finalizes (after the daemon threads stopped).
WITH_STUCK_FINALIZER = """
import threading
class Stuck:
    def __del__(self):
        threading.Event().wait()  # nothing can set it any more
stuck = Stuck()
from podpatterns.__main__ import main
main()
"""


def test_finalizer_that_never_returns_cannot_hold_the_exit(
    procs: list[Proc], tmp_path: Path
) -> None:
    """A stall in the interpreter's own teardown, where the exit guard's thread cannot
    run: SIGALRM ends the process 2 s after the guard's deadline (before, it ran until
    SIGKILL)."""
    program = (sys.executable, "-c", WITH_STUCK_FINALIZER)
    p = _reload_until_stopped(procs, tmp_path, program=program)
    assert p.wait(EXIT_GRACE + 2 + 5) == -signal.SIGALRM
    assert p.find("exit_stalled") < 0  # the guard's thread was stopped before its deadline
