"""Find the slide files of a folder: every ``*.h5`` (case-insensitive suffix), sorted, optionally recursive."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SlideFile:
    index: int          # position in discovery order (= row order of predictions.csv)
    path: Path          # absolute path
    rel: str            # path relative to the input folder, POSIX separators (the CSV's ``file`` column)
    slide_id: str       # file stem
    duplicate_of: str | None = None   # rel of the first file with the same slide id, if this one is a duplicate


def _is_h5(name: str) -> bool:
    return name.lower().endswith(".h5") and len(name) > 3


def discover_slides(folder: str | Path, recursive: bool = False, exclude: str | Path | None = None) -> list[SlideFile]:
    """Every ``.h5`` file in ``folder`` (and its subfolders with ``recursive``), sorted by relative path.

    A broken symlink is still listed (it will be reported as unreadable, never silently dropped). ``exclude``
    is a folder (the output folder) that is never descended into. A slide id (file stem) that was already
    seen marks the later file as a duplicate.
    """
    root = Path(folder).resolve()
    skip = Path(exclude).resolve() if exclude is not None else None
    rels: list[str] = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if skip is None or (here / d).resolve() != skip)
            for name in filenames:
                if _is_h5(name):
                    rels.append((here / name).relative_to(root).as_posix())
    else:
        with os.scandir(root) as it:
            for entry in it:
                if _is_h5(entry.name) and (entry.is_file() or entry.is_symlink()):
                    rels.append(entry.name)
    rels.sort()
    seen: dict[str, str] = {}
    out: list[SlideFile] = []
    for rel in rels:
        path = root / rel
        if path.is_dir():
            continue
        stem = Path(rel).name[:-3]
        first = seen.setdefault(stem, rel)
        out.append(SlideFile(index=len(out), path=path, rel=rel, slide_id=stem,
                             duplicate_of=None if first == rel else first))
    return out
