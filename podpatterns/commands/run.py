"""``podpatterns run -- CMD``: supervise the main process, write its record and tombstone.

The supervisor's documented signal forwarding: every forwarded signal and SIGCHLD are
blocked first and taken with ``sigtimedwait``, so none can arrive in a window where no
handler exists, and one that arrives before the command started stays pending and ends
in a tombstone (see docs/health.md#run).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from podpatterns import logs
from podpatterns.commands.common import TOOL_OPTIONS, Command, Flags, command_words
from podpatterns.health.supervisor import RUN_OPTIONS, RunConfig
from podpatterns.options import resolve

OPTIONS = (*TOOL_OPTIONS, *RUN_OPTIONS)

PROBE_PERIOD = 0.05
"""How often the loop looks at ``--ready-probe``'s result while the command is starting
(the record is written only when that result changes or a heartbeat is due)."""


@dataclass(frozen=True)
class RunCommandConfig:
    """``podpatterns run``'s config: the supervisor's and where its own logs go."""

    run: RunConfig
    log_level: str
    log_format: str


def build(
    flags: Flags, env: Mapping[str, str], file: Mapping[str, Any], file_label: str = ""
) -> RunCommandConfig:
    """Build from flags > env > defaults (``run`` reads no config file).

    Raises:
        ConfigError: naming the flag or environment variable at fault.
    """
    values = resolve(OPTIONS, flags, env, file, file_label)
    return RunCommandConfig(
        RunConfig.from_values(values, command_words(flags)),
        values["log_level"],
        values["log_format"],
    )


def main(config: RunCommandConfig) -> int:
    """Run the command under the :class:`~podpatterns.health.supervisor.Supervisor`;
    its exit code (128+N when killed by signal N)."""
    from podpatterns.health.supervisor import FORWARDED, STOPPING, Supervisor, become_subreaper

    waited = FORWARDED | {signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    logs.configure(config.log_level, config.log_format)
    sup = Supervisor(config.run)
    if os.getpid() != 1:
        become_subreaper()
    sup.write_starting()
    early = signal.sigpending() & STOPPING
    if early:
        return sup.stopped_before_start(min(early))
    failed = sup.spawn()
    if failed is not None:
        return failed
    next_tick = time.monotonic()
    while True:
        probing = sup.config.ready_probe is not None and sup.writer.record.phase.value == "starting"
        period = PROBE_PERIOD if probing else sup.config.heartbeat
        left = next_tick + period - time.monotonic()
        info = signal.sigtimedwait(waited, max(left, 0.0)) if left > 0 else None
        if info is None:
            code = sup.reap()  # a missed SIGCHLD must not leave us waiting forever
            if code is not None:
                return code
            sup.tick()
            next_tick = time.monotonic()
        elif info.si_signo == signal.SIGCHLD:
            code = sup.reap()
            if code is not None:
                return code
        else:
            sup.forward(info.si_signo)


COMMAND = Command(
    name="run",
    help="supervise the main process and write its health record and tombstone",
    description="Run CMD, write HEALTH_DIR/NAME.json (starting, ready, exited), forward "
    "every catchable signal to it and exit with its exit code (128+N when killed by "
    "signal N).",
    options=OPTIONS,
    build=build,
    main=main,
    takes_command=True,
    handles_signals=True,
)
