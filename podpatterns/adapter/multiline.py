"""Join multiline records (stack traces) from lines, before parsing.

A :class:`Grouper` holds the lines of the record being built. A line either starts a new
record (``start`` pattern: every line that does not match continues the previous one) or
continues the current one (``continue`` pattern). A group is also closed at
``max_lines``, at ``max_bytes`` and, by the pipeline, when the file has been idle for the
flush timeout. While a group is open the file's checkpoint stays at its first line, so a
restart reads the whole group again: never a checkpoint inside an open group. A
:class:`Grouper` is one of the two :class:`~podpatterns.adapter.join.Joiner` kinds.
"""

from __future__ import annotations

import re

from podpatterns.adapter.lines import Line

PRESETS: dict[str, tuple[str, str]] = {
    # (mode, pattern)
    "python": (
        "continue",
        r"^(\s|Traceback \(most recent call last\):|During handling of the above exception"
        r"|The above exception was the direct cause|[\w.]+(Error|Exception|Warning|Exit"
        r"|Interrupt)\b(:|$)|$)",
    ),
    "java": ("continue", r"^(\s+at |\s+\.\.\. \d+ (more|common frames omitted)|Caused by:|\s)"),
    "go": (
        "continue",
        r"^(\s|$|goroutine \d+ \[|panic:|fatal error:|\[signal |created by |exit status "
        r"|[\w./*()\-]+\(.*\)$)",
    ),
}


class Grouper:
    """Group lines into records.

    Args:
        mode: ``start`` (the pattern marks a record's first line) or ``continue`` (the
            pattern marks lines that belong to the previous record).
        pattern: the regular expression (matched on the line decoded as UTF-8).
        max_lines: a group is closed at this many lines.
        max_bytes: a group is closed once it holds this many bytes (and cut to it).
        idle_timeout: the pipeline closes an open group once the file was idle this long.
    """

    def __init__(
        self,
        mode: str,
        pattern: re.Pattern[str],
        max_lines: int,
        max_bytes: int,
        idle_timeout: float | None = None,
    ):
        if mode not in ("start", "continue"):
            raise ValueError(f"unknown multiline mode {mode!r}")
        self.mode = mode
        self.pattern = pattern
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.idle_timeout = idle_timeout
        self.held: list[Line] = []
        self._bytes = 0
        self.groups = 0

    @property
    def first_offset(self) -> int | None:
        """Offset of the open group's first line (where the checkpoint must stay)."""
        return self.held[0].offset if self.held else None

    @property
    def held_from(self) -> int | None:
        """Offset of the open group's first line (the :class:`Joiner` name)."""
        return self.first_offset

    def flush(self) -> list[Line]:
        """The open group, closed (none when no group is open)."""
        return [self.flush_group()] if self.held else []

    def restart(self) -> None:
        """Keep the open group: it goes on with the restarted file's lines.

        This is what the pipeline did before the stages were split out; the copy of a
        copytruncate is read from after the group, so dropping it would lose its lines.
        """

    def _continues(self, line: Line) -> bool:
        text = line.data.decode("utf-8", "replace")
        matched = self.pattern.search(text) is not None
        return matched if self.mode == "continue" else not matched

    def feed(self, lines: list[Line]) -> list[Line]:
        """Add lines; return the groups they close, each as one :class:`Line`."""
        out: list[Line] = []
        for line in lines:
            if self.held and not self._continues(line):
                out.append(self.flush_group())
            self.held.append(line)
            self._bytes += len(line.data) + 1
            if len(self.held) >= self.max_lines or self._bytes >= self.max_bytes:
                out.append(self.flush_group())
        return out

    def flush_group(self) -> Line:
        """Close the open group (there must be one) and return it."""
        held = self.held
        self.held = []
        self._bytes = 0
        if len(held) == 1:
            return held[0]
        self.groups += 1
        data = b"\n".join(x.data for x in held)
        cut = len(data) > self.max_bytes
        return Line(
            data[: self.max_bytes],
            held[0].offset,
            held[-1].end,
            truncated=cut or any(x.truncated for x in held),
            partial=held[-1].partial,
        )
