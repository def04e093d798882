"""run_inference end to end on a toy model with the exported graph's exact I/O (no trained model needed):
correctness against a numpy reference for any row budget, one row per file, every bad-file kind, duplicates,
attention files, per-slide backend failures, contract violations, and the output-folder rules."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest

from momkd.errors import ModelFolderError
from momkd.graph import neighbor_table
from momkd.runtime.attention_io import read_attention
from momkd.runtime.backends import OnnxRuntimeBackend
from momkd.runtime.pipeline import UsageError, run_inference
from momkd.runtime.results import COLUMNS
from momkd.testing.toy import build_toy_model_dir, toy_reference, write_slide_folder, write_trident_slide

DIM = 16
SIZES = [7, 40, 1, 120, 9, 2, 65]
SLIDE_CODES = ("unreadable", "missing_dataset", "bad_shape", "row_mismatch", "non_finite", "empty", "feature_dim")


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("toy") / "model"
    return d, build_toy_model_dir(d, feature_dim=DIM, seed=3)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("slides")
    return d, write_slide_folder(d, SIZES, DIM, seed=1)


def plant_bad_files(folder: Path, feature_dim: int) -> dict[str, Path]:
    """Every bad-file kind of the slide reader's catalogue (used when tests/conftest.py has no factory)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    f = rng.standard_normal((5, feature_dim)).astype(np.float32)
    c = np.arange(10, dtype=np.int64).reshape(5, 2)
    out = {}
    (folder / "bad_zero.h5").write_bytes(b"")
    out["unreadable"] = folder / "bad_zero.h5"
    with h5py.File(folder / "bad_missing.h5", "w") as h:
        h["features"] = f
    out["missing_dataset"] = folder / "bad_missing.h5"
    write_trident_slide(folder / "bad_shape.h5", f, c)
    with h5py.File(folder / "bad_shape.h5", "r+") as h:
        del h["coords"]
        h["coords"] = np.zeros((5, 3), np.int64)
    out["bad_shape"] = folder / "bad_shape.h5"
    write_trident_slide(folder / "bad_rows.h5", f, c[:4], chunk_rows=None)
    out["row_mismatch"] = folder / "bad_rows.h5"
    g = f.copy()
    g[2, 1] = np.nan
    write_trident_slide(folder / "bad_nan.h5", g, c)
    out["non_finite"] = folder / "bad_nan.h5"
    write_trident_slide(folder / "bad_empty.h5", f[:0], c[:0])
    out["empty"] = folder / "bad_empty.h5"
    write_trident_slide(folder / "bad_dim.h5", rng.standard_normal((5, feature_dim + 1)).astype(np.float32), c)
    out["feature_dim"] = folder / "bad_dim.h5"
    return out


@pytest.fixture()
def bad_files(request) -> Callable[[Path, int], dict[str, Path]]:
    try:
        return request.getfixturevalue("make_bad_slide_files")
    except pytest.FixtureLookupError:
        return plant_bad_files


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def reference(data: dict, params: dict) -> dict[str, dict]:
    return {sid: toy_reference(f, neighbor_table(c, k=8, direction="paper"), params) for sid, (f, c) in data.items()}


@pytest.mark.parametrize("budget", [1, 50, 100_000])
def test_matches_reference_for_any_row_budget(toy, good, tmp_path: Path, budget: int) -> None:
    model_dir, params = toy
    folder, data = good
    summary = run_inference(model_dir, folder, tmp_path / "out", batch_patches=budget, workers=2)
    assert summary.exit_code == 0 and summary.n_ok == len(SIZES) and summary.n_failed == 0
    assert (summary.backend, summary.device) == ("onnxruntime", "cpu")
    ref = reference(data, params)
    got = rows(tmp_path / "out")
    assert [r["slide_id"] for r in got] == sorted(data)          # discovery order, one row each
    for r in got:
        want = ref[r["slide_id"]]["probability"]
        assert r["status"] == "ok" and r["error"] == ""
        assert r["file"] == f"{r['slide_id']}.h5" and int(r["n_patches"]) == len(data[r["slide_id"]][0])
        assert float(r["probability"]) == pytest.approx(float(want), abs=1e-5)
        assert r["prediction"] == ("positive" if float(r["probability"]) >= 0.5 else "negative")


def test_every_bad_file_kind_is_a_row_and_the_run_goes_on(toy, good, bad_files, tmp_path: Path) -> None:
    model_dir, _ = toy
    folder = tmp_path / "mixed"
    data = write_slide_folder(folder, [12, 30, 5], DIM, seed=7)
    bad = bad_files(folder, DIM)
    (folder / "notes.txt").write_text("not a slide")
    summary = run_inference(model_dir, folder, tmp_path / "out", batch_patches=40)
    got = {r["file"]: r for r in rows(tmp_path / "out")}
    assert len(got) == len(data) + len(bad) and "notes.txt" not in got
    assert [r["file"] for r in rows(tmp_path / "out")] == sorted(got)
    for sid in data:
        assert got[f"{sid}.h5"]["status"] == "ok"
    for code, path in bad.items():
        r = got[path.name]
        assert r["status"] == "error" and r["probability"] == "" and r["prediction"] == ""
        assert "\n" not in r["error"] and r["error"]
        code = code.split("/")[0]                 # "unreadable/truncated": a variant of "unreadable"
        if code in SLIDE_CODES:
            assert r["error"].startswith(f"{code}:"), r
    assert summary.n_ok == len(data) and summary.n_failed == len(bad) and summary.exit_code == 1


def test_feature_dim_mismatch_is_that_slides_error(toy, tmp_path: Path) -> None:
    model_dir, _ = toy
    folder = tmp_path / "slides"
    write_slide_folder(folder, [10], DIM, prefix="good")
    write_slide_folder(folder, [10], DIM * 2, prefix="wide")
    summary = run_inference(model_dir, folder, tmp_path / "out")
    r = {x["slide_id"]: x for x in rows(tmp_path / "out")}
    assert r["good_000"]["status"] == "ok"
    assert r["wide_000"]["status"] == "error" and r["wide_000"]["error"].startswith("feature_dim:")
    assert str(DIM) in r["wide_000"]["error"] and summary.exit_code == 1


def test_save_attention(toy, good, tmp_path: Path) -> None:
    model_dir, params = toy
    folder, data = good
    run_inference(model_dir, folder, tmp_path / "out", batch_patches=100, save_attention=True)
    ref = reference(data, params)
    for sid, (feats, coords) in data.items():
        a = read_attention(tmp_path / "out" / "attention" / f"{sid}.h5")
        np.testing.assert_array_equal(a["coords"], coords)
        assert a["attention"].dtype == np.float32 and a["patch_score"].dtype == np.float32
        assert a["attention"].sum() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(a["attention"], ref[sid]["attention"], atol=1e-6)
        np.testing.assert_allclose(a["patch_score"], ref[sid]["patch_score"], atol=1e-5)


def test_recursive_and_duplicate_slide_ids(toy, tmp_path: Path) -> None:
    model_dir, _ = toy
    folder = tmp_path / "in"
    write_slide_folder(folder, [5], DIM, prefix="a")
    write_slide_folder(folder / "sub", [6, 7], DIM, prefix="a")      # sub/a_000.h5 duplicates a_000
    flat = run_inference(model_dir, folder, tmp_path / "flat")
    assert flat.n_files == 1
    summary = run_inference(model_dir, folder, tmp_path / "rec", recursive=True)
    got = rows(tmp_path / "rec")
    assert [r["file"] for r in got] == ["a_000.h5", "sub/a_000.h5", "sub/a_001.h5"]
    assert [r["status"] for r in got] == ["ok", "error", "ok"]
    assert "duplicate slide id" in got[1]["error"] and "a_000.h5" in got[1]["error"]
    assert summary.exit_code == 1


def test_output_folder_rules(toy, good, tmp_path: Path) -> None:
    model_dir, _ = toy
    folder, _ = good
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(UsageError, match="inside the input folder"):
        run_inference(model_dir, folder, folder / "out")
    with pytest.raises(UsageError, match="inside the input folder"):
        run_inference(model_dir, folder, folder)
    with pytest.raises(UsageError, match="must not contain"):
        run_inference(model_dir, folder, folder.parent)
    with pytest.raises(UsageError, match="does not exist"):
        run_inference(model_dir, tmp_path / "missing", tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == before


def test_model_errors_stop_before_anything_is_written(toy, good, tmp_path: Path) -> None:
    import shutil

    model_dir, _ = toy
    bad_model = tmp_path / "model"
    shutil.copytree(model_dir, bad_model)
    with open(bad_model / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelFolderError, match="checksum mismatch"):
        run_inference(bad_model, good[0], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_folder_is_a_usage_error(toy, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    with pytest.raises(UsageError, match="no .h5 files in"):
        run_inference(toy[0], tmp_path / "in", tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _Wrapped:
    """An ONNX Runtime backend with a hook on its outputs / failures, to test the pipeline's reactions."""

    def __init__(self, inner: OnnxRuntimeBackend, hook) -> None:
        self.inner, self.hook = inner, hook
        self.name, self.device, self.detail = inner.name, inner.device, inner.detail
        self.max_rows, self.max_slides = inner.max_rows, inner.max_slides
        self.calls: list[int] = []

    def run(self, features, neighbors, slide_offsets):
        self.calls.append(len(slide_offsets) - 1)
        return self.hook(self.inner.run(features, neighbors, slide_offsets), features, slide_offsets)

    def close(self) -> None:
        pass


def _backend(model_dir: Path, hook) -> _Wrapped:
    return _Wrapped(OnnxRuntimeBackend(model_dir / "model.onnx", "cpu", threads=1), hook)


def test_a_slide_failing_in_the_backend_does_not_take_its_pack_down(toy, good, tmp_path: Path) -> None:
    model_dir, _ = toy
    folder, data = good

    def hook(out, features, offsets):
        if 120 in np.diff(offsets):        # the 120-patch slide makes the backend fail
            raise RuntimeError("CUDA out of memory\n(simulated)")
        return out

    be = _backend(model_dir, hook)
    summary = run_inference(model_dir, folder, tmp_path / "out", batch_patches=1000, backend_obj=be)
    got = {r["n_patches"]: r for r in rows(tmp_path / "out")}
    assert got["120"]["status"] == "error" and "CUDA out of memory (simulated)" in got["120"]["error"]
    assert sum(r["status"] == "ok" for r in got.values()) == len(SIZES) - 1 and summary.exit_code == 1
    assert be.calls == [3, 4, 1, 1, 1, 1]   # packs [7,40,1] [120,9,2,65]; the failing pack again slide by slide


def test_packs_do_not_depend_on_timing(toy, good, tmp_path: Path) -> None:
    model_dir, _ = toy
    folder, _ = good
    seen = []
    for workers in (1, 3, 1):
        be = _backend(model_dir, lambda out, f, o: out)
        run_inference(model_dir, folder, tmp_path / f"out{len(seen)}", batch_patches=64, workers=workers,
                      backend_obj=be)
        seen.append((be.calls, (tmp_path / f"out{len(seen)}" / "predictions.csv").read_bytes()))
    assert seen[0] == seen[1] == seen[2]     # same packs, byte-identical predictions


def test_non_finite_output_is_reported_not_written(toy, good, tmp_path: Path) -> None:
    model_dir, _ = toy

    def hook(out, features, offsets):
        out["probability"][0] = np.nan
        return out

    run_inference(model_dir, good[0], tmp_path / "out", batch_patches=1000, backend_obj=_backend(model_dir, hook))
    first = rows(tmp_path / "out")[0]
    assert first["status"] == "error" and "not finite" in first["error"] and first["probability"] == ""


def test_output_breaking_the_contract_is_a_model_error(toy, good, tmp_path: Path) -> None:
    model_dir, _ = toy

    def hook(out, features, offsets):
        out["attention"] = out["attention"][:-1]
        return out

    with pytest.raises(ModelFolderError, match="'attention' output has shape"):
        run_inference(model_dir, good[0], tmp_path / "out", backend_obj=_backend(model_dir, hook))
    assert rows(tmp_path / "out") == []     # the CSV stays valid (header only)


def test_threshold_and_class_names_from_the_manifest(good, tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    build_toy_model_dir(model_dir, feature_dim=DIM, seed=3, threshold=0.3, class_names=("wt", "mut"))
    run_inference(model_dir, good[0], tmp_path / "out")
    for r in rows(tmp_path / "out"):
        assert r["prediction"] == ("mut" if float(r["probability"]) >= 0.3 else "wt")


def test_official_graph_direction(good, tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    params = build_toy_model_dir(model_dir, feature_dim=DIM, seed=3, direction="official")
    folder, data = good
    run_inference(model_dir, folder, tmp_path / "out", batch_patches=100)
    for r in rows(tmp_path / "out"):
        f, c = data[r["slide_id"]]
        want = toy_reference(f, neighbor_table(c, k=8, direction="official"), params)["probability"]
        assert float(r["probability"]) == pytest.approx(float(want), abs=1e-5)
