"""The parse stage: lines in, records out.

Each line is decoded (invalid UTF-8 replaced and counted), parsed with the configured
parser (:mod:`podpatterns.adapter.parse`) and annotated with where it came from: ``file``,
``file_id`` and ``offset`` (which, together, identify a record across restarts), plus
``truncated`` and ``partial`` when they apply.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from podpatterns.adapter.counters import Counters
from podpatterns.adapter.lines import Line
from podpatterns.adapter.parse import Parser

Record = dict[str, Any]


class RecordParser:
    """Turn lines into records.

    Args:
        name: the parser's name (``raw`` skips parsing; it is also the ``parse_error``
            value of a line that does not parse).
        parser: the parser.
        drop_errors: drop a line that does not parse instead of shipping it raw.
        counters: counts lines, invalid UTF-8, parse errors and drops.
        fields: the only fields anything reads (a metrics-only pipeline): the ``file``,
            ``file_id`` and ``offset`` annotations are added only if listed; ``None``:
            always.
    """

    def __init__(
        self,
        name: str,
        parser: Parser,
        *,
        drop_errors: bool,
        counters: Counters,
        fields: Collection[str] | None = None,
    ):
        self.name = name
        self.parser = parser
        self.drop_errors = drop_errors
        self._counters = counters
        # A metrics-only pipeline reads a few fields: the annotations it does not read
        # are left out (three dict entries a record, set and freed).
        self._file = fields is None or "file" in fields
        self._file_id = fields is None or "file_id" in fields
        self._offset = fields is None or "offset" in fields

    def records(self, lines: Sequence[tuple[str, str, Line]]) -> list[Record]:
        """The records of ``(path, file_id, line)`` triples, in order."""
        parser = self.parser
        raw = self.name == "raw"
        drop = self.drop_errors
        c = self._counters
        out: list[Record] = []
        c.lines += len(lines)
        for path, file_id, line in lines:
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
                    rec = {"message": text, "parse_error": self.name}
                else:
                    rec = fields
            if self._file:
                rec["file"] = path
            if self._file_id:
                rec["file_id"] = file_id
            if self._offset:
                rec["offset"] = line.offset
            if line.truncated:
                rec["truncated"] = True
            if line.partial:
                rec["partial"] = True
            out.append(rec)
        return out
