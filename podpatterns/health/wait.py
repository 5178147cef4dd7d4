"""``podpatterns wait``: block until every target is there, under one deadline.

Every target is checked at once and then with its own backoff, all in parallel. While
anything still blocks, a progress event names each blocking target and why. A
``ready:NAME`` target whose peer has written its tombstone fails the whole wait at once
(:class:`~podpatterns.errors.PeerExitedError`): it will not become ready. The CLI
``exec``s the command after a successful wait (see :mod:`podpatterns.commands.wait`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from podpatterns import logs
from podpatterns.errors import ConfigError, PeerExitedError, WaitTimeoutError
from podpatterns.health.targets import (
    ATTEMPT_TIMEOUT,
    ReadyTarget,
    Target,
    check_within,
    parse_target,
)
from podpatterns.options import Option, parse_duration
from podpatterns.tasks import TaskSet

WAIT_OPTIONS: tuple[Option[Any], ...] = (
    Option(
        "for",
        parse_target,
        (),
        "a target: ready:NAME (needs --health-dir), tcp://HOST:PORT, http://URL, "
        "https://URL, grpc://HOST:PORT[?service=NAME] (the grpc extra) or file:PATH",
        multiple=True,
        metavar="TARGET",
        scope="wait",
    ),
    Option(
        "timeout",
        parse_duration,
        60.0,
        "give up after this long (exit 124, the command is not run)",
        metavar="DURATION",
        scope="wait",
    ),
    Option(
        "progress_interval",
        parse_duration,
        5.0,
        "log what still blocks this often",
        metavar="DURATION",
        scope="wait",
    ),
)

BACKOFF_FIRST = 0.05
BACKOFF_MAX = 1.0


@dataclass(frozen=True)
class WaitConfig:
    """Validated settings of ``podpatterns wait``.

    Attributes:
        targets: what to wait for (``ready:`` targets carry the health directory).
        timeout: the one deadline for all of them, in seconds.
        progress_interval: seconds between progress events.
    """

    targets: tuple[Target, ...]
    timeout: float = 60.0
    progress_interval: float = 5.0

    def __post_init__(self) -> None:
        if not self.targets:
            raise ConfigError("--for: at least one target is needed (e.g. --for ready:app)")
        if self.timeout <= 0:
            raise ConfigError(f"--timeout: {self.timeout!r} must be > 0")
        if self.progress_interval <= 0:
            raise ConfigError(f"--progress-interval: {self.progress_interval!r} must be > 0")

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> WaitConfig:
        """Build from resolved options; ``ready:`` targets need ``--health-dir``."""
        health_dir: Path | None = values.get("health_dir")
        if health_dir is not None and not health_dir.is_dir():
            # wait runs once, at start: the shared volume is mounted by then, so a
            # missing directory is a wrong path, not one that will still appear.
            what = "is not a directory" if health_dir.exists() else "does not exist"
            raise ConfigError(
                f"--health-dir: {str(health_dir)!r} {what} (the Pod's shared volume's mount path)"
            )
        targets = []
        for target in values["for"]:
            if isinstance(target, ReadyTarget):
                if health_dir is None:
                    raise ConfigError(f"--for: {target.label!r} needs --health-dir DIR")
                target = replace(target, health_dir=health_dir)
            targets.append(target)
        return cls(
            targets=tuple(targets),
            timeout=values["timeout"],
            progress_interval=values["progress_interval"],
        )


async def wait_all(config: WaitConfig) -> None:
    """Return once every target is there.

    Raises:
        WaitTimeoutError: the deadline passed (the message lists what still blocks).
        PeerExitedError: a ``ready:`` peer has exited (the message names it).
    """
    log = logs.get("wait")
    blocking: dict[str, str] = {t.label: "not checked yet" for t in config.targets}
    unchecked = {t.label for t in config.targets}
    first_round = asyncio.Event()  # every target has an outcome: progress can name it
    started = time.monotonic()

    async def one(target: Target) -> None:
        delay = BACKOFF_FIRST
        while True:
            outcome = await check_within(target, ATTEMPT_TIMEOUT)
            unchecked.discard(target.label)
            if not unchecked:
                first_round.set()
            if outcome.ok:
                blocking.pop(target.label, None)
                log.info(
                    "wait_target_ready",
                    target=target.label,
                    after=round(time.monotonic() - started, 3),
                )
                return
            if outcome.fatal:
                log.error("wait_peer_exited", target=target.label, reason=outcome.reason)
                raise PeerExitedError(f"{target.label}: peer {outcome.reason}")
            blocking[target.label] = outcome.reason
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def progress() -> None:
        # The first report comes after one interval and after every target has been
        # checked once (each check is bounded by ATTEMPT_TIMEOUT), so it says why each
        # target blocks, never "not checked yet" because the machine was slow.
        await asyncio.sleep(config.progress_interval)
        await first_round.wait()
        while True:
            for label, reason in sorted(blocking.items()):
                log.info(
                    "wait_blocked",
                    target=label,
                    reason=reason,
                    waited=round(time.monotonic() - started, 1),
                )
            await asyncio.sleep(config.progress_interval)

    log.info("wait_started", targets=[t.label for t in config.targets], timeout=config.timeout)
    reporter = TaskSet("wait")
    reporter.spawn(progress(), "wait-progress")
    try:
        async with asyncio.timeout(config.timeout), asyncio.TaskGroup() as group:
            for target in config.targets:
                group.create_task(one(target))
    except TimeoutError:
        summary = "; ".join(f"{k}: {v}" for k, v in sorted(blocking.items()))
        log.error("wait_timeout", timeout=config.timeout, blocking=dict(blocking))
        raise WaitTimeoutError(
            f"timed out after {config.timeout:g}s waiting for {summary}"
        ) from None
    except BaseExceptionGroup as group_error:
        peer = group_error.subgroup(PeerExitedError)
        if peer is None:
            raise
        raise peer.exceptions[0] from None
    finally:
        await reporter.aclose()
    log.info("wait_done", after=round(time.monotonic() - started, 3))
