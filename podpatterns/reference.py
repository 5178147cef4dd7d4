"""Render docs/reference.md from the code: options, value syntax, exit codes, metrics, events.

Nothing here is copied by hand. The option tables come from the :class:`~podpatterns.options.Option`
declarations, the exit codes from :data:`~podpatterns.errors.EXIT_MEANINGS`, the metrics from
the collectors a runtime with an ambassador registers, and the log events from the logging
calls in the package source. ``tests/test_docs.py`` fails when the committed file differs
from a fresh rendering.

Each component's page in docs/ carries its own option table too, between the markers
``<!-- generated:options NAME -->`` and ``<!-- end generated:options -->`` (NAME is a key
of :func:`option_sections`). ``--write`` rewrites what is between them, so the committed
Markdown reads well on GitHub and on the site alike, and the tests fail when it is stale.

Usage::

    python -m podpatterns.reference            # print the Markdown
    python -m podpatterns.reference --write    # rewrite docs/reference.md and the
                                               # generated sections of docs/*.md
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from podpatterns.errors import EXIT_MEANINGS, ExitCode
from podpatterns.options import (
    Option,
    parse_bool,
    parse_duration,
    parse_optional_duration,
    parse_size,
    show_default,
)

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_OUTPUT = PACKAGE_DIR.parent / "docs" / "reference.md"

# The --config option names the file itself, so the file cannot set it.
_NOT_IN_FILE = frozenset({"config"})


@dataclass(frozen=True)
class ValueSyntax:
    """How one kind of value is written; ``examples`` are checked by tests/test_docs.py."""

    kind: str
    parse: Callable[[str], Any]
    examples: tuple[str, ...]
    text: str


VALUE_SYNTAX: tuple[ValueSyntax, ...] = (
    ValueSyntax(
        "DURATION",
        parse_duration,
        ("250ms", "30s", "5m", "1h", "1.5"),
        "a number with an optional unit `ms`, `s`, `m` or `h`; a bare number is seconds",
    ),
    ValueSyntax(
        "DURATION (off by default)",
        parse_optional_duration,
        ("off", "none", "0", "10s"),
        "as DURATION; `off`, `none` or `0` disable the feature",
    ),
    ValueSyntax(
        "SIZE",
        parse_size,
        ("65536", "256KiB", "1MiB", "1G"),
        "bytes, with an optional unit `B`, `K`/`KiB`, `M`/`MiB` or `G`/`GiB` (powers of 1024, "
        "any case)",
    ),
    ValueSyntax(
        "boolean",
        parse_bool,
        ("true", "false", "yes", "no", "on", "off", "1", "0"),
        "in the environment and the file; on the command line use `--x` or `--no-x`",
    ),
)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{text}`"


def option_table(options: Iterable[Option[Any]]) -> str:
    """A Markdown table of ``options``: flag, environment variable, file key, default, meaning.

    Args:
        options: the declarations, in the order to show them.

    Returns:
        The table, ending with a newline.
    """
    rows = [
        "| flag | environment variable | config-file key | default | meaning |",
        "|------|----------------------|-----------------|---------|---------|",
    ]
    for opt in options:
        if opt.flag:
            flag = f"{_code(opt.cli)}, {_code('--no-' + opt.cli[2:])}"
        else:
            flag = _code(f"{opt.cli} {opt.metavar or opt.name.upper()}")
        env = _code(opt.env)
        key = "—" if opt.name in _NOT_IN_FILE else _code(opt.name)
        if opt.multiple:
            flag += " (repeatable)"
            env += " (comma-separated)"
            if opt.name not in _NOT_IN_FILE:
                key += " (list)"
        default = show_default(opt)
        cells = (flag, env, key, _code(default) if default else "—", opt.help)
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows) + "\n"


def value_syntax_table() -> str:
    """How durations, sizes and booleans are written."""
    rows = ["| value | syntax | examples |", "|-------|--------|----------|"]
    for v in VALUE_SYNTAX:
        examples = ", ".join(_code(e) for e in v.examples)
        rows.append(f"| {v.kind} | {_cell(v.text)} | {examples} |")
    return "\n".join(rows) + "\n"


def exit_code_table() -> str:
    """Every :class:`~podpatterns.errors.ExitCode` with its meaning."""
    rows = ["| code | name | meaning |", "|------|------|---------|"]
    for code in ExitCode:
        rows.append(f"| {int(code)} | {_code(code.name)} | {_cell(EXIT_MEANINGS[code])} |")
    return "\n".join(rows) + "\n"


@dataclass(frozen=True)
class MetricInfo:
    """One metric family as exposed on ``/metrics``."""

    name: str
    kind: str
    labels: tuple[str, ...]
    help: str


def metric_infos() -> list[MetricInfo]:
    """The metric families of a runtime with an ambassador, an adapter, a prober and
    ``--exit-with``.

    The runtime and the components are only constructed (nothing is bound or started),
    so this runs without an event loop.
    """
    from podpatterns.adapter import Adapter
    from podpatterns.ambassador import Ambassador
    from podpatterns.commands import COMMANDS
    from podpatterns.health.coordination import pod_runtime
    from podpatterns.health.prober import Prober
    from podpatterns.metrics import CallbackCollector
    from podpatterns.reload import Reloader
    from podpatterns.runtime import Component

    def config(command: str, **flags: Any) -> Any:
        """The config ``podpatterns COMMAND --flags...`` builds (as the CLI does)."""
        return COMMANDS[command].build(flags, {}, {}, "config file")

    # with --exit-with, as every command builds its runtime
    ambassador = config(
        "ambassador",
        listen="127.0.0.1:0",
        upstream=["127.0.0.1:1"],
        health_dir=".",
        exit_with="app",
    )
    adapter = config("adapter", path=["/var/log/app/*.log"])
    health = config("health", health_dir=".", name="app", probe=["tcp://127.0.0.1:1"])
    reload = config("reload", watch=["."], http_post="http://127.0.0.1:1/")
    components: list[Component] = [
        Ambassador(ambassador),
        Adapter(adapter),
        Prober(health.prober),
        Reloader(reload.reload),
    ]
    runtime = pod_runtime(ambassador.runtime, components)
    declared = {
        f.full_name: f
        for c in runtime.collectors
        if isinstance(c, CallbackCollector)
        for f in c.families
    }
    out: list[MetricInfo] = []
    for family in runtime.registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        if name in declared:
            labels: tuple[str, ...] = declared[name].labels
        else:  # families built by prometheus_client metrics, e.g. Histogram
            seen: dict[str, None] = {}
            for sample in family.samples:
                seen.update(dict.fromkeys(k for k in sample.labels if k != "le"))
            labels = tuple(seen)
        out.append(MetricInfo(name, family.type, labels, family.documentation))
    return out


def metrics_table() -> str:
    """A Markdown table of :func:`metric_infos`."""
    rows = ["| metric | type | labels | meaning |", "|--------|------|--------|---------|"]
    for m in metric_infos():
        labels = ", ".join(_code(label) for label in m.labels) or "—"
        rows.append(f"| {_code(m.name)} | {m.kind} | {labels} | {_cell(m.help)} |")
    return "\n".join(rows) + "\n"


_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class EventInfo:
    """One structured log event name, with the levels and fields it is logged with."""

    name: str
    levels: list[str] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)


def log_events(package_dir: Path = PACKAGE_DIR) -> list[EventInfo]:
    """The log events of the package, found in its source, sorted by name.

    A logging call is ``<logger>.<level>("event_name", key=...)``; a call through a
    plain name (``log("event", ...)``, the level chosen at run time) counts too, with
    the level shown as ``varies``.
    """
    events: dict[str, EventInfo] = {}
    for path in sorted(package_dir.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        source = path.relative_to(package_dir).as_posix()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            first = node.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in _LEVELS:
                level = func.attr
            elif isinstance(func, ast.Name) and func.id == "log":
                level = "varies"
            else:
                continue
            info = events.setdefault(first.value, EventInfo(first.value))
            for value, seq in ((level, info.levels), (source, info.sources)):
                if value not in seq:
                    seq.append(value)
            for kw in node.keywords:
                if kw.arg is not None and kw.arg not in info.fields:
                    info.fields.append(kw.arg)
    return sorted(events.values(), key=lambda e: e.name)


def events_table() -> str:
    """A Markdown table of :func:`log_events`."""
    rows = ["| event | level | fields | logged by |", "|-------|-------|--------|-----------|"]
    for e in log_events():
        fields = ", ".join(_code(f) for f in e.fields) or "—"
        sources = ", ".join(_code(s) for s in e.sources)
        rows.append(f"| {_code(e.name)} | {', '.join(e.levels)} | {fields} | {sources} |")
    return "\n".join(rows) + "\n"


def commands_table() -> str:
    """A Markdown table of the subcommands, from :data:`podpatterns.commands.COMMANDS`."""
    from podpatterns.commands import COMMANDS
    from podpatterns.runtime import RUNTIME_OPTIONS

    runtime = {o.name for o in RUNTIME_OPTIONS}
    rows = ["| command | what it does | options |", "|---------|--------------|---------|"]
    for c in COMMANDS.values():
        names = {o.name for o in c.options}
        shared = (
            "every runtime option"
            if runtime <= names
            else ", ".join(_code(o.cli) for o in c.options if o.name in runtime)
        )
        own = len([o for o in c.options if o.name not in runtime])
        usage = f"podpatterns {c.name} [OPTIONS]" + (" -- CMD [ARGS...]" if c.takes_command else "")
        rows.append(
            f"| {_code(usage)} | {_cell(c.help)} | {own} of its own; "
            f"{shared or 'no runtime option'} |"
        )
    return "\n".join(rows) + "\n"


def option_sections() -> dict[str, tuple[Option[Any], ...]]:
    """The option tables the docs show, by the name used in their page markers."""
    from podpatterns.adapter.config import (
        INPUT_OPTIONS,
        METRICS_OPTIONS,
        PROCESS_OPTIONS,
        PUSH_OPTIONS,
        SINK_OPTIONS,
        STATSD_OPTIONS,
    )
    from podpatterns.ambassador.config import PROTOCOL_OPTIONS, ROUTE_OPTIONS
    from podpatterns.commands.inspect import INSPECT_OPTIONS
    from podpatterns.health.prober import PROBE_OPTIONS
    from podpatterns.health.supervisor import RUN_OPTIONS
    from podpatterns.health.wait import WAIT_OPTIONS
    from podpatterns.reload import RELOAD_OPTIONS
    from podpatterns.runtime import RUNTIME_OPTIONS

    return {
        "runtime": RUNTIME_OPTIONS,
        "ambassador": ROUTE_OPTIONS,
        "ambassador-protocol": PROTOCOL_OPTIONS,
        "adapter-input": INPUT_OPTIONS,
        "adapter-push": PUSH_OPTIONS,
        "adapter-statsd": STATSD_OPTIONS,
        "adapter-metrics": METRICS_OPTIONS,
        "adapter-process": PROCESS_OPTIONS,
        "adapter-sinks": SINK_OPTIONS,
        "run": RUN_OPTIONS,
        "health": PROBE_OPTIONS,
        "reload": RELOAD_OPTIONS,
        "wait": WAIT_OPTIONS,
        "inspect": INSPECT_OPTIONS,
    }


SECTION_END = "<!-- end generated:options -->"
_SECTION = re.compile(
    r"^<!-- generated:options (?P<name>[-\w]+) -->\n(?P<body>.*?)^" + re.escape(SECTION_END),
    re.MULTILINE | re.DOTALL,
)


def section_names(text: str) -> list[str]:
    """The names of the generated option sections in a page, in order."""
    return [m["name"] for m in _SECTION.finditer(text)]


def refresh_sections(text: str) -> str:
    """``text`` with the body of every generated option section rendered afresh.

    Args:
        text: a Markdown page.

    Returns:
        The page; unchanged when every section is current.

    Raises:
        ValueError: a marker names no section of :func:`option_sections`.
    """
    sections = option_sections()

    def body(m: re.Match[str]) -> str:
        name = m["name"]
        if name not in sections:
            raise ValueError(f"generated:options {name!r}: no such section ({', '.join(sections)})")
        return f"<!-- generated:options {name} -->\n\n{option_table(sections[name])}\n{SECTION_END}"

    return _SECTION.sub(body, text)


def render() -> str:
    """The whole of docs/reference.md."""
    sections = option_sections()
    parts = [
        "<!-- Generated by `python -m podpatterns.reference --write`; do not edit. -->\n",
        "# Reference\n",
        "Generated from the declarations in the code: the options from "
        "`podpatterns/runtime/config.py`, `podpatterns/ambassador/config.py` and "
        "`podpatterns/adapter/config.py`, the exit codes "
        "from `podpatterns/errors.py`, the metrics from the collectors a running "
        "ambassador, adapter, `health`, `reload` and `--exit-with` register, and the log "
        "events from the package source. How the sources combine is explained in "
        "[runtime.md](runtime.md#configuration).\n",
        "Every option is a flag, an environment variable and a key of the YAML file "
        "given with `--config`. Precedence: flags > environment > file > defaults.\n",
        "## Commands\n",
        "The subcommands of `podpatterns`, from the table the command line is built from "
        "(`podpatterns/commands/`).\n",
        commands_table(),
        "## Runtime options\n",
        "Shared by every component: `podpatterns ambassador` and `podpatterns adapter`.\n",
        option_table(sections["runtime"]),
        "## Ambassador route options\n",
        "Flags and environment variables describe one route. In the config file these "
        "keys may be set at the top level, where they apply to every route, or in an "
        "entry of `routes:`, where they apply to that route only and win over the top "
        "level, the environment and the flags. A route entry may also have a `name` "
        "(default `route0`, `route1`, ...; the single route of flags and environment is "
        "named `default`). See [ambassador.md](ambassador.md#several-routes).\n",
        option_table(sections["ambassador"]),
        "## Adapter options\n",
        "Options of `podpatterns adapter` (see [adapter.md](adapter.md)), besides the "
        "runtime options.\n",
        "### Input\n",
        option_table(sections["adapter-input"]),
        "### Parse and transform\n",
        option_table(sections["adapter-process"]),
        "### Sinks\n",
        option_table(sections["adapter-sinks"]),
        "## `podpatterns run` options\n",
        "Also `--health-dir`, `--log-level` and `--log-format` from the runtime options; "
        "the command follows `--`. See [health.md](health.md#run).\n",
        option_table(sections["run"]),
        "## `podpatterns health` options\n",
        "Also every runtime option (it runs under the runtime: admin server, shutdown, "
        "`--exit-with`). See [health.md](health.md#health).\n",
        option_table(sections["health"]),
        "## `podpatterns reload` options\n",
        "Also every runtime option. See [reload.md](reload.md).\n",
        option_table(sections["reload"]),
        "## `podpatterns wait` options\n",
        "Also `--health-dir`, `--log-level` and `--log-format` from the runtime options; "
        "the command follows `--`. See [health.md](health.md#wait).\n",
        option_table(sections["wait"]),
        "## `podpatterns inspect` options\n",
        "One-shot and read-only, for `kubectl debug`; it reads no config file. See "
        "[debugging.md](debugging.md).\n",
        option_table(sections["inspect"]),
        "## Value syntax\n",
        value_syntax_table(),
        "A repeatable option takes several values: repeat the flag, separate them with "
        "commas in the environment variable, or give a YAML list in the file.\n",
        "## Exit codes\n",
        exit_code_table(),
        "## Metrics\n",
        "Served on the admin server's `GET /metrics` in the Prometheus text format. "
        "Counters carry the `_total` suffix; the histogram has the usual `_bucket`, "
        "`_sum` and `_count` series.\n",
        metrics_table(),
        "## Log events\n",
        "Structured events on stderr (see [runtime.md](runtime.md#logging)). Every event "
        "also has `event`, `level`, `timestamp` and `component`; ambassador events also "
        "have `route`.\n",
        events_table(),
    ]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the reference, or write it with ``--write [PATH]``; return the exit code.

    ``--write`` also refreshes the generated option sections of the other Markdown
    files in PATH's directory (docs/ by default).
    """
    parser = argparse.ArgumentParser(
        prog="python -m podpatterns.reference", description="Render docs/reference.md."
    )
    parser.add_argument(
        "--write",
        nargs="?",
        const=DEFAULT_OUTPUT,
        type=Path,
        metavar="PATH",
        help=f"write the file instead of printing it (default path: {DEFAULT_OUTPUT}) and "
        "refresh the generated option sections of the Markdown files next to it",
    )
    args = parser.parse_args(argv)
    text = render()
    if args.write is None:
        sys.stdout.write(text)
        return 0
    target: Path = args.write
    if not target.parent.is_dir():
        sys.stderr.write(f"reference: {str(target.parent)!r} is not a directory\n")
        return int(ExitCode.CONFIG)
    target.write_text(text)
    sys.stderr.write(f"reference: wrote {target}\n")
    for page in sorted(target.parent.glob("*.md")):
        if page.resolve() == target.resolve():
            continue
        old = page.read_text()
        new = refresh_sections(old)
        if new != old:
            page.write_text(new)
            sys.stderr.write(f"reference: refreshed the option tables in {page}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
