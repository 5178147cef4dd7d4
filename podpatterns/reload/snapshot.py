"""The content of watched directories as one hash: what ``reload`` decides on.

Not mtimes and not event types: a Kubernetes ConfigMap update is a ``..data`` symlink
swap that inotify reports on the wrong names, a git-sync update is a symlink retarget,
and an editor may rewrite a file with identical bytes. Two snapshots with the same hash
are the same configuration, however the bytes got there.

Walk rules: symlinks are followed (to files and directories, with loop protection),
entries whose name starts with a dot are skipped (Kubernetes' ``..data`` and
``..2024_...`` internals, editors' and writers' temp files: their content is reached
through the visible names that point into them).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

MAX_DEPTH = 16
CHUNK = 1 << 16


class SnapshotError(OSError):
    """The directories changed while they were read (retry), or cannot be read."""


@dataclass(frozen=True)
class Snapshot:
    """One reading of the watched directories.

    Attributes:
        digest: SHA-256 over every visible file's relative path and content.
        files: how many files were read.
        size: how many bytes were read.
    """

    digest: str
    files: int
    size: int

    @property
    def short(self) -> str:
        """The first 12 hex digits, for logs."""
        return self.digest[:12]


def take(roots: Sequence[Path]) -> Snapshot:
    """Read every visible file under ``roots`` and hash them in a stable order.

    Raises:
        SnapshotError: a root is missing, or a file vanished or failed to read while it
            was being read (a swap in progress): the caller retries.
    """
    total = hashlib.sha256()
    files = size = 0
    for index, root in enumerate(roots):
        entries: list[tuple[str, Path]] = []
        _collect(root, "", entries, set(), 0)
        for rel, path in sorted(entries):
            digest, n = _hash_file(path)
            total.update(f"{index}\0{rel}\0{digest}\n".encode())
            files += 1
            size += n
    return Snapshot(total.hexdigest(), files, size)


def _collect(
    directory: Path,
    prefix: str,
    out: list[tuple[str, Path]],
    seen: set[tuple[int, int]],
    depth: int,
) -> None:
    try:
        st = os.stat(directory)
        if (st.st_dev, st.st_ino) in seen or depth > MAX_DEPTH:
            return  # a symlink loop, or absurdly deep
        seen = seen | {(st.st_dev, st.st_ino)}
        names = os.listdir(directory)
    except OSError as exc:
        raise SnapshotError(f"cannot list {directory}: {exc.strerror or exc}") from None
    for name in names:
        if name.startswith("."):
            continue
        path = directory / name
        rel = f"{prefix}{name}"
        try:
            is_dir = path.is_dir()  # follows symlinks
            exists = is_dir or path.is_file()
        except OSError as exc:
            raise SnapshotError(f"cannot stat {path}: {exc.strerror or exc}") from None
        if is_dir:
            _collect(path, rel + "/", out, seen, depth + 1)
        elif exists or path.is_symlink():
            out.append((rel, path))  # a dangling symlink is hashed by its target


def _hash_file(path: Path) -> tuple[str, int]:
    if path.is_symlink() and not path.exists():
        # dangling: mid-swap (the debounce reads again) or really broken (stable)
        return "dangling:" + os.readlink(path), 0
    digest = hashlib.sha256()
    n = 0
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
                n += len(chunk)
    except OSError as exc:
        raise SnapshotError(f"cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest(), n
