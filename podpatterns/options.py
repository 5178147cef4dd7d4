"""Declare each option once; read it from flags, environment and a YAML file.

An :class:`Option` carries its name, parser, default and help. From that one declaration
come the ``--flag``, the ``PODPATTERNS_*`` environment variable, the config-file key, the
``--help`` text and the generated reference in docs/. Precedence is flags > environment >
file > defaults. Every parse error is a :class:`~podpatterns.errors.ConfigError` whose
message names where the value came from, the value, and what was expected.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

from podpatterns.errors import ConfigError

T = TypeVar("T")

ENV_PREFIX = "PODPATTERNS_"


@dataclass(frozen=True)
class Option(Generic[T]):
    """One configuration option.

    Args:
        name: snake_case name; the flag is ``--name-with-dashes``, the environment
            variable ``PODPATTERNS_NAME`` and the config-file key ``name``.
        parse: turns one string into the typed value; raises ``ValueError`` with a
            message saying what is expected (the caller adds where the value came from).
        default: the value when no source sets it (for ``multiple`` options, a tuple).
        help: one sentence for ``--help`` and the docs.
        multiple: the flag may repeat; the environment variable is comma-separated and
            the file key takes a list. The value is a tuple.
        flag: the option is a boolean switch (``--x`` / ``--no-x``).
        metavar: placeholder shown in ``--help``.
        scope: ``"runtime"`` (every component) or the component's name; ``"route"``
            options can also be set per route in the config file.
    """

    name: str
    parse: Callable[[str], T]
    default: Any
    help: str
    multiple: bool = False
    flag: bool = False
    metavar: str | None = None
    scope: str = "runtime"

    @property
    def cli(self) -> str:
        """The command-line flag, e.g. ``--drain-timeout``."""
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        """The environment variable, e.g. ``PODPATTERNS_DRAIN_TIMEOUT``."""
        return ENV_PREFIX + self.name.upper()

    def parse_from(self, raw: Any, where: str) -> Any:
        """Parse one raw value (a string, or a YAML scalar or list) from ``where``."""
        if self.multiple:
            items: Sequence[Any]
            if isinstance(raw, str):
                items = [p for p in (s.strip() for s in raw.split(",")) if p]
            elif isinstance(raw, list | tuple):
                items = raw
            else:
                items = [raw]
            return tuple(self._parse_one(item, where) for item in items)
        return self._parse_one(raw, where)

    def _parse_one(self, raw: Any, where: str) -> Any:
        if self.flag and isinstance(raw, bool):
            return raw
        if isinstance(raw, dict | list):
            raise ConfigError(f"{where}: expected a single value, got {type(raw).__name__}")
        if raw is None:
            raise ConfigError(
                f"{where}: has no value (YAML null); give a value, or remove the key for the "
                f"default"
            )
        if isinstance(raw, bool):
            # YAML 1.1 reads an unquoted off/no/false (on/yes/true) as a boolean. Where
            # "off" is a documented value (--admin off, durations that can be off), a
            # false means it; anything else names what YAML did instead of a value the
            # user never wrote.
            words = "off/no/false" if raw is False else "on/yes/true"
            try:
                if self.parse not in _SWITCH_PARSERS:
                    raise ValueError(words)
                return self.parse("off" if raw is False else "on")
            except ValueError:
                raise ConfigError(
                    f"{where}: YAML read an unquoted {words} as a boolean, which this option "
                    'does not take; quote the value (e.g. "off")'
                ) from None
        text = str(raw)
        try:
            return self.parse(text)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        except ValueError as exc:
            raise ConfigError(f"{where}: {text!r} {exc}") from None


# -- parsers: each raises ValueError("is not ... (what is expected)") -------------------

_SWITCH_PARSERS: set[Callable[[str], Any]] = set()


def takes_off(parse: Callable[[str], T]) -> Callable[[str], T]:
    """Mark a parser for which ``off`` (and ``on``) are values: a YAML file's unquoted
    ``off``, which YAML reads as false, then means "off" for its option."""
    _SWITCH_PARSERS.add(parse)
    return parse


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """Parse ``250ms``, ``30s``, ``5m``, ``1h`` or a bare number of seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError("is not a duration (e.g. 250ms, 30s, 5m; a bare number is seconds)")
    return float(m.group(1)) * _UNITS[m.group(2)]


@takes_off
def parse_optional_duration(text: str) -> float | None:
    """Like :func:`parse_duration`; ``0``, ``off`` or ``none`` mean disabled (``None``)."""
    if text.strip().lower() in ("off", "none", "0", "0s", ""):
        return None
    return parse_duration(text)


_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|K|M|G)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gib": 1024**3,
}


def parse_size(text: str) -> int:
    """Parse a byte size: ``65536``, ``256KiB``, ``1MiB``."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError("is not a size (e.g. 65536, 256KiB, 1MiB)")
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "b").lower()]


@takes_off
def parse_bool(text: str) -> bool:
    """Parse ``true/false``, ``yes/no``, ``on/off``, ``1/0``."""
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("is not a boolean (true or false)")


def parse_int(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """Return a parser for an integer in ``[lo, hi]``."""

    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError("is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"{lo}-{hi}" if hi is not None else f">= {lo}"
            raise ValueError(f"is out of range ({bound})")
        return value

    return parse


def parse_choice(*choices: str) -> Callable[[str], str]:
    """Return a parser accepting one of ``choices`` (case-insensitive)."""

    def parse(text: str) -> str:
        low = text.strip().lower()
        if low not in choices:
            raise ValueError(f"is not one of {', '.join(choices)}")
        return low

    return takes_off(parse) if {"off", "on"} & set(choices) else parse


def parse_str(text: str) -> str:
    """Accept any non-empty string."""
    if not text.strip():
        raise ValueError("is empty")
    return text.strip()


def parse_path(text: str) -> Path:
    """Accept a filesystem path (not checked for existence here)."""
    return Path(parse_str(text))


def is_loopback_host(host: str | None) -> bool:
    """True for ``localhost`` and loopback IP literals, IPv4-mapped IPv6 included
    (``::ffff:127.0.0.1``, how a dual-stack socket reports an IPv4 loopback peer).

    The one loopback rule of the package: bind defaults, quit URLs and the admin
    server's loopback-only endpoints all ask it. A name other than ``localhost`` is not
    loopback (it would need resolving, and may resolve elsewhere later); neither is a
    unix-socket peer, which reports no address.
    """
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


@dataclass(frozen=True, order=True)
class HostPort:
    """A TCP endpoint: a host name or IP literal and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """True for ``localhost`` and loopback IP literals (see :func:`is_loopback_host`)."""
        return is_loopback_host(self.host)


def parse_http_url(text: str) -> str:
    """Accept an ``http://`` or ``https://`` URL with a host and, if given, a valid port.

    Raises:
        ValueError: another scheme, no host, or a port that is not 1-65535.
    """
    text = text.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("is not an HTTP URL (e.g. http://127.0.0.1:8080/path)")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise ValueError("has no valid port (1-65535)")
    return text


def parse_loopback_url(text: str) -> str:
    """Accept an ``http(s)://`` URL whose host is loopback (another container of the Pod).

    Raises:
        ValueError: not an http URL, or not a loopback host.
    """
    text = parse_http_url(text)
    if not is_loopback_host(urlsplit(text).hostname):
        raise ValueError("is not a loopback URL (quit URLs must stay inside the Pod)")
    return text


_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def parse_container_name(text: str) -> str:
    """Accept a container name as Kubernetes allows it (a DNS label): the name of a
    health record, of ``--exit-with``, ``run --name`` and ``wait --for ready:NAME``.

    Raises:
        ValueError: not 1-63 lowercase letters, digits and dashes.
    """
    name = text.strip()
    if not _NAME.match(name):
        raise ValueError(
            "is not a container name (1-63 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit)"
        )
    return name


def parse_hostport(text: str) -> HostPort:
    """Parse ``host:port`` or ``[v6]:port`` with a port in 1-65535."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("is not HOST:PORT (e.g. db.example.com:5432 or [::1]:5432)")
    # isascii: str.isdigit() also accepts digits such as '²' that int() refuses.
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError("is not a valid port (1-65535)")
    return HostPort(host, int(port))


def parse_bind(text: str) -> HostPort:
    """Parse a bind address ``HOST:PORT``; port 0 asks the kernel for a free one."""
    if text.strip().endswith(":0"):
        hp = parse_hostport(text.strip()[:-1] + "1")
        return HostPort(hp.host, 0)
    return parse_hostport(text)


# -- resolution: flags > env > file > defaults ------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, options: Iterable[Option[Any]]) -> None:
    """Add one argparse argument per option; unset flags stay absent from the namespace."""
    for opt in options:
        env_note = f" [env {opt.env}]"
        default_note = "" if opt.default in (None, ()) else f" (default: {_show(opt.default)})"
        help_text = opt.help + default_note + env_note
        if opt.flag:
            parser.add_argument(
                opt.cli,
                dest=opt.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                opt.cli,
                dest=opt.name,
                default=argparse.SUPPRESS,
                action="append" if opt.multiple else "store",
                metavar=opt.metavar or opt.name.upper(),
                help=help_text,
            )


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):  # a delimiter: shown with escapes, as it is written
        return value.decode("latin-1").encode("unicode_escape").decode()
    if isinstance(value, float) and value.is_integer():
        return f"{int(value)}s"
    if isinstance(value, float):
        return f"{value:g}s"
    return str(value)


def show_default(opt: Option[Any]) -> str:
    """The default as a user would write it (for --help and the docs)."""
    return "" if opt.default is None or opt.default == () else _show(opt.default)


def resolve(
    options: Iterable[Option[Any]],
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    file: Mapping[str, Any],
    file_label: str = "config file",
) -> dict[str, Any]:
    """Return ``{name: typed value}`` for ``options`` from the sources in precedence order.

    Args:
        options: the declarations to resolve.
        flags: values given on the command line (argparse namespace ``vars()``; absent
            when not given).
        env: the process environment.
        file: the mapping read from the YAML config file (may be empty).
        file_label: how errors name the file.

    Raises:
        ConfigError: naming the flag, environment variable or file key with the bad value.
    """
    out: dict[str, Any] = {}
    for opt in options:
        if opt.name in flags:
            raw = flags[opt.name]
            if opt.multiple:
                out[opt.name] = tuple(v for item in raw for v in opt.parse_from(item, opt.cli))
            else:
                out[opt.name] = opt.parse_from(raw, opt.cli)
        elif opt.env in env:
            out[opt.name] = opt.parse_from(env[opt.env], opt.env)
        elif opt.name in file:
            out[opt.name] = opt.parse_from(file[opt.name], f"{file_label}: {opt.name}")
        else:
            out[opt.name] = opt.default
    return out


def resolve_with_file(
    options: Sequence[Option[Any]],
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    file: Mapping[str, Any],
    file_label: str = "config file",
) -> dict[str, Any]:
    """Check the file's keys against ``options``, then :func:`resolve` the three sources.

    Raises:
        ConfigError: the file names another config file, has an unknown key, or a value
            from any source is invalid.
    """
    if "config" in file:
        raise ConfigError(f"{file_label}: config: a config file cannot name another one")
    check_unknown_keys(file, [o.name for o in options], file_label)
    return resolve(options, flags, env, file, file_label)


def resolve_entry(
    entry: Mapping[str, Any],
    options: Sequence[Option[Any]],
    shared: Mapping[str, Any],
    label: str,
) -> dict[str, Any]:
    """One entry of a config file's list (the ambassador's ``routes:``, the adapter's
    ``sinks:``): its own keys, parsed, over the values every entry shares.

    Raises:
        ConfigError: an unknown key, or a bad value, named with ``label``.
    """
    check_unknown_keys(entry, [o.name for o in options], label)
    own = resolve([o for o in options if o.name in entry], {}, {}, entry, label)
    return {**shared, **own}


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML config file that must hold a mapping.

    Raises:
        ConfigError: when the file is missing, unreadable, not UTF-8, not YAML or not a
            mapping.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"--config: {str(path)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    import yaml  # only when a config file is given: keeps idle memory down

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config: {str(path)!r} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {str(path)!r} must hold a mapping of option names")
    return data


def check_unknown_keys(data: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    """Reject keys no option declares (a typo must not be silently ignored)."""
    names = set(known)
    for key in data:
        if key not in names:
            hint = _closest(str(key), names)
            raise ConfigError(
                f"{where}: unknown key {key!r}" + (f" (did you mean {hint!r}?)" if hint else "")
            )


def _closest(word: str, names: Iterable[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(word.replace("-", "_"), list(names), n=1)
    return found[0] if found else None


def default_of(options: Iterable[Option[Any]], name: str) -> Any:
    """The declared default of option ``name`` in ``options`` (config dataclasses take
    their field defaults from here, so each default is written once).

    Raises:
        KeyError: no option of that name.
    """
    for opt in options:
        if opt.name == name:
            return opt.default
    raise KeyError(name)


def environ() -> Mapping[str, str]:
    """The environment variables with the podpatterns prefix."""
    return {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
