"""structlog setup: structured events on stderr, JSON unless stderr is a terminal.

stdout is never written by the runtime: for the adapter it is a data channel.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

LEVELS = ("debug", "info", "warning", "error")


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Configure structlog for a command-line process (the library never calls this).

    Args:
        level: minimum level, one of :data:`LEVELS`.
        fmt: ``json``, ``console`` or ``auto`` (console when ``stream`` is a TTY).
        stream: where events go; stderr by default.
    """
    out = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )


def get(name: str, **context: Any) -> Any:
    """A bound logger for one component or module, with ``component`` set."""
    return structlog.get_logger().bind(component=name, **context)


def enabled(logger: Any, level: str) -> bool:
    """Whether ``logger`` (from :func:`get`) emits events of ``level`` (one of
    :data:`LEVELS`), as configured when it was made: a hot path skips gathering the
    fields of an event that would be dropped. True for a logger that cannot tell."""
    check = getattr(logger, "is_enabled_for", None)
    return True if check is None else bool(check(logging.getLevelNamesMapping()[level.upper()]))
