"""The command line: argparse built from :data:`podpatterns.commands.COMMANDS`, dispatch,
and errors mapped to exit codes (see :mod:`podpatterns.errors`).

``podpatterns NAME ...`` builds the parser of that one subcommand and imports only its
module: the others' options and dependencies are not part of its start-up time. Anything
else (``--help``, ``--version``, an unknown command) builds the full parser.

This and the command modules are the only places that read argv and the environment;
signal handlers and logging are set up by each command's ``main``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from podpatterns import __version__, commands
from podpatterns.commands import Command
from podpatterns.errors import EXIT_MEANINGS, ExitCode, PodpatternsError
from podpatterns.options import add_arguments, environ
from podpatterns.runtime.process import release_stop_signals

EXIT_TABLE = "exit codes:\n" + "\n".join(
    f"  {int(code):<4} {meaning}" for code, meaning in EXIT_MEANINGS.items()
)

EPILOG = (
    "every option is also an environment variable (shown after each help) and a "
    "key of the --config YAML file; precedence: flags > environment > file > "
    "defaults.\n\n" + EXIT_TABLE
)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit code 2."""

    def error(self, message: str) -> NoReturn:
        flag, sep, what = message.partition(": ")
        if sep and what == "expected one argument" and flag.startswith("argument "):
            # argparse takes a value that starts with '-' (e.g. -1s) for another flag.
            flag = flag.removeprefix("argument ")
            message = (
                f"{flag}: expected a value (a value that starts with '-' is written {flag}=VALUE)"
            )
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(ExitCode.CONFIG)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``podpatterns`` parser with one sub-command per entry of ``COMMANDS``, or with
    the sub-command ``only`` alone (what ``podpatterns ONLY ...`` parses with)."""
    chosen = [commands.load(only)] if only else list(commands.COMMANDS.values())
    parser = _Parser(
        prog="podpatterns", description="Ambassador, adapter and sidecar coordination for Pods."
    )
    parser.add_argument("--version", action="version", version=f"podpatterns {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    for command in chosen:
        p = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_arguments(p, command.options)
        if command.takes_command:
            p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point."""
    raise SystemExit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the command, return the exit code."""
    words = sys.argv[1:] if argv is None else list(argv)
    only = words[0] if words and words[0] in commands.NAMES else None
    args = build_parser(only).parse_args(words)
    command: Command = commands.load(args.command)
    flags = {k: v for k, v in vars(args).items() if k != "command"}
    if not command.handles_signals:
        release_stop_signals()  # held by the entry point; this command sets no handlers
    try:
        return command.main(command.config(flags, environ()))
    except PodpatternsError as exc:
        sys.stderr.write(f"podpatterns {command.name}: error: {exc}\n")
        return int(exc.exit_code)
