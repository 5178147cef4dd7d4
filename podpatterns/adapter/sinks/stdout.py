"""The stdout sink: JSON lines, each kept under a size container runtimes do not split."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from podpatterns.adapter.sinks import Record, encode, encode_text, write_all


def fit(record: Record, max_line: int, mode: str) -> list[bytes]:
    """Encode ``record`` as lines of at most ``max_line`` bytes (newline included).

    A longer record has its longest string field cut: ``truncate`` keeps the first part
    (``"truncated": true``); ``split`` emits every part as its own record with
    ``"part"`` and ``"parts"`` set (the other fields repeated).
    """
    line = encode(record)
    if len(line) < max_line:
        return [line + b"\n"]
    strings = [(len(v), k) for k, v in record.items() if isinstance(v, str)]
    if not strings:
        return [
            encode(
                {
                    "file": record.get("file"),
                    "offset": record.get("offset"),
                    "truncated": True,
                    "message": "",
                }
            )
            + b"\n"
        ]
    _, key = max(strings)
    text: str = record[key]
    others = {k: v for k, v in record.items() if k != key}
    overhead = len(encode({**others, key: "", "truncated": True, "part": 99999, "parts": 99999}))
    room = max(64, max_line - overhead - 1)
    pieces = _chunks(text, room)
    if mode == "truncate":
        out = {**others, key: pieces[0], "truncated": True}
        return [encode(out)[: max_line - 1] + b"\n"]
    return [
        encode({**others, key: piece, "part": i + 1, "parts": len(pieces)}) + b"\n"
        for i, piece in enumerate(pieces)
    ]


def _chunks(text: str, room: int) -> list[str]:
    """Cut ``text`` so each JSON-encoded piece fits ``room`` bytes (escapes counted)."""
    pieces: list[str] = []
    start = 0
    while start < len(text):
        # JSON may expand a character to 6 bytes (\uXXXX); UTF-8 to 4: start optimistic.
        end = min(len(text), start + room)
        while (
            end > start + 1
            and len(json.dumps(text[start:end], ensure_ascii=False).encode()) - 2 > room
        ):
            end = start + max(1, (end - start) * 3 // 4)
        pieces.append(text[start:end])
        start = end
    return pieces or [""]


class StdoutSink:
    """Write JSON lines to a file descriptor (stdout by default).

    Args:
        max_line: the longest line written, newline included.
        oversize: ``split`` or ``truncate``.
        fd: where to write.
    """

    name = "stdout"

    def __init__(self, max_line: int = 16 * 1024, oversize: str = "split", fd: int | None = None):
        self.max_line = max_line
        self.oversize = oversize
        self.fd = fd  # stdout's, resolved by start(): constructing must not touch stdout
        self.lines = 0
        self.oversized = 0

    async def start(self) -> None:
        """Resolve the descriptor (stdout unless one was given)."""
        if self.fd is None:
            self.fd = sys.stdout.fileno()

    async def send(self, records: list[Record]) -> None:
        """Encode and write the batch in one write (in a thread: a pipe may block)."""
        out: list[bytes] = []
        texts: list[str] = []
        limit = self.max_line
        quick = limit // 4  # UTF-8 takes at most 4 bytes per character
        for rec in records:
            text = encode_text(rec)
            if len(text) < quick or len(text.encode("utf-8", "backslashreplace")) < limit:
                texts.append(text)
            else:
                self.oversized += 1
                if texts:
                    texts.append("")
                    out.append("\n".join(texts).encode("utf-8", "backslashreplace"))
                    texts = []
                out.extend(fit(rec, limit, self.oversize))
        if texts:
            texts.append("")
            out.append("\n".join(texts).encode("utf-8", "backslashreplace"))
        self.lines += len(records)
        assert self.fd is not None, "start() first"
        await asyncio.to_thread(write_all, self.fd, b"".join(out))

    async def close(self) -> None:
        """Nothing to close (stdout belongs to the process)."""

    def collect(self) -> dict[str, Any]:
        """Counters."""
        return {"oversized": self.oversized}
