"""Every background task has an owner that notices when it dies.

First :class:`~podpatterns.tasks.TaskSet` itself, then each component's long-running
loops, crashed for real (the method a loop calls raises once) against real sockets and
files: the death is logged as ``task_died`` with its traceback, ``is_live()`` turns False,
readiness that depended on the loop turns False, and ``close()`` still finishes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from podpatterns.ambassador import Ambassador, RouteConfig
from podpatterns.health.aggregate import Aggregate
from podpatterns.health.prober import Prober, ProberConfig
from podpatterns.health.reader import read_record
from podpatterns.health.records import Phase
from podpatterns.health.targets import parse_target
from podpatterns.health.writer import Writer
from podpatterns.options import HostPort
from podpatterns.reload import ReloadConfig, Reloader
from podpatterns.reload.notify import Exec
from podpatterns.tasks import TaskSet
from tests.servers import read_all, serve
from tests.waiting import eventually

LOOP = "127.0.0.1"
Events = list[MutableMapping[str, Any]]


def deaths(events: Events) -> list[MutableMapping[str, Any]]:
    """The ``task_died`` events among captured ones."""
    return [e for e in events if e["event"] == "task_died"]


def fails_once(real: Callable[..., Any], exc: BaseException) -> Callable[..., Any]:
    """``real``, except that its first call raises ``exc`` (the bug being provoked)."""
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise exc
        return real(*args, **kwargs)

    return wrapper


def async_fails_once(
    real: Callable[..., Awaitable[Any]], exc: BaseException
) -> Callable[..., Awaitable[Any]]:
    """The coroutine-function form of :func:`fails_once`."""
    calls = 0

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise exc
        return await real(*args, **kwargs)

    return wrapper


# -- TaskSet ------------------------------------------------------------------------------


async def test_a_task_that_raises_is_a_logged_death() -> None:
    """An exception ends the task as a death: logged with traceback, remembered, reported."""
    reported: list[tuple[str, BaseException | None]] = []

    async def loop() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    with structlog.testing.capture_logs() as events:
        tasks = TaskSet("test", on_death=lambda name, exc: reported.append((name, exc)))
        task = tasks.spawn(loop(), "looper")
        await asyncio.wait([task])
        await eventually(lambda: bool(reported))
    (event,) = deaths(events)
    assert event["log_level"] == "error" and event["task"] == "looper"
    assert event["error"] == "boom" and isinstance(event["exc_info"], RuntimeError)
    assert tasks.died == {"looper": "RuntimeError: boom"} and not tasks.healthy
    assert [(name, type(exc)) for name, exc in reported] == [("looper", RuntimeError)]
    assert len(tasks) == 0
    await tasks.aclose()


async def test_a_task_that_returns_is_a_death_too() -> None:
    """A loop meant to run until cancelled that returns is reported as having died."""
    reported: list[tuple[str, BaseException | None]] = []

    async def loop() -> None:
        await asyncio.sleep(0)

    with structlog.testing.capture_logs() as events:
        tasks = TaskSet("test", on_death=lambda name, exc: reported.append((name, exc)))
        await asyncio.wait([tasks.spawn(loop(), "quitter")])
        await eventually(lambda: bool(reported))
    (event,) = deaths(events)
    assert event["task"] == "quitter" and event["error"] == "returned unexpectedly"
    assert tasks.died == {"quitter": "returned"} and not tasks.healthy
    assert reported == [("quitter", None)]


async def test_cancelling_is_not_a_death() -> None:
    """aclose() ends every task without a task_died event; the set stays healthy."""
    started = asyncio.Event()

    async def loop() -> None:
        started.set()
        await asyncio.Event().wait()

    with structlog.testing.capture_logs() as events:
        tasks = TaskSet("test", on_death=lambda name, exc: pytest.fail(f"{name} died"))
        task = tasks.spawn(loop(), "forever")
        tasks.spawn(loop(), "never_started")  # cancelled before its first step
        await started.wait()
        await tasks.aclose()
    assert task.cancelled()
    assert deaths(events) == [] and tasks.healthy and tasks.died == {}
    assert len(tasks) == 0


async def test_an_error_while_closing_is_not_a_death() -> None:
    """A task that fails in its own cleanup after cancel() is not reported as a death."""

    async def loop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            raise RuntimeError("cleanup failed")  # replaces the CancelledError

    with structlog.testing.capture_logs() as events:
        tasks = TaskSet("test")
        task = tasks.spawn(loop(), "messy")
        await asyncio.sleep(0)  # let it reach its wait
        await tasks.aclose()
    assert task.done() and deaths(events) == [] and tasks.healthy


async def test_aclose_waits_for_every_task_to_end() -> None:
    """aclose() returns only once each task has finished its cleanup after the cancel."""
    cleaned: list[str] = []
    waiting = asyncio.Event()

    async def loop(name: str) -> None:
        try:
            waiting.set()
            await asyncio.Event().wait()
        finally:
            for _ in range(3):  # a cleanup that itself needs the loop
                await asyncio.sleep(0)
            cleaned.append(name)

    tasks = TaskSet("test")
    spawned = [tasks.spawn(loop(n), n) for n in ("a", "b")]
    await waiting.wait()
    await tasks.aclose()
    assert sorted(cleaned) == ["a", "b"]
    assert all(t.done() for t in spawned)


# -- the ambassador -----------------------------------------------------------------------


async def test_ambassador_health_loop_death(monkeypatch: pytest.MonkeyPatch) -> None:
    """A crashed health loop: logged, not live, not ready (no frozen verdict), still routes."""

    async def hello(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"A")
        await w.drain()
        w.close()

    with structlog.testing.capture_logs() as events:
        async with serve(hello) as upstream:
            amb = Ambassador(
                [
                    RouteConfig(
                        listen=HostPort(LOOP, 0),
                        upstream=(upstream,),
                        ready_requires_upstream=True,
                        health_check_interval=0.02,
                        health_check_timeout=1.0,
                    )
                ]
            )
            await amb.start()
            try:
                await eventually(amb.is_ready)
                assert amb.is_live()
                pool = amb.routes[0].pool
                monkeypatch.setattr(
                    pool, "addresses", async_fails_once(pool.addresses, RuntimeError("bug"))
                )
                await eventually(lambda: not amb.is_live())
                assert not amb.is_ready()  # the last "healthy" is no proof any more
                assert [ep.healthy for ep in pool.endpoints] == [None]
                address = amb.tcp_address()
                reader, writer = await asyncio.open_connection(address.host, address.port)
                assert await read_all(reader) == b"A"  # passive health still routes
                writer.close()
                await writer.wait_closed()
            finally:
                async with asyncio.timeout(10):
                    await amb.close()
    (event,) = deaths(events)
    assert event["task"] == "default/health" and event["log_level"] == "error"
    assert isinstance(event["exc_info"], ExceptionGroup)
    assert event["exc_info"].subgroup(RuntimeError) is not None


async def test_ambassador_connection_setup_bug_is_logged(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug while a connection's relay is attached ends that connection, logged with its
    traceback; the route stays live and the next connection works."""

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await read_all(r))
        await w.drain()
        w.close()

    with structlog.testing.capture_logs() as events:
        async with serve(echo) as upstream:
            amb = Ambassador(
                [RouteConfig(listen=HostPort(LOOP, 0), upstream=(upstream,), splice="off")]
            )
            await amb.start()
            try:
                route = amb.routes[0]
                monkeypatch.setattr(
                    route,
                    "_send_proxy_header",
                    fails_once(route._send_proxy_header, RuntimeError("setup bug")),
                )
                address = amb.tcp_address()
                for expected in (b"", b"second"):
                    reader, writer = await asyncio.open_connection(address.host, address.port)
                    try:
                        writer.write(b"second")
                        writer.write_eof()
                        got = await read_all(reader)
                    except ConnectionResetError:  # the first one is reset
                        got = b""
                    writer.close()
                    assert got == expected
                    await eventually(lambda: route.in_flight() == 0)
                assert amb.is_live() and amb.is_ready()
            finally:
                await amb.close()
    (bug,) = [e for e in events if e["event"] == "connection_setup_bug"]
    assert bug["log_level"] == "error" and bug["error"] == "setup bug"
    assert isinstance(bug["exc_info"], RuntimeError)
    assert deaths(events) == []


def test_tcp_address_is_typed_and_checked() -> None:
    """tcp_address() names the route it cannot answer for, before start and by name."""
    amb = Ambassador(
        [
            RouteConfig(listen=HostPort(LOOP, 0), upstream=(HostPort(LOOP, 1),), name="a"),
            RouteConfig(listen=HostPort(LOOP, 0), upstream=(HostPort(LOOP, 1),), name="b"),
        ]
    )
    with pytest.raises(LookupError, match="name one of the routes"):
        amb.tcp_address()
    with pytest.raises(LookupError, match="'c'"):
        amb.tcp_address("c")
    with pytest.raises(RuntimeError, match="'a' is not bound"):
        amb.tcp_address("a")


# -- reload -------------------------------------------------------------------------------


async def test_reloader_watch_loop_death(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crashed watch loop: logged, not live, not ready (changes would go unnoticed)."""
    (tmp_path / "app.conf").write_text("v1")
    config = ReloadConfig(watch=(tmp_path,), notifier=Exec(("true",)), debounce=0.01)
    with structlog.testing.capture_logs() as events:
        reloader = Reloader(config)
        monkeypatch.setattr(
            reloader, "_check", async_fails_once(reloader._check, RuntimeError("bug"))
        )
        await reloader.start()
        try:
            await eventually(lambda: not reloader.is_live())
            assert not reloader.is_ready()
        finally:
            async with asyncio.timeout(10):
                await reloader.close()
    (event,) = deaths(events)
    assert event["task"] == "reload_watch" and event["error"] == "bug"
    assert isinstance(event["exc_info"], RuntimeError)


# -- health -------------------------------------------------------------------------------


async def test_aggregate_follow_loop_death(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crashed follow loop: logged, not live, and no verdict from the frozen view."""
    Writer(tmp_path, "app").set_ready()
    with structlog.testing.capture_logs() as events:
        agg = Aggregate(tmp_path, resync=0.02)
        await agg.start()
        try:
            assert agg.pod_ok("readyz") and agg.pod_ok("livez") and agg.is_live()
            monkeypatch.setattr(agg, "refresh", fails_once(agg.refresh, RuntimeError("bug")))
            await eventually(lambda: not agg.is_live())
            assert not agg.healthy
            for check in ("livez", "readyz", "startupz"):
                assert not agg.pod_ok(check)
                assert not agg.container_ok(check, "app")
        finally:
            async with asyncio.timeout(10):
                await agg.close()
    (event,) = deaths(events)
    assert event["task"] == "health_follow" and event["error"] == "bug"


async def test_prober_loop_death(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crashed probing loop: logged, and the prober is neither live nor ready."""
    config = ProberConfig(
        health_dir=tmp_path, name="app", probes=(parse_target(f"tcp://{LOOP}:1"),)
    )
    with structlog.testing.capture_logs() as events:
        prober = Prober(config)
        monkeypatch.setattr(
            prober, "probe_once", async_fails_once(prober.probe_once, RuntimeError("bug"))
        )
        await prober.start()
        try:
            await eventually(lambda: not prober.is_live())
            assert not prober.is_ready()
        finally:
            prober.stop_accepting()
            async with asyncio.timeout(10):
                await prober.close()
    (event,) = deaths(events)
    assert event["task"] == "prober" and event["error"] == "bug"


async def test_heartbeat_death(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A heartbeat write that fails ends the heartbeats, logged, and the context exits."""
    writer = Writer(tmp_path, "app", interval=0.02)
    writer.set_ready()
    with structlog.testing.capture_logs() as events:
        heartbeat = writer.heartbeating()
        async with heartbeat:
            monkeypatch.setattr(
                writer, "heartbeat", fails_once(writer.heartbeat, OSError(28, "disk full"))
            )
            await eventually(lambda: not heartbeat.healthy)
    (event,) = deaths(events)
    assert event["task"] == "heartbeat" and "disk full" in event["error"]
    record = read_record(tmp_path, "app").record
    assert record is not None and record.phase is Phase.READY
