"""Output folders written atomically: a hidden temp folder beside the output, renamed into place.

The temp folder of output ``DIR/name`` is ``DIR/.name.rkv-tmp-<pid>-<random>``. A run killed
before the rename (``kill -9``, power loss) leaves it behind; the next run for the same output
removes every such folder whose process is gone, and the legacy ``.name.<8 random>`` folders of
earlier releases. Folders of a live process (a concurrent run) are kept.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["TEMP_MARK", "atomic_dir", "atomic_write_text", "check_output_dir", "remove_stale_temp_dirs", "stale_temp_dirs"]

TEMP_MARK = ".rkv-tmp-"
_LEGACY_RANDOM = r"[a-z0-9_]{8}"  # tempfile.mkdtemp's name characters, used before TEMP_MARK existed


def check_output_dir(out: str | Path, overwrite: bool) -> None:
    """Refuse an output that cannot become a folder, or that exists without ``overwrite``; writes nothing."""
    out = Path(out)
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(f"{parent} is a file, so {out} cannot be created; choose another --out")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a folder; remove it or choose another --out")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite or choose another --out")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _is_stale(folder: Path, name: str) -> bool:
    ours = re.fullmatch(re.escape(f".{name}{TEMP_MARK}") + r"(\d+)-.+", folder.name)
    if ours:
        return not _process_alive(int(ours.group(1)))
    return re.fullmatch(re.escape(f".{name}.") + _LEGACY_RANDOM, folder.name) is not None


def stale_temp_dirs(out: str | Path) -> list[Path]:
    """Temp folders beside ``out`` left by earlier runs for the same output whose process is gone."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.glob(f".{glob.escape(out.name)}.*") if p.is_dir() and _is_stale(p, out.name))


def remove_stale_temp_dirs(out: str | Path) -> list[Path]:
    """Delete :func:`stale_temp_dirs` of ``out``; returns what was removed."""
    removed = stale_temp_dirs(out)
    for folder in removed:
        shutil.rmtree(folder)
    return removed


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temp folder beside ``out``; on success it replaces ``out``, on any failure it is deleted."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TEMP_MARK}{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace the file ``path`` with ``text`` in one rename (a reader sees the old or the new file, never half)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
