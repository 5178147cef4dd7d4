"""The command line: the only place that reads argv and the environment, installs signal
handlers, configures logging and maps errors to exit codes (see :mod:`podpatterns.errors`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from podpatterns import __version__, logs
from podpatterns.errors import EXIT_MEANINGS, ExitCode, PodpatternsError
from podpatterns.options import Option, add_arguments, environ, load_yaml
from podpatterns.runtime import Component, Runtime, RuntimeConfig, Trigger

EXIT_TABLE = "exit codes:\n" + "\n".join(
    f"  {int(code):<4} {meaning}" for code, meaning in EXIT_MEANINGS.items()
)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(ExitCode.CONFIG)


def env_epilog(options: Sequence[Option[Any]]) -> str:
    return (
        "every option is also an environment variable (shown after each help) and a "
        "key of the --config YAML file; precedence: flags > environment > file > "
        "defaults.\n\n" + EXIT_TABLE
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``podpatterns`` parser with one sub-command per component."""
    from podpatterns.ambassador import AMBASSADOR_OPTIONS

    parser = _Parser(
        prog="podpatterns", description="Ambassador, adapter and sidecar coordination for Pods."
    )
    parser.add_argument("--version", action="version", version=f"podpatterns {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    amb = sub.add_parser(
        "ambassador",
        help="local TCP proxy to external services",
        description="Relay TCP (or unix-socket) connections to upstream endpoints.",
        epilog=env_epilog(AMBASSADOR_OPTIONS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(amb, AMBASSADOR_OPTIONS)
    _add_adapter_parser(sub)
    demo = sub.add_parser(
        "demo",
        help="run a small Pod on loopback and print what happened",
        description="An embedded upstream, the ambassador in front of it and a client "
        "pushing traffic through, then a graceful shutdown.",
    )
    demo.add_argument(
        "--connections", type=int, default=200, help="client connections to open (default: 200)"
    )
    demo.add_argument(
        "--megabytes", type=int, default=64, help="bulk bytes to push each way (default: 64)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry point."""
    raise SystemExit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the command, return the exit code."""
    args = build_parser().parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        if args.command == "ambassador":
            return _run_ambassador(flags)
        if args.command == "adapter":
            return _run_adapter(flags)
        if args.command == "demo":
            from podpatterns.demo import run_demo

            return run_demo(connections=args.connections, megabytes=args.megabytes)
    except PodpatternsError as exc:
        sys.stderr.write(f"podpatterns {args.command}: error: {exc}\n")
        return int(exc.exit_code)
    raise AssertionError(args.command)  # pragma: no cover


def _file_values(flags: dict[str, Any]) -> tuple[dict[str, Any], str]:
    from podpatterns.options import parse_path

    path = flags.get("config") or os.environ.get("PODPATTERNS_CONFIG")
    if not path:
        return {}, "config file"
    p = parse_path(str(path))
    return load_yaml(p), str(p)


def _run_ambassador(flags: dict[str, Any]) -> int:
    from podpatterns.ambassador import Ambassador
    from podpatterns.ambassador import config as amb_config

    file, label = _file_values(flags)
    cfg = amb_config.build(flags, environ(), file, label)
    return serve(cfg.runtime, lambda: [Ambassador(cfg)])


def _add_adapter_parser(sub: Any) -> None:
    from podpatterns.adapter import ADAPTER_OPTIONS

    adapter = sub.add_parser(
        "adapter",
        help="tail, parse, transform and ship logs from a shared volume",
        description="Tail files (globs), parse and transform each line, ship the records to "
        "a sink; at least once, checkpointed after the sink acknowledged.",
        epilog=env_epilog(ADAPTER_OPTIONS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(adapter, ADAPTER_OPTIONS)


def _run_adapter(flags: dict[str, Any]) -> int:
    from podpatterns.adapter import Adapter
    from podpatterns.adapter import config as adapter_config

    file, label = _file_values(flags)
    cfg = adapter_config.build(flags, environ(), file, label)
    return serve(cfg.runtime, lambda: [Adapter(cfg)])


def serve(config: RuntimeConfig, make: Callable[[], list[Component]]) -> int:
    """Run components under a runtime with signal handling; return the exit code."""
    logs.configure(config.log_level, config.log_format)
    log = logs.get("cli")
    factory = _loop_factory(config.loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            return runner.run(_serve(config, make))
        except PodpatternsError as exc:
            log.error("startup_failed", error=str(exc))
            sys.stderr.write(f"podpatterns: error: {exc}\n")
            return int(exc.exit_code)


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            from podpatterns.errors import ConfigError

            raise ConfigError("--loop: 'uvloop' is not installed (pip install uvloop)") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _serve(config: RuntimeConfig, make: Callable[[], list[Component]]) -> int:
    triggers: list[Trigger] = []
    if config.exit_with and config.health_dir is not None:
        from podpatterns.tombstone import exit_with_trigger

        triggers.append(exit_with_trigger(Path(config.health_dir), config.exit_with))
    runtime = Runtime(config, make(), triggers=triggers)
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            sys.stderr.write("podpatterns: second SIGINT, exiting now\n")
            sys.stderr.flush()
            os._exit(ExitCode.FORCED)
        runtime.request_shutdown("SIGINT")

    loop.add_signal_handler(signal.SIGTERM, runtime.request_shutdown, "SIGTERM")
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        await runtime.run()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)
    return ExitCode.OK
