"""Writing files so that a crash (or kill -9) never leaves a half-written one, and never touches
files that are not ours.

Every writer stages under a hidden name next to its target, ``.NAME.tmp-PID``, then renames into
place. A staging copy left by a process that died is removed by the next write to the same
target; one of a process still running is left alone.

- :func:`write_file`: one file.
- :func:`save_files`: a model's files into a folder that may hold other things (a user's notes,
  runs): each file replaced on its own, everything else left as it was, as Hugging Face's
  ``save_pretrained`` does.
- :func:`replace_dir`: a folder we own wholly (a checkpoint's ``last/``), swapped in one step.
"""
from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Iterable, List, Union

PathLike = Union[str, os.PathLike]


def staging_path(target: Path) -> Path:
    """The hidden sibling this process stages ``target`` under."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}{''.join(target.suffixes[-1:])}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover from an earlier, failed write
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def clean_stale_staging(target: Path) -> List[Path]:
    """Removes staging copies of ``target`` left by processes that are gone; returns them."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)")
    removed = []
    for path in target.parent.glob(f".{glob_escape(target.name)}.*-*"):
        match = pattern.match(path.name)
        if match and not _pid_alive(int(match.group(1))):
            _remove(path)
            removed.append(path)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_file(path: PathLike, write: Callable[[Path], None]) -> None:
    """Calls ``write(tmp)`` on a hidden sibling of ``path`` (same suffix, so pandas still sees
    ``.gz``), then renames it to ``path``: readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(path)
    tmp = staging_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def save_files(folder: PathLike, write: Callable[[Path], None], *, last: Iterable[str] = (),
               stale: Callable[[str], bool] = lambda name: False) -> List[str]:
    """Writes files into ``folder`` one by one, each atomically, leaving other files alone.

    ``write(stage)`` fills an empty staging folder next to ``folder``; each file it wrote is then
    renamed into ``folder`` (those named in ``last`` at the end: e.g. ``config.json``, which
    loaders read first). Files of ``folder`` that ``stale(name)`` marks as an earlier version of
    ours (weight shards of a previous save) and that this write did not produce are removed.

    Returns the names written. A file at ``folder`` is refused, never moved.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file, not a folder: pass a folder path to save into.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(folder)
    stage = staging_path(folder)
    stage.mkdir()
    try:
        write(stage)
        names = sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file())
        last = [n for n in last if n in names]
        folder.mkdir(exist_ok=True)
        for name in [n for n in names if n not in last] + last:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / name, folder / name)
        for old in folder.iterdir():
            if old.is_file() and old.name not in names and stale(old.name):
                old.unlink()
        return names
    finally:
        shutil.rmtree(stage, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the system
    or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if done == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_dir(tmp: Path, path: Path) -> None:
    """Moves the finished folder ``tmp`` to ``path``, replacing a folder already there.

    Where the system can (Linux), the two folders are swapped in one step, so ``path`` always
    names a complete folder. Elsewhere it takes two renames; a crash between them leaves the old
    folder under ``.NAME.old-PID``, which :func:`recover_dir` puts back.
    """
    if not path.exists():
        os.replace(tmp, path)
        return
    if _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: Path) -> bool:
    """Puts back the previous folder when a crash came between :func:`replace_dir`'s two renames.

    Then ``path`` is missing and the old folder waits under ``.NAME.old-PID``; it is complete, so
    it is renamed back. Returns whether a folder was put back.
    """
    if path.exists():
        return False
    old = sorted(path.parent.glob(f".{glob_escape(path.name)}.old-*"), key=lambda p: p.stat().st_mtime)
    if not old:
        return False
    os.replace(old[-1], path)
    return True
