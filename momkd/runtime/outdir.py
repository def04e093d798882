"""The output folder of ``momkd infer`` as a resource: one run at a time (``OutputLock``), and what a failing write
to it means for the user (``output_errors``, ``ensure_free_space``), so that a full, read-only or busy ``OUT``
ends the run with one line naming ``OUT`` and the rows written so far stay valid for ``--resume``.

The lock is ``OUT/.momkd-infer.lock`` held with ``fcntl.flock`` (non-blocking) for the whole run; it holds the
owner's pid and start time for the message a second run prints. The kernel drops a flock when its process dies,
so a lock file left by a killed run never blocks the next one. The file is removed while still locked, and a
run that locks a file checks that it is still the one at that path (retrying otherwise), so two runs can never
hold locks on two different files of the same name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from momkd.errors import MomkdError

LOCK_FILE = ".momkd-infer.lock"
FREE_SPACE_MARGIN = 1 << 20      # bytes kept free beyond a file's estimated size (HDF5 metadata, the folder)
_FULL = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS,)
_DENIED = (errno.EACCES, errno.EPERM)


class OutputFolderError(MomkdError):
    """The output folder cannot be written (full, read-only, no permission) or another run uses it: exit 2."""


def no_space(out_dir: Path) -> OutputFolderError:
    return OutputFolderError(f"no space left on {out_dir}; free space and rerun with --resume")


def output_error(out_dir: Path, e: OSError) -> OutputFolderError | None:
    """The one-line error for ``e``, an OSError while writing into ``out_dir``; None when ``e`` is not about
    writing there (another errno, or a file outside ``out_dir``)."""
    name = e.filename if isinstance(e.filename, str) else None
    inside = name is None or _is_within(Path(name), out_dir)
    if e.errno in _FULL and inside:
        return no_space(out_dir)
    if e.errno in _READ_ONLY and inside:
        return OutputFolderError(f"{out_dir}: read-only file system; choose another --out")
    if e.errno in _DENIED and name is not None and inside:
        return OutputFolderError(f"{out_dir}: permission denied writing into it; fix its permissions or choose "
                                 "another --out")
    return None


@contextlib.contextmanager
def output_errors(out_dir: Path) -> Iterator[None]:
    """Turn an OSError that says ``out_dir`` cannot be written into an ``OutputFolderError`` (one line)."""
    try:
        yield
    except OSError as e:
        error = output_error(out_dir, e)
        if error is None:
            raise
        raise error from None


def ensure_free_space(out_dir: Path, folder: Path, size: int) -> None:
    """Raise the no-space error when ``folder`` (inside ``out_dir``) has less than ``size`` bytes plus a margin
    free: a file is never started on a disk that cannot hold it (``shutil.disk_usage``; quotas are not seen)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return      # a filesystem that cannot say: the write itself reports a full disk
    if free < size + FREE_SPACE_MARGIN:
        raise no_space(out_dir)


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


class OutputLock:
    """Exclusive use of an output folder by one run (see the module docstring). ``acquire`` raises
    ``OutputFolderError`` when another live run holds it; ``release`` removes the lock file."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self._fd: int | None = None
        self.supported = True      # False: no flock here (some network mounts, not POSIX); not locked

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:         # not a POSIX system: the run goes on unlocked
            self.supported = False
            return
        with output_errors(self.out_dir):
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise OutputFolderError(f"{self.out_dir} is in use by another momkd infer ({holder}); wait for "
                                            "it to finish or choose another --out") from None
                except OSError as e:
                    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                        os.close(fd)
                        raise
                    self.supported = False      # no locking here: the run goes on unlocked
                if self.supported and not _same_file(fd, self.path):
                    os.close(fd)                # the holder removed it as we locked it: lock the new one
                    continue
                break
            self._fd = fd
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n".encode())
            except BaseException:
                self.release()
                raise

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)            # while still locked: see the module docstring
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = os.pread(fd, 200, 0).decode("utf-8").strip()
        if text:
            return text
    return "pid unknown"


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)
