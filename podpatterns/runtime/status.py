"""What ``GET /status`` shows: effective configuration with secrets redacted.

Components describe their live state themselves (the optional ``status()`` of a
:class:`~podpatterns.runtime.Component`); this module turns a config object into
JSON-ready data that never carries a secret:

- a file is shown by its path, never by its content (a token file, a key);
- a URL's userinfo (``https://user:password@host``) is replaced by :data:`REDACTED`, in
  any string, wherever it stands (a notify URL, a probe target, an exec command line);
- an ``Authorization: ...`` or ``Bearer ...`` value inside a string is replaced too;
- the fields a component names as secret (the adapter's ``sink_header`` values) show
  their names and :data:`REDACTED` for each value.

Redaction is by shape as well as by name, so a field added later that holds a URL with
credentials is redacted without anyone remembering to list it.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Collection, Mapping
from pathlib import PurePath
from typing import Any

REDACTED = "<redacted>"
"""What a secret is replaced with."""

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/@]+@")
_AUTH = re.compile(r"(?i)\b(authorization\s*[:=]\s*|bearer\s+)(?:bearer\s+)?[^\s'\"]+")
_SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|token|credential)(?!_file|_path)")


def redact_text(text: str) -> str:
    """``text`` with URL userinfo and authorization values replaced by :data:`REDACTED`."""
    if "://" in text:
        text = _USERINFO.sub(r"\1" + REDACTED + "@", text)
    lowered = text.lower()
    if "bearer" in lowered or "authorization" in lowered:
        text = _AUTH.sub(r"\1" + REDACTED, text)
    return text


def shown(value: Any, secret: bool = False, fields: Collection[str] = ()) -> Any:
    """``value`` as JSON-ready data, secrets redacted.

    Args:
        value: a config value (scalars, paths, addresses, patterns, tuples, mappings,
            dataclasses).
        secret: the value itself is secret: scalars become :data:`REDACTED`; pairs
            (``NAME=VALUE`` options such as headers) keep their name.
        fields: names of secret fields, in dataclasses nested anywhere in ``value`` (the
            adapter's sinks each carry their own ``sink_header``).
    """
    if value is None or isinstance(value, bool):
        return value
    if secret:
        if isinstance(value, tuple | list):
            return [
                [item[0], REDACTED] if isinstance(item, tuple) and len(item) == 2 else REDACTED
                for item in value
            ]
        return REDACTED
    if isinstance(value, int | float):
        return value
    if isinstance(value, enum.Enum):
        return shown(value.value)
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, bytes):
        return redact_text(value.decode("utf-8", "backslashreplace"))
    if isinstance(value, re.Pattern):
        return redact_text(value.pattern)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if type(value).__str__ is not object.__str__:
            return redact_text(str(value))  # an address: HOST:PORT, unix:/path
        return shown_config(value, fields)
    if isinstance(value, Mapping):
        # Keys are data here (container names, counter names), not field names: only
        # the strings' shapes are redacted.
        return {str(k): shown(v, fields=fields) for k, v in value.items()}
    if isinstance(value, tuple | list | set | frozenset):
        return [shown(v, fields=fields) for v in value]
    return redact_text(str(value))


def _is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def shown_config(config: Any, secret: Collection[str] = ()) -> dict[str, Any]:
    """A config dataclass as a mapping of its fields, shown with :func:`shown`.

    Args:
        config: a dataclass instance.
        secret: names of fields whose values are secret, here and in nested dataclasses;
            fields named like a password, token or secret (but not ``*_file``/``*_path``)
            are secret too.

    Returns:
        ``{field: value}`` in field order. A field that is not a dataclass field but a
        property is not shown.
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name.startswith("_"):
            continue
        value = getattr(config, f.name)
        out[f.name] = shown(value, f.name in secret or _is_secret_name(f.name), secret)
    return out
