"""Errors that map to documented exit codes (:data:`EXIT_MEANINGS`).

Library code raises these; only the command line turns them into exit codes
(:mod:`podpatterns.cli`, and :mod:`podpatterns.runtime.process` for a runtime that fails
to start).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of every podpatterns component (see the module table)."""

    OK = 0
    INTERNAL = 1
    CONFIG = 2
    BIND = 3
    PEER_EXITED = 4
    WAIT_TIMEOUT = 124
    CANNOT_EXECUTE = 126
    NOT_FOUND = 127
    FORCED = 130
    TERMINATED = 143


EXIT_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "clean exit, including a graceful SIGTERM drain (a Job must not fail)",
    ExitCode.INTERNAL: "unexpected internal error (a bug: a traceback is printed on stderr)",
    ExitCode.CONFIG: "usage or configuration error (one line on stderr names the option)",
    ExitCode.BIND: "a listener or the admin server could not bind",
    ExitCode.PEER_EXITED: "wait: a waited-for peer wrote its tombstone (the error names it)",
    ExitCode.WAIT_TIMEOUT: "wait: the deadline passed; the command was not run",
    ExitCode.CANNOT_EXECUTE: "run, wait: the command exists but cannot be executed",
    ExitCode.NOT_FOUND: "run, wait: the command was not found",
    ExitCode.FORCED: "forced exit on a second SIGINT",
    ExitCode.TERMINATED: "wait: SIGTERM or SIGINT arrived while waiting; the command was not run",
}
"""One line per exit code; docs/reference.md is generated from it."""


class PodpatternsError(Exception):
    """Base class of the errors that podpatterns reports to users."""

    exit_code: ExitCode = ExitCode.INTERNAL


class ConfigError(PodpatternsError, ValueError):
    """An option has a bad value; the message names the option, the value and what is expected."""

    exit_code = ExitCode.CONFIG


class BindError(PodpatternsError, OSError):
    """A listener or the admin server could not bind its address."""

    exit_code = ExitCode.BIND


class PeerExitedError(PodpatternsError):
    """A peer that was waited for has exited (its tombstone is on disk)."""

    exit_code = ExitCode.PEER_EXITED


class WaitTimeoutError(PodpatternsError):
    """The wait deadline passed before every target was there."""

    exit_code = ExitCode.WAIT_TIMEOUT
