"""Find the slide files of a folder: every ``*.h5`` (case-insensitive suffix), sorted, optionally recursive.

Nothing in a folder stops the listing. An ``.h5`` entry that cannot be opened (a dangling symlink, a symlink
loop, a file without read permission) is listed and gets its row when it fails to read. A name that cannot be
written faithfully into predictions.csv (bytes that are not UTF-8, as names from an SMB/NFS share can hold,
or control / line-break characters) is listed with its name escaped and ``bad_name`` set: it becomes a failed
row without being read. Entries that are not slide files but look like one (a folder named ``x.h5``, an
``x.hdf5`` file, a symlink to a folder or a subfolder that cannot be listed, with ``recursive``) are passed
to ``note``, never dropped in silence.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from momkd.errors import MomkdError

SLIDE_SUFFIX = ".h5"
OTHER_HDF5_SUFFIXES = (".hdf5",)     # HDF5 files that are not read as slides (noted)
_UNSAFE_CATEGORIES = ("Cc", "Cs", "Zl", "Zp")   # control, lone surrogate (undecodable byte), line/paragraph break


class DiscoveryError(MomkdError):
    """The input folder cannot be listed (a usage error: exit code 2)."""


@dataclass(frozen=True)
class SlideFile:
    index: int          # position in discovery order (= row order of predictions.csv)
    path: Path          # absolute path
    rel: str            # path relative to the input folder, POSIX separators (the CSV's ``file`` column; escaped
                        # when ``bad_name``)
    slide_id: str       # file stem (escaped when ``bad_name``)
    duplicate_of: str | None = None   # rel of the first file with the same slide id, if this one is a duplicate
    bad_name: str | None = None       # why the name cannot be used: the file gets a failed row, unread


def escaped(name: str) -> str:
    """``name`` printable on one line: bytes that are not UTF-8 as ``\\xNN``, control and line-break characters
    as Python escapes (``\\r``, ``\\x1b``, ``\\u2028``)."""
    text = os.fsencode(name).decode("utf-8", errors="backslashreplace")
    return "".join(c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in _UNSAFE_CATEGORIES
                   else c for c in text)


def name_problem(rel: str) -> str | None:
    """Why the relative path ``rel`` cannot be a row of predictions.csv (None: it can)."""
    categories = {unicodedata.category(c) for c in rel}
    if "Cs" in categories:
        return "file name is not valid UTF-8 (shown with \\x escapes); rename the file"
    if categories & set(_UNSAFE_CATEGORIES):
        return "file name has control or line-break characters (shown escaped); rename the file"
    return None


def _is_h5(name: str) -> bool:
    return name.lower().endswith(SLIDE_SUFFIX) and len(name) > len(SLIDE_SUFFIX)


def _is_other_hdf5(name: str) -> bool:
    return name.lower().endswith(OTHER_HDF5_SUFFIXES)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()           # follows symlinks; a loop or a dangling link is no folder
    except OSError:
        return False


def discover_slides(folder: str | Path, recursive: bool = False, exclude: str | Path | None = None,
                    note: Callable[[str], None] | None = None) -> list[SlideFile]:
    """Every ``.h5`` file in ``folder`` (and its subfolders with ``recursive``), sorted by relative path.

    A broken symlink is still listed (it will be reported as unreadable, never silently dropped). ``exclude``
    is a folder (the output folder) that is never descended into. A slide id (file stem) that was already
    seen marks the later file as a duplicate. ``note(message)`` gets one line per entry that is not a slide
    file but looks like one (see the module docstring).

    Raises:
        DiscoveryError: ``folder`` itself cannot be listed.
    """
    say = note or (lambda _m: None)
    root = Path(folder).resolve()
    skip = os.path.realpath(exclude) if exclude is not None else None
    rels = _walk(root, skip, say) if recursive else _list(root, say)
    rels.sort()
    seen: dict[str, str] = {}
    out: list[SlideFile] = []
    for rel in rels:
        stem = rel.rsplit("/", 1)[-1][: -len(SLIDE_SUFFIX)]
        problem = name_problem(rel)
        if problem is not None:
            out.append(SlideFile(index=len(out), path=root / rel, rel=escaped(rel), slide_id=escaped(stem),
                                 bad_name=problem))
            continue
        first = seen.setdefault(stem, rel)
        out.append(SlideFile(index=len(out), path=root / rel, rel=rel, slide_id=stem,
                             duplicate_of=None if first == rel else first))
    return out


def _list(root: Path, say: Callable[[str], None]) -> list[str]:
    """The ``.h5`` names of ``root`` (not recursive); folders named ``*.h5`` and other HDF5 files noted."""
    rels = []
    try:
        with os.scandir(root) as it:
            for entry in it:
                if _is_h5(entry.name):
                    if _is_dir(entry):
                        say(f"note: {escaped(entry.name)} is a folder, not a slide file: skipped "
                            "(--recursive reads the .h5 files inside it)")
                    else:
                        rels.append(entry.name)
                elif _is_other_hdf5(entry.name) and not _is_dir(entry):
                    say(f"note: {escaped(entry.name)} skipped: slide files must end in .h5 (rename it to read it)")
    except OSError as e:
        raise DiscoveryError(f"{root}: cannot list the input folder ({e.strerror or e})") from None
    return rels


def _walk(root: Path, skip: str | None, say: Callable[[str], None]) -> list[str]:
    """The ``.h5`` paths below ``root`` relative to it; symlinked folders (not followed) and folders that cannot
    be listed are noted."""
    def unlistable(e: OSError) -> None:
        name = e.filename if isinstance(e.filename, str) else None
        if name is None or os.path.realpath(name) == str(root):
            raise DiscoveryError(f"{root}: cannot list the input folder ({e.strerror or e})")
        say(f"note: {escaped(os.path.relpath(name, root))}: cannot list this folder ({e.strerror or e}): "
            "its files are not read")

    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable):
        here = Path(dirpath)
        kept = []
        for d in sorted(dirnames):
            sub = here / d
            if skip is not None and os.path.realpath(sub) == skip:
                continue
            if sub.is_symlink():
                say(f"note: {escaped(sub.relative_to(root).as_posix())} is a symlink to a folder: not followed")
                continue
            kept.append(d)
        dirnames[:] = kept
        for name in filenames:
            rel = (here / name).relative_to(root).as_posix()
            if _is_h5(name):
                rels.append(rel)
            elif _is_other_hdf5(name):
                say(f"note: {escaped(rel)} skipped: slide files must end in .h5 (rename it to read it)")
    return rels


def slides_below(folder: str | Path) -> bool:
    """Whether some subfolder of ``folder`` holds a ``.h5`` file (stops at the first one; unlistable folders and
    symlinked folders are not searched)."""
    root = Path(folder)
    for dirpath, _dirnames, filenames in os.walk(root):
        if Path(dirpath) != root and any(_is_h5(name) for name in filenames):
            return True
    return False
