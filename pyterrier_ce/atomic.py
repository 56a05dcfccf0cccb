"""Writing a folder atomically: build it under a temporary name, then rename it into place."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(tmp: Path, path: Path) -> None:
    """Moves the finished folder ``tmp`` to ``path``, replacing a folder already there.

    A crash leaves either the old folder or the new one under ``path``, never a half-written one.
    """
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def recover_dir(path: Path) -> bool:
    """Puts back the previous folder when a crash came between :func:`replace_dir`'s two renames.

    Then ``path`` is missing and the old folder waits under ``.NAME.old-PID``; it is complete, so
    it is renamed back. Returns whether a folder was put back.
    """
    if path.exists():
        return False
    old = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not old:
        return False
    os.replace(old[-1], path)
    return True
