"""Crash-safe file replacement: readers see the old content or the new, never a mix.

Used by the adapter's checkpoints and the health records (the shared-volume protocol
of the Pod): temp file in the same directory, write, fsync, rename over the target,
fsync the directory so the rename itself survives a node crash.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def replace_atomically(
    target: Path,
    data: bytes,
    tmp: Path,
    *,
    keep_previous: Path | None = None,
    mode: int | None = None,
) -> None:
    """Replace ``target`` with ``data`` crash-safely.

    Args:
        target: the file to replace (created if missing).
        data: the new content.
        tmp: the temporary file to write first; must be in ``target``'s directory (a
            rename is atomic only within one filesystem). Removed on failure.
        keep_previous: if given and ``target`` exists, ``target`` is first renamed to
            this path (an earlier generation to fall back to).
        mode: the permission bits of the new file, whatever the process's umask (set
            with ``fchmod`` before the rename, so no reader ever sees other bits);
            ``None``: ``0o644`` less the umask.

    Raises:
        OSError: the directory is missing or not writable, or the disk is full.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(tmp, flags, 0o644)
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if keep_previous is not None and target.exists():
            os.replace(target, keep_previous)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_directory(target.parent)


def fsync_directory(directory: Path) -> None:
    """fsync a directory, so that renames and creations in it are durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
