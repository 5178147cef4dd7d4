"""One module per subcommand, and the table the CLI is built from.

Each command module declares a :class:`~podpatterns.commands.common.Command`: its
options, a public ``build(flags, env, file, file_label) -> config`` that turns the three
sources into the command's typed config (the CLI, the manifest checks in the tests and the
generated reference all call it), and ``main(config) -> int`` that runs it.

To add a command: write ``podpatterns/commands/NAME.py`` with its ``COMMAND`` and add it to
:data:`COMMANDS` below (see docs/architecture.md).
"""

from __future__ import annotations

from podpatterns.commands import adapter, ambassador, demo, health, inspect, reload, run, wait
from podpatterns.commands.common import Command

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        ambassador.COMMAND,
        adapter.COMMAND,
        demo.COMMAND,
        run.COMMAND,
        wait.COMMAND,
        health.COMMAND,
        reload.COMMAND,
        inspect.COMMAND,
    )
}
"""Every subcommand by name, in the order ``--help`` lists them."""

__all__ = ["COMMANDS", "Command"]
