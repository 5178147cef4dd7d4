"""Each option's default is declared once: every config dataclass field that an option
sets has the option's declared default (or a documented embedded default)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from podpatterns.adapter.config import ADAPTER_ONLY_OPTIONS, AdapterConfig
from podpatterns.ambassador.config import ROUTE_OPTIONS, RouteConfig
from podpatterns.commands.demo import DEMO_OPTIONS, DemoConfig
from podpatterns.health.prober import PROBE_OPTIONS, ProberConfig
from podpatterns.health.supervisor import RUN_OPTIONS, RunConfig
from podpatterns.health.wait import WAIT_OPTIONS, WaitConfig
from podpatterns.options import Option
from podpatterns.reload import RELOAD_OPTIONS, ReloadConfig
from podpatterns.runtime import EMBEDDED_DEFAULTS, RUNTIME_OPTIONS, RuntimeConfig

PAIRS: list[tuple[str, tuple[Option[Any], ...], type[Any], dict[str, str]]] = [
    ("runtime", RUNTIME_OPTIONS, RuntimeConfig, {}),
    ("route", ROUTE_OPTIONS, RouteConfig, {}),
    ("adapter", ADAPTER_ONLY_OPTIONS, AdapterConfig, {}),
    (
        "health",
        PROBE_OPTIONS,
        ProberConfig,
        {"probe": "probes", "probe_interval": "interval", "probe_timeout": "timeout"},
    ),
    ("run", RUN_OPTIONS, RunConfig, {}),
    ("wait", WAIT_OPTIONS, WaitConfig, {"for": "targets"}),
    ("reload", RELOAD_OPTIONS, ReloadConfig, {}),
    ("demo", DEMO_OPTIONS, DemoConfig, {}),
]
"""(what, the options, the dataclass, option name -> field name where they differ)."""

EXCEPTIONS = {("runtime", name): value for name, value in EMBEDDED_DEFAULTS.items()}
"""Defaults an embedded config changes on purpose (documented where they are declared)."""


def field_default(f: dataclasses.Field[Any]) -> Any:
    """A dataclass field's default, or the sentinel MISSING."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def disagreements(
    what: str, options: tuple[Option[Any], ...], cls: type[Any], renames: dict[str, str]
) -> list[str]:
    """Fields whose default differs from their option's declared default."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = []
    for opt in options:
        f = fields.get(renames.get(opt.name, opt.name))
        if f is None:
            continue  # not a field of its own (e.g. turned into another object)
        have = field_default(f)
        if have is dataclasses.MISSING:
            continue  # required: the command's build always passes it
        want = EXCEPTIONS.get((what, opt.name), opt.default)
        if have != want:
            out.append(f"{cls.__name__}.{f.name} = {have!r}, but {opt.cli} declares {want!r}")
    return out


@pytest.mark.parametrize(("what", "options", "cls", "renames"), PAIRS, ids=[p[0] for p in PAIRS])
def test_dataclass_defaults_are_the_declared_ones(
    what: str, options: tuple[Option[Any], ...], cls: type[Any], renames: dict[str, str]
) -> None:
    """The dataclass and the option declarations agree on every default."""
    assert disagreements(what, options, cls, renames) == []


def test_a_disagreement_is_found() -> None:
    """The check can fail: a dataclass with another default is reported."""

    @dataclasses.dataclass
    class Drifted:
        drain_timeout: float = 29.0

    assert disagreements("runtime", RUNTIME_OPTIONS, Drifted, {}) == [
        "Drifted.drain_timeout = 29.0, but --drain-timeout declares 30.0"
    ]
