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
    _add_run_parser(sub)
    _add_wait_parser(sub)
    _add_health_parser(sub)
    _add_reload_parser(sub)
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
        if args.command == "run":
            return _run_run(flags)
        if args.command == "wait":
            return _run_wait(flags)
        if args.command == "health":
            return _run_health(flags)
        if args.command == "reload":
            return _run_reload(flags)
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
    raise_fd_limit(log)
    factory = _loop_factory(config.loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            return runner.run(_serve(config, make))
        except PodpatternsError as exc:
            log.error("startup_failed", error=str(exc))
            sys.stderr.write(f"podpatterns: error: {exc}\n")
            return int(exc.exit_code)


def raise_fd_limit(log: Any) -> None:
    """Raise the soft open-files limit to the hard limit (as Go programs do at start).

    Every relayed connection holds 2 descriptors (6 with splice pipes); the usual soft
    limit of 1024 would cap a proxy at a few hundred connections for no reason.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("fd_limit_unchanged", soft=soft, hard=hard, error=str(exc))
        else:
            log.debug("fd_limit_raised", soft=soft, now=hard)


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
    exit_with = None
    if config.exit_with and config.health_dir is not None:
        from podpatterns.health.exitwith import ExitWith

        exit_with = ExitWith(
            Path(config.health_dir), config.exit_with, quit_urls=config.exit_with_quit
        )
        triggers.append(exit_with)
    runtime = Runtime(config, make(), triggers=triggers)
    if exit_with is not None:
        runtime.registry.register(exit_with.collector())
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
    if exit_with is not None and runtime.shutdown_reason == f"exit-with:{config.exit_with}":
        return config.exit_with_code
    return ExitCode.OK


# -- health: run and wait ------------------------------------------------------------


def _shared_options(*names: str) -> list[Option[Any]]:
    """Runtime options that a non-runtime tool shares (same flag, env var and meaning)."""
    from podpatterns.runtime import RUNTIME_OPTIONS

    return [o for o in RUNTIME_OPTIONS if o.name in names]


def _command_of(flags: dict[str, Any]) -> tuple[str, ...]:
    argv = list(flags.pop("argv", None) or [])
    if argv and argv[0] == "--":
        argv = argv[1:]
    return tuple(argv)


def _add_run_parser(sub: Any) -> None:
    from podpatterns.health.supervisor import RUN_OPTIONS

    _add_tool_parser(
        sub,
        "run",
        [*_shared_options("health_dir", "log_level", "log_format"), *RUN_OPTIONS],
        help="supervise the main process and write its health record and tombstone",
        description="Run CMD, write HEALTH_DIR/NAME.json (starting, ready, exited), forward "
        "every catchable signal to it and exit with its exit code (128+N when killed by "
        "signal N).",
        command=True,
    )


def _run_run(flags: dict[str, Any]) -> int:
    """``podpatterns run``: the signal loop around the :class:`Supervisor`.

    The supervisor's documented signal forwarding: every forwarded signal and SIGCHLD are
    blocked first and taken with ``sigtimedwait``, so none can arrive in a window where
    no handler exists, and one that arrives before the command started stays pending
    and ends in a tombstone (see docs/health.md#run).
    """
    import time

    from podpatterns.health.supervisor import (
        FORWARDED,
        RUN_OPTIONS,
        STOPPING,
        RunConfig,
        Supervisor,
        become_subreaper,
    )
    from podpatterns.options import resolve

    waited = FORWARDED | {signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    command = _command_of(flags)
    options = [*_shared_options("health_dir", "log_level", "log_format"), *RUN_OPTIONS]
    values = resolve(options, flags, environ(), {})
    logs.configure(values["log_level"], values["log_format"])
    sup = Supervisor(RunConfig.from_values(values, command))
    if os.getpid() != 1:
        become_subreaper()
    sup.write_starting()
    early = signal.sigpending() & STOPPING
    if early:
        return sup.stopped_before_start(min(early))
    failed = sup.spawn()
    if failed is not None:
        return failed
    next_tick = time.monotonic()
    while True:
        probing = sup.config.ready_probe is not None and sup.writer.record.phase.value == "starting"
        period = 0.05 if probing else sup.config.heartbeat
        left = next_tick + period - time.monotonic()
        info = signal.sigtimedwait(waited, max(left, 0.0)) if left > 0 else None
        if info is None:
            code = sup.reap()  # a missed SIGCHLD must not leave us waiting forever
            if code is not None:
                return code
            sup.tick()
            next_tick = time.monotonic()
        elif info.si_signo == signal.SIGCHLD:
            code = sup.reap()
            if code is not None:
                return code
        else:
            sup.forward(info.si_signo)


def _add_wait_parser(sub: Any) -> None:
    from podpatterns.health.wait import WAIT_OPTIONS

    _add_tool_parser(
        sub,
        "wait",
        [*_shared_options("health_dir", "log_level", "log_format"), *WAIT_OPTIONS],
        help="wait for peers and endpoints, then exec a command",
        description="Wait until every --for target is there (in parallel, one deadline), "
        "then exec CMD (or exit 0 without one).",
        command=True,
    )


def _run_wait(flags: dict[str, Any]) -> int:
    """``podpatterns wait``: wait, then ``execvp`` the command (a real exec)."""
    from podpatterns.health.wait import WAIT_OPTIONS, WaitConfig, wait_all
    from podpatterns.options import resolve

    command = _command_of(flags)
    options = [*_shared_options("health_dir", "log_level", "log_format"), *WAIT_OPTIONS]
    values = resolve(options, flags, environ(), {})
    logs.configure(values["log_level"], values["log_format"])
    config = WaitConfig.from_values(values)

    async def main() -> int:
        task = asyncio.create_task(wait_all(config))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            logs.get("wait").info("wait_interrupted")
            return ExitCode.TERMINATED
        return ExitCode.OK

    with asyncio.Runner() as runner:
        code = runner.run(main())
    if code != ExitCode.OK or not command:
        return code
    sys.stderr.flush()
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        sys.stderr.write(f"podpatterns wait: cannot execute {command[0]!r}: {exc.strerror}\n")
        return 127 if isinstance(exc, FileNotFoundError) else 126
    raise AssertionError("unreachable")  # pragma: no cover


def _health_options() -> list[Option[Any]]:
    from podpatterns.health.prober import PROBE_OPTIONS
    from podpatterns.runtime import RUNTIME_OPTIONS

    return [*RUNTIME_OPTIONS, *PROBE_OPTIONS]


def _add_health_parser(sub: Any) -> None:
    _add_tool_parser(
        sub,
        "health",
        _health_options(),
        help="probe the main container, write its record, serve the Pod's probes",
        description="Probe a container (HTTP, TCP, exec, file freshness) with kubelet-like "
        "thresholds, write HEALTH_DIR/NAME.json, and answer /livez, /readyz, /startupz "
        "for the whole Pod and /readyz/NAME etc. per container on the admin server.",
    )


def _run_health(flags: dict[str, Any]) -> int:
    from podpatterns.health.prober import Prober, ProberConfig

    runtime, values = _runtime_tool_values(flags, _health_options())
    config = ProberConfig.from_values(values)
    return serve(runtime, lambda: [Prober(config)])


def _reload_options() -> list[Option[Any]]:
    from podpatterns.reload import RELOAD_OPTIONS
    from podpatterns.runtime import RUNTIME_OPTIONS

    return [*RUNTIME_OPTIONS, *RELOAD_OPTIONS]


def _add_reload_parser(sub: Any) -> None:
    _add_tool_parser(
        sub,
        "reload",
        _reload_options(),
        help="watch mounted configuration and notify the app when its content changes",
        description="Watch directories (ConfigMap and Secret volumes, git-sync roots); when "
        "their content changes, optionally validate it, then notify the app by HTTP POST, "
        "signal or command, with retries.",
    )


def _run_reload(flags: dict[str, Any]) -> int:
    from podpatterns.reload import ReloadConfig, Reloader

    runtime, values = _runtime_tool_values(flags, _reload_options())
    config = ReloadConfig.from_values(values)
    return serve(runtime, lambda: [Reloader(config)])


def _add_tool_parser(
    sub: Any,
    name: str,
    options: Sequence[Option[Any]],
    *,
    help: str,
    description: str,
    command: bool = False,
) -> None:
    """One sub-command's parser from its option declarations (``-- CMD`` if ``command``)."""
    parser = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=env_epilog(options),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser, options)
    if command:
        parser.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")


def _runtime_tool_values(
    flags: dict[str, Any], options: Sequence[Option[Any]]
) -> tuple[RuntimeConfig, dict[str, Any]]:
    """Resolve a runtime-based tool's options from flags, environment and --config file."""
    from podpatterns.options import check_unknown_keys, resolve

    file, label = _file_values(flags)
    check_unknown_keys(file, [o.name for o in options if o.name != "config"], label)
    values = resolve(options, flags, environ(), file, label)
    return RuntimeConfig.from_values(values), values
