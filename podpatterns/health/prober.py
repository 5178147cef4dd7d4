"""``podpatterns health``: probe the main container and write its record.

A :class:`Prober` is a runtime component: it runs every ``--probe`` each
``--probe-interval`` (all at once, each bounded by ``--probe-timeout``) and turns the
results into the container's phase the way the kubelet does, per probe: a probe passes
after ``--success-threshold`` consecutive successes and fails after
``--failure-threshold`` consecutive failures. The container is ``ready`` while every
probe passes; ``starting`` until that first happens; ``not_ready`` after. Every round
rewrites the record (a heartbeat, with the interval as its promise), so a hung prober
shows as a stale record.

The admin server of ``podpatterns health`` answers the whole Pod's probes (the command
builds its runtime with :func:`~podpatterns.health.coordination.pod_runtime`
``pod_probes=True``). The runtime owns the Pod's
:class:`~podpatterns.health.aggregate.Aggregate`, not the prober: its liveness is the
aggregate's own :meth:`~podpatterns.health.aggregate.Aggregate.is_live`.

The probing loop belongs to a :class:`~podpatterns.tasks.TaskSet`: if it dies (a bug), it
is logged as ``task_died`` and :meth:`Prober.is_live` and :meth:`Prober.is_ready` turn
False; the record, no longer rewritten, goes stale for its readers.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from podpatterns import logs, metrics
from podpatterns.errors import ConfigError
from podpatterns.health.options import NAME_OPTION, parse_name
from podpatterns.health.records import Check, Phase
from podpatterns.health.targets import ReadyTarget, Target, check_within, parse_target
from podpatterns.health.writer import Writer
from podpatterns.options import Option, parse_duration, parse_int
from podpatterns.runtime import NothingToDrain
from podpatterns.tasks import TaskSet


def _probe(text: str) -> Target:
    target = parse_target(text)
    if isinstance(target, ReadyTarget):
        raise ValueError("ready:NAME is not a probe (probe the container itself)")
    return target


PROBE_OPTIONS: tuple[Option[Any], ...] = (
    NAME_OPTION,
    Option(
        "probe",
        _probe,
        (),
        "a check of the container: http(s)://URL[#status=200-299&body=REGEX], "
        "tcp://HOST:PORT, grpc://HOST:PORT[?service=NAME] (the grpc extra), exec:CMD ARGS, "
        "file:PATH[?max-age=30s]",
        multiple=True,
        metavar="PROBE",
        scope="health",
    ),
    Option(
        "expect",
        parse_name,
        (),
        "a container the Pod's /readyz and /startupz wait for even before its first record "
        "(repeat for several); without it, a container that has written nothing yet is "
        "not counted",
        multiple=True,
        metavar="NAME",
        scope="health",
    ),
    Option(
        "probe_interval",
        parse_duration,
        10.0,
        "time between two rounds of probes (the kubelet's periodSeconds)",
        metavar="DURATION",
        scope="health",
    ),
    Option(
        "probe_timeout",
        parse_duration,
        1.0,
        "longest time one probe may take (at most --probe-interval); exec probes are "
        "killed with their process group",
        metavar="DURATION",
        scope="health",
    ),
    Option(
        "success_threshold",
        parse_int(1, 100),
        1,
        "consecutive successes after which a probe passes",
        metavar="N",
        scope="health",
    ),
    Option(
        "failure_threshold",
        parse_int(1, 100),
        3,
        "consecutive failures after which a probe fails",
        metavar="N",
        scope="health",
    ),
    Option(
        "initial_delay",
        parse_duration,
        0.0,
        "wait this long before the first round",
        metavar="DURATION",
        scope="health",
    ),
)


@dataclass(frozen=True)
class ProberConfig:
    """Validated settings of ``podpatterns health``.

    Attributes:
        health_dir: the shared directory (must exist).
        name: the probed container's name.
        probes: the checks (at least one).
        expect: containers the Pod's verdicts wait for before their first record.
        interval: seconds between rounds.
        timeout: seconds one probe may take.
        success_threshold: consecutive successes to pass.
        failure_threshold: consecutive failures to fail.
        initial_delay: seconds before the first round.
    """

    health_dir: Path
    name: str
    probes: tuple[Target, ...]
    expect: tuple[str, ...] = ()
    interval: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3
    initial_delay: float = 0.0

    def __post_init__(self) -> None:
        if not self.probes:
            raise ConfigError("--probe: at least one probe is needed (e.g. --probe tcp://...)")
        if self.interval <= 0:
            raise ConfigError(f"--probe-interval: {self.interval!r} must be > 0")
        if self.timeout <= 0:
            raise ConfigError(f"--probe-timeout: {self.timeout!r} must be > 0")

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> ProberConfig:
        """Build from resolved options; ``--health-dir`` and ``--name`` are required."""
        for required in ("health_dir", "name"):
            if values.get(required) is None:
                flag = "--" + required.replace("_", "-")
                raise ConfigError(f"{flag}: required by podpatterns health")
        return cls(
            health_dir=Path(values["health_dir"]),
            name=values["name"],
            probes=tuple(values["probe"]),
            expect=tuple(values["expect"]),
            interval=values["probe_interval"],
            timeout=values["probe_timeout"],
            success_threshold=values["success_threshold"],
            failure_threshold=values["failure_threshold"],
            initial_delay=values["initial_delay"],
        )


@dataclass
class _ProbeState:
    target: Target
    passing: bool = False
    successes: int = 0
    failures: int = 0
    last: str = "not run yet"
    results: dict[str, int] = field(default_factory=lambda: {"success": 0, "failure": 0})


class Prober(NothingToDrain):
    """The ``health`` component: probes, thresholds, the record. See the module doc."""

    name = "health"

    def __init__(self, config: ProberConfig) -> None:
        self.config = config
        self.writer = Writer(config.health_dir, config.name, interval=config.interval)
        self.probes = [_ProbeState(t) for t in config.probes]
        self.rounds = 0
        self._tasks = TaskSet("health")
        self._task: asyncio.Task[None] | None = None
        # A round's write runs in a thread that a cancel does not stop: this lock and
        # flag keep it from overwriting the "prober stopped" record.
        self._write_lock = threading.Lock()
        self._stopped = False
        self._log = logs.get("health", container=config.name)

    async def start(self) -> None:
        """Write ``starting`` and start probing.

        Raises:
            ConfigError: the record cannot be written in ``--health-dir``.
        """
        try:
            await asyncio.to_thread(self.writer.set_starting)
        except OSError as exc:
            raise ConfigError(
                f"--health-dir: cannot write {self.config.name}.json in "
                f"{str(self.config.health_dir)!r}: {exc.strerror or exc}"
            ) from None
        if self.config.timeout > self.config.interval:
            # A round must fit its interval; say so rather than shorten it silently.
            self._log.warning(
                "probe_timeout_clamped",
                probe_timeout=self.config.timeout,
                probe_interval=self.config.interval,
                note="each probe is given at most --probe-interval",
            )
        self._task = self._tasks.spawn(self._run(), "prober")

    async def _run(self) -> None:
        await asyncio.sleep(self.config.initial_delay)
        loop = asyncio.get_running_loop()
        next_round = loop.time()
        while True:
            await self.probe_once()
            next_round += self.config.interval
            # a round that overran its interval starts the next one at once, not in a burst
            next_round = max(next_round, loop.time())
            await asyncio.sleep(next_round - loop.time())

    async def probe_once(self) -> Phase:
        """Run every probe once, update thresholds, write the record; return the phase."""
        timeout = min(self.config.timeout, self.config.interval)  # a round fits its interval
        outcomes = await asyncio.gather(*(check_within(p.target, timeout) for p in self.probes))
        now = time.time()
        for state, outcome in zip(self.probes, outcomes, strict=True):
            state.last = outcome.reason
            if outcome.ok:
                state.results["success"] += 1
                state.successes, state.failures = state.successes + 1, 0
                if not state.passing and state.successes >= self.config.success_threshold:
                    state.passing = True
                    self._log.info("probe_passing", probe=state.target.label)
            else:
                state.results["failure"] += 1
                state.failures, state.successes = state.failures + 1, 0
                if state.passing and state.failures >= self.config.failure_threshold:
                    state.passing = False
                    self._log.warning(
                        "probe_failing", probe=state.target.label, reason=outcome.reason
                    )
            self.writer.set_check(Check(state.target.label, outcome.ok, outcome.reason, now))
        self.rounds += 1
        phase = self._phase()
        try:
            await asyncio.to_thread(self._write, phase)
        except OSError as exc:
            self._log.warning("record_write_failed", error=str(exc))
        return phase

    def _phase(self) -> Phase:
        current = self.writer.record.phase
        if all(p.passing for p in self.probes):
            return Phase.READY
        return Phase.STARTING if current is Phase.STARTING else Phase.NOT_READY

    def _write(self, phase: Phase) -> None:
        with self._write_lock:
            if not self._stopped:
                self._write_locked(phase)

    def _write_locked(self, phase: Phase) -> None:
        before = self.writer.record.phase
        if phase is Phase.READY and before is not Phase.READY:
            self.writer.set_ready()
        elif phase is Phase.NOT_READY and before is not Phase.NOT_READY:
            failing = [p.target.label for p in self.probes if not p.passing]
            self.writer.set_not_ready("failing: " + ", ".join(failing))
        else:
            self.writer.heartbeat()
        if phase is not before:
            self._log.info("record_phase", phase=phase.value, previous=before.value)

    # -- Component protocol -----------------------------------------------------------

    def is_ready(self) -> bool:
        """The prober can serve once it runs (the Pod's verdict is the admin server's);
        False again once the probing loop has ended (stopped, or died)."""
        return self._task is not None and not self._task.done()

    def is_live(self) -> bool:
        """True while the probing loop has not died."""
        return self._tasks.healthy

    def stop_accepting(self) -> None:
        """Stop probing; the record says the prober stopped (not that the app exited)."""
        self._tasks.cancel()
        with self._write_lock:
            self._stopped = True
            try:
                self.writer.set_not_ready("prober stopped")
            except OSError as exc:
                self._log.warning("record_write_failed", error=str(exc))

    async def close(self) -> None:
        """Stop the probe task."""
        await self._tasks.aclose()

    def collectors(self) -> Sequence[Any]:
        """Probe results and the record's phase."""
        return [
            metrics.CallbackCollector(
                [
                    metrics.Family(
                        "counter",
                        "probe_results",
                        "probe attempts by probe and result",
                        ("probe", "result"),
                        lambda: [
                            ((p.target.label, r), float(n))
                            for p in self.probes
                            for r, n in p.results.items()
                        ],
                    ),
                    metrics.Family(
                        "gauge",
                        "probe_passing",
                        "1 while the probe passes (after its thresholds)",
                        ("probe",),
                        lambda: [((p.target.label,), float(p.passing)) for p in self.probes],
                    ),
                    metrics.Family(
                        "gauge",
                        "record_phase",
                        "1 for the phase the prober last wrote",
                        ("phase",),
                        lambda: [
                            ((ph.value,), float(ph is self.writer.record.phase)) for ph in Phase
                        ],
                    ),
                ]
            )
        ]

    async def status(self) -> dict[str, Any]:
        """What ``GET /status`` shows: each probe's verdict after its thresholds, its
        consecutive results and last reason, the record's phase, and the config."""
        from podpatterns.runtime.status import shown, shown_config

        config = shown_config(self.config)
        config["probes"] = [shown(p.target.label) for p in self.probes]
        failing = [p.target.label for p in self.probes if not p.passing]
        return {
            "record": {
                "name": self.config.name,
                "phase": self.writer.record.phase.value,
                "seq": self.writer.record.seq,
            },
            "rounds": self.rounds,
            "probes": [
                {
                    "probe": p.target.label,
                    "passing": p.passing,
                    "successes": p.successes,
                    "failures": p.failures,
                    "last": p.last,
                    "results": dict(p.results),
                }
                for p in self.probes
            ],
            "not_ready": [] if self.is_ready() else ["the probing loop is not running"],
            "warnings": [f"probe failing: {label}" for label in failing] if self.rounds else [],
            "config": config,
        }
