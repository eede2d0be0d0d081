"""Writing user-facing files atomically: a temporary file beside the target, then a rename, so
a failure never leaves a half-written output."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["write_atomic"]


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new file beside ``path``, created with mode 0666 so the kernel applies the process umask
    (as for any file a user's command writes) without this process ever changing the umask,
    which is shared by every thread."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


def write_atomic(path: Path, write) -> None:
    """``write(handle)`` into a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
