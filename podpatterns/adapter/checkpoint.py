"""The crash-safe checkpoint: how far each file (and each spool segment) has been shipped
and acknowledged.

Written as JSON to a temporary file in the same directory, fsync'ed, renamed over the
current file (the current one first becomes the previous generation), and the directory
fsync'ed, so a crash at any point leaves a complete current or previous generation. A
checkpoint that does not parse falls back to the previous generation, loudly.

:class:`Checkpoint` is the bookkeeping both ends of the pipeline share: discovery records
where a file starts (opened, truncated, closed, gone) and the sender records what the
sink acknowledged. The spool's entries (:attr:`Checkpoint.spool`: per segment number, the
offset before which every record was acknowledged) are saved in the same generation,
under an optional ``spool`` key, and so is the logs-to-metrics state
(:attr:`Checkpoint.metrics`), under an optional ``metrics`` key. It imports no stage;
the wiring hands it to the stages that need it.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from podpatterns import logs
from podpatterns.adapter.tail import FileKey, OpenFile, tail_hash
from podpatterns.atomicfile import replace_atomically

VERSION = 1
NAME = "adapter-checkpoint.json"


@dataclass(frozen=True, slots=True)
class Entry:
    """Where one file stands: every byte before ``offset`` was acknowledged by the sink.

    Attributes:
        path: the name the file was last seen under.
        dev: device number.
        ino: inode number.
        offset: acknowledged byte offset.
        head_len: how many first bytes ``head_hash`` covers.
        head_hash: fingerprint of the file's head.
        tail_hash: hash of the bytes just before ``offset``.
    """

    path: str
    dev: int
    ino: int
    offset: int
    head_len: int
    head_hash: str
    tail_hash: str

    @property
    def key(self) -> tuple[int, int]:
        """(dev, ino)."""
        return (self.dev, self.ino)


def entry_at(f: OpenFile, offset: int) -> Entry:
    """The entry saying every byte of ``f`` before ``offset`` was acknowledged.

    Computed when the lines are read (it hashes the bytes before ``offset`` now, while they
    are the bytes that were read), and recorded once the sink acknowledged them.
    """
    return Entry(
        path=f.path,
        dev=f.key[0],
        ino=f.key[1],
        offset=offset,
        head_len=f.fingerprint.length,
        head_hash=f.fingerprint.hash,
        tail_hash=tail_hash(f.fd, offset),
    )


MarkKey = tuple[FileKey, int]
"""(file, epoch): whose checkpoint a batch's mark moves."""


class Checkpoint:
    """Where each file stands, and which acknowledgements may still move it.

    Every file read gets an *epoch*, renewed when it is truncated: a batch carries the
    epoch its lines were read in, and an acknowledgement of an older epoch is stale.

    Args:
        store: where generations are written; ``None`` keeps the checkpoint in memory.
    """

    def __init__(self, store: CheckpointStore | None) -> None:
        self.store = store
        self.acked: dict[FileKey, Entry] = {}
        """The acknowledged position of each file (what is saved)."""
        self.spool: dict[int, int] = {}
        """Per spool segment, the offset before which every record was acknowledged."""
        self.metrics: Callable[[], dict[str, Any]] | None = None
        """Returns the logs-to-metrics state to save with each generation (a copy)."""
        self.loaded_metrics: dict[str, Any] | None = None
        """The logs-to-metrics state of the generation :meth:`load` read."""
        self._epochs: dict[FileKey, int] = {}
        self._closed_at: dict[FileKey, int] = {}
        # (file, epoch) whose reading went on in another file (copytruncate's copy): its
        # acknowledgements move that file's checkpoint.
        self._moved: dict[MarkKey, FileKey] = {}
        self._epoch = itertools.count(1)
        self._dirty = False
        self.moved_at: dict[FileKey, float] = {}
        """Monotonic time each file's position last moved (read from, or acknowledged):
        how long a file's bytes have waited, for ``GET /status``."""

    async def load(self) -> None:
        """Read the last good generation (nothing without a store).

        Raises:
            OSError: see :meth:`CheckpointStore.load`.
        """
        if self.store is not None:
            self.acked = await asyncio.to_thread(self.store.load)
            self.spool = dict(self.store.loaded_spool)
            self.loaded_metrics = self.store.loaded_metrics

    def first_run(self) -> bool:
        """True when no checkpoint was ever written (``--read-from end`` applies)."""
        return not self.acked and (self.store is None or not self.store.current.exists())

    def start(self, key: FileKey, entry: Entry) -> int:
        """A file is read from ``entry`` (opened, or truncated and read again from 0).

        Returns:
            The file's new epoch.
        """
        epoch = next(self._epoch)
        self._epochs[key] = epoch
        self.acked[key] = entry
        self.moved_at[key] = time.monotonic()
        self._dirty = True
        return epoch

    def drop_loaded(self, key: FileKey) -> None:
        """Forget a file's entry: it is another file now (its generation was truncated)."""
        self.acked.pop(key, None)
        self._dirty = True

    def moved(self, old: FileKey, epoch: int, new: FileKey, path: str) -> None:
        """The bytes of ``old`` read in ``epoch`` are now read from ``new``, a byte copy
        (copytruncate): ``new`` starts at ``old``'s acknowledged offset, and what is
        acknowledged of ``old``'s epoch moves ``new``."""
        self._moved[(old, epoch)] = new
        self._epochs[new] = epoch
        entry = self.acked.get(old)
        if entry is not None:
            self.acked[new] = replace(entry, path=path, dev=new[0], ino=new[1])
            self._dirty = True

    def done(self, entry: Entry) -> None:
        """A file not to be read (up to ``entry.offset``): a copy of lines read already,
        or a generation rotated before the first start."""
        self.acked[entry.key] = entry
        self._closed_at[entry.key] = entry.offset
        self._dirty = True

    def stopped_at(self, key: FileKey) -> int | None:
        """Where reading a file that is not open stopped (``None``: unknown file).

        ``None`` too while batches of it are still unacknowledged: it is resumed only
        from an acknowledged offset.
        """
        entry = self.acked.get(key)
        if entry is None:
            return None
        closed = self._closed_at.get(key, entry.offset)
        return entry.offset if closed <= entry.offset else None

    def closed(self, key: FileKey, committed: int, *, deleted: bool) -> None:
        """A file was closed after reading up to ``committed``.

        Its entry stays while the file is in its directory (see :meth:`prune`), unless
        the file was deleted: nothing can be read from it again.
        """
        self._closed_at[key] = committed
        if deleted:
            self._epochs.pop(key, None)
            self.acked.pop(key, None)
            self.moved_at.pop(key, None)
            self._dirty = True

    def acknowledge(
        self, marks: Mapping[MarkKey, Entry], spool: Mapping[int, int] | None = None
    ) -> None:
        """The sink acknowledged a batch: move each file to its mark (unless stale), and
        each spool segment to its offset."""
        if spool:
            for seq, offset in spool.items():
                if offset > self.spool.get(seq, 0):
                    self.spool[seq] = offset
                    self._dirty = True
        for (key, epoch), entry in marks.items():
            if self._epochs.get(key) == epoch:
                self.acked[key] = entry
                self.moved_at[key] = time.monotonic()
                self._dirty = True
                continue
            new = self._moved.get((key, epoch))
            if new is None or self._epochs.get(new) != epoch:
                continue
            current = self.acked.get(new)
            if current is None or current.offset < entry.offset:
                self.acked[new] = replace(
                    entry, path=current.path if current else entry.path, dev=new[0], ino=new[1]
                )
                self.moved_at[new] = time.monotonic()
                self._dirty = True

    def forget_segments(self, seqs: Iterable[int]) -> None:
        """Spool segments that were deleted (or are gone): their entries can go."""
        for seq in seqs:
            if self.spool.pop(seq, None) is not None:
                self._dirty = True

    def prune(self, present: Container[FileKey]) -> None:
        """Forget the files no longer in their directory (deleted, or moved away).

        Args:
            present: files open, or found in the directories followed, now (kept).
        """
        for key, entry in list(self.acked.items()):
            if key in present:
                continue
            if entry.offset < self._closed_at.get(key, 0):
                continue  # batches of this closed file are still being shipped
            self.acked.pop(key, None)
            self._epochs.pop(key, None)
            self._closed_at.pop(key, None)
            self.moved_at.pop(key, None)
            self._dirty = True
        for moved, new in list(self._moved.items()):
            if new not in self.acked:
                del self._moved[moved]

    def touch(self) -> None:
        """Something saved with the checkpoint (the metric state) changed."""
        self._dirty = True

    async def save(self, *, force: bool = False) -> None:
        """Write a generation if anything moved since the last one (or ``force``)."""
        if self.store is None or not (self._dirty or force):
            return
        self._dirty = False
        # Copies taken now, on the loop: the offsets and the metric state of one moment.
        snapshot = dict(self.acked)
        metrics = self.metrics() if self.metrics is not None else None
        await asyncio.to_thread(self.store.save, snapshot, dict(self.spool), metrics)


class CheckpointStore:
    """Load and save the checkpoint in ``directory``.

    Args:
        directory: created if missing.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.current = self.directory / NAME
        self.previous = self.directory / (NAME + ".prev")
        self.writes = 0
        self.fallbacks = 0
        self.loaded_spool: dict[int, int] = {}
        """The spool entries of the generation :meth:`load` returned."""
        self.loaded_metrics: dict[str, Any] | None = None
        """The logs-to-metrics state of the generation :meth:`load` returned."""
        # save() runs in worker threads: a save still running in a cancelled task's
        # thread must not interleave with the final one on the same temporary file.
        self._lock = threading.Lock()
        self._log = logs.get("adapter")

    def load(self) -> dict[tuple[int, int], Entry]:
        """The last good generation; empty when there is none.

        Raises:
            OSError: the directory cannot be created, or this user cannot write it (found
                now rather than at the first save, which would fail after records shipped).
        """
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(self.directory))
        self.directory.mkdir(parents=True, exist_ok=True)
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self.directory))
        for path in (self.current, self.previous):
            if not path.exists():
                continue
            try:
                entries, self.loaded_spool, self.loaded_metrics = _decode(path.read_bytes())
            except (OSError, ValueError, TypeError, KeyError) as exc:
                self.fallbacks += 1
                self._log.error("checkpoint_corrupt", path=str(path), error=str(exc))
                continue
            if path is self.previous:
                self._log.warning("checkpoint_previous_used", path=str(path))
            self._log.info("checkpoint_loaded", path=str(path), files=len(entries))
            return entries
        return {}

    def save(
        self,
        entries: dict[tuple[int, int], Entry],
        spool: Mapping[int, int] | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        """Write a new generation crash-safely (blocking: call it in a thread).

        Args:
            entries: the files.
            spool: per spool segment, the acknowledged offset.
            metrics: the logs-to-metrics state (JSON-able).
        """
        with self._lock:
            self._save(entries, spool or {}, metrics)

    def _save(
        self,
        entries: dict[tuple[int, int], Entry],
        spool: Mapping[int, int],
        metrics: Mapping[str, Any] | None,
    ) -> None:
        doc: dict[str, Any] = {"version": VERSION, "files": [asdict(e) for e in entries.values()]}
        if spool:
            # Optional: a checkpoint without spool entries reads as before.
            doc["spool"] = {str(seq): offset for seq, offset in sorted(spool.items())}
        if metrics is not None:
            doc["metrics"] = metrics  # optional too
        data = json.dumps(doc, separators=(",", ":")).encode()
        replace_atomically(
            self.current, data, self.directory / (NAME + ".tmp"), keep_previous=self.previous
        )
        self.writes += 1


def _decode(
    raw: bytes,
) -> tuple[dict[tuple[int, int], Entry], dict[int, int], dict[str, Any] | None]:
    doc: Any = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ValueError("not a version 1 checkpoint")
    out: dict[tuple[int, int], Entry] = {}
    for item in doc["files"]:
        entry = Entry(**item)
        if not isinstance(entry.offset, int) or entry.offset < 0:
            raise ValueError(f"bad offset {entry.offset!r}")
        out[entry.key] = entry
    spool: dict[int, int] = {}
    for seq, offset in doc.get("spool", {}).items():
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"bad spool offset {offset!r}")
        spool[int(seq)] = offset
    metrics = doc.get("metrics")
    if metrics is not None and not isinstance(metrics, dict):
        raise ValueError("bad metrics state")
    return out, spool, metrics
