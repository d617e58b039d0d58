"""Checkpoints: written atomically (temp file, fsync, rename), read with ``weights_only=True``.

The checkpoint being replaced is kept as ``<name>.prev``, so a checkpoint damaged later (a bad
disk, a partial copy) still leaves the one before it.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from mlo.errors import UserError


def previous_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".prev")


def atomic_write(path: str | Path, write, keep_previous: bool = False) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync it, rename it over ``path``
    (first moving an existing ``path`` to ``<path>.prev`` if ``keep_previous``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f), keep_previous=True)


def remove_partial_writes(path: str | Path) -> None:
    """Temp files of writes that a killed process never finished."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        tmp.unlink()


def existing_checkpoint(path: str | Path) -> Path | None:
    """``path``, or its ``.prev`` if a kill fell between the two renames of a save; None if neither."""
    path = Path(path)
    for candidate in (path, previous_path(path)):
        if candidate.is_file():
            return candidate
    return None


class UnreadableFile(Exception):
    """A torch file that ``read_torch_file`` could not load; the message is a one-line reason."""


def read_torch_file(path: str | Path, map_location="cpu") -> Any:
    """``torch.load(weights_only=True)``, with every way a damaged or foreign file fails turned into
    ``UnreadableFile``, so each caller can say in its own words which file and what to do."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise UnreadableFile((str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]) from None


def _unreadable(path: Path) -> bool:
    try:
        read_torch_file(path)
    except UnreadableFile:
        return True
    return False


def load_checkpoint(path: str | Path, map_location="cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        return read_torch_file(path, map_location)
    except UnreadableFile:
        previous = previous_path(path)
        if previous.is_file() and not _unreadable(previous):
            advice = f"the previous one, '{previous.name}', is readable: move it over '{path.name}' to resume from it"
        elif previous.is_file():
            advice = f"'{previous.name}' is damaged too: delete the run directory to start over"
        else:
            advice = "delete the run directory to start over"
        raise UserError(f"checkpoint '{path}' is truncated or corrupted; {advice}") from None
