"""What every command shares: the :class:`Command` declaration, the config-file source,
and the wiring of a runtime-based tool (options, resolution, serving)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from podpatterns.options import Option, check_unknown_keys, load_yaml, parse_path, resolve
from podpatterns.runtime import RUNTIME_OPTIONS, RuntimeConfig

Flags = Mapping[str, Any]
"""Values given on the command line, by option name (absent when not given)."""


@dataclass(frozen=True)
class Command:
    """One subcommand.

    Attributes:
        name: the subcommand (``podpatterns NAME``).
        help: one line for ``podpatterns --help``.
        description: the paragraph of ``podpatterns NAME --help``.
        options: its option declarations (flags, env vars, file keys, docs).
        build: ``(flags, env, file, file_label) -> config``; raises ConfigError.
        main: runs the command with its config; returns the exit code.
        takes_command: it ends with ``-- CMD ARGS...`` (``run``, ``wait``); the words
            arrive in ``flags["argv"]``.
        handles_signals: ``main`` takes over SIGTERM and SIGINT, which the entry point
            holds (``podpatterns.__main__``), and releases them once its handlers are in
            place; for any other command the CLI releases them before ``main``.
    """

    name: str
    help: str
    description: str
    options: tuple[Option[Any], ...]
    build: Callable[[Flags, Mapping[str, str], Mapping[str, Any], str], Any]
    main: Callable[[Any], int]
    takes_command: bool = False
    handles_signals: bool = False

    @property
    def reads_config_file(self) -> bool:
        """The command has ``--config FILE`` (and reads ``PODPATTERNS_CONFIG``)."""
        return any(o.name == "config" for o in self.options)

    def file_values(self, flags: Flags, env: Mapping[str, str]) -> tuple[dict[str, Any], str]:
        """The config file's mapping and how errors name it (empty without one)."""
        if not self.reads_config_file:
            return {}, "config file"
        path = flags.get("config") or env.get("PODPATTERNS_CONFIG")
        if not path:
            return {}, "config file"
        p = parse_path(str(path))
        return load_yaml(p), str(p)

    def config(self, flags: Flags, env: Mapping[str, str]) -> Any:
        """The command's config from flags, the environment and the config file."""
        file, label = self.file_values(flags, env)
        return self.build(flags, env, file, label)


def shared_options(*names: str) -> tuple[Option[Any], ...]:
    """Runtime options that a non-runtime tool shares (same flag, env var and meaning)."""
    return tuple(o for o in RUNTIME_OPTIONS if o.name in names)


TOOL_OPTIONS = shared_options("health_dir", "log_level", "log_format")
"""What ``run`` and ``wait`` share with the runtime-based commands."""


def resolve_runtime_tool(
    options: Sequence[Option[Any]],
    flags: Flags,
    env: Mapping[str, str],
    file: Mapping[str, Any],
    file_label: str,
) -> tuple[RuntimeConfig, dict[str, Any]]:
    """Resolve a runtime-based tool's options (the runtime's plus its own).

    Raises:
        ConfigError: an unknown file key, or a bad value (naming where it came from).
    """
    check_unknown_keys(file, [o.name for o in options if o.name != "config"], file_label)
    values = resolve(options, flags, env, file, file_label)
    return RuntimeConfig.from_values(values), values


def command_words(flags: Flags) -> tuple[str, ...]:
    """The ``-- CMD ARGS...`` words of a command that takes one."""
    argv = list(flags.get("argv") or [])
    if argv and argv[0] == "--":
        argv = argv[1:]
    return tuple(argv)
