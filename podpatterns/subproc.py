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
    code, _, tail = await _run(argv, capture=False)
    return code, tail


async def run_output(argv: Sequence[str]) -> tuple[int, bytes, str]:
    """:func:`run_command` that also returns what the command wrote on stdout (a
    token, a value); return (exit code, stdout, stderr tail)."""
    return await _run(argv, capture=True)


async def _run(argv: Sequence[str], capture: bool) -> tuple[int, bytes, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if capture else asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        return 127, b"", f"cannot execute {argv[0]!r}: {exc.strerror or exc}"
    try:
        out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.shield(proc.wait())
    tail = err.decode(errors="replace").strip().splitlines()[-1:] if err else []
    return int(proc.returncode or 0), out or b"", tail[0][:200] if tail else ""
