"""Wire the stages: tail -> lines -> parse -> transform -> sink -> checkpoint.

Two tasks and one bounded queue. The reader discovers and reads files, splits lines and
puts batches (with, per file, the offset after the batch's last complete line) on a queue
bounded in bytes: when the sink is slow or down the queue fills and reading pauses, so the
files themselves are the buffer. The sender parses, transforms and ships one batch at a
time, then acknowledges it: only then does the checkpoint of each file in the batch move
to that offset, and the checkpoint is written (crash-safely) before the next batch is
sent. Batches are shipped in order, so a file's checkpoint never passes a record that
was not acknowledged, and after a crash at most the one unacknowledged batch is sent
again.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import watchfiles

from podpatterns import logs
from podpatterns.adapter.checkpoint import CheckpointStore, Entry
from podpatterns.adapter.config import AdapterConfig
from podpatterns.adapter.lines import Line, LineSplitter
from podpatterns.adapter.multiline import PRESETS, Grouper
from podpatterns.adapter.parse import Parser, get_parser
from podpatterns.adapter.sinks import DeadLetter, Sink
from podpatterns.adapter.sinks.retry import Backoff
from podpatterns.adapter.tail import (
    FileKey,
    Fingerprint,
    OpenFile,
    expand,
    find_by_key,
    find_copy,
    tail_hash,
    watch_roots,
)
from podpatterns.adapter.transform import TransformChain, load_callable, redactor
from podpatterns.errors import ConfigError
from podpatterns.metrics import CallbackCollector, Family, Sample, counter, gauge

Record = dict[str, Any]
WatcherFactory = Callable[..., Any]


@dataclass(slots=True)
class Tracked:
    """A file being read, with its line splitter and bookkeeping."""

    file: OpenFile
    splitter: LineSplitter
    epoch: int
    last_growth: float
    rotated_at: float = 0.0
    cri_held: list[tuple[Line, str]] = field(default_factory=list)
    grouper: Grouper | None = None


@dataclass(slots=True)
class Batch:
    """Lines read, with the checkpoint each file reaches once they are acknowledged."""

    lines: list[tuple[str, str, Line]] = field(default_factory=list)  # (path, file_id, line)
    marks: dict[FileKey, tuple[int, Entry]] = field(default_factory=dict)
    nbytes: int = 0


class ByteQueue:
    """A FIFO bounded by the bytes it holds (an item larger than the bound still fits alone).

    One producer (the reader) and one consumer (the sender). Bytes are released by
    :meth:`release` once an item was fully handled, so the bound covers what is being
    shipped too.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: deque[Batch | None] = deque()
        self._not_empty = asyncio.Event()
        self._room = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: Batch) -> None:
        """Wait for room, then add ``item``."""
        while self.bytes and self.bytes + item.nbytes > self.max_bytes:
            self._room.clear()
            await self._room.wait()
        self._items.append(item)
        self.bytes += item.nbytes
        self._not_empty.set()

    def end(self) -> None:
        """Mark the end of the stream (the consumer gets ``None``)."""
        self._items.append(None)
        self._not_empty.set()

    async def get(self) -> Batch | None:
        """The next item (waits for one)."""
        while not self._items:
            self._not_empty.clear()
            await self._not_empty.wait()
        return self._items.popleft()

    def release(self, size: int) -> None:
        """Give back the room of a handled item."""
        self.bytes -= size
        self._room.set()


@dataclass
class Counters:
    """Plain integers the hot path counts into; read at scrape time."""

    lines: int = 0
    bytes_read: int = 0
    records_shipped: int = 0
    batches: int = 0
    invalid_utf8: int = 0
    parse_errors: int = 0
    parse_dropped: int = 0
    partial_flushed: int = 0
    truncations: int = 0
    truncated_bytes_lost: int = 0
    truncated_bytes_recovered: int = 0
    rotations: int = 0
    replaced: int = 0
    files_opened: int = 0
    files_closed: int = 0
    open_errors: int = 0
    cri_merged: int = 0
    sink_errors: int = 0


class Adapter:
    """The adapter as a :class:`~podpatterns.runtime.Component`.

    Args:
        config: the validated configuration.
        sink: where records go (built from ``config`` when omitted).
        watcher: ``watchfiles.awatch``-compatible factory (tests inject failures).
    """

    name = "adapter"

    def __init__(
        self,
        config: AdapterConfig,
        *,
        sink: Sink | None = None,
        watcher: WatcherFactory = watchfiles.awatch,
    ) -> None:
        self.config = config
        self.dead_letter = DeadLetter(config.dead_letter, config.dead_letter_max_bytes)
        self.sink: Sink = sink if sink is not None else build_sink(config, self.dead_letter)
        self.counters = Counters()
        self.tracked: dict[FileKey, Tracked] = {}
        self.acked: dict[FileKey, Entry] = {}
        self._epochs: dict[FileKey, int] = {}
        self._epoch = itertools.count(1)
        self._queue = ByteQueue(config.queue_max_bytes)
        self._store = CheckpointStore(config.checkpoint_dir) if config.checkpoint_dir else None
        self._parser: Parser = get_parser(config.parse, config.regex)
        self._chain = TransformChain(
            add=config.add_field,
            rename=config.rename_field,
            drop=config.drop_field,
            timestamp_field=config.timestamp_field,
            redact=(
                redactor(config.redact, config.redact_regex)
                if config.redact or config.redact_regex
                else None
            ),
            keep=config.filter,
            exclude=config.exclude,
            sample=config.sample,
            rate_limit=config.rate_limit,
        )
        self._watcher_factory = watcher
        # Our own writes (checkpoint, file sink, dead letters) may live in a watched
        # directory: their events would only wake the reader for nothing.
        self._own_paths = [
            os.path.abspath(p)
            for p in (self.config.checkpoint_dir, self.config.sink_path, self.config.dead_letter)
            if p is not None
        ]
        self.mode = "poll" if config.watch == "poll" else "watch"
        self._wake = asyncio.Event()
        self._watch_stop = asyncio.Event()
        self._discover_requested = False
        self._stopping = False
        self._reader_done = False
        self._drained = asyncio.Event()
        self._extra: list[Batch] = []
        self._closed_at: dict[FileKey, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._failed = False
        self._dirty = False
        self._log = logs.get("adapter")

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the checkpoint, open the files and the sink, start reading.

        Raises:
            ConfigError: a ``--transform`` cannot be imported, or the checkpoint
                directory cannot be created or written.
        """
        self._chain.user = tuple(load_callable(ref) for ref in self.config.transform)
        if self._store is not None:
            try:
                self.acked = await asyncio.to_thread(self._store.load)
            except OSError as exc:
                hint = (
                    "mount a writable volume (an emptyDir) there"
                    if exc.errno == errno.EROFS
                    else "it must be a directory this user can write; in a Pod, set fsGroup"
                )
                raise ConfigError(
                    f"--checkpoint-dir: cannot use {self._store.directory}: {exc.strerror} ({hint})"
                ) from None
        self._restore()
        await self.sink.start()
        if self.mode == "watch":
            self._tasks.append(asyncio.create_task(self._watch_loop(), name="adapter-watch"))
        self._tasks.append(asyncio.create_task(self._read_loop(), name="adapter-read"))
        self._tasks.append(asyncio.create_task(self._send_loop(), name="adapter-send"))
        self._started = True
        self._log.info(
            "adapter_started",
            paths=list(self.config.path),
            files=len(self.tracked),
            sink=self.sink.name,
            mode=self.mode,
        )

    def is_ready(self) -> bool:
        """Ready once started, as long as no stage failed."""
        return self._started and not self._failed

    def stop_accepting(self) -> None:
        """Look for new files one last time, then stop discovering; read every open file
        to its end, then finish."""
        if not self._stopping:
            self._stopping = True
            self._wake.set()
            self._watch_stop.set()

    def in_flight(self) -> int:
        """Batches queued or being shipped, plus one while files are still being read."""
        return len(self._queue) + (0 if self._reader_done else 1)

    async def wait_drained(self) -> None:
        """Return once every batch read was shipped and checkpointed."""
        await self._drained.wait()

    def cut(self) -> int:
        """Stop reading and shipping now; return the batches that were left."""
        left = len(self._queue)
        for task in self._tasks:
            task.cancel()
        return left

    async def close(self) -> None:
        """Stop the tasks, write the final checkpoint, close files and the sink."""
        self._watch_stop.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._save_checkpoint(force=True)
        for t in self.tracked.values():
            t.file.close()
        self.tracked.clear()
        await self.sink.close()
        self._log.info("adapter_stopped", **{k: v for k, v in vars(self.counters).items() if v})

    # -- restore at startup ---------------------------------------------------------------

    def _restore(self) -> None:
        """Open the files the globs match and those the checkpoint knows under other names."""
        found = expand(self.config.path)
        first_run = not self.acked and (self._store is None or not self._store.current.exists())
        now = time.monotonic()
        known = dict(self.acked)
        for key, path in sorted(found.items(), key=lambda kv: kv[1]):
            entry = known.pop(key, None)
            if entry is not None:
                self._resume(path, entry, now, rotated=False)
            else:
                start = None if first_run and self.config.read_from == "end" else 0
                self._open(path, start, now)
        for key, entry in known.items():
            # Not under a matched name: rotated (renamed) while we were down?
            rotated_path = find_by_key(os.path.dirname(entry.path) or ".", key)
            if rotated_path is None:
                self.acked.pop(key, None)
                continue
            self._resume(rotated_path, entry, now, rotated=True)

    def _resume(self, path: str, entry: Entry, now: float, *, rotated: bool) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self.counters.open_errors += 1
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
            self.counters.truncations += 1
            self._log.warning(
                "file_truncated", path=path, offset=entry.offset, size=size, at="startup"
            )
            offset = 0
        else:
            if rotated:  # a stranger that got the inode of a rotated file: not ours
                self.acked.pop(entry.key, None)
                return
            self.counters.replaced += 1
            self._log.warning("file_replaced", path=path, offset=entry.offset)
            offset = 0
        t = self._open(path, offset, now)
        if t is not None and rotated:
            t.file.rotated = True
            t.rotated_at = now
            self.counters.rotations += 1
            self._log.info("file_rotated", path=entry.path, now_at=path, at="startup")

    def _open(self, path: str, offset: int | None, now: float) -> Tracked | None:
        try:
            f = OpenFile.open(path, offset)
        except OSError as exc:
            self.counters.open_errors += 1
            self._log.warning("file_open_failed", path=path, error=str(exc))
            return None
        old = self.tracked.get(f.key)
        if old is not None:  # already open (a second name for one file)
            f.close()
            return old
        epoch = next(self._epoch)
        self._epochs[f.key] = epoch
        t = Tracked(
            f,
            LineSplitter(self.config.delimiter, self.config.max_line_bytes, f.offset),
            epoch,
            now,
            grouper=self._grouper(),
        )
        self.tracked[f.key] = t
        self.acked[f.key] = self._entry(f, f.offset)
        self._dirty = True
        self.counters.files_opened += 1
        self._log.info("file_opened", path=path, offset=f.offset)
        return t

    def _grouper(self) -> Grouper | None:
        cfg = self.config
        if cfg.multiline != "off":
            mode, pattern = PRESETS[cfg.multiline]
            regex = re.compile(pattern)
        elif cfg.multiline_start is not None:
            mode, regex = "start", cfg.multiline_start
        elif cfg.multiline_continue is not None:
            mode, regex = "continue", cfg.multiline_continue
        else:
            return None
        return Grouper(mode, regex, cfg.multiline_max_lines, cfg.multiline_max_bytes)

    def _entry(self, f: OpenFile, offset: int) -> Entry:
        return Entry(
            path=f.path,
            dev=f.key[0],
            ino=f.key[1],
            offset=offset,
            head_len=f.fingerprint.length,
            head_hash=f.fingerprint.hash,
            tail_hash=tail_hash(f.fd, offset),
        )

    # -- reading -----------------------------------------------------------------------

    async def _watch_loop(self) -> None:
        """File events wake the reader; if the watcher cannot run, fall back to polling."""
        roots = watch_roots(self.config.path)
        if not roots:
            self.mode = "poll"
            self._log.warning("watch_fallback_polling", error="no directory to watch", roots=[])
            return
        own = self._own_paths

        def wanted(change: watchfiles.Change, path: str) -> bool:
            return not any(path == o or path.startswith(o + os.sep) for o in own)

        try:
            async for changes in self._watcher_factory(
                *roots,
                watch_filter=wanted,
                debounce=50,
                step=20,
                stop_event=self._watch_stop,
                rust_timeout=1000,
                recursive=True,
            ):
                if any(c[0] == watchfiles.Change.added for c in changes):
                    self._discover_requested = True
                self._wake.set()
        except (OSError, RuntimeError) as exc:
            self.mode = "poll"
            self._log.warning(
                "watch_fallback_polling", error=str(exc), roots=[str(r) for r in roots]
            )
            self._wake.set()

    async def _read_loop(self) -> None:
        try:
            await self._read_until_stopped()
        except Exception:
            # A bug: readiness turns 503 and the traceback is logged; the task's owner
            # (close) collects it.
            self._failed = True
            self._log.exception("adapter_stage_failed", stage="read")
            raise
        finally:
            self._reader_done = True
            # The sender must learn the stream ended, even when reading failed.
            self._queue.end()

    async def _read_until_stopped(self) -> None:
        cfg = self.config
        next_reconcile = time.monotonic() + cfg.reconcile_interval
        looked_last = False
        while True:
            now = time.monotonic()
            # Cleared before reading: an event that arrives while we read keeps it set,
            # so the wait below returns at once instead of at the next reconcile.
            self._wake.clear()
            if self._stopping and not looked_last:
                # One last look before discovery stops: a file the main container wrote
                # just before it exited (an --exit-with stop follows its tombstone at
                # once, before any file event) is still read to its end and shipped.
                looked_last = True
                self._reconcile(now, discover=True, check=True)
            elif not self._stopping and (now >= next_reconcile or self._discover_requested):
                full = now >= next_reconcile
                self._discover_requested = False
                self._reconcile(now, discover=True, check=full)
                if full:
                    next_reconcile = now + cfg.reconcile_interval
            progressed = await self._read_round(now)
            if progressed:
                await asyncio.sleep(0)
                continue
            if self._stopping:
                return
            self._idle_work(now)
            if self._extra:
                continue
            if self.mode == "poll":
                timeout = min(cfg.poll_interval, max(0.0, next_reconcile - now))
            else:
                timeout = max(0.0, next_reconcile - now)
            if cfg.flush_partial_after is not None:
                timeout = min(timeout, cfg.flush_partial_after / 2)
            if cfg.multiline != "off" or cfg.multiline_start or cfg.multiline_continue:
                timeout = min(timeout, cfg.multiline_timeout / 2)
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _read_round(self, now: float) -> bool:
        """Read one chunk from every file that grew; queue the lines. True if any grew."""
        cfg = self.config
        batch = Batch()
        progressed = False
        while self._extra:
            await self._queue.put(self._extra.pop(0))
        for t in list(self.tracked.values()):
            f = t.file
            try:
                data = f.read(cfg.read_chunk)
            except OSError as exc:
                self._log.warning("file_read_failed", path=f.path, error=str(exc))
                self._close(t, "read_failed")
                continue
            if data is None:
                self._truncated(t, now)
                progressed = True
                continue
            if not data:
                continue
            progressed = True
            t.last_growth = now
            self.counters.bytes_read += len(data)
            lines = t.splitter.feed(data)
            if lines:
                batch = await self._add(batch, t, lines)
        if batch.lines or batch.marks:
            await self._queue.put(batch)
        return progressed

    async def _add(self, batch: Batch, t: Tracked, lines: list[Line]) -> Batch:
        cfg = self.config
        f = t.file
        if cfg.parse == "cri":
            lines = self._join_cri(t, lines)
        elif t.grouper is not None:
            lines = t.grouper.feed(lines)
        path = f.path
        file_id = f"{f.key[0]}:{f.key[1]}"
        for line in lines:
            batch.lines.append((path, file_id, line))
            batch.nbytes += len(line.data) + 64
            if len(batch.lines) >= cfg.batch_max_records or batch.nbytes >= cfg.batch_max_bytes:
                batch.marks[f.key] = (t.epoch, self._entry(f, line.end))
                await self._queue.put(batch)
                batch = Batch()
        committed = t.splitter.committed
        if t.cri_held:
            committed = t.cri_held[0][0].offset
        elif t.grouper is not None and t.grouper.held:
            committed = t.grouper.held[0].offset
        batch.marks[f.key] = (t.epoch, self._entry(f, committed))
        return batch

    def _join_cri(self, t: Tracked, lines: list[Line]) -> list[Line]:
        """Merge CRI partial (``P``) lines into the full (``F``) line that ends them.

        Held partials keep the file's checkpoint at the first of them: a restart reads the
        whole group again (never checkpoint inside an open group).
        """
        out: list[Line] = []
        for line in lines:
            parts = line.data.split(b" ", 3)
            if len(parts) < 3 or parts[2][:1] not in (b"P", b"F"):
                if t.cri_held:
                    out.append(self._merged(t.cri_held))
                    t.cri_held = []
                out.append(line)
                continue
            message = parts[3] if len(parts) > 3 else b""
            t.cri_held.append((line, message.decode("utf-8", "replace")))
            if (
                parts[2][:1] == b"F"
                or sum(len(m) for _, m in t.cri_held) > self.config.max_line_bytes
            ):
                out.append(self._merged(t.cri_held))
                t.cri_held = []
        return out

    def _merged(self, held: list[tuple[Line, str]]) -> Line:
        first, last = held[0][0], held[-1][0]
        if len(held) == 1:
            return first
        self.counters.cri_merged += len(held) - 1
        head = last.data.split(b" ", 3)
        message = "".join(m for _, m in held).encode()
        data = b" ".join(head[:3]) + b" " + message
        return Line(
            data[: self.config.max_line_bytes],
            first.offset,
            last.end,
            truncated=any(x.truncated for x, _ in held) or len(data) > self.config.max_line_bytes,
        )

    def _idle_work(self, now: float) -> None:
        """Flush idle partial lines; close rotated files read to their end."""
        cfg = self.config
        for t in list(self.tracked.values()):
            idle = now - t.last_growth
            if (
                cfg.flush_partial_after is not None
                and t.splitter.held
                and idle >= cfg.flush_partial_after
            ):
                self._flush_partial(t)
            if t.grouper is not None and t.grouper.held and idle >= cfg.multiline_timeout:
                self._queue_line(t, t.grouper.flush_group())
            if t.file.rotated and idle >= cfg.rotate_wait and now - t.rotated_at >= cfg.rotate_wait:
                self._flush_partial(t)
                self._close(t, "rotated")

    def _flush_partial(self, t: Tracked) -> None:
        """Emit what the file holds: an unterminated line, open groups (rotation, truncation)."""
        line = t.splitter.flush()
        if line is not None:
            self.counters.partial_flushed += 1
            if t.grouper is not None:
                for group in t.grouper.feed([line]):
                    self._queue_line(t, group)
            elif self.config.parse == "cri":
                for merged in self._join_cri(t, [line]):
                    self._queue_line(t, merged)
            else:
                self._queue_line(t, line)
        if t.grouper is not None and t.grouper.held:
            self._queue_line(t, t.grouper.flush_group())
        if t.cri_held:
            self._queue_line(t, self._merged(t.cri_held))
            t.cri_held = []

    def _queue_line(self, t: Tracked, line: Line) -> None:
        batch = Batch(
            [(t.file.path, f"{t.file.key[0]}:{t.file.key[1]}", line)],
            {t.file.key: (t.epoch, self._entry(t.file, line.end))},
            len(line.data),
        )
        self._extra.append(batch)  # queued by the reader, which may wait for room

    def _close(self, t: Tracked, reason: str) -> None:
        self.tracked.pop(t.file.key, None)
        try:
            deleted = t.file.deleted()
        except OSError:
            deleted = False
        t.file.close()
        # Forget the entry only once everything read from it was acknowledged (_prune).
        self._closed_at[t.file.key] = t.splitter.committed
        self.counters.files_closed += 1
        self._log.info("file_closed", path=t.file.path, reason=reason, offset=t.file.offset)
        if deleted:
            self._epochs.pop(t.file.key, None)
            self.acked.pop(t.file.key, None)
            self._dirty = True

    def _reconcile(self, now: float, *, discover: bool, check: bool) -> None:
        """Re-glob; mark files no longer matched as rotated; check every file for truncation."""
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
                self.counters.rotations += 1
                # Records read from now on carry the rotated name: the new file at the
                # old name starts again at offset 0, and (file, offset) must stay a key.
                new_name = find_by_key(os.path.dirname(f.path) or ".", key)
                self._log.info("file_rotated", path=f.path, now_at=new_name)
                if new_name is not None:
                    f.path = new_name
            if check:
                self._check_truncated(t, now)
        for key, path in found.items():
            if key in self.tracked:
                continue
            entry = self.acked.get(key)
            if entry is not None:  # a file we closed is matched again: resume, verified
                self._resume(path, entry, now, rotated=False)
            else:
                self._open(path, 0, now)
        if check:
            self._prune(found)

    def _check_truncated(self, t: Tracked, now: float) -> None:
        try:
            truncated = t.file.truncated()
        except OSError:
            return
        if truncated:
            self._truncated(t, now)

    def _truncated(self, t: Tracked, now: float) -> None:
        """Continue a truncated file from 0; read what was missed from a copy if there is one."""
        f = t.file
        seen_size = f.size
        self.counters.truncations += 1
        lost = max(0, seen_size - f.offset)
        recovered = 0
        directory = os.path.dirname(f.path) or "."
        copy = find_copy(directory, f.fingerprint, t.splitter.committed + 1, f.key)
        if copy is not None:
            # copytruncate: the copy holds what was written before the truncation.
            rt = self._open(copy, t.splitter.committed, now)
            if rt is not None:
                rt.file.recovery = True
                rt.file.rotated = True
                rt.rotated_at = now
                recovered = max(0, rt.file.size - f.offset)
                lost = 0
        else:
            self._flush_partial(t)
        self.counters.truncated_bytes_lost += lost
        self.counters.truncated_bytes_recovered += recovered
        self._log.warning(
            "file_truncated", path=f.path, offset=f.offset, lost_bytes=lost, copy=copy, at="running"
        )
        f.restart()
        t.splitter.reset(0)
        t.cri_held = []
        t.epoch = next(self._epoch)
        self._epochs[f.key] = t.epoch
        self.acked[f.key] = self._entry(f, 0)
        self._dirty = True

    def _prune(self, found: dict[FileKey, str]) -> None:
        """Forget checkpoint entries of closed files no longer found where they were."""
        for key, entry in list(self.acked.items()):
            if key in self.tracked or key in found:
                continue
            if entry.offset < self._closed_at.get(key, 0):
                continue  # batches of this closed file are still being shipped
            try:
                st = os.stat(entry.path)
            except OSError:
                st = None
            if st is None or (st.st_dev, st.st_ino) != key:
                self.acked.pop(key, None)
                self._epochs.pop(key, None)
                self._closed_at.pop(key, None)
                self._dirty = True

    # -- shipping ----------------------------------------------------------------------

    async def _send_loop(self) -> None:
        try:
            while True:
                batch = await self._queue.get()
                if batch is None:
                    break
                await self._ship(batch)
                self._queue.release(batch.nbytes)
        except Exception:
            self._failed = True
            self._log.exception("adapter_stage_failed", stage="send")
            raise
        finally:
            if not self._failed:
                self._drained.set()

    async def _ship(self, batch: Batch) -> None:
        records, failed = self._process(batch)
        if failed:
            await asyncio.to_thread(
                self.dead_letter.write, [(r, None, reason) for r, reason in failed]
            )
        if records:
            await self._send(records)
            self.counters.records_shipped += len(records)
        self.counters.batches += 1
        for key, (epoch, entry) in batch.marks.items():
            if self._epochs.get(key) == epoch:
                self.acked[key] = entry
                self._dirty = True
        await self._save_checkpoint()

    async def _send(self, records: list[Record]) -> None:
        """Send until the sink accepts; an OSError (disk full, EPIPE) is retried, not fatal."""
        backoff = Backoff(0.1, 5.0)
        while True:
            try:
                await self.sink.send(records)
            except OSError as exc:
                if backoff.attempt == 0:
                    self._log.warning("sink_failing", sink=self.sink.name, error=str(exc))
                self.counters.sink_errors += 1
                await asyncio.sleep(backoff.next_delay())
                continue
            if backoff.attempt:
                self._log.info("sink_recovered", sink=self.sink.name, attempts=backoff.attempt)
            return

    def _process(self, batch: Batch) -> tuple[list[Record], list[tuple[Record, str]]]:
        parser = self._parser
        raw = self.config.parse == "raw"
        drop = self.config.on_parse_error == "drop"
        c = self.counters
        out: list[Record] = []
        c.lines += len(batch.lines)
        for path, file_id, line in batch.lines:
            try:
                text = line.data.decode()
            except UnicodeDecodeError:
                text = line.data.decode("utf-8", "replace")
                c.invalid_utf8 += 1
            if raw:
                rec: Record = {"message": text}
            else:
                try:
                    fields = parser(text)
                except Exception:  # a parser bug must not stop the pipeline: count it
                    fields = None
                if fields is None:
                    c.parse_errors += 1
                    if drop:
                        c.parse_dropped += 1
                        continue
                    rec = {"message": text, "parse_error": self.config.parse}
                else:
                    rec = fields
            rec["file"] = path
            rec["file_id"] = file_id
            rec["offset"] = line.offset
            if line.truncated:
                rec["truncated"] = True
            if line.partial:
                rec["partial"] = True
            out.append(rec)
        chain = self._chain
        if (
            chain.user
            or chain.keep
            or chain.exclude
            or chain.add
            or chain.rename
            or chain.drop
            or chain.redact
            or chain.timestamp_field
            or chain.sample < 1
            or chain.rate_limit
        ):
            return chain.apply(out)
        return out, []

    async def _save_checkpoint(self, force: bool = False) -> None:
        if self._store is None or not (self._dirty or force):
            return
        self._dirty = False
        snapshot = dict(self.acked)
        await asyncio.to_thread(self._store.save, snapshot)

    # -- metrics -----------------------------------------------------------------------

    def lag_bytes(self) -> int:
        """Bytes in open files not yet acknowledged."""
        total = 0
        for key, t in self.tracked.items():
            entry = self.acked.get(key)
            total += max(0, t.file.size - (entry.offset if entry else 0))
        return total

    def collectors(self) -> Sequence[Any]:
        """The adapter's metric families."""
        c = self.counters
        chain = self._chain.counters

        def sink_samples() -> list[Sample]:
            return [((self.sink.name, k), float(v)) for k, v in self.sink.collect().items()]

        return [
            CallbackCollector(
                [
                    counter("adapter_lines", "lines read and handed to parsing", lambda: c.lines),
                    counter("adapter_bytes_read", "bytes read from files", lambda: c.bytes_read),
                    counter(
                        "adapter_records_shipped",
                        "records the sink acknowledged",
                        lambda: c.records_shipped,
                    ),
                    counter(
                        "adapter_batches", "batches shipped and acknowledged", lambda: c.batches
                    ),
                    counter(
                        "adapter_lines_truncated",
                        "lines longer than --max-line-bytes (cut and marked)",
                        lambda: sum(t.splitter.truncated_lines for t in self.tracked.values()),
                    ),
                    counter(
                        "adapter_invalid_utf8",
                        "lines with invalid UTF-8 (replaced)",
                        lambda: c.invalid_utf8,
                    ),
                    counter(
                        "adapter_parse_errors",
                        "lines the parser could not parse",
                        lambda: c.parse_errors,
                    ),
                    counter(
                        "adapter_partial_flushed",
                        "unterminated lines emitted (--flush-partial-after, truncation, rotation)",
                        lambda: c.partial_flushed,
                    ),
                    counter(
                        "adapter_truncations",
                        "truncations detected (copytruncate, truncate, rewrite)",
                        lambda: c.truncations,
                    ),
                    counter(
                        "adapter_truncated_bytes_lost",
                        "bytes known to be lost to a truncation",
                        lambda: c.truncated_bytes_lost,
                    ),
                    counter(
                        "adapter_truncated_bytes_recovered",
                        "bytes read back from a copytruncate copy",
                        lambda: c.truncated_bytes_recovered,
                    ),
                    counter(
                        "adapter_rotations",
                        "files seen rotated away (renamed or deleted)",
                        lambda: c.rotations,
                    ),
                    counter(
                        "adapter_files_replaced",
                        "files whose inode was reused by another file",
                        lambda: c.replaced,
                    ),
                    counter(
                        "adapter_cri_partials_merged",
                        "CRI partial lines merged into their full line",
                        lambda: c.cri_merged,
                    ),
                    counter(
                        "adapter_file_open_errors",
                        "files that could not be opened",
                        lambda: c.open_errors,
                    ),
                    counter(
                        "adapter_sink_errors",
                        "sink sends that failed with an OS error and were retried",
                        lambda: c.sink_errors,
                    ),
                    Family(
                        "counter",
                        "adapter_records_dropped",
                        "records dropped by transforms, by reason",
                        ("reason",),
                        lambda: [
                            (("filter",), chain.filtered),
                            (("sample",), chain.sampled_out),
                            (("rate_limit",), chain.rate_limited),
                            (("parse_error",), c.parse_dropped),
                        ],
                    ),
                    counter(
                        "adapter_transform_failures",
                        "records a user transform raised on (dead-lettered)",
                        lambda: chain.failed,
                    ),
                    Family(
                        "counter",
                        "adapter_dead_letter_records",
                        "records sent to the dead-letter file",
                        ("outcome",),
                        lambda: [
                            (("written",), self.dead_letter.written),
                            (("dropped",), self.dead_letter.dropped),
                        ],
                    ),
                    gauge(
                        "adapter_files_open", "files open for reading", lambda: len(self.tracked)
                    ),
                    Family(
                        "gauge",
                        "adapter_watch_mode",
                        "1 for the file-change detection in use",
                        ("mode",),
                        lambda: [
                            (("watch",), float(self.mode == "watch")),
                            (("poll",), float(self.mode == "poll")),
                        ],
                    ),
                    gauge(
                        "adapter_queue_bytes",
                        "bytes read and not yet acknowledged",
                        lambda: self._queue.bytes,
                    ),
                    gauge(
                        "adapter_lag_bytes",
                        "bytes in open files not yet acknowledged",
                        self.lag_bytes,
                    ),
                    counter(
                        "adapter_checkpoint_writes",
                        "checkpoint generations written",
                        lambda: self._store.writes if self._store else 0,
                    ),
                    counter(
                        "adapter_checkpoint_fallbacks",
                        "corrupt checkpoint generations skipped",
                        lambda: self._store.fallbacks if self._store else 0,
                    ),
                    Family(
                        "counter",
                        "adapter_sink_events",
                        "sink counters (requests, retries, rejected, ...)",
                        ("sink", "event"),
                        sink_samples,
                    ),
                ]
            )
        ]


def build_sink(config: AdapterConfig, dead_letter: DeadLetter) -> Sink:
    """The sink ``config`` asks for."""
    if config.sink == "file":
        from podpatterns.adapter.sinks.file import FileSink

        assert config.sink_path is not None
        return FileSink(config.sink_path, config.sink_fsync)
    if config.sink == "http":
        from podpatterns.adapter.sinks.http import HttpSink

        assert config.sink_url is not None
        return HttpSink(
            config.sink_url,
            fmt=config.sink_format,
            gzip_body=config.sink_gzip,
            headers=config.sink_header,
            token_file=config.sink_token_file,
            timeout=config.sink_timeout,
            retries=config.sink_retries,
            backoff=config.sink_backoff,
            backoff_max=config.sink_backoff_max,
            dead_letter=dead_letter,
            ca_file=config.sink_ca,
        )
    if config.sink == "tcp":
        from podpatterns.adapter.sinks.tcp import TcpSink

        return TcpSink(
            config.sink_address, config.sink_timeout, config.sink_backoff, config.sink_backoff_max
        )
    from podpatterns.adapter.sinks.stdout import StdoutSink

    return StdoutSink(config.stdout_max_line, config.stdout_oversize)
