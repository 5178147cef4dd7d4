"""``podpatterns reload``: notify the app when the content of watched directories changes.

Two tasks, so that a slow app never blocks watching:

- the **watch loop** wakes on file events (and every ``--resync``), then waits until the
  directories have been quiet for ``--debounce``, hashes their content in a thread
  (:mod:`podpatterns.reload.snapshot`) and, when the hash differs from the last one
  acted on, records it as the *wanted* version and wakes the notifier;
- the **notifier** takes the newest wanted version (older ones are coalesced away),
  runs ``--validate`` if set (a failure blocks that version, never retried), and
  notifies with retries and capped exponential backoff; a newer version arriving during
  the retries replaces the one being retried.

Readiness is false while a version could not be delivered; metrics count every step.
Both loops belong to a :class:`~podpatterns.tasks.TaskSet`: if either dies (a bug), it is
logged as ``task_died``, liveness turns false, and so does readiness, since changes are
then neither noticed nor delivered.
"""

from __future__ import annotations

import asyncio
import shlex
import signal
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from podpatterns import logs, metrics
from podpatterns.dirwatch import DirWatcher, WatchFactory
from podpatterns.errors import ConfigError
from podpatterns.options import (
    Option,
    parse_choice,
    parse_duration,
    parse_http_url,
    parse_path,
    parse_str,
)
from podpatterns.reload.notify import Exec, HttpPost, Notifier, NotifyError, SignalPid
from podpatterns.reload.snapshot import Snapshot, SnapshotError, take
from podpatterns.runtime import NothingToDrain
from podpatterns.subproc import run_command
from podpatterns.tasks import TaskSet


def _argv(text: str) -> tuple[str, ...]:
    argv = tuple(shlex.split(parse_str(text)))
    if not argv:
        raise ValueError("is not a command")
    return argv


_SIGNALS = ("hup", "usr1", "usr2", "term", "int", "quit", "winch")

RELOAD_OPTIONS: tuple[Option[Any], ...] = (
    Option(
        "watch",
        parse_path,
        (),
        "a directory whose content is the configuration (a mounted ConfigMap or Secret, "
        "a git-sync root); never a single file",
        multiple=True,
        metavar="DIR",
        scope="reload",
    ),
    Option(
        "http_post",
        parse_http_url,
        None,
        "notify by POSTing to this URL (2xx is success)",
        metavar="URL",
        scope="reload",
    ),
    Option(
        "signal",
        parse_choice(*_SIGNALS),
        "hup",
        "the signal sent to the pid in --pid-file",
        metavar="SIGNAL",
        scope="reload",
    ),
    Option(
        "pid_file",
        parse_path,
        None,
        "notify by sending --signal to the pid in this file (read at every notification)",
        metavar="FILE",
        scope="reload",
    ),
    Option(
        "exec",
        _argv,
        None,
        "notify by running this command (split like a shell would; exit 0 is success)",
        metavar="CMD",
        scope="reload",
    ),
    Option(
        "validate",
        _argv,
        None,
        "run this command first; a non-zero exit blocks notifying that version",
        metavar="CMD",
        scope="reload",
    ),
    Option(
        "debounce",
        parse_duration,
        0.5,
        "act once the directories have been quiet this long",
        metavar="DURATION",
        scope="reload",
    ),
    Option(
        "resync",
        parse_duration,
        10.0,
        "re-read the directories this often even without a file event",
        metavar="DURATION",
        scope="reload",
    ),
    Option(
        "notify_timeout",
        parse_duration,
        10.0,
        "longest time one notification (or validation) may take",
        metavar="DURATION",
        scope="reload",
    ),
    Option(
        "retry_max",
        parse_duration,
        30.0,
        "longest wait between two notification attempts (backoff doubles from 100ms)",
        metavar="DURATION",
        scope="reload",
    ),
)


@dataclass(frozen=True)
class ReloadConfig:
    """Validated settings of ``podpatterns reload``.

    Attributes:
        watch: the directories.
        notifier: how the app is told.
        validate: the validation command, or ``None``.
        debounce: quiet seconds before acting.
        resync: seconds between re-reads without events.
        notify_timeout: seconds one attempt may take.
        retry_max: the backoff cap in seconds.
    """

    watch: tuple[Path, ...]
    notifier: Notifier
    validate: tuple[str, ...] | None = None
    debounce: float = 0.5
    resync: float = 10.0
    notify_timeout: float = 10.0
    retry_max: float = 30.0

    def __post_init__(self) -> None:
        if not self.watch:
            raise ConfigError("--watch: at least one directory is needed")
        for path in self.watch:
            if path.exists() and not path.is_dir():
                raise ConfigError(
                    f"--watch: {str(path)!r} is a file; watch its directory "
                    f"({str(path.parent)!r}): files are replaced, not modified"
                )
        for name in ("resync", "notify_timeout", "retry_max"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')}: must be > 0")

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> ReloadConfig:
        """Build from resolved options; exactly one way to notify."""
        ways = [k for k in ("http_post", "pid_file", "exec") if values.get(k) is not None]
        if len(ways) != 1:
            raise ConfigError(
                "reload: give exactly one of --http-post URL, --pid-file FILE (with "
                "--signal) or --exec CMD"
                + (f" (got {', '.join('--' + w.replace('_', '-') for w in ways)})" if ways else "")
            )
        notifier: Notifier
        if ways[0] == "http_post":
            notifier = HttpPost(values["http_post"])
        elif ways[0] == "pid_file":
            notifier = SignalPid(
                signal.Signals["SIG" + values["signal"].upper()], values["pid_file"]
            )
        else:
            notifier = Exec(values["exec"])
        return cls(
            watch=tuple(values["watch"]),
            notifier=notifier,
            validate=values["validate"],
            debounce=values["debounce"],
            resync=values["resync"],
            notify_timeout=values["notify_timeout"],
            retry_max=values["retry_max"],
        )


class Reloader(NothingToDrain):
    """The ``reload`` component (see the module doc).

    Args:
        config: the settings.
        watch: the watcher's event source (tests force polling with it).
    """

    name = "reload"

    def __init__(
        self,
        config: ReloadConfig,
        *,
        watch: WatchFactory | None = None,
    ) -> None:
        self.config = config
        # No filter: a ..data swap shows up on hidden names; the content hash decides.
        self.watcher = DirWatcher(
            config.watch, resync=config.resync, debounce_ms=50, watch=watch, component="reload"
        )
        self.current: Snapshot | None = None  # last version acted on (or the start)
        self.wanted: Snapshot | None = None  # newest version not yet delivered
        self.delivered: Snapshot | None = None
        self.failing = False
        self.counts = {
            "changes": 0,
            "notify_ok": 0,
            "notify_failed": 0,
            "validate_failed": 0,
            "snapshot_errors": 0,
            "coalesced": 0,
        }
        self._wake = asyncio.Event()
        self._tasks = TaskSet("reload")
        self._log = logs.get("reload")

    async def start(self) -> None:
        """Take the starting snapshot (not notified: the app read it at start), then watch."""
        try:
            self.current = await asyncio.to_thread(take, self.config.watch)
        except SnapshotError as exc:
            self.counts["snapshot_errors"] += 1
            self._log.warning("reload_snapshot_failed", error=str(exc))
        self._log.info(
            "reload_watching",
            watch=[str(p) for p in self.config.watch],
            notify=self.config.notifier.label,
            version=self.current.short if self.current else None,
        )
        self._tasks.spawn(self._watch_loop(), "reload_watch")
        self._tasks.spawn(self._notify_loop(), "reload_notify")

    async def _watch_loop(self) -> None:
        async with aclosing(self.watcher.wakeups()) as wakeups:
            async for _ in wakeups:
                await self._check()

    async def _settled(self) -> Snapshot | None:
        """A snapshot that stayed the same for ``debounce`` seconds (content debounce:
        a burst of writes or a swap in progress is never acted on half-way)."""
        try:
            snap = await asyncio.to_thread(take, self.config.watch)
            while True:
                await asyncio.sleep(self.config.debounce)
                again = await asyncio.to_thread(take, self.config.watch)
                if again.digest == snap.digest:
                    return snap
                snap = again
        except SnapshotError as exc:
            self.counts["snapshot_errors"] += 1
            self._log.warning("reload_snapshot_failed", error=str(exc))
            return None

    async def _check(self) -> None:
        newest = self.wanted or self.current
        try:
            quick = await asyncio.to_thread(take, self.config.watch)
        except SnapshotError:
            quick = None  # settle below, which counts and logs
        if quick is not None and newest is not None and quick.digest == newest.digest:
            return  # nothing changed (the common resync case): no debounce wait
        snap = await self._settled()
        if snap is None:
            return
        newest = self.wanted or self.current
        if newest is not None and snap.digest == newest.digest:
            return
        if self.wanted is not None:
            self.counts["coalesced"] += 1
        self.counts["changes"] += 1
        self._log.info(
            "reload_change_detected",
            version=snap.short,
            previous=newest.short if newest else None,
            files=snap.files,
        )
        self.wanted = snap
        self._wake.set()

    async def _notify_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            snap = self.wanted
            if snap is None:
                continue
            await self._deliver(snap)

    async def _deliver(self, snap: Snapshot) -> None:
        if self.config.validate is not None:
            try:
                async with asyncio.timeout(self.config.notify_timeout):
                    code, err = await run_command(self.config.validate)
            except TimeoutError:
                code, err = -1, f"timed out after {self.config.notify_timeout:g}s"
            if code != 0:
                self.counts["validate_failed"] += 1
                self._log.warning(
                    "reload_validation_failed", version=snap.short, exit=code, error=err
                )
                if self.wanted is snap:
                    self.wanted = None
                    self.current = snap  # do not act on this version again
                return
        delay = 0.1
        attempt = 0
        while True:
            attempt += 1
            try:
                async with asyncio.timeout(self.config.notify_timeout):
                    await self.config.notifier.notify()
            except (NotifyError, TimeoutError) as exc:
                self.counts["notify_failed"] += 1
                self.failing = True
                reason = str(exc) or f"timed out after {self.config.notify_timeout:g}s"
                self._log.warning(
                    "reload_notify_failed", version=snap.short, attempt=attempt, error=reason,
                    retry_in=delay,
                )  # fmt: skip
                try:
                    # a newer version ends the wait: retry with it instead
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                if self.wanted is not snap:
                    return  # superseded: the loop picks up the newest
                self._wake.clear()
                delay = min(delay * 2, self.config.retry_max)
                continue
            self.counts["notify_ok"] += 1
            self.failing = False
            self.delivered = snap
            if self.wanted is snap:
                self.wanted = None
                self.current = snap
            self._log.info("reload_notified", version=snap.short, attempt=attempt)
            return

    # -- Component protocol -----------------------------------------------------------

    def is_ready(self) -> bool:
        """False while a version could not be delivered, and once a loop has died (a
        change would then go unnoticed or undelivered)."""
        return not self.failing and self._tasks.healthy

    def is_live(self) -> bool:
        """True while neither the watch loop nor the notifier has died."""
        return self._tasks.healthy

    def stop_accepting(self) -> None:
        """Stop watching and notifying."""
        self._tasks.cancel()

    async def close(self) -> None:
        """Stop both tasks."""
        await self._tasks.aclose()

    def collectors(self) -> Sequence[Any]:
        """Reload steps and the watch mode."""
        return [
            metrics.CallbackCollector(
                [
                    metrics.Family(
                        "counter",
                        "reload_events",
                        "reload steps: changes, notify_ok, notify_failed, validate_failed, "
                        "snapshot_errors, coalesced",
                        ("kind",),
                        lambda: [((k,), float(v)) for k, v in self.counts.items()],
                    ),
                    metrics.Family(
                        "gauge",
                        "reload_pending",
                        "1 while a changed version waits to be delivered",
                        (),
                        lambda: [((), float(self.wanted is not None))],
                    ),
                    metrics.Family(
                        "gauge",
                        "reload_watch_mode",
                        "1 for how reload watches its directories (inotify or polling)",
                        ("mode",),
                        lambda: [
                            ((m,), float(self.watcher.mode == m)) for m in ("inotify", "polling")
                        ],
                    ),
                ]
            )
        ]

    async def status(self) -> dict[str, Any]:
        """What ``GET /status`` shows: the version acted on, the one pending delivery
        (a reload not yet delivered), whether notifying fails, the step counts, the
        watch mode and the config (the notify target redacted)."""
        from podpatterns.runtime.status import shown, shown_config

        config = shown_config(self.config)
        config["notifier"] = shown(self.config.notifier.label)
        pending = self.wanted
        not_ready = []
        if self.failing:
            not_ready.append(
                f"version {pending.short if pending else '?'} could not be delivered; retrying"
            )
        if not self._tasks.healthy:
            not_ready.append("a background task died (see task_died)")
        return {
            "current": self.current.short if self.current else None,
            "delivered": self.delivered.short if self.delivered else None,
            "pending": None
            if pending is None
            else {"version": pending.short, "files": pending.files},
            "failing": self.failing,
            "counts": dict(self.counts),
            "watch_mode": self.watcher.mode,
            "not_ready": not_ready,
            "warnings": [f"reload of version {pending.short} pending"] if pending else [],
            "config": config,
        }
