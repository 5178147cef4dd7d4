"""OTLP logs (``ExportLogsServiceRequest``) into flat records, from protobuf or JSON.

One record per ``LogRecord``, flattened so the adapter's transforms (which address
top-level fields) apply to it:

==========================  ===============================================================
field                       from
==========================  ===============================================================
``message``                 the body when it is a string
``body``                    the body otherwise (a map, list, number...; bytes as base64)
``timestamp``               ``time_unix_nano`` (else ``observed_time_unix_nano``), RFC 3339
``observed_timestamp``      ``observed_time_unix_nano``, RFC 3339 (when set)
``severity``                ``severity_text``, else the name of ``severity_number``
``severity_number``         ``severity_number`` (when set)
``trace_id``, ``span_id``   lowercase hex (when set)
``flags``                   the trace flags (when set)
``event_name``              ``event_name`` (when set)
*attribute key*             each log attribute, under its own key; under
                            ``attributes.KEY`` when KEY is one of the names above
``resource.KEY``            each resource attribute (``resource.service.name``)
``scope.name``, ...         the instrumentation scope's name and version
==========================  ===============================================================

The protobuf encoding is decoded with the official definitions (``opentelemetry-proto``,
the ``otlp`` extra); the JSON encoding (OTLP/HTTP's: lowerCamelCase keys, 64-bit integers
as strings, trace and span ids as hex) by hand, per the OTLP specification.
"""

from __future__ import annotations

import base64
import importlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from podpatterns.adapter.inputs import Record

__all__ = [
    "BadRequest",
    "check_protobuf",
    "decode_block",
    "from_json",
    "from_protobuf",
    "protobuf_available",
]

RESERVED = frozenset(
    {
        "message",
        "body",
        "timestamp",
        "observed_timestamp",
        "severity",
        "severity_number",
        "trace_id",
        "span_id",
        "flags",
        "event_name",
        "input",
    }
)

# SeverityNumber ranges (logs data model): 1-4 TRACE, 5-8 DEBUG, 9-12 INFO, 13-16 WARN,
# 17-20 ERROR, 21-24 FATAL; the 2nd-4th of a range are TRACE2...
_SEVERITY = ("TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL")


class BadRequest(ValueError):
    """The body is not a valid export request (the reason is the message)."""


def severity_name(number: int) -> str:
    """``INFO``, ``WARN3``... for a SeverityNumber in 1-24."""
    if not 1 <= number <= 24:
        return ""
    base, step = divmod(number - 1, 4)
    return _SEVERITY[base] + (str(step + 1) if step else "")


# The formatted second of recent timestamps: the records of a request share a few seconds,
# and strftime costs more than the rest of a record's decoding (measured).
_SECONDS: dict[int, str] = {}


def rfc3339(nanos: int) -> str:
    """``2026-12-02T08:00:00.123456789Z``.

    Raises:
        BadRequest: beyond what a date can hold (year 9999).
    """
    secs, frac = divmod(nanos, 1_000_000_000)
    prefix = _SECONDS.get(secs)
    if prefix is None:
        try:
            prefix = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        except (OverflowError, ValueError, OSError):
            raise BadRequest(f"timestamp {nanos} ns is out of range") from None
        if len(_SECONDS) >= 1024:
            _SECONDS.clear()
        _SECONDS[secs] = prefix
    return f"{prefix}{frac:09d}Z"


def _finish(
    rec: Record,
    attributes: Iterable[tuple[str, Any]],
    resource: Mapping[str, Any],
) -> Record:
    for key, value in attributes:
        rec["attributes." + key if key in RESERVED or key in rec else key] = value
    rec.update(resource)
    return rec


# -- protobuf --------------------------------------------------------------------------


def protobuf_available() -> bool:
    """True when ``opentelemetry-proto`` (the ``otlp`` extra) can be imported."""
    try:
        import opentelemetry.proto.collector.logs.v1.logs_service_pb2  # noqa: F401
    except ImportError:
        return False
    return True


def _any(v: Any) -> Any:
    """An ``AnyValue`` message as a plain value."""
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind == "int_value":
        return v.int_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "double_value":
        return v.double_value
    if kind == "kvlist_value":
        return {kv.key: _any(kv.value) for kv in v.kvlist_value.values}
    if kind == "array_value":
        return [_any(x) for x in v.array_value.values]
    if kind == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    return None


_PROTO: list[Any] = []  # the request class and DecodeError, imported on first use


def _parse(body: bytes) -> Any:
    """The ``ExportLogsServiceRequest`` message of ``body``.

    Raises:
        BadRequest: the body does not decode.
    """
    if not _PROTO:
        from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
            ExportLogsServiceRequest,
        )

        # Looked up, not imported: protobuf ships no type stubs (types-protobuf is not a
        # dependency), and this keeps mypy quiet wherever the package is type-checked.
        error = importlib.import_module("google.protobuf.message").DecodeError
        _PROTO[:] = [ExportLogsServiceRequest, error]
    request_type, decode_error = _PROTO
    request = request_type()
    try:
        request.ParseFromString(body)
    except decode_error as exc:
        raise BadRequest(f"not an OTLP ExportLogsServiceRequest (protobuf): {exc}") from None
    return request


def check_protobuf(body: bytes) -> int:
    """How many log records a protobuf ``ExportLogsServiceRequest`` holds: a body that
    decodes here gives records in :func:`from_protobuf` (no field of a decoded request
    can fail there: the largest fixed64 timestamp is a date), so the HTTP input checks
    the body with this, spools it raw and flattens it when the spool is read back.

    Raises:
        BadRequest: the body does not decode.
    """
    request = _parse(body)
    return sum(len(sl.log_records) for rl in request.resource_logs for sl in rl.scope_logs)


def decode_block(data: bytes, source: str) -> list[Record]:
    """The records of a protobuf body the spool kept raw, ``input`` set to ``source``.

    Raises:
        BadRequest: the body does not decode (never for a body :func:`check_protobuf`
            accepted).
    """
    records = from_protobuf(data)
    for rec in records:
        rec["input"] = source
    return records


def from_protobuf(body: bytes) -> list[Record]:
    """The records of a protobuf ``ExportLogsServiceRequest``.

    Raises:
        BadRequest: the body does not decode.
    """
    request = _parse(body)
    out: list[Record] = []
    for rl in request.resource_logs:
        resource = {"resource." + kv.key: _any(kv.value) for kv in rl.resource.attributes}
        for sl in rl.scope_logs:
            scope: dict[str, Any] = {}
            if sl.scope.name:
                scope["scope.name"] = sl.scope.name
            if sl.scope.version:
                scope["scope.version"] = sl.scope.version
            shared = {**resource, **scope}
            for lr in sl.log_records:
                rec: Record = {}
                value = lr.body
                kind = value.WhichOneof("value")
                if kind == "string_value":
                    rec["message"] = value.string_value
                elif kind is not None:
                    rec["body"] = _any(value)
                ts = lr.time_unix_nano or lr.observed_time_unix_nano
                if ts:
                    rec["timestamp"] = rfc3339(ts)
                if lr.observed_time_unix_nano:
                    rec["observed_timestamp"] = rfc3339(lr.observed_time_unix_nano)
                number = int(lr.severity_number)
                severity = lr.severity_text or severity_name(number)
                if severity:
                    rec["severity"] = severity
                if number:
                    rec["severity_number"] = number
                if lr.trace_id:
                    rec["trace_id"] = lr.trace_id.hex()
                if lr.span_id:
                    rec["span_id"] = lr.span_id.hex()
                if lr.flags:
                    rec["flags"] = lr.flags
                if lr.event_name:
                    rec["event_name"] = lr.event_name
                for kv in lr.attributes:  # as _finish(), inlined: it is per record
                    key = kv.key
                    rec["attributes." + key if key in RESERVED or key in rec else key] = _any(
                        kv.value
                    )
                rec.update(shared)
                out.append(rec)
    return out


def response_protobuf(rejected: int, message: str) -> bytes:
    """A protobuf ``ExportLogsServiceResponse`` (with ``partial_success`` if ``rejected``)."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
        ExportLogsServiceResponse,
    )

    resp = ExportLogsServiceResponse()
    if rejected:
        resp.partial_success.rejected_log_records = rejected
        resp.partial_success.error_message = message
    out: bytes = resp.SerializeToString()
    return out


def status_protobuf(code: int, message: str) -> bytes:
    """A ``google.rpc.Status`` (code, message), hand-encoded: the body OTLP/HTTP asks for
    with a 4xx/5xx (two fields; no dependency on googleapis-common-protos)."""
    text = message.encode()
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# -- JSON ------------------------------------------------------------------------------


def _json_any(v: Any) -> Any:
    """An OTLP/JSON ``AnyValue`` object as a plain value."""
    if not isinstance(v, dict):
        raise BadRequest(f"an AnyValue must be an object, not {type(v).__name__}")
    if "stringValue" in v:
        return v["stringValue"]
    if "intValue" in v:
        return int(v["intValue"])  # a string in OTLP/JSON (64 bits)
    if "boolValue" in v:
        return bool(v["boolValue"])
    if "doubleValue" in v:
        return float(v["doubleValue"])
    if "kvlistValue" in v:
        return dict(_json_kvs((v["kvlistValue"] or {}).get("values")))
    if "arrayValue" in v:
        return [_json_any(x) for x in (v["arrayValue"] or {}).get("values") or []]
    if "bytesValue" in v:
        return v["bytesValue"]  # base64 already
    return None


def _json_kvs(kvs: Any) -> list[tuple[str, Any]]:
    if kvs is None:
        return []
    if not isinstance(kvs, list):
        raise BadRequest("attributes must be a list of {key, value}")
    out = []
    for kv in kvs:
        if not isinstance(kv, dict) or not isinstance(kv.get("key"), str):
            raise BadRequest("an attribute must be an object with a string key")
        out.append((kv["key"], _json_any(kv.get("value") or {})))
    return out


def _int(v: Any, what: str) -> int:
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        raise BadRequest(f"{what} must be an integer, not {v!r}") from None


def _hex_id(v: Any, size: int, what: str) -> str:
    if not isinstance(v, str) or (v and len(v) != 2 * size):
        raise BadRequest(f"{what} must be {2 * size} hex digits")
    try:
        bytes.fromhex(v)
    except ValueError:
        raise BadRequest(f"{what} must be {2 * size} hex digits") from None
    return v.lower()


def _json_record(lr: Any, shared: Mapping[str, Any]) -> Record:
    if not isinstance(lr, dict):
        raise BadRequest("a logRecord must be an object")
    rec: Record = {}
    if lr.get("body") is not None:
        value = _json_any(lr["body"])
        rec["message" if isinstance(value, str) else "body"] = value
    ts = _int(lr.get("timeUnixNano"), "timeUnixNano")
    observed = _int(lr.get("observedTimeUnixNano"), "observedTimeUnixNano")
    if ts or observed:
        rec["timestamp"] = rfc3339(ts or observed)
    if observed:
        rec["observed_timestamp"] = rfc3339(observed)
    number = lr.get("severityNumber") or 0
    if isinstance(number, str):  # the enum's name is allowed too
        names = [severity_name(n) for n in range(25)]
        short = number.removeprefix("SEVERITY_NUMBER_")
        number = names.index(short) if short in names else 0
    number = _int(number, "severityNumber")
    severity = lr.get("severityText") or severity_name(number)
    if severity:
        rec["severity"] = str(severity)
    if number:
        rec["severity_number"] = number
    if lr.get("traceId"):
        rec["trace_id"] = _hex_id(lr["traceId"], 16, "traceId")
    if lr.get("spanId"):
        rec["span_id"] = _hex_id(lr["spanId"], 8, "spanId")
    if lr.get("flags"):
        rec["flags"] = _int(lr["flags"], "flags")
    if lr.get("eventName"):
        rec["event_name"] = str(lr["eventName"])
    return _finish(rec, _json_kvs(lr.get("attributes")), shared)


def from_json(doc: Any) -> tuple[list[Record], int, str]:
    """The records of an OTLP/JSON ``ExportLogsServiceRequest``.

    A log record that is malformed is rejected alone (partial success).

    Returns:
        The records, how many were rejected, and why (the first reason).

    Raises:
        BadRequest: the document is not an export request at all.
    """
    if not isinstance(doc, dict):
        raise BadRequest("an OTLP/JSON export request must be an object with resourceLogs")
    resource_logs = doc.get("resourceLogs") or []
    if not isinstance(resource_logs, list):
        raise BadRequest("resourceLogs must be a list")
    out: list[Record] = []
    rejected = 0
    reason = ""
    for rl in resource_logs:
        if not isinstance(rl, dict):
            raise BadRequest("a resourceLogs item must be an object")
        res = rl.get("resource") or {}
        resource = {
            "resource." + k: v
            for k, v in _json_kvs(res.get("attributes") if isinstance(res, dict) else None)
        }
        for sl in rl.get("scopeLogs") or []:
            if not isinstance(sl, dict):
                raise BadRequest("a scopeLogs item must be an object")
            scope = sl.get("scope") or {}
            shared = dict(resource)
            if isinstance(scope, dict):
                if scope.get("name"):
                    shared["scope.name"] = str(scope["name"])
                if scope.get("version"):
                    shared["scope.version"] = str(scope["version"])
            for lr in sl.get("logRecords") or []:
                try:
                    out.append(_json_record(lr, shared))
                except BadRequest as exc:
                    rejected += 1
                    reason = reason or str(exc)
    return out, rejected, reason
