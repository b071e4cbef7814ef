"""Atomic file writes, the one way resvae writes a file others may read while it runs, and the
error a full disk turns into."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import ConfigError, DiskFullError

# sysexits.h's EX_IOERR: the exit status of a command stopped by a full disk (2 is bad input,
# 3 a run stopped by non-finite losses)
EXIT_DISK_FULL = 74


def _free(path: Path) -> str:
    with contextlib.suppress(OSError):
        return f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there now"
    return "free space unknown"


@contextlib.contextmanager
def disk_full_is_named(path: Path, kept: str) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT inside the block into a DiskFullError naming `path` and saying what
    survived (`kept`); other errors pass through unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(e.errno, f"{path}: the disk is full ({e.strerror}; {_free(path)}) "
                            f"while writing it; {kept}") from e


def check_output(path: str | os.PathLike, flag: str = "-o", *, folder: bool = False) -> Path:
    """Refuse, before any work, an output path that cannot be written: a folder where a file is
    to go (or a file where a folder is), a path under a file, or one whose nearest existing
    folder is not writable (a read-only file system, no permission)."""
    path = Path(path)
    if path.is_dir() and not folder:
        raise ConfigError(f"{flag} {path}: a folder; give the path of a file to write")
    # the nearest folder that exists: a folder output itself, else the one it is written into
    nearest = next(p for p in ((path, *path.parents) if folder else path.parents) if p.exists())
    if not nearest.is_dir():
        raise ConfigError(f"{flag} {path}: {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: cannot write in {nearest} (a read-only file system, "
                          "or no permission)")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temp path in `path`'s directory, then os.replace it onto `path`.

    Readers see the old file or the new one, never half of one; if `write` raises, the temp
    file is removed and `path` is untouched. A full disk is a DiskFullError naming `path`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    kept = "the previous version of it is intact" if path.exists() else "nothing was written"
    with disk_full_is_named(path, kept):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
