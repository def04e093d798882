"""``--save-attention``: ``OUT_DIR/attention/{slide_id}.h5`` with ``coords`` (N, 2) int64, ``attention`` (N,)
float32 and ``patch_score`` (N,) float32 (rows in the slide file's order), written atomically."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from momkd.atomic import atomic_path

ATTENTION_DIR = "attention"


def attention_path(out_dir: Path, slide_id: str) -> Path:
    return Path(out_dir) / ATTENTION_DIR / f"{slide_id}.h5"


def write_attention(out_dir: Path, slide_id: str, coords: np.ndarray, attention: np.ndarray,
                    patch_score: np.ndarray, *, source: str = "", probability: float | None = None,
                    model_sha256: str = "") -> Path:
    path = attention_path(out_dir, slide_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        f.create_dataset("attention", data=np.asarray(attention, dtype=np.float32))
        f.create_dataset("patch_score", data=np.asarray(patch_score, dtype=np.float32))
        f.attrs["slide_id"] = slide_id
        f.attrs["source_file"] = source
        f.attrs["model_manifest_sha256"] = model_sha256
        if probability is not None:
            f.attrs["probability"] = float(probability)
    return path


def read_attention(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("coords", "attention", "patch_score")}
