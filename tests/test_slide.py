"""read_slide / read_slide_header: TRIDENT and CLAM formats, casting, attributes, every bad-file kind, speed."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from momkd.data.slide import Slide, SlideAttrs, _read_row_chunks, nonfinite_rows, read_slide, read_slide_header
from momkd.errors import SlideError, SlideFeatureDimError, SlideUnreadableError
from momkd.synth import write_slide_h5

from conftest import BAD_SLIDE_FEATURE_DIM, BAD_SLIDE_KINDS


def sample(n: int = 30, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, 10_000, size=(n, 2))


def test_trident(tmp_path: Path) -> None:
    f, c = sample()
    path = write_slide_h5(tmp_path / "TCGA-AB-1234-01Z.DX1.h5", f, c, encoder="uni_v1", patch_size_level0=512,
                          magnification=20.0)
    slide = read_slide(path, expected_dim=12)
    assert isinstance(slide, Slide) and slide.slide_id == "TCGA-AB-1234-01Z.DX1" and slide.path == path
    assert slide.features.dtype == np.float32 and slide.features.flags.c_contiguous
    assert slide.coords.dtype == np.int64 and slide.coords.shape == (30, 2)
    np.testing.assert_array_equal(slide.features, f)
    np.testing.assert_array_equal(slide.coords, c)
    assert slide.attrs == SlideAttrs(patch_size_level0=512, encoder="uni_v1", magnification=20.0)
    assert (slide.n_patches, slide.feature_dim) == (30, 12)
    with h5py.File(path) as h5:
        assert h5["features"].chunks == (1, 12)


def test_clam_int32_coords_and_no_attributes(tmp_path: Path) -> None:
    f, c = sample()
    path = write_slide_h5(tmp_path / "clam.h5", f, c, fmt="clam")
    with h5py.File(path) as h5:
        assert h5["coords"].dtype == np.int32 and not h5["coords"].attrs and not h5["features"].attrs
    slide = read_slide(path)
    assert slide.coords.dtype == np.int64
    np.testing.assert_array_equal(slide.coords, c)
    assert slide.attrs == SlideAttrs()


def test_fp16_features_cast_to_float32(tmp_path: Path) -> None:
    f, c = sample()
    path = write_slide_h5(tmp_path / "half.h5", f.astype(np.float16), c)
    slide = read_slide(path)
    assert slide.features.dtype == np.float32 and slide.features.flags.c_contiguous
    np.testing.assert_array_equal(slide.features, f.astype(np.float16).astype(np.float32))


def test_attributes_read_defensively(tmp_path: Path) -> None:
    f, c = sample()
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as h5:
        h5["features"] = f
        h5["coords"] = c
        h5["coords"].attrs.update({"patch_size": 224, "level0_magnification": 40, "patch_size_level0": "None"})
        h5["features"].attrs["encoder"] = np.bytes_(b"conch_v15")
        h5.attrs["target_magnification"] = 20.0
    attrs = read_slide(path).attrs
    assert attrs == SlideAttrs(patch_size_level0=448, encoder="conch_v15", magnification=20.0)


def test_header_reads_no_features(tmp_path: Path) -> None:
    f, c = sample()
    f[3, 3] = np.nan   # only a full read finds it
    path = write_slide_h5(tmp_path / "h.h5", f, c, encoder="uni_v1")
    n, d, attrs = read_slide_header(path)
    assert (n, d, attrs.encoder) == (30, 12, "uni_v1")
    with pytest.raises(SlideError, match="NaN or Inf in 1 of 30 rows"):
        read_slide(path)


def test_nonfinite_rows_exact_despite_overflowing_sums() -> None:
    x = np.ones((6, 4), np.float32)
    x[1] = 3e38          # finite values whose sum overflows
    x[2, 0] = np.nan
    x[4, 3] = -np.inf
    x[5, :2] = [np.inf, -np.inf]
    np.testing.assert_array_equal(nonfinite_rows(x), [2, 4, 5])


@pytest.mark.parametrize("key", BAD_SLIDE_KINDS)
def test_every_bad_file_kind(bad_slide_files: dict[str, Path], key: str) -> None:
    path = bad_slide_files[key]
    detail = {
        "unreadable": "empty file (0 bytes)",
        "unreadable/truncated": "truncated or corrupt HDF5 file",
        "unreadable/not_hdf5": "not an HDF5 file",
        "missing_dataset": "no 'features' dataset (found: coords)",
        "missing_dataset/coords": "no 'coords' dataset (found: features)",
        "bad_shape": "features have shape (5,), expected (N, D)",
        "bad_shape/coords": "coords have shape (5, 3), expected (N, 2)",
        "row_mismatch": "features have 5 rows but coords have 4",
        "non_finite": "features contain NaN or Inf in 2 of 5 rows (first at row 1)",
        "empty": "no patches (N = 0)",
        "feature_dim": f"feature dim {BAD_SLIDE_FEATURE_DIM + 1} does not match the expected {BAD_SLIDE_FEATURE_DIM}",
    }[key]
    with pytest.raises(SlideError) as info:
        read_slide(path, expected_dim=BAD_SLIDE_FEATURE_DIM)
    e = info.value
    assert e.code == key.split("/")[0]
    assert e.path == path and str(e) == f"{path}: {e.message}"
    assert detail in e.message and "\n" not in str(e)


def test_header_catches_layout_problems(bad_slide_files: dict[str, Path]) -> None:
    for key, path in bad_slide_files.items():
        if key in ("non_finite", "feature_dim"):   # values / the caller's dim: not a header matter
            read_slide_header(path)
        else:
            with pytest.raises(SlideError) as info:
                read_slide_header(path)
            assert info.value.code == key.split("/")[0]


def test_not_found_folder_and_dim(tmp_path: Path) -> None:
    with pytest.raises(SlideUnreadableError, match="file not found"):
        read_slide(tmp_path / "nope.h5")
    (tmp_path / "dir.h5").mkdir()
    with pytest.raises(SlideUnreadableError, match="is a folder"):
        read_slide(tmp_path / "dir.h5")
    path = write_slide_h5(tmp_path / "s.h5", *sample())
    with pytest.raises(SlideFeatureDimError):
        read_slide(path, expected_dim=13)


def test_three_dim_features_are_refused_with_the_shape_seen(tmp_path: Path) -> None:
    f, c = sample(5, 4)
    with h5py.File(tmp_path / "v.h5", "w") as h5:
        h5["features"] = f[None]
        h5["coords"] = c
    with pytest.raises(SlideError, match=r"features have shape \(1, 5, 4\), expected \(N, D\)") as info:
        read_slide(str(tmp_path / "v.h5"))
    assert info.value.code == "bad_shape"


def test_coords_nan_and_string_features(tmp_path: Path) -> None:
    f, _ = sample(4, 3)
    with h5py.File(tmp_path / "c.h5", "w") as h5:
        h5["features"] = f
        h5["coords"] = np.array([[0, 0], [1, np.nan], [2, 2], [3, 3]], dtype=np.float64)
    with pytest.raises(SlideError, match="coords contain NaN or Inf in 1 of 4 rows") as info:
        read_slide(tmp_path / "c.h5")
    assert info.value.code == "non_finite"
    with h5py.File(tmp_path / "s.h5", "w") as h5:
        h5["features"] = np.array([[b"a", b"b"]] * 4)
        h5["coords"] = np.zeros((4, 2), np.int64)
    with pytest.raises(SlideUnreadableError, match="expected numbers"):
        read_slide(tmp_path / "s.h5")


@pytest.mark.parametrize("layout, fast", [
    (dict(chunks=(1, 12), maxshape=(None, 12)), True),           # TRIDENT / CLAM
    (dict(chunks=(7, 12)), True),                                 # partial last chunk
    (dict(chunks=(1, 12), dtype=">f4"), True),                    # big-endian
    (dict(chunks=(4, 12), dtype="f2"), True),                     # fp16
    (dict(chunks=(1, 6)), False),                                 # chunks split rows
    (dict(chunks=(1, 12), compression="gzip"), False),            # filtered
    (dict(), False),                                              # contiguous
])
def test_chunk_read_matches_hdf5(tmp_path: Path, layout: dict, fast: bool) -> None:
    f, c = sample(30, 12)
    with h5py.File(tmp_path / "s.h5", "w") as h5:
        h5.create_dataset("features", data=f.astype(layout.pop("dtype", "f4")), **layout)
        h5["coords"] = c
    with h5py.File(tmp_path / "s.h5", "r") as h5:
        direct = _read_row_chunks(h5["features"])
        assert (direct is not None) == fast
        expected = h5["features"][()]
    if fast:
        np.testing.assert_array_equal(direct, expected)
    np.testing.assert_array_equal(read_slide(tmp_path / "s.h5").features, expected.astype(np.float32))


def test_unwritten_chunks_are_refused_not_read_as_fill_values(tmp_path: Path) -> None:
    f, c = sample(10, 4)
    with h5py.File(tmp_path / "s.h5", "w") as h5:
        h5.create_dataset("features", shape=(10, 4), chunks=(1, 4), dtype="f4")[:5] = f[:5]
        h5["coords"] = c
    with h5py.File(tmp_path / "s.h5", "r") as h5:
        assert _read_row_chunks(h5["features"]) is None
    with pytest.raises(SlideError, match="features rows 5-9 were never written") as info:
        read_slide(tmp_path / "s.h5")
    assert info.value.code == "incomplete"
