"""Parsers: one line (text) in, a dict of fields out, or ``None`` when it does not parse.

Every parser is a plain callable ``(str) -> dict | None`` and must not raise on any
input (tests fuzz them). The pipeline turns ``None`` into a raw record marked
``parse_error`` (or drops it, ``--on-parse-error drop``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection
from typing import Any

Parser = Callable[[str], dict[str, Any] | None]


def parse_raw(line: str) -> dict[str, Any] | None:
    """The line as ``message``."""
    return {"message": line}


# The C scanner behind json.loads, called directly on a line that starts with "{": it
# skips loads()'s type checks and its two whitespace regex matches, about a quarter of
# the cost of a short log line (issue 15's benchmark).
_scan_once = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_JSON_WS = " \t\n\r"  # what json.loads allows around the value


def parse_json(line: str) -> dict[str, Any] | None:
    """A JSON object; its keys become fields (what ``json.loads`` accepts, nothing else)."""
    try:
        if line[:1] == "{":
            value, end = _scan_once(line, 0)
            if end != len(line) and line[end:].strip(_JSON_WS):
                return None  # json.loads: "Extra data"
            return value  # type: ignore[no-any-return]  # an object: it starts with "{"
        value = json.loads(line)
    except (ValueError, StopIteration, RecursionError):
        return None
    return value if isinstance(value, dict) else None


_LOGFMT = re.compile(r'\s*([^\s=]+)(?:=("(?:[^"\\]|\\.)*"|[^\s"]*))?')


def parse_logfmt(line: str) -> dict[str, Any] | None:
    """``key=value key2="quoted value" flag`` pairs (a bare key is ``true``)."""
    out: dict[str, Any] = {}
    pos = 0
    n = len(line)
    while pos < n:
        m = _LOGFMT.match(line, pos)
        if m is None or m.end() == pos:
            if line[pos:].strip():
                return None
            break
        key, value = m.group(1), m.group(2)
        if value is None:
            out[key] = True
        elif value.startswith('"'):
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value[1:-1]
        else:
            out[key] = value
        pos = m.end()
    return out or None


def regex_parser(pattern: re.Pattern[str], fields: Collection[str] | None = None) -> Parser:
    """A parser whose fields are the named groups of ``pattern`` (unmatched groups left out).

    Args:
        pattern: the regular expression.
        fields: only these groups become fields (a metrics-only pipeline needs only the
            fields its metrics read, and the substrings of the others cost a third of the
            parse); ``None``: every group.
    """
    search = pattern.search
    if fields is not None:
        return _projected(search, tuple(n for n in pattern.groupindex if n in fields))

    def parse(line: str) -> dict[str, Any] | None:
        m = search(line)
        if m is None:
            return None
        fields = m.groupdict()
        if None in fields.values():  # rare: most patterns' groups all take part
            return {k: v for k, v in fields.items() if v is not None}
        return fields

    return parse


def _projected(search: Callable[[str], re.Match[str] | None], names: tuple[str, ...]) -> Parser:
    """A regex parser that makes fields of the groups ``names`` only."""
    if len(names) == 1:
        (name,) = names

        def parse_one(line: str) -> dict[str, Any] | None:
            m = search(line)
            if m is None:
                return None
            value = m.group(name)
            return {} if value is None else {name: value}

        return parse_one

    def parse(line: str) -> dict[str, Any] | None:
        m = search(line)
        if m is None:
            return None
        values = m.group(*names) if names else ()
        if None in values:
            return {k: v for k, v in zip(names, values, strict=True) if v is not None}
        return dict(zip(names, values, strict=True))

    return parse


_COMMON = (
    r"^(?P<remote_addr>\S+) (?P<ident>\S+) (?P<remote_user>\S+) \[(?P<time>[^\]]*)\] "
    r'"(?P<method>[A-Z]+) (?P<path>[^"]*?)(?: (?P<protocol>HTTP/[\d.]+))?" '
    r"(?P<status>\d{3}) (?P<bytes>\d+|-)"
)
_COMBINED = _COMMON + r' "(?P<referer>[^"]*)" "(?P<user_agent>[^"]*)"'
_COMMON_RE = re.compile(_COMMON + r"\s*$")
_COMBINED_RE = re.compile(_COMBINED + r"(?: .*)?$")
_INTS = ("status", "bytes")


def _access(pattern: re.Pattern[str]) -> Parser:
    def parse(line: str) -> dict[str, Any] | None:
        m = pattern.match(line)
        if m is None:
            return None
        out: dict[str, Any] = {k: v for k, v in m.groupdict().items() if v is not None}
        for key in _INTS:
            value = out.get(key)
            out[key] = int(value) if value and value != "-" else 0
        return out

    return parse


parse_nginx = _access(_COMBINED_RE)
"""nginx's default ``combined`` log format (the same as apache combined)."""
parse_apache = _access(_COMBINED_RE)
"""Apache combined log format."""
parse_apache_common = _access(_COMMON_RE)
"""Apache common log format."""


_CRI = re.compile(
    r"^(?P<time>\S+) (?P<stream>stdout|stderr) (?P<tag>[PF])(?:\S*) ?(?P<message>.*)$", re.DOTALL
)


def split_cri(data: bytes) -> tuple[bytes, bool, bytes] | None:
    """Split a CRI container log line at the byte level, for merging partials before parsing.

    Returns:
        ``(head, final, message)``: the ``TIME STREAM TAG`` head, whether the tag is ``F``
        (full) rather than ``P`` (partial), and the message; ``None`` when the third field
        is not a ``P`` or ``F`` tag.
    """
    parts = data.split(b" ", 3)
    if len(parts) < 3 or parts[2][:1] not in (b"P", b"F"):
        return None
    return b" ".join(parts[:3]), parts[2][:1] == b"F", parts[3] if len(parts) > 3 else b""


def parse_cri(line: str) -> dict[str, Any] | None:
    """A CRI container log line ``TIME STREAM P|F MESSAGE`` (partials merged before)."""
    m = _CRI.match(line)
    if m is None:
        return None
    return m.groupdict()


_RFC5424 = re.compile(
    r"^<(?P<pri>\d{1,3})>(?P<version>\d{1,2}) (?P<timestamp>\S+) (?P<hostname>\S+) "
    r"(?P<appname>\S+) (?P<procid>\S+) (?P<msgid>\S+) "
    r"(?P<sd>-|(?:\[(?:[^\]\\]|\\.)*\])+)(?: (?P<message>.*))?$",
    re.DOTALL,
)
_RFC3164 = re.compile(
    r"^(?:<(?P<pri>\d{1,3})>)?(?P<timestamp>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) "
    r"(?P<hostname>\S+) (?P<tag>[^:\[\s]+)(?:\[(?P<procid>[^\]]*)\])?: ?(?P<message>.*)$",
    re.DOTALL,
)


def parse_syslog(line: str) -> dict[str, Any] | None:
    """Syslog: RFC 5424, else RFC 3164 (BSD); ``pri`` split into facility and severity."""
    m = _RFC5424.match(line) or _RFC3164.match(line)
    if m is None:
        return None
    out: dict[str, Any] = {k: v for k, v in m.groupdict().items() if v is not None and v != "-"}
    pri = out.pop("pri", None)
    if pri is not None:
        value = int(pri)
        if value > 191:
            return None
        out["facility"], out["severity"] = divmod(value, 8)
    out.setdefault("message", "")
    return out


def get_parser(
    name: str, pattern: re.Pattern[str] | None = None, fields: Collection[str] | None = None
) -> Parser:
    """The parser called ``name`` (see :data:`podpatterns.adapter.config.PARSERS`).

    Args:
        name: the parser's name.
        pattern: the ``regex`` parser's pattern.
        fields: the fields the records are read for, when that is all anything reads (a
            metrics-only pipeline): a parser may leave the others out (``regex`` does);
            ``None``: every field.
    """
    if name == "regex":
        if pattern is None:
            raise ValueError("the regex parser needs a pattern")
        return regex_parser(pattern, fields)
    table: dict[str, Parser] = {
        "raw": parse_raw,
        "json": parse_json,
        "logfmt": parse_logfmt,
        "nginx": parse_nginx,
        "apache": parse_apache,
        "apache_common": parse_apache_common,
        "cri": parse_cri,
        "syslog": parse_syslog,
    }
    return table[name]
