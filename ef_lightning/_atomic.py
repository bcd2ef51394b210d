"""Crash-safe checkpoint files, shared by the Lightning strategy and the Accelerate plugin.

:func:`atomic_save` writes a new file next to the target, makes it durable and renames it over the target, so a
process killed at any point leaves either the previous complete file or the new complete file at the path, never a
partial one. :func:`damage` says why a file that failed to load is unreadable (truncated or corrupted), for error
messages that tell a damaged file from other load errors.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import zipfile
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["atomic_save", "damage"]

#: suffix of the temporary files :func:`atomic_save` writes (``.<name>.<random>.tmp``, hidden from ``*.ckpt`` globs)
TMP_SUFFIX = ".tmp"


def atomic_save(obj: object, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)``, atomically: the bytes go to a temporary file in the same directory (created with
    the permissions ``open`` would give), which is flushed and fsynced, then ``os.replace``-d over ``path``; the
    directory is fsynced last so the rename survives a power loss.

    A crash before the rename leaves ``path`` as it was (a partial ``.<name>.<random>.tmp`` may remain beside it);
    an error removes the temporary file and propagates.

    Args:
        obj: anything ``torch.save`` accepts.
        path: the local file to write (its directory is created if missing).
    """
    target = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(target)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (POSIX; a file system that cannot fsync a directory is skipped)."""
    if os.name == "nt":
        return
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def damage(path: str | os.PathLike[str]) -> str | None:
    """Why the ``torch.save`` file at ``path`` is unreadable, or None when it is a complete archive (or not a local
    file): call it after a load failed, to tell a truncated or corrupted file from other errors (it reads the whole
    file and checks every member's CRC).

    Args:
        path: the file that failed to load.

    Returns:
        a short reason ("empty file", "truncated or not a torch.save archive", "corrupted member 'archive/data/3'"),
        or None.
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        return None
    if os.path.getsize(p) == 0:
        return "empty file"
    if not zipfile.is_zipfile(p):
        return "truncated or not a torch.save archive (no zip central directory)"
    try:
        with zipfile.ZipFile(p) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"corrupted archive ({e})"
    return None if bad is None else f"corrupted member {bad!r} (CRC mismatch)"


def rank_state_path(directory: str | os.PathLike[str], rank: int) -> str:
    """Where rank ``rank``'s EF21 state lives in a checkpoint directory: ``directory/ef21_rank{rank}.pt``."""
    return os.path.join(os.fspath(directory), f"ef21_rank{rank}.pt")


def read_rank_state(directory: str | os.PathLike[str], rank: int, map_location: Any, what: str) -> dict[str, Any]:
    """Rank ``rank``'s EF21 engine state from ``directory`` (a file written as ``{"config": ..., "engine": ...}``).

    Args:
        directory: the checkpoint directory.
        rank: this process's rank.
        map_location: device for the loaded tensors.
        what: the save step that writes these files, for the messages (e.g. ``"save_state"``).

    Raises:
        ValueError: naming the rank and the file, when the file is missing, truncated, corrupted or holds no state.
    """
    path = rank_state_path(directory, rank)
    if not os.path.isfile(path):
        found = sorted(os.path.basename(f) for f in glob.glob(os.path.join(os.fspath(directory), "ef21_rank*.pt")))
        raise ValueError(
            f"rank {rank}: {path} does not exist (EF21 files in {os.fspath(directory)!r}: {found or 'none'}); "
            "every rank needs its own file: resume an EF21 run from a checkpoint it saved, with the same number "
            "of processes"
        )
    try:
        saved = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        why = damage(path) or f"{type(e).__name__}: {e}"
        raise ValueError(
            f"rank {rank}: {path} cannot be read: {why}. It was not written completely (a crash or a full disk "
            f"during {what}, a partial copy) or was damaged since; this rank's error-feedback state exists only in "
            "this file: resume from another checkpoint"
        ) from e
    if not isinstance(saved, Mapping) or not isinstance(saved.get("engine"), Mapping):
        raise ValueError(
            f"rank {rank}: {path} holds no EF21 state (expected a dict with key 'engine', as {what} writes); "
            "resume from a checkpoint an EF21 run saved"
        )
    return dict(saved["engine"])
