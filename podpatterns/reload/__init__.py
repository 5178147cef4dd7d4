"""``podpatterns reload``: watch mounted configuration, notify the app on real changes."""

from __future__ import annotations

from podpatterns.reload.reloader import RELOAD_OPTIONS, ReloadConfig, Reloader

__all__ = ["RELOAD_OPTIONS", "ReloadConfig", "Reloader"]
