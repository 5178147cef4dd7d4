"""The join stage's contract: lines in, records that span several lines out.

Two joiners implement it: CRI partial-line merging (:class:`~podpatterns.adapter.cri.CriJoiner`)
and multiline grouping (:class:`~podpatterns.adapter.multiline.Grouper`). A file has at most
one (the configuration rejects ``--multiline`` with ``--parse cri``). While a joiner holds
lines, the file's checkpoint is pinned at the first of them (:attr:`Joiner.held_from`): a
restart reads the whole open group again, never from inside it.
"""

from __future__ import annotations

from typing import Protocol

from podpatterns.adapter.lines import Line


class Joiner(Protocol):
    """Joins the lines of one file; what the pipeline calls.

    Attributes:
        idle_timeout: close an open group once the file has been idle this long (seconds);
            ``None``: only :meth:`flush` closes it.
    """

    idle_timeout: float | None

    def feed(self, lines: list[Line]) -> list[Line]:
        """Add the next lines of the file; return the joined lines they complete."""
        ...

    @property
    def held_from(self) -> int | None:
        """Offset of the first line held back (where the checkpoint must stay), if any."""
        ...

    def flush(self) -> list[Line]:
        """Emit what is held as complete (end of file, rotation, truncation, idle)."""
        ...

    def restart(self) -> None:
        """The file was truncated and a copy is read for what was missed."""
        ...
