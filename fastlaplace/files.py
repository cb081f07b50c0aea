"""Files written whole or not at all: checkpoints, run files, data caches."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, write, keep_previous: Path | None = None) -> None:
    """``write(file)`` to a new temporary file beside ``path``, then rename it over ``path``
    (after moving the current ``path`` to ``keep_previous``, if given). The temporary file
    gets a fresh name created exclusively, so a file or symlink planted at a predictable
    name is never written through; it is removed on any failure (a full disk, an interrupt),
    so nothing half-written remains. An OSError names the file."""
    path = Path(path)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        tmp = Path(name)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; a written file gets the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(f"could not write {path}: {exc.strerror or exc}") from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
