"""``--save-attention``: ``OUT_DIR/attention/{slide_id}.h5`` with ``coords`` (N, 2) int64, ``attention`` (N,)
float32 and ``patch_score`` (N,) float32 (rows in the slide file's order), written atomically.

The HDF5 file is built in memory and written with one plain write, after checking that the disk has room for
it: HDF5 never writes to a full disk (where it can leave the library in a state that crashes the process), and a
full or read-only output folder is an ``OSError`` that ``outdir.output_errors`` turns into one line. A slide id
whose attention file name the filesystem refuses (too long once the temporary suffix is added) is that slide's
``AttentionNameError``, not the run's.
"""

from __future__ import annotations

import contextlib
import errno
import io
from pathlib import Path

import h5py
import numpy as np

from momkd.atomic import atomic_path
from momkd.errors import SlideError

from .outdir import ensure_free_space

ATTENTION_DIR = "attention"


class AttentionNameError(SlideError):
    """The slide's attention file cannot have its name on this filesystem (too long)."""

    code = "name_too_long"


def attention_path(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / ATTENTION_DIR / f"{slide_id}.h5"


def attention_bytes(coords: np.ndarray, attention: np.ndarray, patch_score: np.ndarray, slide_id: str,
                    source: str = "", probability: float | None = None, model_sha256: str = "") -> bytes:
    """The attention file of one slide as bytes: ``coords`` (N, 2) int64, ``attention`` (N,) and ``patch_score``
    (N,) float32, and the slide's attributes."""
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        f.create_dataset("attention", data=np.asarray(attention, dtype=np.float32))
        f.create_dataset("patch_score", data=np.asarray(patch_score, dtype=np.float32))
        f.attrs["slide_id"] = slide_id
        f.attrs["source_file"] = source
        f.attrs["model_manifest_sha256"] = model_sha256
        if probability is not None:
            f.attrs["probability"] = float(probability)
    return buf.getvalue()


def write_attention(out_dir: Path, slide_id: str, coords: np.ndarray, attention: np.ndarray,
                    patch_score: np.ndarray, *, source: str = "", probability: float | None = None,
                    model_sha256: str = "") -> Path:
    """Write ``OUT_DIR/attention/{slide_id}.h5`` atomically (see the module docstring for the shapes).

    Raises:
        AttentionNameError: the file name is too long for the filesystem (that slide's problem).
        OutputFolderError: the disk has no room for the file. Other OSErrors (read-only, permissions) pass
            through for ``outdir.output_errors``.
    """
    path = attention_path(out_dir, slide_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = attention_bytes(coords, attention, patch_score, slide_id, source, probability, model_sha256)
    ensure_free_space(Path(out_dir), path.parent, len(data))
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
        raise AttentionNameError(path, "the attention file's name is too long for the output folder's filesystem; "
                                 "rename the slide file") from None
    return path


def discard_attention(out_dir: Path, slide_id: str) -> None:
    """Remove a slide's attention file of an earlier run, if any (a name too long to exist is not there)."""
    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
        try:
            attention_path(out_dir, slide_id).unlink()
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:
                raise


def read_attention(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("coords", "attention", "patch_score")}
