"""What the kubelet does to a Pod's volumes, reproduced for tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def configmap_write(d: Path, version: int, files: dict[str, str]) -> None:
    """Update ``d`` the way the kubelet's AtomicWriter does: a new timestamped directory,
    a ``..data_tmp`` symlink to it renamed over ``..data``, visible names linking into
    ``..data``, the old directory removed."""
    ts = d / f"..2026_11_24_{version:04d}"
    ts.mkdir()
    for name, content in files.items():
        (ts / name).write_text(content)
    os.symlink(ts.name, d / "..data_tmp")
    os.replace(d / "..data_tmp", d / "..data")
    for name in files:
        if not (d / name).is_symlink():
            os.symlink(f"..data/{name}", d / name)
    for old in d.iterdir():
        if old.name.startswith("..2026") and old.name != ts.name:
            shutil.rmtree(old)
