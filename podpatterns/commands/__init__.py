"""One module per subcommand, and the table the CLI is built from.

Each command module declares a :class:`~podpatterns.commands.common.Command`: its
options, a public ``build(flags, env, file, file_label) -> config`` that turns the three
sources into the command's typed config (the CLI, the manifest checks in the tests and the
generated reference all call it), and ``main(config) -> int`` that runs it.

To add a command: write ``podpatterns/commands/NAME.py`` with its ``COMMAND`` and add its
name to :data:`NAMES` below (see docs/architecture.md).

The command modules are imported on first use: ``podpatterns ambassador`` imports only
``podpatterns.commands.ambassador`` (:func:`load`), not the options and dependencies of
the seven others, which is part of every container's start-up time. :data:`COMMANDS`
imports them all, for ``--help`` and the generated reference.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from podpatterns.commands.common import Command

NAMES = ("ambassador", "adapter", "demo", "run", "wait", "health", "reload", "inspect")
"""Every subcommand, in the order ``--help`` lists them (its module is ``commands.NAME``)."""


def load(name: str) -> Command:
    """The :class:`Command` of subcommand ``name`` (one of :data:`NAMES`), imported now."""
    if name not in NAMES:
        raise KeyError(name)
    command: Command = importlib.import_module(f"{__name__}.{name}").COMMAND
    return command


if TYPE_CHECKING:
    COMMANDS: dict[str, Command]
    """Every subcommand by name, in the order ``--help`` lists them."""


def __getattr__(attr: str) -> dict[str, Command]:
    """``COMMANDS``, built (every command module imported) on first access."""
    if attr != "COMMANDS":
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    commands = {name: load(name) for name in NAMES}
    globals()["COMMANDS"] = commands
    return commands


__all__ = ["COMMANDS", "NAMES", "Command", "load"]
