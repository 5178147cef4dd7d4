"""The process entry of a runtime-based command: logging, the fd limit, the event loop,
SIGTERM/SIGINT, and the exit code the shutdown carries.

Only commands call this; a program that embeds a :class:`~podpatterns.runtime.Runtime`
runs it in its own loop and installs its own handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from podpatterns import logs
from podpatterns.errors import ConfigError, ExitCode, PodpatternsError
from podpatterns.runtime.config import RuntimeConfig
from podpatterns.runtime.lifecycle import Runtime


def serve(config: RuntimeConfig, make: Callable[[], Runtime]) -> int:
    """Run the runtime ``make()`` builds until it stops; return the process exit code.

    ``make`` is called inside the event loop, so what it builds belongs to that loop.
    SIGTERM and SIGINT start the graceful shutdown; a second SIGINT exits at once (130).
    The exit code is the one the shutdown carries (``--exit-with-code`` after an
    ``--exit-with`` shutdown, 0 otherwise), or a startup error's.

    Once the runtime has stopped (or failed to start) the process has
    :data:`EXIT_GRACE` seconds to close the loop and let the interpreter exit; then
    :func:`guard_exit` ends it with the same code. ``serve`` is a process's entry, not
    something to call in a process that goes on afterwards.
    """
    logs.configure(config.log_level, config.log_format)
    log = logs.get("cli")
    raise_fd_limit(log)
    tune_gc()
    with asyncio.Runner(loop_factory=loop_factory(config.loop)) as runner:
        try:
            code = runner.run(_serve(make))
        except PodpatternsError as exc:
            log.error("startup_failed", error=str(exc))
            sys.stderr.write(f"podpatterns: error: {exc}\n")
            code = int(exc.exit_code)
        except BaseException:
            guard_exit(ExitCode.INTERNAL, log)  # a bug: its traceback follows
            raise
        guard_exit(code, log)  # before the runner closes: closing the loop may block too
    return code


EXIT_GRACE = 5.0
"""Seconds the process may take to end once its runtime has stopped (:func:`guard_exit`).

A clean end takes 0.2 to 0.6 s (closing the loop, joining the threads, the interpreter's
teardown), up to 1 s under load."""


def guard_exit(code: int, log: Any, grace: float = EXIT_GRACE) -> None:
    """End the process with ``code`` if it is still alive ``grace`` seconds from now.

    Called once the work is done. What follows is teardown: ``asyncio.Runner.close()``
    cancels the tasks left and joins the default executor's threads, and the
    interpreter's exit joins every non-daemon thread, without a deadline. A thread that
    never returns (a library's worker blocked in a call) would keep a stopped process
    alive until the kubelet's SIGKILL (exit 137, the Pod's deletion held up for its whole
    grace period), as an e2e run once saw of ``reload``. The guard is a daemon thread:
    it logs ``exit_stalled`` with the threads still alive and every thread's stack, then
    calls ``os._exit(code)``. The log gets one second, so a stderr that no longer drains
    cannot hold the exit either.

    A daemon thread cannot act once the interpreter is finalizing (after the threads are
    joined and the ``atexit`` functions ran: modules and thread states are torn down
    then, and a thread that wakes up is stopped). A stall there (a finalizer that blocks,
    a deadlock in the interpreter's own teardown) is ended by the kernel instead:
    SIGALRM, whose default action ends the process, 2 s after the guard's deadline. No
    log then, and the exit status is the signal's (142), not ``code``.
    """
    signal.setitimer(signal.ITIMER_REAL, grace + 2.0)

    def expire() -> None:
        threading.Event().wait(grace)
        report = threading.Thread(
            target=_report_stall, args=(log, code, grace), name="exit-report", daemon=True
        )
        report.start()
        report.join(1.0)
        os._exit(code)

    threading.Thread(target=expire, name="exit-guard", daemon=True).start()


def _report_stall(log: Any, code: int, grace: float) -> None:
    guards = {"exit-guard", "exit-report"}
    frames = sys._current_frames()
    threads = [t for t in threading.enumerate() if t.name not in guards]
    log.error(
        "exit_stalled",
        after=grace,
        exit_code=code,
        # what the interpreter's exit waits for (the main thread is the one waiting)
        threads=[t.name for t in threads if not t.daemon and t is not threading.main_thread()],
        stacks={
            f"{t.name} ({t.ident})": "".join(traceback.format_stack(frames[t.ident]))
            for t in threads
            if t.ident in frames
        },
    )
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed or broken: nothing to save
            stream.flush()


STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
"""The signals the entry point holds until a command has its handlers (``__main__``)."""


def hold_stop_signals() -> None:
    """Block :data:`STOP_SIGNALS` in the calling thread (a thread it starts inherits it)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


async def start_worker_threads_holding_stop_signals() -> None:
    """Start every later thread with :data:`STOP_SIGNALS` blocked in it, so that a stop
    signal is only ever delivered to the main thread.

    At exit the handlers are swapped for SIG_IGN with the signals blocked in the main
    thread (:func:`_serve`); in between the disposition is the default one for an
    instant, and a SIGTERM that another thread took then killed the process (143).
    Threads started by Python (the default executor's, anyio's worker that runs
    watchfiles, and the threads those start in turn) get the mask from
    :func:`_start_holding_stop_signals`; libuv's thread pool (uvloop's getaddrinfo)
    starts all its threads at its first use, so it is used once here, with the signals
    held, and its threads inherit the mask.
    """
    threading.Thread.start = _start_holding_stop_signals  # type: ignore[method-assign,assignment]
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(initializer=hold_stop_signals))
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # numeric: no resolver, only the pool's threads started (a no-op for asyncio's loop,
        # whose getaddrinfo runs in the default executor above)
        await loop.getaddrinfo("127.0.0.1", None, flags=socket.AI_NUMERICHOST)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


_THREAD_START = threading.Thread.start


def _start_holding_stop_signals(thread: threading.Thread) -> None:
    """``threading.Thread.start`` in this process: the new thread inherits the caller's
    signal mask, so the caller holds :data:`STOP_SIGNALS` for the instant of the start
    (a signal that comes meanwhile is delivered when the mask is restored)."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        _THREAD_START(thread)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def release_stop_signals() -> None:
    """Unblock :data:`STOP_SIGNALS`: one held since the process started is delivered now,
    to the handlers just installed. A no-op when they were not held."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def raise_fd_limit(log: Any) -> None:
    """Raise the soft open-files limit to the hard limit (as Go programs do at start).

    Every relayed connection holds 2 descriptors (6 with splice pipes); the usual soft
    limit of 1024 would cap a proxy at a few hundred connections for no reason.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("fd_limit_unchanged", soft=soft, hard=hard, error=str(exc))
        else:
            log.debug("fd_limit_raised", soft=soft, now=hard)


GC_YOUNG_THRESHOLD = 10_000
"""Allocations between two collections of the youngest generation (CPython's default: 700)."""


def tune_gc() -> None:
    """Collect the youngest generation every :data:`GC_YOUNG_THRESHOLD` allocations.

    The hot paths make short-lived containers by the thousand (an adapter batch is a
    thousand lines and records, alive across a few awaits): at CPython's default of 700
    each batch went through several young collections, was promoted and scanned again:
    0.30 CPU s of collections in a metrics-only adapter run of issue 15's benchmark
    (200,000 lines, about 1.2 CPU s of work in all), 0.06 with this threshold. Most of those
    objects are freed by reference counting before a collection sees them; cycles are
    still collected, a little later.
    """
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop factory for ``--loop`` (``None``: asyncio's default loop).

    Raises:
        ConfigError: ``uvloop`` was asked for and is not installed.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("--loop: 'uvloop' is not installed (pip install uvloop)") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _serve(make: Callable[[], Runtime]) -> int:
    runtime = make()
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            sys.stderr.write("podpatterns: second SIGINT, exiting now\n")
            sys.stderr.flush()
            os._exit(ExitCode.FORCED)
        runtime.request_shutdown("SIGINT")

    await start_worker_threads_holding_stop_signals()
    loop.add_signal_handler(signal.SIGTERM, runtime.request_shutdown, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    release_stop_signals()  # a SIGTERM that came while starting is handled now
    try:
        await runtime.run()
    finally:
        # The work is done: a later SIGTERM (a kubelet or podman repeating it, a Pod's
        # preStop racing the stop) must not turn the clean exit into a death by signal
        # (143) while the interpreter tears down. remove_signal_handler() restores the
        # default action, so ignore the signals right after it, with them held between
        # the two (one arriving in that gap would kill the process).
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
                signal.signal(sig, signal.SIG_IGN)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    request = runtime.shutdown_request
    return ExitCode.OK if request is None else request.exit_code
