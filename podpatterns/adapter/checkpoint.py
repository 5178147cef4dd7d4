"""The crash-safe checkpoint: how far each file has been shipped and acknowledged.

Written as JSON to a temporary file in the same directory, fsync'ed, renamed over the
current file (the current one first becomes the previous generation), and the directory
fsync'ed, so a crash at any point leaves a complete current or previous generation. A
checkpoint that does not parse falls back to the previous generation, loudly.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from podpatterns import logs
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
                entries = _decode(path.read_bytes())
            except (OSError, ValueError, TypeError, KeyError) as exc:
                self.fallbacks += 1
                self._log.error("checkpoint_corrupt", path=str(path), error=str(exc))
                continue
            if path is self.previous:
                self._log.warning("checkpoint_previous_used", path=str(path))
            self._log.info("checkpoint_loaded", path=str(path), files=len(entries))
            return entries
        return {}

    def save(self, entries: dict[tuple[int, int], Entry]) -> None:
        """Write a new generation crash-safely (blocking: call it in a thread)."""
        with self._lock:
            self._save(entries)

    def _save(self, entries: dict[tuple[int, int], Entry]) -> None:
        data = json.dumps(
            {"version": VERSION, "files": [asdict(e) for e in entries.values()]},
            separators=(",", ":"),
        ).encode()
        replace_atomically(
            self.current, data, self.directory / (NAME + ".tmp"), keep_previous=self.previous
        )
        self.writes += 1


def _decode(raw: bytes) -> dict[tuple[int, int], Entry]:
    doc: Any = json.loads(raw)
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ValueError("not a version 1 checkpoint")
    out: dict[tuple[int, int], Entry] = {}
    for item in doc["files"]:
        entry = Entry(**item)
        if not isinstance(entry.offset, int) or entry.offset < 0:
            raise ValueError(f"bad offset {entry.offset!r}")
        out[entry.key] = entry
    return out
