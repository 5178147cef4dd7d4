"""The discovery stage: which files are read, and what became of them.

(Over ~500 lines because rotation by identity, copies and the open-file bound decide
together what happens to one file; each rule needs the others' state.)

Files are found by glob and known by identity (device, inode, head fingerprint), so a
rename is a rotation, not a new file. Discovery follows a file renamed anywhere in its
directory, and opens the generations rotation made of a matched name (``access.log.1``,
``access.log-20240101``: :func:`~podpatterns.adapter.tail.rotated_name`) as soon as it sees
them, whatever the glob: a generation rotated away before it was ever opened (the reader
paused by a sink outage, the adapter stopped) is read all the same. Every file of a
followed directory is in the checkpoint once seen, read or known to hold nothing new, so a
restart tells old generations from new ones.

A copy (copytruncate) is known by its content: it starts like a file being read and holds
the bytes just before that file's read position. It is not read as a new file; once the
original is truncated, the original's reading goes on in the copy from where it was left,
with its line splitter and joiner, and the original is read again from 0. Bytes a
truncation took that no copy holds are counted when they were seen.

A file no longer under a matched name is read to its end and closed after
``--rotate-wait``. At most ``--max-open-files`` files are open: beyond that, files read to
their end and acknowledged are closed (and reopened by identity when they grow), and files
waiting for a descriptor are counted. The :class:`Tracker` owns the open files; the wiring
reads them (:mod:`podpatterns.adapter.reader`).
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from podpatterns import logs
from podpatterns.adapter.checkpoint import Checkpoint, Entry, entry_at
from podpatterns.adapter.config import AdapterConfig
from podpatterns.adapter.counters import Counters
from podpatterns.adapter.join import Joiner
from podpatterns.adapter.lines import LineSplitter
from podpatterns.adapter.tail import (
    FileKey,
    Fingerprint,
    OpenFile,
    expand,
    find_copy,
    open_as,
    pread_exact,
    rotated_name,
    same_bytes_before,
    scan,
    tail_hash,
)

FD_RESERVE = 64
"""Descriptors left for everything but log files (sockets, the checkpoint, the watch)
when ``--max-open-files`` is derived from the process's limit."""


def max_open_files(configured: int | None) -> int:
    """``--max-open-files``, or the process's descriptor limit less :data:`FD_RESERVE`."""
    if configured is not None:
        return configured
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - FD_RESERVE)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A file discovery found: where it is, how big, and whether a glob matches it."""

    path: str
    size: int
    matched: bool


@dataclass(slots=True)
class Tracked:
    """A file being read, with its line splitter, its joiner and bookkeeping.

    Attributes:
        file: the open file.
        splitter: splits its bytes into lines.
        epoch: the checkpoint epoch of what is read now (see
            :class:`~podpatterns.adapter.checkpoint.Checkpoint`).
        last_growth: monotonic time it last grew.
        rotated_at: monotonic time it was seen rotated.
        joiner: joins CRI partials or multiline records, if configured.
    """

    file: OpenFile
    splitter: LineSplitter
    epoch: int
    last_growth: float
    rotated_at: float = 0.0
    joiner: Joiner | None = None

    @property
    def key(self) -> FileKey:
        """The file's identity."""
        return self.file.key

    @property
    def path(self) -> str:
        """The name the file is read under now."""
        return self.file.path

    @property
    def file_id(self) -> str:
        """``dev:ino``, the ``file_id`` field of its records."""
        return f"{self.file.key[0]}:{self.file.key[1]}"

    @property
    def committed(self) -> int:
        """How far the checkpoint may move: to the end of the last line handed on, or the
        first line a joiner holds back."""
        held = self.joiner.held_from if self.joiner is not None else None
        return self.splitter.committed if held is None else held

    def entry(self, offset: int) -> Entry:
        """The checkpoint entry for ``offset`` of this file."""
        return entry_at(self.file, offset)


Flush = Callable[[Tracked], Awaitable[object]]
"""Hands on what a file holds (partial line, open group) before it restarts from 0."""


class Tracker:
    """Finds the files to read and follows them through rotation and truncation.

    Args:
        config: globs, ``--read-from``, ``--max-open-files``, line splitting settings.
        checkpoint: where files start and stop being tracked.
        counters: counts opens, rotations, truncations, ...
        new_joiner: makes the joiner of a newly opened file (``None`` for none).
        flush: hands on what a truncated file holds when no copy has it.
        own_paths: files the adapter writes (checkpoint, file sink, dead letters): never
            read, whatever their name.
    """

    def __init__(
        self,
        config: AdapterConfig,
        checkpoint: Checkpoint,
        counters: Counters,
        new_joiner: Callable[[], Joiner | None],
        flush: Flush,
        own_paths: Iterable[str | os.PathLike[str]] = (),
    ) -> None:
        self.config = config
        self.tracked: dict[FileKey, Tracked] = {}
        self.max_open = max_open_files(config.max_open_files)
        self._checkpoint = checkpoint
        self._counters = counters
        self._new_joiner = new_joiner
        self._flush = flush
        self._own = {os.path.abspath(p) for p in own_paths}
        self._bases: set[tuple[str, str]] = set()  # (directory, name) a glob matched
        self._copies: set[FileKey] = set()  # copies of a file still being read
        self._log = logs.get("adapter")

    # -- discovery -------------------------------------------------------------------------

    def restore(self, now: float) -> None:
        """Open the files the globs match, their rotated generations, and the files the
        checkpoint knows, wherever they are in their directory now."""
        self.discover(now, startup=True)

    def discover(self, now: float, *, startup: bool = False) -> None:
        """Glob again, follow renames within directories, open new files and generations,
        and check every open file for truncation.

        Synchronous: it hands nothing on, so it also runs while the reader waits for room
        in the queue (a sink outage), when rotation goes on regardless.
        """
        candidates, present = self._candidates()
        for key, t in list(self.tracked.items()):
            self._follow(t, candidates.get(key), now)
        waiting = 0
        first_run = startup and self._checkpoint.first_run()
        # Known files first: a new file is compared with them to tell a copy.
        ordered = sorted(
            candidates.items(), key=lambda kv: (kv[0] not in self._checkpoint.acked, kv[1].path)
        )
        for key, c in ordered:
            if key in self.tracked or key in self._copies:
                continue
            entry = self._checkpoint.acked.get(key)
            if entry is not None:
                stopped = self._checkpoint.stopped_at(key)
                if stopped is None:
                    continue  # its last batches are not acknowledged yet
                if c.size == stopped and (not c.matched or len(self.tracked) >= self.max_open):
                    continue  # nothing new: reopened by identity when it grows
            if not self._room(now):
                waiting += 1
                continue
            if entry is not None:
                self._resume(c, entry, now)
            else:
                self._new(key, c, now, first_run=first_run)
        if waiting:
            self._counters.open_deferred += waiting
            self._log.warning(
                "open_files_limited", limit=self.max_open, open=len(self.tracked), waiting=waiting
            )
        self._copies &= present
        if not startup:
            self._checkpoint.prune(self.tracked.keys() | present)

    def _candidates(self) -> tuple[dict[FileKey, Candidate], set[FileKey]]:
        """The files to follow, and every file found in the directories followed."""
        own = self._own
        found = {k: p for k, p in expand(self.config.path).items() if os.path.abspath(p) not in own}
        for path in found.values():
            self._bases.add((os.path.dirname(path) or ".", os.path.basename(path)))
        bases: dict[str, list[str]] = {}
        for directory, name in self._bases:
            bases.setdefault(directory, []).append(name)
        directories = set(bases)
        directories.update(os.path.dirname(t.path) or "." for t in self.tracked.values())
        directories.update(os.path.dirname(e.path) or "." for e in self._checkpoint.acked.values())
        listing: dict[FileKey, tuple[str, int]] = {}
        for directory in directories:
            for key, item in scan(directory).items():
                listing.setdefault(key, item)
        out: dict[FileKey, Candidate] = {}
        for key, path in found.items():
            size = listing[key][1] if key in listing else _size(path)
            if size is not None:
                out[key] = Candidate(path, size, True)
        known = self._checkpoint.acked
        for key, (path, size) in listing.items():
            if key in out or os.path.abspath(path) in own:
                continue
            name = os.path.basename(path)
            if (
                key in self.tracked
                or key in known
                or any(rotated_name(name, b) for b in bases.get(os.path.dirname(path) or ".", ()))
            ):
                out[key] = Candidate(path, size, False)
        return out, set(listing) | set(found)

    def _follow(self, t: Tracked, c: Candidate | None, now: float) -> None:
        """Keep an open file's name current; notice rotation and truncation."""
        f = t.file
        if c is not None:
            old = f.path
            f.path = c.path
            if c.matched:
                f.rotated = False
            elif not f.rotated:
                self._rotated(t, old, now)
        elif not f.rotated:  # deleted, or moved out of the directories followed
            self._rotated(t, f.path, now)
        try:
            truncated = f.truncated()
        except OSError:
            return
        if truncated:
            # What cannot go on in a copy is handed on by the reader (Tracker.truncated).
            self._continue_in_copy(t, now)

    def _rotated(self, t: Tracked, old: str, now: float) -> None:
        t.file.rotated = True
        t.rotated_at = now
        self._counters.rotations += 1
        # Records read from now on carry the name the file has now: the new file at the
        # old name starts again at offset 0, and (file, offset) must stay a key.
        self._log.info("file_rotated", path=t.file.path, was=old)

    def _room(self, now: float) -> bool:
        """True when one more file may be opened; closes an idle file to make room."""
        if len(self.tracked) < self.max_open:
            return True
        idle = [t for t in self.tracked.values() if self._closable(t)]
        if not idle:
            return False
        self.close(min(idle, key=lambda t: t.last_growth), "open_files_limit")
        return True

    def _closable(self, t: Tracked) -> bool:
        """Read to its end, nothing held, everything acknowledged: it can be reopened by
        identity when it grows, losing nothing."""
        f = t.file
        entry = self._checkpoint.acked.get(f.key)
        return (
            f.offset >= f.size
            and t.splitter.held == 0
            and (t.joiner is None or t.joiner.held_from is None)
            and entry is not None
            and entry.offset == f.offset
        )

    def _resume(self, c: Candidate, entry: Entry, now: float) -> None:
        """Reopen a file the checkpoint knows, where it was left, if it is still that file."""
        try:
            fd = open_as(c.path, entry.key)
        except OSError as exc:
            self._open_failed(c.path, exc)
            return
        if fd is None:
            return  # renamed since the listing: the next pass finds it by its new name
        try:
            head = Fingerprint(entry.head_len, entry.head_hash)
            same_head = head.matches(fd)
            size = os.fstat(fd).st_size
            intact = (
                same_head
                and size >= entry.offset
                and tail_hash(fd, entry.offset) == entry.tail_hash
            )
        except OSError:
            return
        finally:
            os.close(fd)
        if intact:
            self.open(c.path, entry.offset, now, rotated=not c.matched, key=entry.key)
            return
        # The generation the checkpoint knows is no longer in this inode: truncated
        # (copytruncate while we were stopped: look for its copy), or another file.
        directory = os.path.dirname(c.path) or "."
        copy = self._copy_of_entry(directory, entry)
        # The copy's reading starts where the original's was acknowledged.
        if (
            copy is not None
            and self.open(copy[0], entry.offset, now, rotated=True, key=copy[2]) is not None
        ):
            self._counters.truncated_bytes_recovered += copy[1] - entry.offset
        if same_head or copy is not None:
            self._counters.truncations += 1
        else:
            self._counters.replaced += 1
        self._done_copies(directory, head, entry.offset, not_key=entry.key)
        self._log.warning(
            "file_truncated" if same_head or copy is not None else "file_replaced",
            path=c.path,
            offset=entry.offset,
            size=size,
            copy=copy[0] if copy else None,
            at="startup",
        )
        self._checkpoint.drop_loaded(entry.key)
        self.open(c.path, 0, now, rotated=not c.matched, key=entry.key)

    def _copy_of_entry(self, directory: str, entry: Entry) -> tuple[str, int, FileKey] | None:
        """A file in ``directory`` that holds the generation ``entry`` describes, up to
        its offset: same head, and the same bytes just before the offset."""
        return find_copy(
            directory,
            Fingerprint(entry.head_len, entry.head_hash),
            entry.offset,
            lambda fd: tail_hash(fd, entry.offset) == entry.tail_hash,
            lambda key: key == entry.key or key in self.tracked,
        )

    def _done_copies(self, directory: str, head: Fingerprint, upto: int, not_key: FileKey) -> None:
        """Record copies of a generation read up to ``upto`` that hold nothing more (a
        copy taken before the last bytes were written): never read as new files."""
        if head.length == 0:
            return
        acked = self._checkpoint.acked
        for key, (path, size) in scan(directory).items():
            if size > upto or key == not_key or key in self.tracked or key in acked:
                continue
            entry = _entry_if_head(path, key, size, head)
            if entry is not None:
                self._copies.discard(key)
                self._checkpoint.done(entry)

    def _new(self, key: FileKey, c: Candidate, now: float, *, first_run: bool) -> None:
        """A file seen for the first time: a copy of one being read, history, or new.

        Everything is judged on the file the listing found, opened by name and identity:
        a rotation since the listing may have given its name to a file being read, which
        would pass for its copy (and the generation would never be read).
        """
        try:
            fd = open_as(c.path, key)
        except OSError as exc:
            self._open_failed(c.path, exc)
            return
        if fd is None:
            return  # renamed since the listing: the next pass finds it by its new name
        try:
            if self._copy_of_open(fd, c.size):
                self._copies.add(key)
                return
            if first_run and not c.matched and self.config.read_from == "end":
                # --read-from end: generations rotated before the adapter ever ran are
                # history, not read (with beginning they are read, like the matched file).
                head = Fingerprint.of(fd)
                try:
                    tail = tail_hash(fd, c.size)
                except OSError:
                    tail = ""
                self._checkpoint.done(
                    Entry(c.path, key[0], key[1], c.size, head.length, head.hash, tail)
                )
                return
        finally:
            os.close(fd)
        start = None if first_run and self.config.read_from == "end" else 0
        self.open(c.path, start, now, rotated=not c.matched, key=key)

    def _copy_of_open(self, fd: int, size: int) -> bool:
        """True when the open file ``fd`` (``size`` bytes) is a byte copy of (the start of)
        a file being read."""
        try:
            for t in self.tracked.values():
                f = t.file
                if f.fingerprint.length == 0 or not f.fingerprint.matches(fd):
                    continue
                upto = min(size, f.stat_size())
                if upto >= f.fingerprint.length and same_bytes_before(fd, f.fd, upto):
                    return True
        except OSError:
            return False
        return False

    def open(
        self,
        path: str,
        offset: int | None,
        now: float,
        *,
        rotated: bool = False,
        key: FileKey | None = None,
    ) -> Tracked | None:
        """Start reading ``path`` at ``offset`` (``None``: at its end).

        Args:
            path: the file.
            offset: where to start.
            now: monotonic time.
            rotated: it is under no name a glob matches (closed once idle).
            key: the identity a directory listing gave ``path``: nothing is opened if the
                name is another file's now (a rotation renamed it since).

        Returns:
            The tracked file (the one already open when it is a second name for it), or
            ``None`` when it cannot be opened (logged and counted) or ``path`` is no longer
            ``key`` (found by its new name at the next pass).
        """
        try:
            if key is None:
                f: OpenFile | None = OpenFile.open(path, offset)
            else:
                f = OpenFile.open_listed(path, key, offset)
        except OSError as exc:
            self._open_failed(path, exc)
            return None
        if f is None:
            return None
        old = self.tracked.get(f.key)
        if old is not None:  # already open (a second name for one file)
            f.close()
            return old
        epoch = self._checkpoint.start(f.key, entry_at(f, f.offset))
        t = Tracked(
            f,
            LineSplitter(self.config.delimiter, self.config.max_line_bytes, f.offset),
            epoch,
            now,
            joiner=self._new_joiner(),
        )
        if rotated:
            f.rotated = True
            t.rotated_at = now
        self.tracked[f.key] = t
        self._copies.discard(f.key)
        self._counters.files_opened += 1
        self._log.info("file_opened", path=path, offset=f.offset)
        return t

    def _open_failed(self, path: str, exc: OSError) -> None:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            # Out of descriptors (fewer than --max-open-files): tried again next pass.
            self._counters.open_deferred += 1
            return
        self._counters.open_errors += 1
        self._log.warning("file_open_failed", path=path, error=str(exc))

    # -- truncation --------------------------------------------------------------------------

    def _continue_in_copy(self, t: Tracked, now: float) -> bool:
        """After a copytruncate, go on reading ``t``'s generation in its copy.

        The copy holds the same bytes, so ``t`` keeps its line splitter, its joiner and its
        epoch (acknowledgements of lines read from the original move the copy's
        checkpoint); the original is read again from 0 as a new generation.

        Returns:
            False when no copy holds what was read (the reader hands on what ``t`` holds
            and restarts it: :meth:`truncated`).
        """
        f = t.file
        found = self._copy_of(f)
        if found is None:
            return False
        path, size, key = found
        try:
            copy = OpenFile.open_listed(path, key, f.offset)
        except OSError:
            return False
        if copy is None:
            return False
        if copy.recent != f.recent or (
            copy.key in self.tracked and not self._adopt(self.tracked[copy.key], t)
        ):
            copy.close()
            return False
        lost = max(0, f.seen - size)
        recovered = size - f.offset
        self._counters.truncations += 1
        self._counters.truncated_bytes_lost += lost
        self._counters.truncated_bytes_recovered += recovered
        self._log.warning(
            "file_truncated",
            path=f.path,
            offset=f.offset,
            copy=path,
            recovered_bytes=recovered,
            lost_bytes=lost,
            at="running",
        )
        original = f
        del self.tracked[original.key]
        copy.seen = size
        copy.rotated = True
        t.file = copy
        t.rotated_at = now
        t.last_growth = now
        self.tracked[copy.key] = t
        self._checkpoint.moved(original.key, t.epoch, copy.key, path)
        original.restart()
        original.rotated = False
        self.tracked[original.key] = Tracked(
            original,
            LineSplitter(self.config.delimiter, self.config.max_line_bytes, 0),
            self._checkpoint.start(original.key, entry_at(original, 0)),
            now,
            joiner=self._new_joiner(),
        )
        return True

    def _copy_of(self, f: OpenFile) -> tuple[str, int, FileKey] | None:
        """``(path, size, identity)`` of the largest file in ``f``'s directory that holds its
        generation up to its read position (a copytruncate copy), if any."""
        recent = f.recent
        return find_copy(
            os.path.dirname(f.path) or ".",
            f.fingerprint,
            f.offset,
            lambda fd: pread_exact(fd, len(recent), f.offset - len(recent)) == recent,
            lambda key: key == f.key,
        )

    def _adopt(self, other: Tracked, t: Tracked) -> bool:
        """Take over ``other``, a copy of ``t``'s generation that discovery opened as a new
        file (it saw the copy before it was written, still empty), if nothing of it was
        read yet: ``t``'s reading then goes on in it, and nothing is read twice."""
        if (
            other is t
            or other.file.offset != 0
            or other.splitter.held
            or (other.joiner is not None and other.joiner.held_from is not None)
        ):
            return False
        del self.tracked[other.key]
        other.file.close()
        self._counters.files_closed += 1
        self._log.info("file_closed", path=other.path, reason="copy", offset=0)
        return True

    async def truncated(self, t: Tracked, now: float) -> None:
        """Continue a truncated file from 0; its generation goes on in a copy if there is one."""
        if self.tracked.get(t.file.key) is not t or self._continue_in_copy(t, now):
            return
        f = t.file
        await self._flush(t)
        # Bytes seen in the file and never read are gone, but for those a file being
        # read holds (a copy read as a file of its own: it holds the bytes up to its size).
        held = self._copy_of(f)
        lost = max(0, f.seen - max(f.offset, held[1] if held is not None else 0))
        self._counters.truncations += 1
        self._counters.truncated_bytes_lost += lost
        self._log.warning(
            "file_truncated", path=f.path, offset=f.offset, lost_bytes=lost, copy=None, at="running"
        )
        directory = os.path.dirname(f.path) or "."
        self._done_copies(directory, f.fingerprint, f.offset, not_key=f.key)
        f.restart()
        t.splitter.reset(0)
        if t.joiner is not None:
            t.joiner.restart()
        t.epoch = self._checkpoint.start(f.key, entry_at(f, 0))

    # -- closing -------------------------------------------------------------------------------

    def close(self, t: Tracked, reason: str) -> None:
        """Stop reading ``t`` (rotated and read to its end, idle at the open-file bound, or
        no longer readable)."""
        self.tracked.pop(t.file.key, None)
        try:
            deleted = t.file.deleted()
        except OSError:
            deleted = False
        t.file.close()
        self._checkpoint.closed(t.file.key, t.splitter.committed, deleted=deleted)
        self._counters.files_closed += 1
        self._log.info("file_closed", path=t.file.path, reason=reason, offset=t.file.offset)

    def close_all(self) -> None:
        """Close every file (the adapter is closing; nothing is recorded)."""
        for t in self.tracked.values():
            t.file.close()
        self.tracked.clear()


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _entry_if_head(path: str, key: FileKey, size: int, head: Fingerprint) -> Entry | None:
    """The entry of file ``key`` read to ``size`` if ``path`` still names it and it starts
    like ``head`` (``None`` otherwise, or when it cannot be read)."""
    try:
        fd = open_as(path, key)
    except OSError:
        return None
    if fd is None:
        return None
    try:
        if not head.matches(fd):
            return None
        return Entry(path, key[0], key[1], size, head.length, head.hash, tail_hash(fd, size))
    except OSError:
        return None
    finally:
        os.close(fd)
