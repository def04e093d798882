"""Shared fixtures: a synthetic cohort (session) and the catalogue of bad slide files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from momkd.synth import SyntheticCohort, make_synthetic_cohort, write_slide_h5

# Without an NVIDIA driver the Triton kernels (tests/test_kernels_*.py) run in Triton's interpreter. Triton reads
# TRITON_INTERPRET when it is first imported, and some test modules import it indirectly (torch_geometric) while
# being collected, so it is set here, before any of them.
if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

BAD_SLIDE_FEATURE_DIM = 16
BAD_SLIDE_KINDS = (
    "unreadable", "unreadable/truncated", "unreadable/not_hdf5", "missing_dataset", "missing_dataset/coords",
    "bad_shape", "bad_shape/coords", "row_mismatch", "non_finite", "empty", "feature_dim",
)


@pytest.fixture(scope="session")
def synth_cohort(tmp_path_factory: pytest.TempPathFactory) -> SyntheticCohort:
    """The default synthetic cohort (60 cases, D = 64, 200 genes, seed 0), written once per session."""
    return make_synthetic_cohort(tmp_path_factory.mktemp("synth_cohort"))


def plant_bad_slide_files(folder: Path, feature_dim: int = BAD_SLIDE_FEATURE_DIM) -> dict[str, Path]:
    """Write one file per bad-slide kind (``BAD_SLIDE_KINDS``) into ``folder``; returns key -> path.

    The key is the ``SlideError.code`` the file must raise; a code's further variants are keyed
    ``"code/variant"`` (the code is ``key.split("/")[0]``). Every file is named ``bad_*.h5`` and, where it
    has features, uses ``feature_dim`` (except the ``feature_dim`` file, which has ``feature_dim + 1``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n = 5
    features = rng.standard_normal((n, feature_dim)).astype(np.float32)
    coords = np.arange(2 * n, dtype=np.int64).reshape(n, 2) * 256
    out: dict[str, Path] = {}

    def raw(key: str, name: str, datasets: dict[str, np.ndarray]) -> None:
        with h5py.File(folder / name, "w") as h5:
            for ds_name, data in datasets.items():
                h5[ds_name] = data
        out[key] = folder / name

    (folder / "bad_zero.h5").write_bytes(b"")
    out["unreadable"] = folder / "bad_zero.h5"
    whole = write_slide_h5(folder / "bad_truncated.h5", rng.standard_normal((200, feature_dim)).astype(np.float32),
                           np.zeros((200, 2), np.int64))
    whole.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    out["unreadable/truncated"] = whole
    (folder / "bad_text.h5").write_text("case_id,slide_id\nthis is not HDF5\n")
    out["unreadable/not_hdf5"] = folder / "bad_text.h5"
    raw("missing_dataset", "bad_no_features.h5", {"coords": coords})
    raw("missing_dataset/coords", "bad_no_coords.h5", {"features": features})
    raw("bad_shape", "bad_features_1d.h5", {"features": features[:, 0], "coords": coords})
    raw("bad_shape/coords", "bad_coords_3col.h5", {"features": features, "coords": np.zeros((n, 3), np.int64)})
    out["row_mismatch"] = write_slide_h5(folder / "bad_rows.h5", features, coords[:4])
    nan = features.copy()
    nan[1, 2] = np.nan
    nan[3, 0] = np.inf
    out["non_finite"] = write_slide_h5(folder / "bad_nan.h5", nan, coords)
    out["empty"] = write_slide_h5(folder / "bad_empty.h5", features[:0], coords[:0])
    out["feature_dim"] = write_slide_h5(folder / "bad_dim.h5",
                                        rng.standard_normal((n, feature_dim + 1)).astype(np.float32), coords)
    assert tuple(out) == BAD_SLIDE_KINDS
    return out


@pytest.fixture(scope="session")
def make_bad_slide_files() -> Callable[[Path, int], dict[str, Path]]:
    """Factory: ``make_bad_slide_files(folder, feature_dim)`` plants every bad-slide kind (see
    ``plant_bad_slide_files``) and returns key -> path."""
    return plant_bad_slide_files


@pytest.fixture()
def bad_slide_files(tmp_path: Path) -> dict[str, Path]:
    """Every bad-slide kind in a fresh folder, feature dim ``BAD_SLIDE_FEATURE_DIM``."""
    return plant_bad_slide_files(tmp_path / "bad_slides")


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory) -> Path:
    """A torch-free toy model folder (``momkd.testing.toy``): feature dim 8, classes ("low", "high")."""
    from momkd.testing.toy import build_toy_model_dir

    d = tmp_path_factory.mktemp("toy") / "model"
    build_toy_model_dir(d, feature_dim=8, class_names=("low", "high"))
    return d
