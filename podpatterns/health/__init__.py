"""Health signalling and Pod coordination through a shared volume (docs/health.md).

The record file (:mod:`~podpatterns.health.records`) is the one contract between
containers; everything else here writes it (the supervisor, the app API) or reads it
(``wait``, ``--exit-with``).
"""

from __future__ import annotations

from podpatterns.dirwatch import DirWatcher
from podpatterns.health.reader import State, Status, Tracker, read_record
from podpatterns.health.records import (
    SCHEMA_VERSION,
    Check,
    Phase,
    Record,
    RecordError,
    write_atomic,
)
from podpatterns.health.watch import wait_exited, wait_ready, wait_status
from podpatterns.health.writer import Writer

__all__ = [
    "SCHEMA_VERSION",
    "Check",
    "DirWatcher",
    "Phase",
    "Record",
    "RecordError",
    "State",
    "Status",
    "Tracker",
    "Writer",
    "read_record",
    "wait_exited",
    "wait_ready",
    "wait_status",
    "write_atomic",
]
