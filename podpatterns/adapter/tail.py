"""Files: discovery by glob, identity, reading, rotation and truncation checks.

Identity of a file is its device and inode *plus* a fingerprint of its head (a hash of
its first bytes, however few there are: it works from the first byte) and, at a
checkpointed offset, a hash of the bytes just before that offset. Together they tell a
file we know from a different file that got the same inode (deleted and recreated) or
was truncated and rewritten while we were not looking.
"""

from __future__ import annotations

import glob
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HEAD_BYTES = 256
"""The head fingerprint covers up to this many first bytes of a file."""

TAIL_BYTES = 64
"""The tail check covers up to this many bytes before an offset."""

FileKey = tuple[int, int]
"""(st_dev, st_ino) of a file."""


def digest(data: bytes) -> str:
    """A short hex digest of ``data``."""
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def pread_exact(fd: int, n: int, offset: int) -> bytes:
    """Read up to ``n`` bytes at ``offset`` (fewer only at the end of the file)."""
    chunks = []
    while n > 0:
        chunk = os.pread(fd, n, offset)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """Hash of the first ``length`` bytes of a file (``length`` <= :data:`HEAD_BYTES`)."""

    length: int
    hash: str

    @classmethod
    def of(cls, fd: int) -> Fingerprint:
        """The fingerprint of the open file ``fd`` as it is now."""
        head = pread_exact(fd, HEAD_BYTES, 0)
        return cls(len(head), digest(head))

    def matches(self, fd: int) -> bool:
        """True when the open file ``fd`` starts with the same bytes."""
        head = pread_exact(fd, self.length, 0)
        return len(head) == self.length and digest(head) == self.hash


def tail_hash(fd: int, offset: int) -> str:
    """Hash of the (up to :data:`TAIL_BYTES`) bytes just before ``offset``."""
    start = max(0, offset - TAIL_BYTES)
    return digest(pread_exact(fd, offset - start, start))


def expand(patterns: tuple[str, ...]) -> dict[FileKey, str]:
    """Regular files matched by the globs now, by identity (``**`` recurses)."""
    found: dict[FileKey, str] = {}
    for pattern in patterns:
        for name in glob.iglob(pattern, recursive=True):
            try:
                st = os.stat(name)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.setdefault((st.st_dev, st.st_ino), name)
    return found


def watch_roots(patterns: tuple[str, ...]) -> list[Path]:
    """The deepest existing directories that hold every file the globs can match.

    A directory that does not exist yet is replaced by its nearest existing parent (so
    its creation is seen), but never by the filesystem root: watching ``/`` recursively
    would cost more than it gives, so such a glob relies on the periodic reconcile.
    """
    roots: set[Path] = set()
    for pattern in patterns:
        parts = Path(pattern).parts
        fixed: list[str] = []
        for part in parts[:-1]:
            if glob.has_magic(part):
                break
            fixed.append(part)
        root = Path(*fixed) if fixed else Path(".")
        while not root.is_dir() and root != root.parent:
            root = root.parent
        if root != root.parent:
            roots.add(root)
    # A root inside another is covered by the outer (recursive) watch.
    return sorted(r for r in roots if not any(o != r and o in r.parents for o in roots))


def find_by_key(directory: str, key: FileKey) -> str | None:
    """The path of the file with identity ``key`` in ``directory`` (rotated names), if any."""
    try:
        with os.scandir(directory) as it:
            for entry in it:
                try:
                    if entry.inode() == key[1] and entry.is_file(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        if st.st_dev == key[0]:
                            return entry.path
                except OSError:
                    continue
    except OSError:
        return None
    return None


def open_as(path: str, key: FileKey) -> int | None:
    """Open ``path`` read-only if it is still the file ``key`` names.

    A name read from a directory listing may belong to another file by the time it is
    opened: one rotation renames every generation up by one (``access.log.1`` becomes
    ``access.log.2``, ``access.log`` becomes ``access.log.1``), so a name listed for one
    generation can name the next, newer one a moment later.

    Returns:
        The open descriptor (the caller closes it), or ``None`` when the name is another
        file's now (the file is found under its new name by the next listing).

    Raises:
        OSError: ``path`` cannot be opened.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if (st.st_dev, st.st_ino) != key:
        os.close(fd)
        return None
    return fd


def scan(directory: str) -> dict[FileKey, tuple[str, int]]:
    """The regular files in ``directory`` (not followed through symlinks): identity ->
    (path, size). Empty when it cannot be read."""
    out: dict[FileKey, tuple[str, int]] = {}
    try:
        with os.scandir(directory) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    out[(st.st_dev, st.st_ino)] = (entry.path, st.st_size)
    except OSError:
        return {}
    return out


ROTATED_SEPARATORS = (".", "-", "_")
"""What follows a log's name in the names rotation gives it (``access.log.1``,
``access.log-20240101``)."""

COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".lzma", ".z", ".zip", ".br")
"""Suffixes of compressed generations: their bytes are not the log's lines."""


def rotated_name(name: str, base: str) -> bool:
    """True when ``name`` is a name rotation gives a file called ``base`` (and not a
    compressed one)."""
    return (
        len(name) > len(base) + 1
        and name.startswith(base)
        and name[len(base)] in ROTATED_SEPARATORS
        and not name.lower().endswith(COMPRESSED)
    )


def same_bytes_before(fd_a: int, fd_b: int, offset: int) -> bool:
    """True when the (up to :data:`TAIL_BYTES`) bytes before ``offset`` are equal in both."""
    start = max(0, offset - TAIL_BYTES)
    a = pread_exact(fd_a, offset - start, start)
    return len(a) == offset - start and a == pread_exact(fd_b, offset - start, start)


def find_copy(
    directory: str,
    fingerprint: Fingerprint,
    offset: int,
    same_tail: Callable[[int], bool],
    skip: Callable[[FileKey], bool],
) -> tuple[str, int, FileKey] | None:
    """A copy, in ``directory``, of a file read up to ``offset`` (copytruncate's copy).

    A copy starts like ``fingerprint``, holds at least ``offset`` bytes and, just before
    ``offset``, the bytes read last (``same_tail(fd)`` says so, from the bytes kept in
    memory or a checkpointed hash): reading it from ``offset`` continues where the
    original was left.

    Args:
        directory: where to look.
        fingerprint: the original's head.
        offset: how far the original was read.
        same_tail: True when the open file holds the original's bytes before ``offset``.
        skip: files not to consider (the original itself, files already followed).

    Returns:
        ``(path, size, identity)`` of the largest such copy, or ``None``.
    """
    best: tuple[str, int, FileKey] | None = None
    for key, (path, size) in scan(directory).items():
        if skip(key) or size < offset or (best is not None and size <= best[1]):
            continue
        try:
            fd = open_as(path, key)  # ``skip`` judged the file listed, not the name's next
        except OSError:
            continue
        if fd is None:
            continue
        try:
            if fingerprint.matches(fd) and same_tail(fd):
                best = (path, size, key)
        except OSError:
            continue
        finally:
            os.close(fd)
    return best


class OpenFile:
    """One file being read: its descriptor, identity and read position.

    Args:
        path: the name it was opened by (updated when it is seen under another name).
        fd: an open read-only descriptor (owned: closed by :meth:`close`).
        offset: where reading starts.
    """

    def __init__(self, path: str, fd: int, offset: int) -> None:
        st = os.fstat(fd)
        self.key: FileKey = (st.st_dev, st.st_ino)
        self.path = path
        self.fd = fd
        self.offset = offset
        self.size = st.st_size
        self.fingerprint = Fingerprint.of(fd)
        self.recent = pread_exact(fd, min(offset, TAIL_BYTES), max(0, offset - TAIL_BYTES))
        self.seen = max(offset, self.size)  # largest size seen of this generation
        self.rotated = False  # no longer at a path the globs match
        self.closed = False

    @classmethod
    def open(cls, path: str, offset: int | None = None) -> OpenFile:
        """Open ``path``; ``offset`` None means at its end."""
        return cls._owning(path, os.open(path, os.O_RDONLY | os.O_CLOEXEC), offset)

    @classmethod
    def open_listed(cls, path: str, key: FileKey, offset: int | None = None) -> OpenFile | None:
        """Open ``path`` as :meth:`open` does if it is still the file ``key`` names (a
        directory listing's name and identity, see :func:`open_as`); ``None`` if not.

        Raises:
            OSError: ``path`` cannot be opened.
        """
        fd = open_as(path, key)
        return None if fd is None else cls._owning(path, fd, offset)

    @classmethod
    def _owning(cls, path: str, fd: int, offset: int | None) -> OpenFile:
        try:
            if offset is None:
                offset = os.fstat(fd).st_size
            return cls(path, fd, offset)
        except BaseException:
            os.close(fd)
            raise

    def read(self, n: int) -> bytes | None:
        """Read up to ``n`` bytes at the read position and advance it.

        The bytes just before the position are read again in the same call and compared
        with those read last time (and the head, within the first :data:`HEAD_BYTES`), so
        a file truncated and rewritten between two looks is never read from the middle of
        foreign data, nor a new generation taken for the one read from 0.

        Returns:
            The bytes (empty at the end of the file), or ``None`` when the file was
            truncated or rewritten under us.
        """
        k = len(self.recent)
        if self.offset < self.fingerprint.length and not self.fingerprint.matches(self.fd):
            # Near the start the head is the check: at 0 there are no bytes before.
            return None
        data = os.pread(self.fd, n + k, self.offset - k)
        if k:
            if data[:k] != self.recent:
                return None
            data = data[k:]
        if data:
            self.offset += len(data)
            self.seen = max(self.seen, self.offset)
            self.recent = (self.recent + data)[-TAIL_BYTES:]
            if self.fingerprint.length < HEAD_BYTES:
                self.fingerprint = Fingerprint.of(self.fd)
        return data

    def stat_size(self) -> int:
        """The file's size now (also remembered in :attr:`size`)."""
        self.size = os.fstat(self.fd).st_size
        return self.size

    def deleted(self) -> bool:
        """True when no name links to the file any more."""
        return os.fstat(self.fd).st_nlink == 0

    def truncated(self) -> bool:
        """True when the file is shorter than what was read, or was rewritten under us
        (the bytes before the read position or its head differ).

        Otherwise the size is remembered in :attr:`seen`: bytes known to have been in
        this generation, counted as lost if a truncation takes them unread. A head
        shorter than :data:`HEAD_BYTES` (a file read again from 0 while it was empty, and
        not read since: reading is paused) is taken again from the bytes there now, so
        that the next generation is told from this one: with an empty head every check
        passes, and a later generation's size would count in :attr:`seen` (its bytes,
        read from its copy, would then be counted lost at the next truncation).
        """
        size = self.stat_size()
        if size < self.offset:
            return True
        before = pread_exact(self.fd, len(self.recent), self.offset - len(self.recent))
        if before != self.recent or not self.fingerprint.matches(self.fd):
            return True
        if self.fingerprint.length < HEAD_BYTES and size > self.fingerprint.length:
            self.fingerprint = Fingerprint.of(self.fd)
        self.seen = max(self.seen, size)
        return False

    def restart(self) -> None:
        """Continue from offset 0 (after a truncation)."""
        self.offset = 0
        self.recent = b""
        self.fingerprint = Fingerprint.of(self.fd)
        self.size = self.seen = os.fstat(self.fd).st_size

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if not self.closed:
            self.closed = True
            os.close(self.fd)
