"""``podpatterns wait -- CMD``: wait for peers and endpoints, then exec the command."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from podpatterns import logs
from podpatterns.commands.common import TOOL_OPTIONS, Command, Flags, command_words
from podpatterns.errors import ExitCode
from podpatterns.health.wait import WAIT_OPTIONS, WaitConfig
from podpatterns.options import resolve
from podpatterns.runtime.process import release_stop_signals

OPTIONS = (*TOOL_OPTIONS, *WAIT_OPTIONS)


@dataclass(frozen=True)
class WaitCommandConfig:
    """``podpatterns wait``'s config: what to wait for, the command, where logs go."""

    wait: WaitConfig
    command: tuple[str, ...]
    log_level: str
    log_format: str


def build(
    flags: Flags, env: Mapping[str, str], file: Mapping[str, Any], file_label: str = ""
) -> WaitCommandConfig:
    """Build from flags > env > defaults (``wait`` reads no config file).

    Raises:
        ConfigError: naming the flag or environment variable at fault.
    """
    values = resolve(OPTIONS, flags, env, file, file_label)
    return WaitCommandConfig(
        WaitConfig.from_values(values),
        command_words(flags),
        values["log_level"],
        values["log_format"],
    )


def main(config: WaitCommandConfig) -> int:
    """Wait, then ``execvp`` the command (a real exec: it takes this process's PID).

    Returns:
        The exit code when no exec happened: 0 without a command, 143 when SIGTERM or
        SIGINT ended the wait, 126/127 when the command cannot be executed.

    Raises:
        WaitTimeoutError, PeerExitedError: the wait failed (the CLI maps the exit code).
    """
    from podpatterns.health.wait import wait_all

    logs.configure(config.log_level, config.log_format)

    async def waiting() -> int:
        task = asyncio.create_task(wait_all(config.wait))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        release_stop_signals()  # held since the start; CMD must not inherit the mask
        try:
            await task
        except asyncio.CancelledError:
            logs.get("wait").info("wait_interrupted")
            return ExitCode.TERMINATED
        return ExitCode.OK

    with asyncio.Runner() as runner:
        code = runner.run(waiting())
    command = config.command
    if code != ExitCode.OK or not command:
        return code
    sys.stderr.flush()
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.stderr.write(f"podpatterns wait: cannot execute {command[0]!r}: {exc.strerror}\n")
        return ExitCode.NOT_FOUND if isinstance(exc, FileNotFoundError) else ExitCode.CANNOT_EXECUTE
    raise AssertionError("unreachable")  # pragma: no cover


COMMAND = Command(
    name="wait",
    help="wait for peers and endpoints, then exec a command",
    description="Wait until every --for target is there (in parallel, one deadline), "
    "then exec CMD (or exit 0 without one).",
    options=OPTIONS,
    build=build,
    main=main,
    takes_command=True,
    handles_signals=True,
)
