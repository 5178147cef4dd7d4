"""podpatterns.logs: which levels a configured logger emits."""

from __future__ import annotations

import io
import json

import structlog

from podpatterns import logs


def test_enabled_follows_the_configured_level() -> None:
    """At level warning, info is not enabled (a hot path skips gathering its fields) and
    what a warning event says is written; at level info it is enabled."""
    out = io.StringIO()
    try:
        logs.configure("warning", "json", out)
        log = logs.get("test")
        assert not logs.enabled(log, "info")
        assert logs.enabled(log, "warning") and logs.enabled(log, "error")
        log.info("dropped")
        log.warning("kept", n=1)
        events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
        assert events == ["kept"], events
        logs.configure("info", "json", out)
        assert logs.enabled(logs.get("test"), "info")
        assert not logs.enabled(logs.get("test"), "debug")
    finally:
        structlog.reset_defaults()
