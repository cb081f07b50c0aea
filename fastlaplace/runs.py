"""Checkpoint files: written atomically with a checksum, the previous one kept, and read
back without running code.

A checkpoint is ``torch.save`` of ``{"format": 1, "sha256": hex, "payload": uint8 tensor}``,
the payload being ``torch.save`` of the run's state (tensors and plain values only). Both
layers are loaded with ``weights_only=True``, so a file holding anything else (for instance
a pickled object whose ``__reduce__`` would run code) is refused before anything of it runs;
the digest catches a flipped byte or a truncated file. Writing a new checkpoint first moves
the current one to ``*.prev.pt``, so a crash at any point leaves at least one good file.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path

import torch

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupted, truncated, refused or of another run."""


def previous(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept."""
    return path.with_name(path.stem + ".prev" + path.suffix)


def atomic_write(path: Path, write, keep_previous: Path | None = None) -> None:
    """``write(file)`` to a temporary file, then rename it over ``path`` (after moving the
    current ``path`` to ``keep_previous``, if given). The temporary file is removed on any
    failure (a full disk, an interrupt), so nothing half-written remains; an OSError names
    the file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(f"could not write {path}: {exc.strerror or exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` (tensors and plain values) to ``path``, keeping the previous file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    wrapper = {"format": FORMAT, "sha256": hashlib.sha256(data).hexdigest(),
               "payload": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
    atomic_write(Path(path), lambda f: torch.save(wrapper, f), keep_previous=previous(Path(path)))


def _load_plain(source, what: str) -> object:
    if not zipfile.is_zipfile(source):  # every file torch.save writes is a zip archive
        raise CheckpointError(f"{what} is corrupted or not a checkpoint (not a torch.save archive)")
    if hasattr(source, "seek"):
        source.seek(0)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{what} holds objects other than tensors and plain values; it is refused because "
                              "loading them could run code (checkpoints of fastlaplace.train never do)") from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{what} is corrupted or not a checkpoint ({reason})") from exc


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The state saved in ``path``, after verifying its checksum; :class:`CheckpointError`
    (naming the previous checkpoint when there is one) if it cannot be trusted to be intact."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        wrapper = _load_plain(path, str(path))
        if isinstance(wrapper, dict) and "format" in wrapper:
            if wrapper.get("format") != FORMAT or not isinstance(wrapper.get("payload"), torch.Tensor) \
                    or wrapper["payload"].dtype != torch.uint8 or not isinstance(wrapper.get("sha256"), str):
                raise CheckpointError(f"{path} is not a fastlaplace checkpoint of format {FORMAT}")
            data = wrapper["payload"].numpy().tobytes()
            if hashlib.sha256(data).hexdigest() != wrapper["sha256"]:
                raise CheckpointError(f"{path} is corrupted (checksum mismatch)")
            state = _load_plain(io.BytesIO(data), str(path))
        else:  # written before checkpoints carried a checksum: still loaded without running code
            state = wrapper
        if not isinstance(state, dict) or not isinstance(state.get("config"), dict) \
                or not isinstance(state.get("learner"), dict) or not isinstance(state.get("iteration"), int):
            raise CheckpointError(f"{path} is not a checkpoint written by fastlaplace.train")
    except CheckpointError as exc:
        prev = previous(path)
        if prev.is_file():
            raise CheckpointError(f"{exc}; the previous checkpoint is {prev}") from exc
        raise
    return state


def read_latest(path: Path, log=None) -> tuple[dict, Path] | None:
    """The newest intact checkpoint of a run: ``path``, or its previous one when ``path`` is
    damaged or missing (said through ``log``); ``None`` when the run has none."""
    prev = previous(path)
    if not path.exists() and not prev.exists():
        return None
    try:
        return read_checkpoint(path), path
    except (CheckpointError, FileNotFoundError) as exc:
        if not prev.is_file():
            raise
        state = read_checkpoint(prev)
        if log is not None:
            log(f"warning: {str(exc).split('; the previous')[0]}; continuing from {prev} "
                f"(iteration {state['iteration']})")
        return state, prev
