"""The durable spool: where pushed records wait, fsync'ed, until every sink acknowledged them.

Records are appended as NDJSON lines (one JSON object per record, the input's name in
its ``input`` field) to numbered segment files under ``--spool-dir``
(``spool-0000000000000001.ndjson``, ...), and :meth:`Spool.append` returns only once they
are on disk (written and ``fdatasync``'ed). Appends that arrive while a write is in
flight are written together by the next one: one ``fdatasync`` for all of them (group
commit; :attr:`SpoolCounters.syncs` against :attr:`SpoolCounters.appends` shows it).

The pipeline reads the spool back in order (:meth:`Spool.read`), from what was synced
only, and hands the records on like lines of a tailed file; once the sink acknowledged a
batch, the checkpoint records, per segment, the offset every record before which was
acknowledged (:meth:`Spool.acknowledged`). A segment is closed ("sealed") once it holds
``segment_bytes``; a sealed segment whose every record was acknowledged is deleted
(:meth:`Spool.remove_done`). The bytes appended and not yet acknowledged are bounded by
``max_bytes``: beyond it, :meth:`Spool.append` raises
:class:`~podpatterns.adapter.inputs.SpoolFull` with an estimate of when to retry.

After a crash, a segment may end in a torn line (the process died inside a write, or the
machine lost what was written but not synced): it is cut off at the last newline and
counted (never merged with the next record), and what the checkpoint says was not
acknowledged is read again (at most the one unacknowledged batch is sent twice). NDJSON
keeps this check cheap (a torn line has no newline; a corrupt one does not parse) and the
segments readable with ``jq``.

An input whose messages are cheaper to keep as they arrived than as JSON (a chunk of
syslog frames read from TCP, an OTLP protobuf body) appends them raw
(:meth:`Spool.append_raw`): one line ``["raw",KIND,INPUT,"BASE64"]`` for the whole
chunk, written and synced like any other, and turned into records only when read back,
by the decoder of its kind (:data:`DECODERS`, or the one the input registered with the
append). The chunk must decode the same alone: an input appends only whole messages. A
raw line turns into more records than a batch holds: the reader hands them out in
batches of at most ``max_records``, and only the last one carries the line's offset for
the checkpoint (after a crash, the whole chunk is read again: at most once more).

Every file operation runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import importlib
import json
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from podpatterns import logs
from podpatterns.adapter.inputs import Record, SpoolFull
from podpatterns.atomicfile import fsync_directory

__all__ = ["DECODERS", "Decoder", "RawBlock", "Spool", "SpoolCounters", "segment_name"]

_SEGMENT = re.compile(r"spool-(\d{16})\.ndjson")
_BLOCK = 64 * 1024


Decoder = Callable[[bytes, str], list[Record]]
"""Raw bytes an input appended, and its name -> the records (``input`` set)."""

DECODERS: dict[str, str] = {
    "syslog": "podpatterns.adapter.inputs.syslog:decode_block",
    "otlp-protobuf": "podpatterns.adapter.inputs.otlp:decode_block",
}
"""Raw kinds -> the decoder used when no input registered one (after a restart with
another configuration): ``module:function``, imported when first needed."""


@dataclass(frozen=True)
class RawBlock:
    """Bytes appended raw: decoded into records when read back."""

    kind: str
    source: str
    data: bytes
    count: int  # messages in it, as the input counted them (0: unknown)


def segment_name(seq: int) -> str:
    """The file name of segment ``seq``."""
    return f"spool-{seq:016d}.ndjson"


@dataclass
class SpoolCounters:
    """Plain integers counted by the spool, read at scrape time."""

    appends: int = 0
    records_appended: int = 0
    bytes_appended: int = 0
    syncs: int = 0
    full: int = 0
    write_errors: int = 0
    records_read: int = 0
    raw_appends: int = 0
    raw_undecodable: int = 0
    records_from_memory: int = 0
    torn_tails: int = 0
    torn_bytes: int = 0
    corrupt_records: int = 0
    segments_removed: int = 0


@dataclass
class _Segment:
    seq: int
    path: Path
    size: int  # bytes synced: what the reader may read
    acked: int  # bytes acknowledged
    sealed: bool


class Spool:
    """Segment files under ``directory``; appends durable on return.

    Lifecycle: :meth:`open` (in a thread: scans, repairs torn tails, removes what was
    acknowledged), :meth:`run` (the writer, a task owned by the adapter), then
    :meth:`stop` (no more appends; those in flight are written) and :meth:`close`.

    Args:
        directory: where segments live (created if missing).
        max_bytes: most bytes appended and not yet acknowledged.
        segment_bytes: a segment is sealed once it holds this many bytes.
    """

    def __init__(self, directory: Path, *, max_bytes: int, segment_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.counters = SpoolCounters()
        self._segments: dict[int, _Segment] = {}
        self._active: _Segment | None = None
        self._fd = -1  # the active segment, for appending
        self._unacked = 0  # bytes appended (or being appended) and not acknowledged
        self._pending: list[tuple[bytes, list[Record] | RawBlock, asyncio.Future[None]]] = []
        # The records of the latest appends, as appended (segment, offset, records, bytes):
        # the reader takes them from here instead of decoding the segment again, as long
        # as they are next to read; bounded in bytes, the disk is the fallback.
        self._cache: deque[tuple[int, int, list[Record] | RawBlock, int]] = deque()
        self._cache_bytes = 0
        self.cache_max_bytes = min(max_bytes, 4 * 1024 * 1024)
        self._wake = asyncio.Event()
        self._synced = asyncio.Event()  # new bytes readable, or stopped
        self._space = asyncio.Event()
        self._space.set()
        self._stopped = False
        self._writing = False
        self._roll = False  # a failed write could not be cut back: start a new segment
        self._idle = asyncio.Event()  # nothing pending, nothing being written
        self._idle.set()
        self._acks: deque[tuple[float, int]] = deque()  # (when, bytes): the drain rate
        # The reader: the segment and offset it reads next, and its descriptor.
        self._read_seq = 0
        self._read_pos = 0
        self._read_fd = -1
        # Records of a raw line beyond a batch: handed out first, then the line's mark.
        self._rest: list[Record] = []
        self._rest_mark: tuple[int, int] = (0, 0)
        self.decoders: dict[str, Decoder] = {}
        """Input name -> its decoder of raw appends (set by :meth:`append_raw`)."""
        self._log = logs.get("adapter")

    # -- opening ---------------------------------------------------------------------------

    def open(self, acked: Mapping[int, int]) -> list[int]:
        """Scan the directory and start a new active segment (blocking: call in a thread).

        Args:
            acked: per segment, the offset the checkpoint says was acknowledged.

        Returns:
            The segments the checkpoint may forget: deleted now (every record of them
            was acknowledged) or gone already.

        Raises:
            OSError: the directory cannot be created or written.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise PermissionError(13, os.strerror(13), str(self.directory))
        found: dict[int, Path] = {}
        for entry in os.scandir(self.directory):
            m = _SEGMENT.fullmatch(entry.name)
            if m and entry.is_file(follow_symlinks=False):
                found[int(m.group(1))] = Path(entry.path)
        forget = [seq for seq in acked if seq not in found]
        for seq in sorted(found):
            path = found[seq]
            size = self._repair(path)
            seg = _Segment(seq, path, size, min(acked.get(seq, 0), size), sealed=True)
            if seg.acked >= seg.size:
                path.unlink()
                self.counters.segments_removed += 1
                if seq in acked:
                    forget.append(seq)
                continue
            self._segments[seq] = seg
            self._unacked += seg.size - seg.acked
        # Numbers only grow: a number the checkpoint may still hold is never reused.
        last = max([*found, *acked, 0])
        self._start_segment(last + 1)
        first = next(iter(self._segments.values()))
        self._read_seq, self._read_pos = first.seq, first.acked
        self._update_space()
        if self._unacked:
            self._log.info(
                "spool_opened",
                directory=str(self.directory),
                segments=len(self._segments) - 1,
                unacknowledged_bytes=self._unacked,
            )
        return forget

    def _repair(self, path: Path) -> int:
        """Cut a torn last line off ``path``; its size after that."""
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            end = size
            while end > 0:
                start = max(0, end - _BLOCK)
                block = os.pread(fd, end - start, start)
                nl = block.rfind(b"\n")
                if nl >= 0:
                    end = start + nl + 1
                    break
                end = start
            if end < size:
                # The process died inside a write, or the machine lost bytes written
                # but not synced: what follows the last newline was never acknowledged.
                os.ftruncate(fd, end)
                os.fsync(fd)
                self.counters.torn_tails += 1
                self.counters.torn_bytes += size - end
                self._log.warning(
                    "spool_torn_tail", segment=path.name, offset=end, bytes=size - end
                )
            return end
        finally:
            os.close(fd)

    def _start_segment(self, seq: int) -> None:
        """Create segment ``seq`` and make it the active one (blocking)."""
        path = self.directory / segment_name(seq)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        fsync_directory(self.directory)
        if self._fd >= 0:
            os.close(self._fd)
        if self._active is not None:
            self._active.sealed = True
        self._fd = fd
        self._active = _Segment(seq, path, 0, 0, sealed=False)
        self._segments[seq] = self._active

    # -- appending -------------------------------------------------------------------------

    @property
    def unacknowledged_bytes(self) -> int:
        """Bytes appended (or being appended) and not acknowledged yet."""
        return self._unacked

    async def append(self, records: list[Record], *, source: str) -> None:
        """Store ``records`` durably, each with ``input`` set to ``source``.

        Raises:
            SpoolFull: the spool holds ``max_bytes`` unacknowledged (or is stopping);
                nothing was stored.
            OSError: writing failed (disk full...); nothing was stored.
        """
        if not records:
            return
        await self._append(encode(records, source), records)

    async def append_raw(
        self, data: bytes, *, source: str, kind: str, count: int, decode: Decoder
    ) -> None:
        """Store ``data`` durably as it is: whole messages of ``kind`` that ``decode``
        turns into records when they are read back (:class:`SpoolFull`, :class:`OSError`
        as :meth:`append`).

        Args:
            data: the bytes, decodable alone.
            source: the input's name.
            kind: a key of :data:`DECODERS` (the decoder after a restart).
            count: how many messages ``data`` holds, for the counters (0: unknown).
            decode: the input's decoder (counting into its counters).
        """
        if not data:
            return
        self.decoders[source] = decode
        line = f'["raw",{json.dumps(kind)},{json.dumps(source)},"'.encode()
        line += base64.b64encode(data) + b'"]\n'
        self.counters.raw_appends += 1
        await self._append(line, RawBlock(kind, source, data, count))

    async def _append(self, data: bytes, records: list[Record] | RawBlock) -> None:
        n = len(data)
        if self._stopped:
            raise SpoolFull(1.0)
        if self._unacked and self._unacked + n > self.max_bytes:
            self.counters.full += 1
            self._space.clear()
            raise SpoolFull(self._retry_after(self._unacked + n - self.max_bytes))
        self._unacked += n
        self._update_space()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((data, records, fut))
        self._idle.clear()
        self._wake.set()
        # The write goes on if the caller is cancelled (its peer hung up): the records
        # are then stored, unacknowledged to anyone (at least once).
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            fut.add_done_callback(_consume)
            raise

    async def wait_for_space(self) -> None:
        """Return at once, unless the spool was found full: then once at most half of
        ``max_bytes`` is unacknowledged (hysteresis: a stream input that appends at most
        that much at once then does not see SpoolFull again from its own appends)."""
        await self._space.wait()

    def _update_space(self) -> None:
        if self._unacked <= self.max_bytes // 2:
            self._space.set()
        elif self._unacked >= self.max_bytes:
            self._space.clear()

    def _retry_after(self, excess: int) -> float:
        """Seconds until ``excess`` bytes are likely acknowledged, from the recent rate."""
        now = time.monotonic()
        while self._acks and now - self._acks[0][0] > 30:
            self._acks.popleft()
        if not self._acks:
            return 5.0  # nothing acknowledged lately: the sink is likely down
        span = max(1.0, now - self._acks[0][0])
        rate = sum(b for _, b in self._acks) / span
        return float(min(60, max(1, math.ceil(excess / rate))))

    async def run(self) -> None:
        """The writer: write and sync what was appended, in groups, until stopped.

        Cancelled (a drain cut short), it refuses what was appended and not yet
        confirmed (:class:`SpoolFull`: the peer retries; what the last write had put on
        disk is then stored twice, at least once), so no caller waits forever.
        """
        group: list[tuple[bytes, list[Record] | RawBlock, asyncio.Future[None]]] = []
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if not self._pending:
                    if self._stopped:
                        return
                    continue
                group, self._pending = self._pending, []
                self._writing = True
                try:
                    await self._write_group(group)
                finally:
                    self._writing = False
                    self._synced.set()
                    if self._pending:
                        self._wake.set()
                    else:
                        self._idle.set()
        finally:
            self._stopped = True
            for _, _, fut in [*group, *self._pending]:
                if not fut.done():
                    fut.set_exception(SpoolFull(1.0))
            self._pending = []
            self._idle.set()
            self._synced.set()

    async def _write_group(
        self, group: list[tuple[bytes, list[Record] | RawBlock, asyncio.Future[None]]]
    ) -> None:
        data = b"".join(d for d, _, _ in group)
        active = self._active
        assert active is not None
        try:
            if active.size >= self.segment_bytes or self._roll:
                self._roll = False
                await asyncio.to_thread(self._start_segment, active.seq + 1)
                active = self._active
                assert active is not None
            await asyncio.to_thread(self._write, self._fd, data, active.size)
        except OSError as exc:
            self.counters.write_errors += 1
            self._unacked -= len(data)
            self._update_space()
            self._log.error("spool_write_failed", directory=str(self.directory), error=str(exc))
            for _, _, fut in group:
                if not fut.done():
                    fut.set_exception(OSError(exc.errno, exc.strerror))
            return
        at = active.size
        active.size += len(data)
        c = self.counters
        c.syncs += 1
        c.appends += len(group)
        c.records_appended += sum(
            r.count if isinstance(r, RawBlock) else len(r) for _, r, _ in group
        )
        c.bytes_appended += len(data)
        cache = self._cache
        for d, records, _ in group:
            cache.append((active.seq, at, records, len(d)))
            self._cache_bytes += len(d)
            at += len(d)
        while self._cache_bytes > self.cache_max_bytes and len(cache) > 1:
            self._cache_bytes -= cache.popleft()[3]
        for _, _, fut in group:
            if not fut.done():
                fut.set_result(None)

    def _write(self, fd: int, data: bytes, at: int) -> None:
        """Append ``data`` and sync it; on failure, cut the file back to ``at``."""
        try:
            view = memoryview(data)
            while view:
                done = os.write(fd, view)
                view = view[done:]
            os.fdatasync(fd)
        except OSError:
            try:
                os.ftruncate(fd, at)
            except OSError:
                # What follows ``at`` stays (never read: the reader stops at the synced
                # size); nothing more is appended after it.
                self._roll = True
            raise

    async def stop(self) -> None:
        """Refuse appends from now on (SpoolFull); return once those in flight are written."""
        self._stopped = True
        self._wake.set()
        await self._idle.wait()
        self._synced.set()

    # -- reading ---------------------------------------------------------------------------

    async def read(
        self, max_bytes: int, max_records: int
    ) -> tuple[list[Record], int, dict[int, int]] | None:
        """The next records synced and not read yet: about ``max_bytes`` of them, at most
        ``max_records``.

        Waits for some; ``None`` once stopped and everything was read. Appends still in
        memory are gathered into one batch; the records of a raw line continue in the
        next batch when they do not fit.

        Returns:
            The records, the bytes they took in the spool, and per segment read, the
            offset the checkpoint reaches once they are acknowledged: the end of the
            last line all of whose records are in this batch or an earlier one (empty
            when this batch holds only part of a raw line).
        """
        records: list[Record] = []
        marks: dict[int, int] = {}
        used = 0
        while len(records) < max_records:
            if self._rest:
                room = max_records - len(records)
                records += self._rest[:room]
                del self._rest[:room]
                if not self._rest:
                    seq, pos = self._rest_mark
                    marks[seq] = pos
                continue
            if (records or marks) and (used >= max_bytes or not self._next_cached()):
                break  # more only if it is at hand in memory
            got = await self._read_lines(max_bytes - used, max_records)
            if got is None:
                if not (records or marks):
                    return None
                break
            self._rest, n = got
            used += n
            self._rest_mark = (self._read_seq, self._read_pos)
            if not self._rest:
                marks[self._read_seq] = self._read_pos
        self.counters.records_read += len(records)
        return records, used, marks

    def _next_cached(self) -> bool:
        """Whether the next append to read is in memory."""
        cache = self._cache
        return bool(cache) and (cache[0][0], cache[0][1]) == (self._read_seq, self._read_pos)

    async def _read_lines(
        self, max_bytes: int, max_records: int
    ) -> tuple[list[Record], int] | None:
        """The records of the next lines (a raw line alone, decoded) and their bytes; the
        reader's position moves past them. Waits for some; ``None`` once stopped and
        everything was read."""
        while True:
            seg = self._segments.get(self._read_seq)
            if seg is None:  # removed: every record of it was acknowledged
                nxt = [s for s in self._segments if s > self._read_seq]
                if not nxt:
                    return None
                self._next_segment(nxt[0])
                continue
            if self._read_pos < seg.size:
                break
            if seg.sealed and seg is not self._active:
                nxt = [s for s in self._segments if s > self._read_seq]
                self._next_segment(nxt[0])
                continue
            if self._stopped and not self._pending and not self._writing:
                return None
            self._synced.clear()
            await self._synced.wait()
        cached = self._from_cache(seg.seq, max_bytes, max_records)
        if cached is not None:
            items, used = cached
            self._read_pos += used
            records = self._expand(items)
            self.counters.records_from_memory += len(records)
            return records, used
        if self._read_fd < 0:
            self._read_fd = await asyncio.to_thread(os.open, seg.path, os.O_RDONLY)
        want = min(seg.size - self._read_pos, max(max_bytes, 1))
        items, used = await asyncio.to_thread(
            self._decode, self._read_fd, self._read_pos, want, seg.size, max(max_records, 1)
        )
        if not used:  # cannot happen with segments we wrote: skip the bytes, counted
            self.counters.corrupt_records += 1
            used = want
        self._read_pos += used
        return self._expand(items), used

    def _expand(self, items: list[Record] | RawBlock) -> list[Record]:
        """The records of ``items``: decoded, for a raw block (on the event loop: the
        decoders count into their input's counters)."""
        if not isinstance(items, RawBlock):
            return items
        decode = self.decoders.get(items.source) or _default_decoder(items.kind)
        try:
            if decode is None:
                raise LookupError(f"no decoder for raw kind {items.kind!r}")
            return decode(items.data, items.source)
        except Exception as exc:  # a decoder bug: counted and logged, the reader goes on
            self.counters.raw_undecodable += 1
            self.counters.corrupt_records += 1  # the metric of lines that did not decode
            self._log.error(
                "spool_raw_undecodable",
                kind=items.kind,
                input=items.source,
                bytes=len(items.data),
                error=f"{type(exc).__name__}: {exc}",
            )
            return []

    def _from_cache(
        self, seq: int, max_bytes: int, max_records: int
    ) -> tuple[list[Record] | RawBlock, int] | None:
        """The appends next to read, whole, if they are still cached; and their bytes.
        A raw append comes alone."""
        cache = self._cache
        pos = self._read_pos
        while cache and (cache[0][0], cache[0][1]) < (seq, pos):
            self._cache_bytes -= cache.popleft()[3]
        records: list[Record] = []
        used = 0
        while cache:
            cseq, at, recs, size = cache[0]
            if cseq != seq or at != pos + used:
                break
            if isinstance(recs, RawBlock):
                if records:
                    break
                cache.popleft()
                self._cache_bytes -= size
                return recs, size
            if records and (len(records) + len(recs) > max_records or used >= max_bytes):
                break
            if not records and len(recs) > max_records:
                return None  # larger than a batch: split by the disk reader
            cache.popleft()
            self._cache_bytes -= size
            records += recs
            used += size
        return (records, used) if records else None

    def _next_segment(self, seq: int) -> None:
        if self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1
        self._read_seq, self._read_pos = seq, 0

    def _decode(
        self, fd: int, pos: int, want: int, size: int, max_records: int
    ) -> tuple[list[Record] | RawBlock, int]:
        """Records of whole lines from ``pos`` (blocking); and the bytes they used. A raw
        line comes alone: the records before it are returned first."""
        data = os.pread(fd, want, pos)
        end = data.rfind(b"\n") + 1
        while end == 0 and pos + len(data) < size:  # one record longer than ``want``
            data += os.pread(fd, min(size - pos - len(data), max(want, _BLOCK)), pos + len(data))
            end = data.rfind(b"\n") + 1
        records: list[Record] = []
        loads = json.loads
        start = lines = 0
        while start < end and lines < max_records:
            nl = data.index(b"\n", start)
            if data.startswith(b'["raw",', start):
                if records:
                    break
                block = _raw_line(data[start:nl])
                start = nl + 1
                if block is None:
                    self.counters.corrupt_records += 1
                    continue
                return block, start
            try:
                rec = loads(data[start:nl])
            except ValueError:
                rec = None
            start = nl + 1
            lines += 1
            if not isinstance(rec, dict):
                # Never written by us (a disk error, a hand edit): counted and skipped.
                self.counters.corrupt_records += 1
                continue
            records.append(rec)
        return records, start

    # -- acknowledging ---------------------------------------------------------------------

    def acknowledged(self, marks: Mapping[int, int]) -> None:
        """Every record before ``marks[seq]`` in segment ``seq`` was acknowledged."""
        freed = 0
        for seq, offset in marks.items():
            seg = self._segments.get(seq)
            if seg is not None and offset > seg.acked:
                freed += offset - seg.acked
                seg.acked = offset
        if freed:
            self._unacked -= freed
            self._acks.append((time.monotonic(), freed))
            self._update_space()

    async def remove_done(self) -> list[int]:
        """Delete the sealed segments whose every record was acknowledged.

        Returns:
            Their numbers (the checkpoint may forget them now).
        """
        done = [
            s
            for s in self._segments.values()
            if s.sealed and s is not self._active and s.acked >= s.size
        ]
        removed: list[int] = []
        for seg in done:
            if seg.seq == self._read_seq:
                continue  # the reader still holds it open; removed on the next call
            try:
                await asyncio.to_thread(seg.path.unlink)
            except FileNotFoundError:
                pass
            except OSError as exc:
                self._log.warning("spool_remove_failed", segment=seg.path.name, error=str(exc))
                continue
            del self._segments[seg.seq]
            self.counters.segments_removed += 1
            removed.append(seg.seq)
        return removed

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the descriptors (an empty active segment is removed)."""
        for fd in (self._fd, self._read_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._read_fd = -1
        active = self._active
        if active is not None and active.size == 0 and not self._pending:
            with contextlib.suppress(OSError):
                active.path.unlink()

    def segments(self) -> int:
        """How many segment files there are."""
        return len(self._segments)


def _raw_line(line: bytes) -> RawBlock | None:
    """A raw line's block; ``None`` if it is not one (corrupt)."""
    try:
        tag, kind, source, data = json.loads(line)
        if tag != "raw" or not isinstance(kind, str) or not isinstance(source, str):
            return None
        return RawBlock(kind, source, base64.b64decode(data, validate=True), 0)
    except (ValueError, TypeError, binascii.Error):
        return None


_DEFAULT_DECODERS: dict[str, Decoder | None] = {}


def _default_decoder(kind: str) -> Decoder | None:
    """The decoder :data:`DECODERS` names for ``kind`` (``None``: unknown kind)."""
    if kind not in _DEFAULT_DECODERS:
        where = DECODERS.get(kind)
        fn: Decoder | None = None
        if where is not None:
            module, _, name = where.partition(":")
            fn = getattr(importlib.import_module(module), name)
        _DEFAULT_DECODERS[kind] = fn
    return _DEFAULT_DECODERS[kind]


def _consume(fut: asyncio.Future[None]) -> None:
    """Retrieve the outcome of an append whose caller went away (no "never retrieved")."""
    if not fut.cancelled():
        fut.exception()


_DUMPS = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str).encode
_DUMPS_ASCII = json.JSONEncoder(separators=(",", ":"), default=str).encode


def encode(records: list[Record], source: str) -> bytes:
    """``records`` as NDJSON, each with ``input`` set to ``source``."""
    out = []
    for rec in records:
        rec["input"] = source
        out.append(_DUMPS(rec))
    out.append("")
    text = "\n".join(out)
    try:
        return text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (JSON allows "\ud800"): escaped, it reads back the same.
        return "\n".join([*map(_DUMPS_ASCII, records), ""]).encode()


def describe(counters: SpoolCounters) -> dict[str, Any]:
    """The non-zero counters (for the ``adapter_stopped`` event)."""
    return {k: v for k, v in vars(counters).items() if v}
