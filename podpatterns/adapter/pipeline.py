"""Wire the stages: discovery -> read -> join -> batch -> parse -> transform -> sinks -> checkpoint.

Two tasks and one bounded queue, plus a task per sink (another task, the file watch,
only wakes the reader).
The reader discovers files (:mod:`~podpatterns.adapter.tracking`), reads and splits them
into lines (:mod:`~podpatterns.adapter.reader`), joins CRI partials or multiline records
(:mod:`~podpatterns.adapter.join`) and puts batches (with, per file, the offset the
checkpoint reaches) on a queue bounded in bytes (:mod:`~podpatterns.adapter.batch`): when
the sink is slow or down the queue fills and reading pauses, so the files themselves are
the buffer. The sender parses (:mod:`~podpatterns.adapter.records`) and transforms
(:mod:`~podpatterns.adapter.transform`) each batch once and hands it to every sink's lane
(:mod:`~podpatterns.adapter.ship`); each lane ships its batches in order. A batch is
acknowledged once every sink has acknowledged it, in batch order: only then does the
checkpoint of each file in the batch move (:mod:`~podpatterns.adapter.checkpoint`), and
the checkpoint is written (crash-safely) by the lane that acknowledged it last, before
that lane sends its next batch. So a file's checkpoint never passes a record some sink
did not acknowledge; with one sink, after a crash at most the one unacknowledged batch
is sent again, and with several, the batches not yet acknowledged by all of them. The
queue's bytes are given back only when every sink has acknowledged a batch, so a sink
that is down holds at most ``--queue-max-bytes`` while the others go on shipping.

Pushed inputs (:mod:`~podpatterns.adapter.inputs`) append what they receive to the
durable spool (:mod:`~podpatterns.adapter.spool`); a third producer reads the spool back
in order and puts its records, already structured (no line parser), on the same queue,
each batch with the spool offsets the checkpoint reaches once it is acknowledged.

The stages import none of each other; this module is the only one that knows them all.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Any

import watchfiles

from podpatterns import logs
from podpatterns.adapter import metrics
from podpatterns.adapter.batch import LINE_OVERHEAD, Batch, Batcher, ByteQueue
from podpatterns.adapter.checkpoint import NAME, Checkpoint, CheckpointStore, Entry
from podpatterns.adapter.config import AdapterConfig, SinkConfig
from podpatterns.adapter.counters import Counters
from podpatterns.adapter.cri import CriJoiner
from podpatterns.adapter.inputs import Input
from podpatterns.adapter.join import Joiner
from podpatterns.adapter.k8s import K8sMetadata
from podpatterns.adapter.l2m import MetricState
from podpatterns.adapter.lines import Line
from podpatterns.adapter.metrics import Counted
from podpatterns.adapter.multiline import PRESETS, Grouper
from podpatterns.adapter.parse import Parser, get_parser
from podpatterns.adapter.reader import Reader
from podpatterns.adapter.records import Record, RecordParser
from podpatterns.adapter.scrape import JsonScraper
from podpatterns.adapter.ship import Lane, Shipment, build_sink, dead_letter_failed
from podpatterns.adapter.sinks import DeadLetter, Sink
from podpatterns.adapter.sinks.none import NoneSink
from podpatterns.adapter.spool import Spool
from podpatterns.adapter.statsd import StatsdMetrics, StatsdServer
from podpatterns.adapter.tail import FileKey
from podpatterns.adapter.tracking import Tracked, Tracker
from podpatterns.adapter.transform import Counters as TransformCounters
from podpatterns.adapter.transform import TransformChain, load_callable, redactor
from podpatterns.adapter.watch import FileEvents, WatcherFactory
from podpatterns.errors import ConfigError
from podpatterns.metrics import CallbackCollector
from podpatterns.tasks import TaskSet

__all__ = ["Adapter", "build_inputs"]


def _unusable(flag: str, directory: Path, exc: OSError) -> ConfigError:
    """The error for a state directory (checkpoint, spool) that cannot be used."""
    hint = (
        "mount a writable volume (an emptyDir) there"
        if exc.errno == errno.EROFS
        else "it must be a directory this user can write; in a Pod, set fsGroup"
    )
    return ConfigError(f"{flag}: cannot use {directory}: {exc.strerror} ({hint})")


def build_inputs(config: AdapterConfig) -> list[Input]:
    """The pushed inputs ``config`` asks for (each module imported on first use)."""
    inputs: list[Input] = []
    if config.http_listen is not None:
        from podpatterns.adapter.inputs.http import HttpInput

        inputs.append(HttpInput(config.http_listen, max_body=config.http_max_body))
    if config.tcp_listen is not None:
        from podpatterns.adapter.inputs.tcp import TcpInput

        inputs.append(TcpInput(config.tcp_listen, max_line=config.max_line_bytes))
    if any(flag.startswith("--syslog-") for flag in config.pushed_inputs):
        from podpatterns.adapter.inputs.syslog import inputs_from_config

        inputs.extend(inputs_from_config(config))
    if config.forward_listen is not None or config.forward_unix is not None:
        from podpatterns.adapter.inputs import forward

        inputs.extend(forward.inputs_from_config(config))
    return inputs


LOOKAHEAD = 2
"""Batches parsed ahead of the fastest sink (one being shipped, one ready)."""


class Adapter:
    """The adapter as a :class:`~podpatterns.runtime.Component`.

    Args:
        config: the validated configuration.
        sink: where records go (the sinks are built from ``config`` when neither this nor
            ``sinks`` is given).
        sinks: several sinks, each shipping every record: by name, or a list of sink
            objects and :class:`~podpatterns.adapter.config.SinkConfig` entries (built
            here, with the dead-letter file of ``config``).
        watcher: ``watchfiles.awatch``-compatible factory (tests inject failures).
        inputs: the pushed inputs (built from ``config`` when omitted); they need
            ``config.spool_dir``.
        parser: parses the lines of files instead of the one ``config.parse`` names.
        transforms: the chains applied in turn to every batch, instead of the one
            ``config``'s transform options make.
    """

    name = "adapter"

    def __init__(
        self,
        config: AdapterConfig,
        *,
        sink: Sink | None = None,
        sinks: Mapping[str, Sink] | Sequence[Sink | SinkConfig] | None = None,
        watcher: WatcherFactory = watchfiles.awatch,
        inputs: Sequence[Input] | None = None,
        parser: Parser | None = None,
        transforms: Sequence[TransformChain] | None = None,
    ) -> None:
        self.config = config
        self.dead_letter = DeadLetter(config.dead_letter, config.dead_letter_max_bytes)
        self.counters = Counters()
        if sink is not None:
            sinks = {sink.name: sink}
        self.lanes: list[Lane] = []
        if isinstance(sinks, Mapping):
            for name, s in sinks.items():
                self.lanes.append(Lane(name, s, self.counters, config.sink_unready_after))
        else:
            for c in config.sinks if sinks is None else sinks:
                if isinstance(c, SinkConfig):
                    built = build_sink(c, self.dead_letter)
                    self.lanes.append(Lane(c.name, built, self.counters, c.sink_unready_after))
                else:  # the application's own: raising is how it says "not accepted"
                    self.lanes.append(
                        Lane(c.name, c, self.counters, config.sink_unready_after, retry_any=True)
                    )
        names = [lane.name for lane in self.lanes]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"sinks: name {twice[0]!r} used twice (give each its own name)")
        # Shipments handed to the lanes and not yet acknowledged by all, in batch order.
        self._inflight: deque[Shipment] = deque()
        self._ack_lock = asyncio.Lock()
        self._all_acked = asyncio.Event()
        self._lane_moved = asyncio.Event()
        self._unready_reason: str | None = None
        self.inputs: list[Input] = list(build_inputs(config) if inputs is None else inputs)
        self.scraper = JsonScraper(config.scrape)
        self.statsd: StatsdServer | None = None
        if config.statsd:
            metrics_store = StatsdMetrics(
                config.statsd_mappings,
                buckets=config.statsd_buckets,
                max_series=config.statsd_max_series,
                reserved=config.declared_metric_names(),
                expire_after=config.statsd_expire_after,
            )
            self.statsd = StatsdServer(metrics_store, udp=config.statsd_udp, tcp=config.statsd_tcp)
        self.spool: Spool | None = None
        if self.inputs:
            if config.spool_dir is None:
                raise ConfigError("--spool-dir: missing (pushed inputs need a spool directory)")
            self.spool = Spool(
                config.spool_dir,
                max_bytes=config.spool_max_bytes,
                segment_bytes=config.spool_segment_bytes,
            )
        # Without --checkpoint-dir, the spool's directory holds the checkpoint: spooled
        # records are acknowledged through it, so it must survive a restart with them.
        state_dir = config.state_dir
        self._store = CheckpointStore(state_dir) if state_dir else None
        self._checkpoint = Checkpoint(self._store)
        # Logs to metrics: counted at acknowledgement, saved in the checkpoint's generations.
        self.metric_state = MetricState(config.metrics) if config.metrics else None
        if self.metric_state is not None:
            self._checkpoint.metrics = self.metric_state.dump
        own_paths = [
            p
            for p in (
                state_dir,
                config.spool_dir,
                config.dead_letter,
                *(c.sink_path for c in config.sinks if c.kind == "file"),
            )
            if p is not None
        ]
        self._tracker = Tracker(
            config,
            self._checkpoint,
            self.counters,
            self._new_joiner,
            self._flush_file,
            own_paths=[
                *own_paths,
                *(
                    [state_dir / n for n in (NAME, NAME + ".prev", NAME + ".tmp")]
                    if state_dir
                    else []
                ),
            ],
        )
        self._reader = Reader(config.read_chunk, self.counters)
        # While the sink is down and the queue full, discovery goes on: files rotated
        # meanwhile are followed and opened (an fd each), so no generation is lost.
        self._queue = ByteQueue(
            config.queue_max_bytes,
            self._discover_while_full,
            config.reconcile_interval,
            producers=bool(config.path) + bool(self.spool),
        )
        self._batcher = Batcher(self._queue, config.batch_max_records, config.batch_max_bytes)
        self._chains = list(transforms) if transforms is not None else [self._config_chain()]
        read = self._fields_read() if parser is None else None
        self._parser = RecordParser(
            config.parse if parser is None else getattr(parser, "__name__", "custom"),
            get_parser(config.parse, config.regex, read) if parser is None else parser,
            drop_errors=config.on_parse_error == "drop",
            counters=self.counters,
            fields=read,
        )
        self._transform_counters = self._chains[0].counters if self._chains else TransformCounters()
        # The Downward API's variables are the Pod's facts, read here like the volume.
        self._k8s = K8sMetadata(config.k8s_env_metadata, os.environ, config.k8s_metadata_dir)
        # Our own writes (checkpoint, file sink, dead letters) may live in a watched
        # directory: their events would only wake the reader for nothing.
        self._events = FileEvents(
            config.path,
            own_paths,
            poll=config.watch == "poll",
            watcher=watcher,
        )
        self._stopping = False
        self._reader_done = not config.path
        self._spool_done = self.spool is None
        self._drained = asyncio.Event()
        self._tasks = TaskSet("adapter")
        self._started = False
        self._failed = False
        self._log = logs.get("adapter")

    def _fields_read(self) -> frozenset[str] | None:
        """In a metrics-only adapter (every sink ``none``, no transform), the only record
        fields anything reads: the parser and the parse stage may leave the others out.
        ``None`` when records are shipped or transformed (every field matters)."""
        if self.metric_state is None or self.config.transform:
            return None
        if any(chain.active for chain in self._chains):
            return None
        if not all(isinstance(lane.sink, NoneSink) for lane in self.lanes):
            return None
        return self.metric_state.fields()

    def _config_chain(self) -> TransformChain:
        """The transforms the options ask for, as one chain (applied in its fixed order)."""
        config = self.config
        return TransformChain(
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

    @property
    def sink(self) -> Sink:
        """The first sink (the only one, unless several were configured)."""
        return self.lanes[0].sink

    @property
    def tracked(self) -> dict[FileKey, Tracked]:
        """The files being read, by identity."""
        return self._tracker.tracked

    @property
    def acked(self) -> dict[FileKey, Entry]:
        """The acknowledged position of every file the checkpoint knows."""
        return self._checkpoint.acked

    @property
    def mode(self) -> str:
        """``watch`` while file events wake the reader, ``poll`` otherwise."""
        return self._events.mode

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the checkpoint, open the files, the spool and the sink, start reading,
        bind the pushed inputs.

        Raises:
            ConfigError: a ``--transform`` cannot be imported, or the checkpoint or spool
                directory cannot be created or written.
            BindError: an input cannot bind its address.
        """
        if self.config.transform:
            if not self._chains:
                self._chains.append(TransformChain(counters=self._transform_counters))
            user = tuple(load_callable(ref) for ref in self.config.transform)
            self._chains[-1].user += user
        try:
            await self._checkpoint.load()
        except OSError as exc:
            assert self._store is not None  # nothing to load without a store
            flag = "--checkpoint-dir" if self.config.checkpoint_dir else "--spool-dir"
            raise _unusable(flag, self._store.directory, exc) from None
        if self.metric_state is not None:
            self.metric_state.restore(self._checkpoint.loaded_metrics)
        if self.spool is not None:
            await self._open_spool(self.spool)
        self._tracker.restore(time.monotonic())
        if self.config.k8s_metadata_dir is not None:
            await self._k8s.refresh()
            self._tasks.spawn(self._k8s.watch(), "adapter-k8s-metadata")
        for lane in self.lanes:
            await lane.sink.start()
        # The stages end on their own (the stream drained, the watch stopped or fell back
        # to polling): returning is their normal end; raising is a death.
        if self.config.path:
            if self.mode == "watch":
                self._tasks.spawn(self._events.run(), "adapter-watch", may_return=True)
            self._tasks.spawn(self._read_loop(), "adapter-read", may_return=True)
        if self.spool is not None:
            self._tasks.spawn(self.spool.run(), "adapter-spool-write", may_return=True)
            self._tasks.spawn(self._spool_loop(self.spool), "adapter-spool-read", may_return=True)
        self._tasks.spawn(self._send_loop(), "adapter-send", may_return=True)
        for target in self.scraper.targets:
            self._tasks.spawn(self.scraper.run(target), f"adapter-scrape-{target.config.name}")
        for lane in self.lanes:
            self._tasks.spawn(self._lane_loop(lane), f"adapter-sink-{lane.name}", may_return=True)
        # Bound last: a peer is answered only once everything behind the input runs.
        try:
            if self.statsd is not None:
                await self.statsd.start()
            for inp in self.inputs:
                assert self.spool is not None
                await inp.start(self.spool)
        except BaseException:
            await self.close()  # the runtime closes only components that started
            raise
        self._started = True
        self._log.info(
            "adapter_started",
            paths=list(self.config.path),
            files=len(self.tracked),
            inputs=[i.name for i in self.inputs],
            sinks=[lane.name for lane in self.lanes],
            mode=self.mode,
        )

    async def _open_spool(self, spool: Spool) -> None:
        try:
            forget = await asyncio.to_thread(spool.open, self._checkpoint.spool)
        except OSError as exc:
            raise _unusable("--spool-dir", spool.directory, exc) from None
        self._checkpoint.forget_segments(forget)

    def is_ready(self) -> bool:
        """Ready once started, as long as no stage failed, no task died and no sink has
        been failing longer than its ``--sink-unready-after``."""
        if not (self._started and not self._failed and self._tasks.healthy):
            return False
        return self.unready_reason() is None

    def unready_reason(self) -> str | None:
        """Why a sink makes the adapter unready (logged once per change), or ``None``."""
        now = time.monotonic()
        reason = None
        for lane in self.lanes:
            down = lane.down_for(now)
            if lane.unready_after is not None and down >= lane.unready_after:
                reason = f"sink {lane.name} failing for {down:.0f}s"
                break
        if (reason is None) != (self._unready_reason is None):
            if reason is None:
                self._log.info("sinks_ready_again")
            else:
                self._log.warning("sink_unready", reason=reason)
        self._unready_reason = reason
        return reason

    def is_live(self) -> bool:
        """Live unless one of the adapter's tasks, or an input's, died (a bug: a restart
        may help)."""
        return self._tasks.healthy and all(i.is_live() for i in self.inputs)

    def stop_accepting(self) -> None:
        """Look for new files one last time, then stop discovering; read every open file
        to its end, then finish."""
        if not self._stopping:
            self._stopping = True
            self._events.stop()
            if self.spool is not None:
                self._tasks.spawn(self._stop_inputs(), "adapter-inputs-stop", may_return=True)

    async def _stop_inputs(self) -> None:
        """Close the inputs (requests in flight are answered), then the spool's writer: the
        spool reader then reads to the end and finishes."""
        await self._close_inputs()
        if self.spool is not None:
            await self.spool.stop()

    async def _close_inputs(self) -> None:
        for inp in self.inputs:
            await inp.close()
        if self.statsd is not None:
            await self.statsd.close()

    def in_flight(self) -> int:
        """Batches queued or being shipped, plus one while files or the spool are still
        being read."""
        return (
            len(self._queue)
            + len(self._inflight)
            + (0 if self._reader_done else 1)
            + (0 if self._spool_done else 1)
        )

    async def wait_drained(self) -> None:
        """Return once every batch read was shipped and checkpointed."""
        await self._drained.wait()

    def cut(self) -> int:
        """Stop reading and shipping now; return the batches that were left."""
        left = len(self._queue) + len(self._inflight)
        self._tasks.cancel()
        return left

    async def close(self) -> None:
        """Stop the tasks, write the final checkpoint, close files, inputs, spool and sink."""
        self._events.stop()
        await self._tasks.aclose()
        await self._close_inputs()
        await self._checkpoint.save(force=True)
        self._tracker.close_all()
        if self.spool is not None:
            self.spool.close()
        for lane in self.lanes:
            await lane.sink.close()
        spooled = {} if self.spool is None else vars(self.spool.counters)
        self._log.info(
            "adapter_stopped",
            **{k: v for k, v in vars(self.counters).items() if v},
            **{"spool_" + k: v for k, v in spooled.items() if v},
        )

    # -- wiring of the stages ------------------------------------------------------------

    def _new_joiner(self) -> Joiner | None:
        """The joiner of a newly opened file (the config allows at most one kind)."""
        cfg = self.config
        if cfg.parse == "cri":
            return CriJoiner(cfg.max_line_bytes, self.counters)
        if cfg.multiline != "off":
            mode, pattern = PRESETS[cfg.multiline]
            regex = re.compile(pattern)
        elif cfg.multiline_start is not None:
            mode, regex = "start", cfg.multiline_start
        elif cfg.multiline_continue is not None:
            mode, regex = "continue", cfg.multiline_continue
        else:
            return None
        return Grouper(
            mode, regex, cfg.multiline_max_lines, cfg.multiline_max_bytes, cfg.multiline_timeout
        )

    async def _hand_on(self, t: Tracked, lines: list[Line]) -> None:
        """Join a file's new lines and add them to the batch being gathered."""
        if t.joiner is not None:
            lines = t.joiner.feed(lines)
        await self._batcher.add(t, lines, t.committed)

    async def _flush_file(self, t: Tracked) -> bool:
        """Hand on what a file holds: an unterminated line, an open group (rotation,
        truncation, --flush-partial-after). True if anything was handed on."""
        lines: list[Line] = []
        line = t.splitter.flush()
        if line is not None:
            self.counters.partial_flushed += 1
            lines = [line] if t.joiner is None else t.joiner.feed([line])
        if t.joiner is not None:
            lines += t.joiner.flush()
        if lines:
            await self._batcher.add(t, lines, lines[-1].end)
        return bool(lines)

    # -- the reader task -------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            await self._produce("read", self._read_until_stopped())
        finally:
            self._reader_done = True

    async def _produce(self, stage: str, run: Awaitable[None]) -> None:
        """Run a producer (the file reader, the spool reader) until it ends; then tell the
        queue, even when it failed."""
        try:
            await run
        except Exception:
            # A bug: readiness turns 503 and the traceback is logged; the TaskSet logs
            # the task's death too and liveness turns off.
            self._failed = True
            self._log.exception("adapter_stage_failed", stage=stage)
            raise
        finally:
            # The sender must learn the stream ended, even when reading failed.
            self._queue.end()

    async def _read_until_stopped(self) -> None:
        cfg = self.config
        events = self._events
        next_reconcile = time.monotonic() + cfg.reconcile_interval
        looked_last = False
        while True:
            now = time.monotonic()
            # Cleared before reading: an event that arrives while we read keeps it set,
            # so the wait below returns at once instead of at the next reconcile.
            events.wake.clear()
            if self._stopping and not looked_last:
                # One last look before discovery stops: a file the main container wrote
                # just before it exited (an --exit-with stop follows its tombstone at
                # once, before any file event) is still read to its end and shipped.
                looked_last = True
                self._tracker.discover(now)
            elif not self._stopping and (now >= next_reconcile or events.discover_requested):
                events.discover_requested = False
                self._tracker.discover(now)
                next_reconcile = now + cfg.reconcile_interval
            progressed = await self._read_round(now)
            await self._batcher.flush()
            if progressed:
                await asyncio.sleep(0)
                continue
            if self._stopping:
                # Every file is read to its end: an unterminated last line (the writer
                # exited before its newline) is complete as far as the writer is
                # concerned, and is shipped, marked partial.
                for t in list(self.tracked.values()):
                    await self._flush_file(t)
                await self._batcher.flush()
                return
            if await self._idle_work(now):
                await self._batcher.flush()
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
                    await events.wake.wait()
            except TimeoutError:
                pass

    def _discover_while_full(self) -> None:
        if not self._stopping:
            self._tracker.discover(time.monotonic())

    async def _read_round(self, now: float) -> bool:
        """Read one chunk from every file that grew and hand the lines on. True if any grew."""
        progressed = False
        for t in list(self.tracked.values()):
            got = self._reader.read(t.file, t.splitter)
            if got is None:
                continue
            if got == "failed":
                self._tracker.close(t, "read_failed")
                continue
            progressed = True
            if got == "truncated":
                await self._tracker.truncated(t, now)
                continue
            t.last_growth = now
            if got:
                await self._hand_on(t, got)
        return progressed

    async def _idle_work(self, now: float) -> bool:
        """Flush idle partial lines and groups; close rotated files read to their end.

        Returns:
            True if anything was handed on.
        """
        cfg = self.config
        handed = False
        for t in list(self.tracked.values()):
            idle = now - t.last_growth
            if (
                cfg.flush_partial_after is not None
                and t.splitter.held
                and idle >= cfg.flush_partial_after
            ):
                handed |= await self._flush_file(t)
            joiner = t.joiner
            if (
                joiner is not None
                and joiner.idle_timeout is not None
                and joiner.held_from is not None
                and idle >= joiner.idle_timeout
            ):
                lines = joiner.flush()
                await self._batcher.add(t, lines, lines[-1].end)
                handed = True
            if t.file.rotated and idle >= cfg.rotate_wait and now - t.rotated_at >= cfg.rotate_wait:
                handed |= await self._flush_file(t)
                self._tracker.close(t, "rotated")
        return handed

    # -- the spool reader task -------------------------------------------------------------

    async def _spool_loop(self, spool: Spool) -> None:
        try:
            await self._produce("spool_read", self._read_spool(spool))
        finally:
            self._spool_done = True

    async def _read_spool(self, spool: Spool) -> None:
        """Read the spool back in order and queue its records (already structured)."""
        cfg = self.config
        while True:
            got = await spool.read(cfg.batch_max_bytes, cfg.batch_max_records)
            if got is None:
                return
            records, used, marks = got
            batch = Batch(records=records, spool=marks, nbytes=used + LINE_OVERHEAD * len(records))
            await self._queue.put(batch)

    # -- the sender task -------------------------------------------------------------------

    async def _send_loop(self) -> None:
        try:
            while True:
                # Parsed records take more memory than the lines they come from: a batch
                # is parsed only when some sink is about to need it, so while every sink
                # is slow or down the backlog stays lines (bounded by --queue-max-bytes).
                while all(lane.queued >= LOOKAHEAD for lane in self.lanes):
                    self._lane_moved.clear()
                    await self._lane_moved.wait()
                batch = await self._queue.get()
                if batch is None:
                    break
                records, failed = self._process(batch)
                await dead_letter_failed(self.dead_letter, failed)
                item = Shipment(
                    records,
                    batch.nbytes,
                    batch.data_bytes,
                    len(self.lanes),
                    batch,
                )
                self._inflight.append(item)
                for lane in self.lanes:
                    lane.put(item)
            for lane in self.lanes:
                lane.end()
            while self._inflight:
                self._all_acked.clear()
                await self._all_acked.wait()
        except Exception:
            self._failed = True
            self._log.exception("adapter_stage_failed", stage="send")
            raise
        finally:
            if not self._failed:
                self._drained.set()

    async def _lane_loop(self, lane: Lane) -> None:
        try:
            await lane.run(self._acked)
        except Exception:
            self._failed = True
            self._log.exception("adapter_stage_failed", stage="sink", sink=lane.name)
            raise

    async def _acked(self, item: Shipment) -> None:
        """A lane acknowledged ``item``: acknowledge, in batch order, every batch all sinks
        have, and write the checkpoint before that lane sends its next batch; then delete
        the spool segments the checkpoint no longer needs."""
        self._lane_moved.set()
        item.waiting -= 1
        if item.waiting:
            return
        async with self._ack_lock:
            inflight = self._inflight
            done: list[Batch] = []
            while inflight and not inflight[0].waiting:
                shipment = inflight.popleft()
                self.counters.batches += 1
                self.counters.records_shipped += len(shipment.records)
                self._checkpoint.acknowledge(shipment.batch.marks, shipment.batch.spool)
                if self.metric_state is not None and shipment.records:
                    # In the generation the save below writes, with these offsets.
                    self.metric_state.observe(shipment.records)
                    self._checkpoint.touch()
                self._queue.release(shipment.nbytes)
                done.append(shipment.batch)
            if done:
                await self._checkpoint.save()
                spooled = [b.spool for b in done if b.spool]
                if spooled and self.spool is not None:
                    for marks in spooled:
                        self.spool.acknowledged(marks)
                    self._checkpoint.forget_segments(await self.spool.remove_done())
            if not inflight:
                self._all_acked.set()

    def _process(self, batch: Batch) -> tuple[list[Record], list[tuple[Record, str]]]:
        """Parse and transform a batch: the records to ship and those a transform failed on.

        Records from the spool skip the line parser (--parse applies to files)."""
        records = self._parser.records(batch.lines) if batch.lines else []
        if batch.records:
            records += batch.records
        self._k8s.apply(records)
        failed: list[tuple[Record, str]] = []
        for chain in self._chains:
            if chain.active:
                records, more = chain.apply(records)
                failed += more
        return records, failed

    # -- metrics -----------------------------------------------------------------------

    def lag_bytes(self) -> int:
        """Bytes in open files not yet acknowledged."""
        total = 0
        acked = self.acked
        for key, t in self.tracked.items():
            entry = acked.get(key)
            total += max(0, t.file.size - (entry.offset if entry else 0))
        return total

    def _counted(self) -> list[Counted]:
        """The inputs whose counters are exposed, the StatsD one included."""
        return [*self.inputs, *([self.statsd] if self.statsd is not None else [])]

    def collectors(self) -> Sequence[Any]:
        """The adapter's metric families."""
        return [
            CallbackCollector(
                metrics.families(
                    counters=self.counters,
                    transforms=self._transform_counters,
                    lanes=self.lanes,
                    dead_letter=self.dead_letter,
                    splitters=lambda: [t.splitter for t in self.tracked.values()],
                    mode=lambda: self.mode,
                    queue_bytes=lambda: self._queue.bytes,
                    lag_bytes=self.lag_bytes,
                    store=self._store,
                    spool=self.spool,
                    inputs=self._counted(),
                    metric_state=self.metric_state,
                )
                + self.scraper.families()
            ),
            self.scraper,
            *([self.statsd.metrics] if self.statsd else []),
            *([self.metric_state] if self.metric_state is not None else []),
        ]

    async def status(self) -> dict[str, Any]:
        """What ``GET /status`` shows: every open file with its lag in bytes and seconds,
        the checkpoint's age, the sink's retry state, the dead-letter counts and the
        effective config (header values redacted; the token file by its path only).

        A file's ``lag_seconds`` is how long its unacknowledged bytes have waited without
        its checkpoint moving (0 when every byte is acknowledged). The files' sizes are
        those the reader saw last; the checkpoint file is looked at on a worker thread.
        """
        from podpatterns.runtime.status import shown_config

        now = time.monotonic()
        acked = self.acked
        moved_at = self._checkpoint.moved_at
        files = []
        for key, t in self.tracked.items():
            entry = acked.get(key)
            offset = entry.offset if entry else 0
            lag = max(0, t.file.size - offset)
            files.append(
                {
                    "path": t.path,
                    "file_id": t.file_id,
                    "size": t.file.size,
                    "acked": offset,
                    "lag_bytes": lag,
                    "lag_seconds": round(now - moved_at.get(key, now), 3) if lag else 0.0,
                    "rotated": t.file.rotated,
                }
            )
        checkpoint: dict[str, Any] | None = None
        if self._store is not None:
            store = self._store
            checkpoint = {
                "path": str(store.current),
                "writes": store.writes,
                "fallbacks": store.fallbacks,
                "age": await asyncio.to_thread(_age, store.current),
            }
        now = time.monotonic()
        sinks: list[dict[str, Any]] = []
        warnings: list[str] = []
        for lane in self.lanes:
            down = lane.down_for(now)
            if down:
                warnings.append(f"sink {lane.name} failing for {down:.0f}s; retrying")
            sinks.append(
                {
                    "name": lane.name,
                    "failing": bool(down),
                    "failing_for": round(down, 1),
                    "records": lane.records,
                    "pending_bytes": lane.pending_bytes,
                    "counters": lane.sink.collect(),
                }
            )
        spool: dict[str, Any] | None = None
        if self.spool is not None:
            spool = {
                "directory": str(self.spool.directory),
                "counters": dict(vars(self.spool.counters)),
            }
        not_ready = []
        if not self._started:
            not_ready.append("not started")
        if self._failed:
            not_ready.append("a pipeline stage failed (see adapter_stage_failed)")
        if not self._tasks.healthy:
            not_ready.append("a background task died (see task_died)")
        return {
            "mode": self.mode,
            "files": files,
            "lag_bytes": sum(f["lag_bytes"] for f in files),
            "queue_bytes": self._queue.bytes,
            "checkpoint": checkpoint,
            "sinks": sinks,
            "errors_retried": self.counters.sink_errors,
            "spool": spool,
            "inputs": {i.name: i.collect() for i in self._counted()},
            "dead_letter": {
                "path": str(self.dead_letter.path) if self.dead_letter.path else None,
                "written": self.dead_letter.written,
                "dropped": self.dead_letter.dropped,
            },
            "records_shipped": self.counters.records_shipped,
            "not_ready": not_ready,
            "warnings": warnings,
            "config": shown_config(self.config, secret=("sink_header",)),
        }


def _age(path: Path) -> float | None:
    """Seconds since ``path`` was last written (wall clock), or None without the file."""
    try:
        return round(time.time() - path.stat().st_mtime, 3)
    except OSError:
        return None
