"""predictions.csv: atomic rewrite, flushed after each pack, and --resume (never duplicates, redoes only what is
missing, failed, or changed; refuses rows made by another model)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from momkd.runtime.backends import OnnxRuntimeBackend
from momkd.runtime.pipeline import run_inference
from momkd.runtime.results import COLUMNS, ResultRow, ResultsError, ResultsWriter, format_probability, read_predictions
from momkd.testing.toy import build_toy_model_dir, write_slide_folder

DIM = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("toy") / "model"
    build_toy_model_dir(d, feature_dim=DIM)
    return d


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    write_slide_folder(tmp_path / "in", [5, 9, 3, 12, 4], DIM)
    return tmp_path / "in"


def lines(out: Path) -> list[str]:
    return (out / "predictions.csv").read_text().splitlines()


def test_writer_is_atomic_and_ordered(tmp_path: Path) -> None:
    w = ResultsWriter(tmp_path, 3)
    w.set(2, ResultRow.ok("c", "c.h5", 4, 0.123456789123, "pos"))
    w.set(0, ResultRow.failed("a", "a.h5", "empty: slide has\nno patches", 0))
    w.flush()
    assert lines(tmp_path) == [",".join(COLUMNS), "a,a.h5,error,empty: slide has no patches,0,,",
                               "c,c.h5,ok,,4,0.123456789,pos"]
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]    # no temp file left

    def boom(src, dst):
        raise OSError("disk full")

    w.set(1, ResultRow.ok("b", "b.h5", 1, 0.5, "pos"))
    real = os.replace
    os.replace = boom
    try:
        with pytest.raises(OSError):
            w.flush()
    finally:
        os.replace = real
    assert len(lines(tmp_path)) == 3                                      # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]


def test_probability_format_round_trips_float32() -> None:
    import numpy as np

    for p in np.random.default_rng(0).random(100).astype(np.float32):
        assert np.float32(float(format_probability(p))) == p


def test_second_resume_run_does_nothing(model_dir: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = run_inference(model_dir, folder, out)
    before = lines(out)
    second = run_inference(model_dir, folder, out, resume=True)
    assert second.n_processed == 0 and second.n_kept == 5 and second.exit_code == 0
    assert lines(out) == before and len(before) == 6
    assert first.n_processed == 5


def test_resume_redoes_only_the_missing_row(model_dir: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_inference(model_dir, folder, out)
    before = lines(out)
    (out / "predictions.csv").write_text("\n".join(before[:2] + before[3:]) + "\n")   # drop the 2nd slide's row
    summary = run_inference(model_dir, folder, out, resume=True)
    assert summary.n_processed == 1 and summary.n_kept == 4
    assert lines(out) == before


def test_resume_redoes_failed_and_changed_slides(model_dir: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (folder / "late.h5").write_bytes(b"")                 # unreadable now ...
    first = run_inference(model_dir, folder, out)
    assert first.n_failed == 1
    (folder / "late.h5").unlink()
    write_slide_folder(folder, [6], DIM, prefix="late")     # ... fixed later (as late_000.h5)
    os.rename(folder / "late_000.h5", folder / "late.h5")
    write_slide_folder(folder, [7], DIM, seed=99)           # slide_000.h5 replaced by new content
    second = run_inference(model_dir, folder, out, resume=True)
    assert second.n_processed == 2 and second.n_failed == 0 and second.exit_code == 0
    got = {r.file: r for r in read_predictions(out / "predictions.csv")}
    assert got["late.h5"].status == "ok" and got["slide_000.h5"].n_patches == "7"
    assert len(got) == 6


def test_resume_refuses_rows_of_another_model(model_dir: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_inference(model_dir, folder, out)
    other = tmp_path / "other"
    build_toy_model_dir(other, feature_dim=DIM, seed=5)
    with pytest.raises(ResultsError, match="another model"):
        run_inference(other, folder, out, resume=True)
    (out / "run.json").unlink()
    with pytest.raises(ResultsError, match="run.json"):
        run_inference(model_dir, folder, out, resume=True)
    (out / "predictions.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ResultsError, match="not a momkd predictions file"):
        read_predictions(out / "predictions.csv")


class _InterruptAfter:
    """Backend that is interrupted (Ctrl-C) on its n-th call."""

    def __init__(self, inner: OnnxRuntimeBackend, n: int) -> None:
        self.inner, self.n = inner, n
        self.name, self.device, self.detail, self.max_rows, self.max_slides = "onnxruntime", "cpu", "", None, None

    def run(self, *args):
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt
        return self.inner.run(*args)

    def close(self) -> None:
        pass


def test_flushed_after_each_pack_and_resumable_after_interrupt(model_dir: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    be = _InterruptAfter(OnnxRuntimeBackend(model_dir / "model.onnx", "cpu", threads=1), 3)
    with pytest.raises(KeyboardInterrupt):
        run_inference(model_dir, folder, out, batch_patches=1, backend_obj=be)   # one slide per pack
    done = read_predictions(out / "predictions.csv")
    assert [r.slide_id for r in done] == ["slide_000", "slide_001"] and all(r.status == "ok" for r in done)
    summary = run_inference(model_dir, folder, out, resume=True)
    assert summary.n_processed == 3 and summary.n_kept == 2 and summary.exit_code == 0
    with open(out / "predictions.csv", newline="") as f:
        ids = [r["slide_id"] for r in csv.DictReader(f)]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == 5


def test_resume_with_attention_redoes_slides_without_an_attention_file(model_dir: Path, folder: Path,
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_inference(model_dir, folder, out)
    summary = run_inference(model_dir, folder, out, resume=True, save_attention=True)
    assert summary.n_processed == 5 and len(list((out / "attention").glob("*.h5"))) == 5
    (out / "attention" / "slide_003.h5").unlink()
    again = run_inference(model_dir, folder, out, resume=True, save_attention=True)
    assert again.n_processed == 1 and (out / "attention" / "slide_003.h5").is_file()
