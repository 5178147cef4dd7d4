"""Run a short command (a probe, a validation, a notification) and clean up after it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence


async def run_command(argv: Sequence[str]) -> tuple[int, str]:
    """Run ``argv`` (no shell) in its own process group; return (exit code, stderr tail).

    A cancelled run kills the whole group.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        return 127, f"cannot execute {argv[0]!r}: {exc.strerror or exc}"
    try:
        _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.shield(proc.wait())
    tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
    return int(proc.returncode or 0), tail[0][:200] if tail else ""
