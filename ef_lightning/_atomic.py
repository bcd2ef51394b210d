"""Crash-safe checkpoint files, shared by the Lightning strategy and the Accelerate plugin.

:func:`atomic_save` writes a new file next to the target, makes it durable and renames it over the target, so a
process killed at any point leaves either the previous complete file or the new complete file at the path, never a
partial one. :func:`damage` says why a file that failed to load is unreadable (truncated or corrupted), for error
messages that tell a damaged file from other load errors.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import zipfile

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
