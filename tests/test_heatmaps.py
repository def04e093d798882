"""`momkd infer --heatmaps`: one non-blank PNG per good slide and none for a failed one, the patch grid from the
TRIDENT patch size or the coordinate spacing, a failing heatmap recorded while the run goes on, --resume, and
the optional slide-image background (openslide)."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("matplotlib")

from momkd.cli.main import app  # noqa: E402
from momkd.data import wsi  # noqa: E402
from momkd.runtime import heatmap  # noqa: E402
from momkd.runtime.heatmap_writer import HeatmapOptions  # noqa: E402
from momkd.runtime.pipeline import run_inference  # noqa: E402
from momkd.synth import grid_coords  # noqa: E402
from momkd.testing.toy import write_slide_folder, write_trident_slide  # noqa: E402

DIM = 8
runner = CliRunner()


def pixel_variance(path: Path) -> float:
    from matplotlib.image import imread

    return float(np.asarray(imread(path), dtype=np.float64)[..., :3].var())


def index_rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "heatmaps" / "heatmaps.csv").open(newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    write_slide_folder(folder, [40, 120, 1], DIM)
    (folder / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n truncated")
    with h5py.File(folder / "empty.h5", "w") as f:
        f.create_dataset("features", shape=(0, DIM), dtype="float32")
        f.create_dataset("coords", shape=(0, 2), dtype="int64")
    return folder


def test_one_png_per_good_slide_none_for_failed(toy_model_dir: Path, mixed: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "heatmaps").mkdir(parents=True)
    (out / "heatmaps" / "broken.png").write_bytes(b"stale")        # an older run's heatmap of a now-bad slide
    result = runner.invoke(app, ["infer", str(toy_model_dir), str(mixed), "--out", str(out), "--heatmaps"])
    assert result.exit_code == 1, result.output
    assert "3 heatmaps -> " in result.stdout
    pngs = sorted(p.name for p in (out / "heatmaps").glob("*.png"))
    assert pngs == ["slide_000.png", "slide_001.png", "slide_002.png"]
    for name in pngs:
        assert pixel_variance(out / "heatmaps" / name) > 0
    rows = index_rows(out)
    assert set(rows) == {"slide_000", "slide_001", "slide_002"}
    assert {r["status"] for r in rows.values()} == {"ok"}


def test_score_values_and_resume(toy_model_dir: Path, tmp_path: Path) -> None:
    write_slide_folder(tmp_path / "in", [30, 50], DIM)
    args = ["infer", str(toy_model_dir), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--heatmaps",
            "--heatmap-value", "score", "-q"]
    assert runner.invoke(app, args).exit_code == 0
    (tmp_path / "out" / "heatmaps" / "slide_001.png").unlink()     # a missing heatmap makes --resume redo it
    again = runner.invoke(app, args + ["--resume"])
    assert again.exit_code == 0, again.output
    assert "1 kept from an earlier run" in again.stdout and "2 heatmaps" in again.stdout
    rows = index_rows(tmp_path / "out")
    assert rows["slide_000"]["status"] == "kept" and rows["slide_001"]["status"] == "ok"
    assert (tmp_path / "out" / "heatmaps" / "slide_001.png").is_file()


def test_a_failing_heatmap_is_recorded_and_the_run_goes_on(toy_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    write_slide_folder(tmp_path / "in", [20, 25, 30], DIM)
    real = heatmap.render_heatmap

    def flaky(path: Path, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if Path(path).stem == "slide_001":
            raise RuntimeError("disk full")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(heatmap, "render_heatmap", flaky)
    logged: list[str] = []
    summary = run_inference(toy_model_dir, tmp_path / "in", tmp_path / "out", heatmaps=HeatmapOptions(),
                            log=logged.append)
    assert summary.exit_code == 0 and summary.n_ok == 3          # the predictions stand
    assert summary.heatmaps.n_ok == 2 and set(summary.heatmaps.failures) == {"slide_001"}
    assert "1 failed" in summary.line()
    assert not (tmp_path / "out" / "heatmaps" / "slide_001.png").exists()
    row = index_rows(tmp_path / "out")["slide_001"]
    assert row["status"] == "error" and "disk full" in row["error"]
    assert any(m.startswith("heatmap failed: slide_001: RuntimeError: disk full") for m in logged)


def test_patch_size_from_trident_attribute_else_spacing(toy_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    coords = grid_coords(30, patch=224)
    write_trident_slide(folder / "trident.h5", rng.standard_normal((30, DIM)), coords, patch_size=448)
    with h5py.File(folder / "clam.h5", "w") as f:                  # CLAM: no attributes
        f.create_dataset("features", data=rng.standard_normal((30, DIM)).astype(np.float32))
        f.create_dataset("coords", data=coords.astype(np.int32))
    seen: dict[str, int] = {}
    real = heatmap.render_heatmap

    def spy(path: Path, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen[Path(path).stem] = kwargs["patch_size"]
        return real(path, *args, **kwargs)

    monkeypatch.setattr(heatmap, "render_heatmap", spy)
    run_inference(toy_model_dir, folder, tmp_path / "out", heatmaps=HeatmapOptions())
    assert seen == {"trident": 448, "clam": 224}


def test_patch_grid_places_values() -> None:
    coords = np.array([[512, 256], [768, 256], [512, 768]])
    grid, extent = heatmap.patch_grid(coords, np.array([1.0, 2.0, 3.0]), 256)
    assert grid.shape == (3, 2)
    assert grid[0, 0] == 1.0 and grid[0, 1] == 2.0 and grid[2, 0] == 3.0
    assert np.isnan(grid[1]).all() and np.isnan(grid[2, 1])
    assert extent == (512.0, 1024.0, 1024.0, 256.0)
    from momkd.data.slide import DEFAULT_PATCH_SIZE, infer_patch_size

    assert infer_patch_size(coords) == 256
    assert infer_patch_size(np.array([[7, 9]])) == DEFAULT_PATCH_SIZE


def test_a_large_slide_renders_in_seconds(tmp_path: Path) -> None:
    coords = grid_coords(50_000)
    values = np.random.default_rng(0).random(50_000)
    t0 = time.perf_counter()
    heatmap.render_heatmap(tmp_path / "big.png", coords, values, patch_size=256, title="big", value_label="v")
    assert time.perf_counter() - t0 < 10
    assert pixel_variance(tmp_path / "big.png") > 0


def test_option_errors_are_one_line(toy_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    write_slide_folder(tmp_path / "in", [5], DIM)
    base = ["infer", str(toy_model_dir), str(tmp_path / "in"), "--out", str(tmp_path / "out")]
    for extra, expected in ((["--slides", str(tmp_path)], "--slides is only used with --heatmaps"),
                            (["--heatmaps", "--slides", str(tmp_path / "nowhere")], "--slides folder does not exist")):
        result = runner.invoke(app, base + extra)
        assert result.exit_code == 2, result.output
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], result.stderr
        assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_slides_without_openslide_draw_the_grid_and_say_so(toy_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(wsi, "openslide_module", lambda: None)
    write_slide_folder(tmp_path / "in", [12], DIM)
    (tmp_path / "wsi").mkdir()
    result = runner.invoke(app, ["infer", str(toy_model_dir), str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                                 "--heatmaps", "--slides", str(tmp_path / "wsi")])
    assert result.exit_code == 0, result.output
    notes = [ln for ln in result.stderr.splitlines() if "openslide is not installed" in ln]
    assert len(notes) == 1
    assert index_rows(tmp_path / "out")["slide_000"]["background"] == "patch grid"


def write_generic_tiff(path: Path, coords: np.ndarray, patch: int) -> None:
    """A small tiled pyramidal TIFF (openslide's generic-tiff format) covering the patches, one colour per patch."""
    tifffile = pytest.importorskip("tifffile")
    cells = (coords // patch).max(axis=0) + 2
    rng = np.random.default_rng(1)
    colours = rng.integers(40, 230, size=(cells[1], cells[0], 3), dtype=np.uint8)
    level0 = np.kron(colours, np.ones((patch, patch, 1), dtype=np.uint8))
    with tifffile.TiffWriter(path) as tif:
        for step in (1, 4):
            tif.write(level0[::step, ::step], tile=(256, 256), photometric="rgb", compression="zlib")


def test_overlay_on_the_slide_thumbnail_and_crops(toy_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("openslide")
    if wsi.openslide_module() is None:
        pytest.skip("libopenslide is not loadable")
    slides = write_slide_folder(tmp_path / "in", [40], DIM)
    coords = slides["slide_000"][1]
    (tmp_path / "wsi").mkdir()
    write_generic_tiff(tmp_path / "wsi" / "slide_000.tif", coords, 256)
    result = runner.invoke(app, ["infer", str(toy_model_dir), str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                                 "--heatmaps", "--slides", str(tmp_path / "wsi")])
    assert result.exit_code == 0, result.output
    assert index_rows(tmp_path / "out")["slide_000"]["background"] == "slide image slide_000.tif"
    assert pixel_variance(tmp_path / "out" / "heatmaps" / "slide_000.png") > 0

    pytest.importorskip("torch")
    from momkd.report.crops import crop_montages
    from momkd.report.memory_codes import CodeHit

    hits = [CodeHit(0, "positive", c, r + 1, "slide_000", 1, int(coords[2 * c + r, 0]), int(coords[2 * c + r, 1]),
                    0.9 - 0.1 * r) for c in range(2) for r in range(2)]
    written, notes = crop_montages(hits, tmp_path / "wsi", tmp_path / "in", tmp_path, ("low", "high"), lambda _m: None)
    assert notes == [] and len(written) == 1
    assert pixel_variance(written[0][1]) > 0
