"""predictions.csv: atomic rewrites (start and end of a run), each pack's rows appended and fsynced (bytes per pack
= that pack's rows), and --resume (never duplicates, redoes only what is missing, failed, or changed; refuses rows
made by another model; ignores a torn last line; a kill -9 then --resume gives the uninterrupted result)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from momkd.runtime.backends import OnnxRuntimeBackend
from momkd.runtime.pipeline import run_inference
from momkd.runtime.results import COLUMNS, ResultRow, ResultsError, ResultsWriter, format_probability, read_predictions
from momkd.testing.toy import build_toy_model_dir, write_slide_folder
from momkd.testing.process import reaped

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
    w.set(2, ResultRow.ok("c", "c.h5", 4, 0.123456789123, "pos", threshold=0.48))
    w.set(0, ResultRow.failed("a", "a.h5", "empty: slide has\nno patches", 0))
    w.flush()
    assert lines(tmp_path) == [",".join(COLUMNS), "a,a.h5,error,empty: slide has no patches,0,,,",
                               "c,c.h5,ok,,4,0.123456789,pos,0.48"]
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]    # no temp file left

    def boom(src, dst):
        raise OSError("disk full")

    w.set(1, ResultRow.ok("b", "b.h5", 1, 0.5, "pos", threshold=0.5))
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


# -- appends: O(rows of a pack) bytes per pack, a torn last line, kill -9 ----------------------------------------

def test_writer_appends_pending_rows_and_rewrites_in_order(tmp_path: Path) -> None:
    w = ResultsWriter(tmp_path, 4)
    w.flush()                                                   # header only (the start of a run)
    w.set(3, ResultRow.ok("d", "d.h5", 2, 0.75, "pos", threshold=0.5))
    w.set(1, ResultRow.failed("b", "b.h5", "unreadable: x"))
    size = (tmp_path / "predictions.csv").stat().st_size
    w.commit()                                                  # appended, sorted among themselves
    assert lines(tmp_path)[1:] == ["b,b.h5,error,unreadable: x,,,,", "d,d.h5,ok,,2,0.75,pos,0.5"]
    assert (tmp_path / "predictions.csv").stat().st_size - size == len("b,b.h5,error,unreadable: x,,,,\n"
                                                                       "d,d.h5,ok,,2,0.75,pos,0.5\n")
    w.commit()                                                  # nothing pending: nothing written
    w.set(0, ResultRow.ok("a", "a.h5", 1, 0.25, "neg", threshold=0.5))
    w.commit()
    assert [r.slide_id for r in read_predictions(tmp_path / "predictions.csv")] == ["b", "d", "a"]
    with pytest.raises(ValueError, match="a second row"):
        w.set(3, ResultRow.ok("d", "d.h5", 2, 0.75, "pos", threshold=0.5))
    w.flush()                                                   # the end of a run: discovery order
    assert [r.slide_id for r in read_predictions(tmp_path / "predictions.csv")] == ["a", "b", "d"]
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]


def test_bytes_written_per_pack_are_those_of_its_rows(model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from momkd.runtime import results

    folder = tmp_path / "many"
    write_slide_folder(folder, [3] * 40, DIM)
    (folder / "slide_010b.h5").write_bytes(b"")                 # a reader failure between two packs
    rewrites, appends = [], []
    real_write, real_commit = results.atomic_write_text, ResultsWriter.commit

    def write(path, text):
        if path.name == "predictions.csv":
            rewrites.append(len(text))
        real_write(path, text)

    def commit(self):
        before, n = self.path.stat().st_size, len(self.pending)
        real_commit(self)
        appends.append((n, self.path.stat().st_size - before))

    monkeypatch.setattr(results, "atomic_write_text", write)
    monkeypatch.setattr(ResultsWriter, "commit", commit)
    out = tmp_path / "out"
    summary = run_inference(model_dir, folder, out, batch_patches=1)   # one slide per pack: 40 packs
    final = (out / "predictions.csv").read_bytes()
    assert summary.n_ok == 40 and summary.n_failed == 1
    assert len(rewrites) == 2 and rewrites[1] == len(final)    # the start (header) and the end (ordered) only
    assert len(appends) == 40 and sum(n for n, _ in appends) == 41
    longest = max(len(line) + 1 for line in final.splitlines())
    assert all(0 < grew <= n * longest for n, grew in appends)  # O(rows of the pack), never the whole file
    assert sum(grew for _, grew in appends) == len(final) - rewrites[0]   # each row appended once
    assert [r.slide_id for r in read_predictions(out / "predictions.csv")] == sorted(
        [f"slide_{i:03d}" for i in range(40)] + ["slide_010b"])


def test_a_torn_last_line_is_ignored_and_redone_on_resume(model_dir: Path, folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_inference(model_dir, folder, out)
    whole = (out / "predictions.csv").read_bytes()
    rows = whole.splitlines(keepends=True)
    # a run killed mid-append: rows in completion order, the last one half written
    (out / "predictions.csv").write_bytes(b"".join([rows[0], rows[3], rows[1], rows[5], rows[2][:17]]))
    assert [r.slide_id for r in read_predictions(out / "predictions.csv")] == ["slide_002", "slide_000",
                                                                              "slide_004"]
    summary = run_inference(model_dir, folder, out, resume=True)
    assert summary.n_kept == 3 and summary.n_processed == 2 and summary.exit_code == 0
    assert (out / "predictions.csv").read_bytes() == whole
    torn_utf8 = rows[0] + rows[1] + "slide_é".encode()[:-1]    # cut inside a UTF-8 sequence
    (out / "predictions.csv").write_bytes(torn_utf8)
    assert [r.slide_id for r in read_predictions(out / "predictions.csv")] == ["slide_000"]
    (out / "predictions.csv").write_bytes(rows[0] + rows[1] + b'x,"torn\n')   # ends inside a quoted field
    assert [r.slide_id for r in read_predictions(out / "predictions.csv")] == ["slide_000"]
    (out / "predictions.csv").write_bytes(rows[0] + rows[1][:17] + b"\n" + rows[2])   # not the last line
    with pytest.raises(ResultsError, match="line 2 is malformed"):
        run_inference(model_dir, folder, out, resume=True)
    (out / "predictions.csv").write_bytes(rows[0] + rows[1] + rows[2].replace(b",ok,", b",okay,"))
    with pytest.raises(ResultsError, match="line 3 is malformed"):      # a whole last line is checked
        read_predictions(out / "predictions.csv")


_KILLED_RUN = """
import sys, time
from pathlib import Path
from momkd.runtime.backends import OnnxRuntimeBackend
from momkd.runtime.pipeline import run_inference

model_dir, folder, out, marker, n = sys.argv[1:6]

class HangOnCall:
    def __init__(self, inner, n):
        self.inner, self.n = inner, n
        self.name, self.device, self.detail, self.max_rows, self.max_slides = "onnxruntime", "cpu", "", None, None

    def run(self, *args):
        self.n -= 1
        if self.n == 0:                      # packs 1..n-1 are recorded: wait here to be killed
            Path(marker).write_text("ready")
            time.sleep(600)
        return self.inner.run(*args)

    def close(self):
        self.inner.close()

be = HangOnCall(OnnxRuntimeBackend(Path(model_dir) / "model.onnx", "cpu", threads=1), int(n))
run_inference(model_dir, folder, out, batch_patches=1, backend_obj=be)
"""


def test_kill_9_mid_run_then_resume_gives_the_uninterrupted_result(model_dir: Path, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "in"
    write_slide_folder(folder, [5, 9, 3, 12, 4, 7, 6, 8], DIM)
    (folder / "slide_001b.h5").write_bytes(b"")                 # a reader failure: appended out of file order
    run_inference(model_dir, folder, tmp_path / "whole", batch_patches=1)
    whole = (tmp_path / "whole" / "predictions.csv").read_bytes()

    out, marker = tmp_path / "out", tmp_path / "hung"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(model_dir), str(folder), str(out), str(marker),
                             "5"])
    with reaped(proc):
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run never reached its 5th pack"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    left = read_predictions(out / "predictions.csv")
    ok = [r.slide_id for r in left if r.status == "ok"]
    assert ok == [f"slide_{i:03d}" for i in range(4)]           # the 4 packs done before the kill, durable
    assert sorted(r.slide_id for r in left) == sorted(ok + ["slide_001b"])   # its failure too, each file once
    whole_rows = {r.file: r for r in read_predictions(tmp_path / "whole" / "predictions.csv")}
    assert all(r == whole_rows[r.file] for r in left)
    summary = run_inference(model_dir, folder, out, resume=True, batch_patches=1)
    assert summary.n_kept == 4 and summary.n_processed == 5 and summary.exit_code == 1   # slide_001b fails again
    assert (out / "predictions.csv").read_bytes() == whole
