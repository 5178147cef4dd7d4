"""Join CRI partial lines: ``P`` lines are merged into the ``F`` line that ends them.

A container runtime splits a long log line into partial (``P``) lines followed by one full
(``F``) line, each with its own ``TIME STREAM TAG`` head. Merging happens before batching
(see :mod:`podpatterns.adapter.join`), so the checkpoint never lands inside a split line;
the merged line keeps the CRI layout and is parsed by the ``cri`` parser like any other.
"""

from __future__ import annotations

from podpatterns.adapter.counters import Counters
from podpatterns.adapter.lines import Line
from podpatterns.adapter.parse import split_cri


class CriJoiner:
    """Merge the CRI partial lines of one file (a :class:`~podpatterns.adapter.join.Joiner`).

    Args:
        max_line_bytes: a merged line is cut to this many bytes, and partials holding more
            message than this are merged without waiting for their ``F`` line.
        counters: ``cri_merged`` counts the partials merged away.
    """

    # A CRI runtime always ends a split line with its F line; the partial-line flush
    # (--flush-partial-after, rotation, truncation) covers a writer that died in between.
    idle_timeout: float | None = None

    def __init__(self, max_line_bytes: int, counters: Counters) -> None:
        self.max_line_bytes = max_line_bytes
        self.counters = counters
        self.held: list[tuple[Line, str]] = []

    @property
    def held_from(self) -> int | None:
        """Offset of the first partial held, if any."""
        return self.held[0][0].offset if self.held else None

    def feed(self, lines: list[Line]) -> list[Line]:
        """Add lines; return them with each run of partials merged into its full line."""
        out: list[Line] = []
        for line in lines:
            parts = split_cri(line.data)
            if parts is None:
                if self.held:
                    out.append(self._merged())
                out.append(line)
                continue
            _, final, message = parts
            self.held.append((line, message.decode("utf-8", "replace")))
            if final or sum(len(m) for _, m in self.held) > self.max_line_bytes:
                out.append(self._merged())
        return out

    def flush(self) -> list[Line]:
        """The held partials merged into one line (none when nothing is held)."""
        return [self._merged()] if self.held else []

    def restart(self) -> None:
        """Forget the held partials (the copy is read from after them)."""
        self.held = []

    def _merged(self) -> Line:
        held = self.held
        self.held = []
        first, last = held[0][0], held[-1][0]
        if len(held) == 1:
            return first
        self.counters.cri_merged += len(held) - 1
        parts = split_cri(last.data)
        assert parts is not None  # only CRI lines are held
        message = "".join(m for _, m in held).encode()
        data = parts[0] + b" " + message
        return Line(
            data[: self.max_line_bytes],
            first.offset,
            last.end,
            truncated=any(x.truncated for x, _ in held) or len(data) > self.max_line_bytes,
        )
