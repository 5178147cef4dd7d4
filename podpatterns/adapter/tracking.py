"""The discovery stage: which files are read, and what became of them.

Files are found by glob and known by identity (device, inode, head fingerprint), so a
rename is a rotation, not a new file. A file no longer under a matched name is read to its
end and closed after ``--rotate-wait``; a truncated file continues from 0, and after a
copytruncate the copy is read for what the truncation took. The :class:`Tracker` owns the
open files; the wiring reads them (:mod:`podpatterns.adapter.reader`).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
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
    find_by_key,
    find_copy,
    tail_hash,
)


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
        config: globs, ``--read-from``, line splitting settings.
        checkpoint: where files start and stop being tracked.
        counters: counts opens, rotations, truncations, ...
        new_joiner: makes the joiner of a newly opened file (``None`` for none).
        flush: hands on what a truncated file holds when no copy has it.
    """

    def __init__(
        self,
        config: AdapterConfig,
        checkpoint: Checkpoint,
        counters: Counters,
        new_joiner: Callable[[], Joiner | None],
        flush: Flush,
    ) -> None:
        self.config = config
        self.tracked: dict[FileKey, Tracked] = {}
        self._checkpoint = checkpoint
        self._counters = counters
        self._new_joiner = new_joiner
        self._flush = flush
        self._log = logs.get("adapter")

    # -- startup -----------------------------------------------------------------------

    def restore(self, now: float) -> None:
        """Open the files the globs match and those the checkpoint knows under other names."""
        found = expand(self.config.path)
        acked = self._checkpoint.acked
        first_run = self._checkpoint.first_run()
        known = dict(acked)
        for key, path in sorted(found.items(), key=lambda kv: kv[1]):
            entry = known.pop(key, None)
            if entry is not None:
                self._resume(path, entry, now, rotated=False)
            else:
                start = None if first_run and self.config.read_from == "end" else 0
                self.open(path, start, now)
        for key, entry in known.items():
            # Not under a matched name: rotated (renamed) while we were down?
            rotated_path = find_by_key(os.path.dirname(entry.path) or ".", key)
            if rotated_path is None:
                self._checkpoint.drop_loaded(key)
                continue
            self._resume(rotated_path, entry, now, rotated=True)

    def _resume(self, path: str, entry: Entry, now: float, *, rotated: bool) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self._counters.open_errors += 1
            self._log.warning("file_open_failed", path=path, error=str(exc))
            return
        try:
            same_head = Fingerprint(entry.head_len, entry.head_hash).matches(fd)
            size = os.fstat(fd).st_size
            intact = (
                same_head
                and size >= entry.offset
                and tail_hash(fd, entry.offset) == entry.tail_hash
            )
        except OSError:
            os.close(fd)
            return
        os.close(fd)
        if intact:
            offset = entry.offset
        elif same_head:
            self._counters.truncations += 1
            self._log.warning(
                "file_truncated", path=path, offset=entry.offset, size=size, at="startup"
            )
            offset = 0
        else:
            if rotated:  # a stranger that got the inode of a rotated file: not ours
                self._checkpoint.drop_loaded(entry.key)
                return
            self._counters.replaced += 1
            self._log.warning("file_replaced", path=path, offset=entry.offset)
            offset = 0
        t = self.open(path, offset, now)
        if t is not None and rotated:
            t.file.rotated = True
            t.rotated_at = now
            self._counters.rotations += 1
            self._log.info("file_rotated", path=entry.path, now_at=path, at="startup")

    def open(self, path: str, offset: int | None, now: float) -> Tracked | None:
        """Start reading ``path`` at ``offset`` (``None``: at its end).

        Returns:
            The tracked file (the one already open when it is a second name for it), or
            ``None`` when it cannot be opened (logged and counted).
        """
        try:
            f = OpenFile.open(path, offset)
        except OSError as exc:
            self._counters.open_errors += 1
            self._log.warning("file_open_failed", path=path, error=str(exc))
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
        self.tracked[f.key] = t
        self._counters.files_opened += 1
        self._log.info("file_opened", path=path, offset=f.offset)
        return t

    # -- while running -------------------------------------------------------------------

    async def reconcile(self, now: float, *, discover: bool, check: bool) -> None:
        """Re-glob; mark files no longer matched as rotated; check every file for truncation.

        Args:
            now: monotonic time.
            discover: glob again (open new files, notice rotated ones).
            check: check every open file for truncation, and prune the checkpoint.
        """
        found = expand(self.config.path) if discover else {}
        for key, t in list(self.tracked.items()):
            f = t.file
            path = found.get(key)
            if path is not None:
                f.path = path
                if f.rotated:
                    f.rotated = False
            elif discover and not f.rotated and not f.recovery:
                f.rotated = True
                t.rotated_at = now
                self._counters.rotations += 1
                # Records read from now on carry the rotated name: the new file at the
                # old name starts again at offset 0, and (file, offset) must stay a key.
                new_name = find_by_key(os.path.dirname(f.path) or ".", key)
                self._log.info("file_rotated", path=f.path, now_at=new_name)
                if new_name is not None:
                    f.path = new_name
            if check:
                await self._check_truncated(t, now)
        for key, path in found.items():
            if key in self.tracked:
                continue
            entry = self._checkpoint.acked.get(key)
            if entry is not None:  # a file we closed is matched again: resume, verified
                self._resume(path, entry, now, rotated=False)
            else:
                self.open(path, 0, now)
        if check:
            self._checkpoint.prune(self.tracked.keys() | found.keys())

    async def _check_truncated(self, t: Tracked, now: float) -> None:
        try:
            truncated = t.file.truncated()
        except OSError:
            return
        if truncated:
            await self.truncated(t, now)

    async def truncated(self, t: Tracked, now: float) -> None:
        """Continue a truncated file from 0; read what was missed from a copy if there is one."""
        f = t.file
        seen_size = f.size
        self._counters.truncations += 1
        lost = max(0, seen_size - f.offset)
        recovered = 0
        directory = os.path.dirname(f.path) or "."
        copy = find_copy(directory, f.fingerprint, t.splitter.committed + 1, f.key)
        if copy is not None:
            # copytruncate: the copy holds what was written before the truncation.
            rt = self.open(copy, t.splitter.committed, now)
            if rt is not None:
                rt.file.recovery = True
                rt.file.rotated = True
                rt.rotated_at = now
                recovered = max(0, rt.file.size - f.offset)
                lost = 0
        else:
            await self._flush(t)
        self._counters.truncated_bytes_lost += lost
        self._counters.truncated_bytes_recovered += recovered
        self._log.warning(
            "file_truncated", path=f.path, offset=f.offset, lost_bytes=lost, copy=copy, at="running"
        )
        f.restart()
        t.splitter.reset(0)
        if t.joiner is not None:
            t.joiner.restart()
        t.epoch = self._checkpoint.start(f.key, entry_at(f, 0))

    def close(self, t: Tracked, reason: str) -> None:
        """Stop reading ``t`` (rotated and read to its end, or no longer readable)."""
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
