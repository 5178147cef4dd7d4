"""The OTLP/HTTP logs sink: records as OpenTelemetry LogRecords, POSTed to ``/v1/logs``.

Encoded with the official protobuf definitions (``opentelemetry-proto``, the ``otlp``
extra), as protobuf (``application/x-protobuf``, the default) or OTLP/JSON. Everything
else — retries, Retry-After, gzip, headers, the token file, TLS and dead letters — is
the HTTP sink's (:class:`~podpatterns.adapter.sinks.http.HttpSink`).

A record maps to one LogRecord:

- ``body``: the body field (``message`` by default), as a string or structured value;
- ``severity_text``: the severity field (``level`` by default); ``severity_number`` from
  its name (``debug``, ``info``, ``warn``, ``error``, ``fatal``..., syslog's names, or a
  syslog severity 0-7 as ``--parse syslog`` gives it);
- ``time_unix_nano``: the ``timestamp`` field (ISO 8601 or epoch seconds), else 0
  (unknown, as the specification allows); ``observed_time_unix_nano``: when it was sent;
- ``attributes``: every other field, with its JSON type kept; the Kubernetes metadata
  fields (``k8s_pod``, ``k8s_labels``...) are resource attributes instead
  (``k8s.pod.name``, ``k8s.pod.label.KEY``...).

A 2xx answer whose ``partial_success`` reports rejected records is final (the
specification forbids retrying it): the count is added to the sink's ``rejected``
counter and one dead-letter entry records it with the collector's message, since OTLP
does not say which records were rejected.
"""

from __future__ import annotations

import json
import time
from typing import Any

from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import (
    LogRecord,
    ResourceLogs,
    ScopeLogs,
    SeverityNumber,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from podpatterns.adapter.sinks import Record
from podpatterns.adapter.sinks.http import HttpSink
from podpatterns.adapter.timestamps import unix_nanos

SCOPE = "podpatterns.adapter"

_SEVERITIES: dict[str, int] = {
    "trace": SeverityNumber.SEVERITY_NUMBER_TRACE,
    "debug": SeverityNumber.SEVERITY_NUMBER_DEBUG,
    "info": SeverityNumber.SEVERITY_NUMBER_INFO,
    "information": SeverityNumber.SEVERITY_NUMBER_INFO,
    "notice": SeverityNumber.SEVERITY_NUMBER_INFO2,
    "warn": SeverityNumber.SEVERITY_NUMBER_WARN,
    "warning": SeverityNumber.SEVERITY_NUMBER_WARN,
    "error": SeverityNumber.SEVERITY_NUMBER_ERROR,
    "err": SeverityNumber.SEVERITY_NUMBER_ERROR,
    "critical": SeverityNumber.SEVERITY_NUMBER_FATAL,
    "crit": SeverityNumber.SEVERITY_NUMBER_FATAL,
    "fatal": SeverityNumber.SEVERITY_NUMBER_FATAL,
    "alert": SeverityNumber.SEVERITY_NUMBER_FATAL2,
    "emerg": SeverityNumber.SEVERITY_NUMBER_FATAL3,
    "emergency": SeverityNumber.SEVERITY_NUMBER_FATAL3,
    "panic": SeverityNumber.SEVERITY_NUMBER_FATAL3,
}


_UNSPECIFIED: int = SeverityNumber.SEVERITY_NUMBER_UNSPECIFIED

# Syslog severities 0-7 (what --parse syslog yields) by name.
_SYSLOG = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")


def severity(value: str | int) -> tuple[str, int]:
    """The OTLP severity text and number of a level name (case-insensitive) or a syslog
    severity (0-7); an unknown level keeps its text with number 0 (unspecified)."""
    if isinstance(value, int):
        if 0 <= value < len(_SYSLOG):
            name = _SYSLOG[value]
            return name, _SEVERITIES[name]
        return str(value), _UNSPECIFIED
    return value, _SEVERITIES.get(value.strip().lower(), _UNSPECIFIED)


def set_value(out: AnyValue, value: Any) -> None:
    """Fill ``out`` with ``value``, keeping its JSON type (``None`` leaves it empty)."""
    if isinstance(value, str):
        out.string_value = value
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int):
        if -(2**63) <= value < 2**63:
            out.int_value = value
        else:
            out.string_value = str(value)
    elif isinstance(value, float):
        out.double_value = value
    elif isinstance(value, dict):
        kv = out.kvlist_value.values
        for k, v in value.items():
            item = kv.add()
            item.key = str(k)
            set_value(item.value, v)
    elif isinstance(value, list | tuple):
        arr = out.array_value.values
        for v in value:
            set_value(arr.add(), v)
    elif value is not None:
        out.string_value = str(value)


def _attributes(pairs: Any, into: Any) -> None:
    for key, value in pairs:
        item: KeyValue = into.add()
        item.key = key
        set_value(item.value, value)


K8S_RESOURCE = {
    "k8s_pod": "k8s.pod.name",
    "k8s_namespace": "k8s.namespace.name",
    "k8s_node": "k8s.node.name",
    "k8s_container": "k8s.container.name",
    "k8s_labels": "k8s.pod.label.",
    "k8s_annotations": "k8s.pod.annotation.",
}
"""The adapter's Kubernetes metadata fields and their OpenTelemetry resource attributes
(a mapping's keys are appended to the prefix)."""


def _k8s_resource(rec: Record) -> dict[str, Any]:
    """The Kubernetes metadata fields ``rec`` carries (the same on every record)."""
    return {k: rec[k] for k in K8S_RESOURCE if k in rec}


def _k8s_attributes(fields: dict[str, Any]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in fields.items():
        name = K8S_RESOURCE[key]
        if isinstance(value, dict):
            out.extend((name + str(k), v) for k, v in value.items())
        else:
            out.append((name, value))
    return out


class OtlpSink(HttpSink):
    """POST batches to an OTLP/HTTP logs endpoint.

    Args:
        url: the endpoint, e.g. ``http://collector:4318/v1/logs``.
        encoding: ``protobuf`` or ``json``.
        body_field: the field that becomes the body.
        severity_field: the field that becomes the severity.
        resource: resource attributes ``(key, value)``.
        **http: the :class:`HttpSink` settings (gzip, headers, token file, retries...).
    """

    name = "otlp"

    def __init__(
        self,
        url: str,
        *,
        encoding: str = "protobuf",
        body_field: str = "message",
        severity_field: str = "level",
        resource: tuple[tuple[str, str], ...] = (),
        **http: Any,
    ) -> None:
        super().__init__(url, **http)
        self.encoding = encoding
        self.body_field = body_field
        self.severity_field = severity_field
        self.resource = resource

    def request(self, records: list[Record]) -> ExportLogsServiceRequest:
        """The export request of a batch: one resource, one scope, a LogRecord per record.

        The Kubernetes metadata fields (``--k8s-env-metadata default``,
        ``--k8s-metadata-dir``) are the same on every record of an adapter: they become
        resource attributes under their semantic-convention names, once per request.
        """
        req = ExportLogsServiceRequest()
        rl: ResourceLogs = req.resource_logs.add()
        res: Resource = rl.resource
        lifted = _k8s_resource(records[0]) if records else {}
        _attributes((*self.resource, *_k8s_attributes(lifted)), res.attributes)
        sl: ScopeLogs = rl.scope_logs.add()
        scope: InstrumentationScope = sl.scope
        scope.name = SCOPE
        observed = time.time_ns()
        body_field, severity_field = self.body_field, self.severity_field
        for rec in records:
            lr: LogRecord = sl.log_records.add()
            lr.observed_time_unix_nano = observed
            for key, value in rec.items():
                if key == body_field:
                    set_value(lr.body, value)
                elif (
                    key == severity_field
                    and isinstance(value, str | int)
                    and not isinstance(value, bool)
                ):
                    text, number = severity(value)
                    lr.severity_text = text
                    lr.severity_number = number  # type: ignore[assignment]
                elif key == "timestamp" and (ns := unix_nanos(value)) is not None:
                    lr.time_unix_nano = ns
                elif key in lifted and lifted[key] == value:
                    continue  # on the resource
                else:
                    item = lr.attributes.add()
                    item.key = key
                    set_value(item.value, value)
        return req

    def encode(self, records: list[Record]) -> tuple[bytes, str]:
        """Protobuf (``application/x-protobuf``) or OTLP/JSON (``application/json``)."""
        req = self.request(records)
        if self.encoding == "json":
            from google.protobuf import json_format

            # OTLP/JSON: lowerCamelCase keys, enums as integers (the specification's form).
            data = json_format.MessageToDict(req, use_integers_for_enums=True)
            return json.dumps(data, separators=(",", ":")).encode(), "application/json"
        return req.SerializeToString(), "application/x-protobuf"

    def refused_in(
        self, records: list[Record], content_type: str, answer: bytes
    ) -> tuple[int, list[tuple[Record, str]]]:
        """The ``partial_success`` of the answer: rejected records are final, not retried."""
        if not answer:
            return 0, []
        resp = ExportLogsServiceResponse()
        try:
            if "json" in content_type:
                from google.protobuf import json_format

                json_format.Parse(answer, resp, ignore_unknown_fields=True)
            else:
                resp.ParseFromString(answer)
        except Exception:  # an answer we cannot read: the 2xx stands, nothing refused
            return 0, []
        refused = int(resp.partial_success.rejected_log_records)
        if refused <= 0:
            return 0, []
        # OTLP does not say which records: one entry tells how many, of which batch.
        first, last = records[0], records[-1]
        summary: Record = {
            "otlp_partial_success": {
                "rejected_log_records": refused,
                "batch_records": len(records),
                "first": {k: first.get(k) for k in ("file", "file_id", "offset")},
                "last": {k: last.get(k) for k in ("file", "file_id", "offset")},
            }
        }
        why = resp.partial_success.error_message or "rejected by the collector"
        return refused, [(summary, why[:512])]
