"""Atomic file writes (no torch): a file appears whole under its final name or not at all, with the permissions
the process's umask gives an ordinary new file (``mkstemp`` alone would leave it 0600), and the rename itself is
made durable (the folder is fsynced where the filesystem allows it).

``atomic_path`` yields a temporary path in the destination's folder for writers that open files themselves
(h5py, safetensors); on success it is fsynced and renamed over the destination, on failure removed.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


# A temp name is ".<stem>.<8 random>.tmp": cap the stem (in bytes) so a target name near NAME_MAX (255) still fits.
_TEMP_STEM = 200


def current_umask() -> int:
    """The process's umask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed over it (after fsync, with umask permissions) when the block
    exits normally, removed when it raises."""
    path = Path(path)
    stem = os.fsdecode(os.fsencode(path.name)[:_TEMP_STEM])
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a filesystem that refuses fsync on a folder (some network mounts)
    keeps the rename as durable as it can make it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")
