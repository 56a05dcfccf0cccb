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
