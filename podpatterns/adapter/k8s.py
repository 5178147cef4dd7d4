"""Kubernetes metadata for every record, from the Downward API.

Two sources, both set up in the Pod spec (docs/adapter.md has the manifest):

- **environment variables** (``env[].valueFrom.fieldRef``): ``--k8s-env-metadata
  FIELD=VAR`` sets FIELD from VAR; ``default`` stands for ``k8s_pod=POD_NAME``,
  ``k8s_namespace=POD_NAMESPACE``, ``k8s_node=NODE_NAME`` and
  ``k8s_container=CONTAINER_NAME``. A variable that is not set adds nothing (logged once).
- **a downwardAPI volume** (``--k8s-metadata-dir``): its ``labels`` and ``annotations``
  files, in the kubelet's ``key="value"`` lines, become the ``k8s_labels`` and
  ``k8s_annotations`` mappings. Labels and annotations change while the Pod runs; the
  kubelet then swaps the volume's ``..data`` symlink, and :meth:`K8sMetadata.watch`
  re-reads both files (level-triggered: on every wake-up, the state on disk decides).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from podpatterns import logs
from podpatterns.dirwatch import DirWatcher

DEFAULT_ENV: tuple[tuple[str, str], ...] = (
    ("k8s_pod", "POD_NAME"),
    ("k8s_namespace", "POD_NAMESPACE"),
    ("k8s_node", "NODE_NAME"),
    ("k8s_container", "CONTAINER_NAME"),
)
"""What ``--k8s-env-metadata default`` stands for: the usual Downward API variable names."""

FILES = (("labels", "k8s_labels"), ("annotations", "k8s_annotations"))
"""The downwardAPI volume's files and the record fields they become."""


def env_fields(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """``--k8s-env-metadata`` pairs with ``default`` expanded (a later pair wins)."""
    out: dict[str, str] = {}
    for field, var in pairs:
        if (field, var) == ("default", "*"):
            out.update(DEFAULT_ENV)
        else:
            out[field] = var
    return tuple(out.items())


def parse_downward_file(text: str) -> dict[str, str]:
    """The ``key="value"`` lines the kubelet writes for ``metadata.labels`` and
    ``metadata.annotations`` (values quoted as Go's ``%q`` does); bad lines are skipped."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, quoted = line.partition("=")
        if not sep or not key or not (len(quoted) >= 2 and quoted[0] == quoted[-1] == '"'):
            continue
        try:
            value = json.loads(quoted)
        except ValueError:  # a Go escape JSON lacks (\x.., \a, \v, \U...): keep it raw
            value = quoted[1:-1]
        out[key] = str(value)
    return out


class K8sMetadata:
    """The fields added to every record: from the environment, and from the volume.

    Args:
        env_pairs: ``--k8s-env-metadata``: ``(field, variable)`` pairs, or ``default``.
        environ: the process environment (the wiring passes ``os.environ``).
        directory: the downwardAPI volume, or ``None``.
    """

    def __init__(
        self,
        env_pairs: tuple[tuple[str, str], ...],
        environ: Mapping[str, str],
        directory: Path | None,
    ) -> None:
        self.directory = directory
        self.reads = 0
        self._log = logs.get("adapter")
        self._env: dict[str, Any] = {}
        missing = []
        for field, var in env_fields(env_pairs):
            if var in environ:
                self._env[field] = environ[var]
            else:
                missing.append(var)
        if missing:
            self._log.warning("k8s_env_missing", variables=missing)
        self._files: dict[str, dict[str, str]] = {}
        self.fields: dict[str, Any] = dict(self._env)
        """What is added to every record now (replaced as a whole on a change)."""

    def _read(self) -> dict[str, dict[str, str]]:
        """Read the volume's files (blocking: call it in a thread)."""
        assert self.directory is not None
        out: dict[str, dict[str, str]] = {}
        for name, field in FILES:
            try:
                text = (self.directory / name).read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            out[field] = parse_downward_file(text)
        return out

    async def refresh(self) -> bool:
        """Re-read the volume; True when what records get changed."""
        if self.directory is None:
            return False
        files = await asyncio.to_thread(self._read)
        self.reads += 1
        if files == self._files:
            return False
        first = not self._files and self.reads == 1
        self._files = files
        self.fields = {**self._env, **files}
        if not first:
            self._log.info(
                "k8s_metadata_changed",
                labels=len(files.get("k8s_labels", {})),
                annotations=len(files.get("k8s_annotations", {})),
            )
        return True

    async def watch(self, resync: float = 5.0) -> None:
        """Re-read the volume on every change (and every ``resync`` seconds), forever."""
        assert self.directory is not None
        watcher = DirWatcher(self.directory, resync=resync, component="adapter")
        async for _ in watcher.wakeups():
            await self.refresh()

    def apply(self, records: list[dict[str, Any]]) -> None:
        """Add the fields to every record (mappings copied: a transform may change them)."""
        fields = self.fields
        if not fields:
            return
        nested = [k for k, v in fields.items() if isinstance(v, dict)]
        for rec in records:
            rec.update(fields)
            for k in nested:
                rec[k] = dict(fields[k])
