"""podpatterns: ambassador, adapter and sidecar coordination for Kubernetes Pods."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
