"""Split bytes into lines: bytes first, partial lines held, over-long lines truncated.

A :class:`LineSplitter` is fed the bytes of one file in order and returns the complete
lines with their byte offsets. The unterminated tail is held (at most ``max_line_bytes``
of it: an over-long line keeps its head and skips the rest up to the next delimiter), so
memory per file stays bounded whatever the file holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate, islice, repeat
from operator import add


@dataclass(slots=True)
class Line:
    """One line of a file.

    Attributes:
        data: the line without its delimiter (and without a trailing CR before LF), cut to
            ``max_line_bytes`` when longer.
        offset: byte offset of the line's first byte in the file.
        end: byte offset just after the line's delimiter (where the next line starts).
        truncated: the line was longer than ``max_line_bytes``.
        partial: the line had no delimiter (emitted by :meth:`LineSplitter.flush`).
    """

    data: bytes
    offset: int
    end: int
    truncated: bool = False
    partial: bool = False


class LineSplitter:
    """Turn a stream of bytes from one file into :class:`Line` objects.

    Args:
        delimiter: the line delimiter (``b"\\n"`` by default).
        max_line_bytes: longest line kept; the rest of a longer line is skipped.
        start: file offset of the first byte that will be fed.
    """

    def __init__(self, delimiter: bytes = b"\n", max_line_bytes: int = 256 * 1024, start: int = 0):
        self.delimiter = delimiter
        self.max_line_bytes = max_line_bytes
        self._crlf = delimiter == b"\n"
        self._held = b""  # the start of an unterminated line (<= max_line_bytes)
        self._held_at = start  # file offset of _held's first byte
        self._skip_tail = b""  # last len(delimiter)-1 bytes skipped (a split delimiter)
        self._skipping = False  # inside an over-long line, skipping up to the delimiter
        self._fed = start  # file offset after the last byte fed
        self.truncated_lines = 0

    @property
    def position(self) -> int:
        """File offset after the last byte fed."""
        return self._fed

    @property
    def committed(self) -> int:
        """File offset after the last complete line returned (the start of what is held)."""
        return self._held_at

    @property
    def held(self) -> int:
        """Bytes of an unterminated line held (a skipped over-long tail is not counted)."""
        return len(self._held)

    def reset(self, start: int) -> None:
        """Forget what is held and continue at file offset ``start`` (after truncation)."""
        self._held = b""
        self._held_at = start
        self._fed = start
        self._skipping = False

    def feed(self, data: bytes) -> list[Line]:
        """Add the next bytes of the file; return the lines they complete."""
        out: list[Line] = []
        if not data:
            return out
        delim = self.delimiter
        dlen = len(delim)
        limit = self.max_line_bytes
        base = self._fed
        self._fed += len(data)
        if self._held or self._skipping:
            # Only the bytes that may hold the delimiter spanning the boundary are joined.
            if self._skipping:
                joined = self._skip_tail
                idx = (joined + data).find(delim)
                if idx < 0:
                    self._skip_tail = (joined + data)[-(dlen - 1) :] if dlen > 1 else b""
                    return out
                end = base - len(joined) + idx + dlen
                line = self._held
                out.append(Line(line, self._held_at, end, truncated=True))
                self.truncated_lines += 1
                self._held = b""
                self._skipping = False
                data = data[end - base :]
                base = end
                self._held_at = end
            else:
                data = self._held + data
                base = self._held_at
                self._held = b""
        parts = data.split(delim)
        tail = parts.pop()
        pos = base
        crlf = self._crlf
        if parts and not (crlf and b"\r\n" in data) and max(map(len, parts)) <= limit:
            # The common case (no CR to strip, no over-long line): no test per line.
            ends = list(accumulate(map(add, map(len, parts), repeat(dlen)), initial=base))
            out.extend(map(Line, parts, ends, islice(ends, 1, None)))
            parts = []
            pos = ends[-1]
        for part in parts:
            end = pos + len(part) + dlen
            if crlf and part.endswith(b"\r"):
                part = part[:-1]
            if len(part) > limit:
                out.append(Line(part[:limit], pos, end, truncated=True))
                self.truncated_lines += 1
            else:
                out.append(Line(part, pos, end))
            pos = end
        self._held_at = pos
        if len(tail) > limit:
            self._held = tail[:limit]
            self._skip_tail = tail[-(dlen - 1) :] if dlen > 1 else b""
            self._skipping = True
        else:
            self._held = tail
        return out

    def flush(self) -> Line | None:
        """Emit the held unterminated line (``partial``), if any, as complete."""
        if self._skipping:
            line = Line(self._held, self._held_at, self._fed, truncated=True, partial=True)
            self.truncated_lines += 1
        elif self._held:
            line = Line(self._held, self._held_at, self._fed, partial=True)
        else:
            return None
        self._held = b""
        self._skipping = False
        self._held_at = self._fed
        return line
