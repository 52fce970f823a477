"""Crash-safe file writes and the one rule for local paths.

An atomic write goes to a temporary file in the target's directory, which is then renamed over the
target with ``os.replace`` (atomic on POSIX): readers see either the old or the new complete file, and
a crash (OOM kill, preemption, full disk) never leaves a truncated one. With ``durable`` (the default)
the file and its directory are also fsynced, so the new file survives a power loss.
"""
import os
import tempfile
from typing import Any, BinaryIO, Callable

import torch

__all__ = ["is_local", "fsync_dir", "atomic_write", "atomic_write_bytes", "atomic_torch_save"]


def is_local(path) -> bool:
    """Whether ``path`` (str or PathLike) is a plain file-system path.

    Anything with a ``scheme://`` prefix is not, ``file://`` included: Detectron2's PathManager and
    fvcore handle such paths through their handlers, so this package leaves them to those too.
    """
    return isinstance(path, (str, os.PathLike)) and "://" not in os.fspath(path)


def fsync_dir(directory: str) -> None:
    """fsync a directory (makes a rename in it durable); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask (read without changing it where Linux shows it, else set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str, write_fn: Callable[[BinaryIO], Any], *, durable: bool = True) -> None:
    """Call ``write_fn(file)`` on a temporary file next to ``path``, then atomically rename it to ``path``.

    The temporary file is named ``.<basename>.<random>.tmp`` (never mistaken for a checkpoint or an image
    by its extension, unique per writer) and removed if ``write_fn`` raises. The directory is created if
    needed. ``durable``: fsync the file before the rename and the directory after it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would survive the rename: the mode of open()
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(directory)


def atomic_write_bytes(path: str, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(data), durable=durable)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path`` (durable)."""
    atomic_write(path, lambda f: torch.save(obj, f))
