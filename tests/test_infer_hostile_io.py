"""`momkd infer` against a hostile file system: a busy or full or read-only output folder, file names and directory
entries that are not slides or cannot be written as they are, files rewritten behind --resume's back, CSV cells
a spreadsheet would run, SIGTERM, empty folders, and the read-ahead budget of compressed files.

Every case asserts the guarantee: one correct row per ``.h5`` entry, the exit code as documented, one line and no
traceback on stderr, and the good slides' probabilities equal to those of a clean run."""

from __future__ import annotations

import csv
import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from momkd.cli.main import app
from momkd.runtime import outdir
from momkd.runtime.discover import discover_slides, escaped
from momkd.runtime.outdir import LOCK_FILE, OutputLock
from momkd.runtime.reader import ReaderConfig, SlideReader, processes_supported
from momkd.runtime.results import COLUMNS, LEGACY_COLUMNS, ResultRow, ResultsWriter, read_predictions
from momkd.testing.toy import build_toy_model_dir, write_slide_folder
from momkd.testing.process import reaped

DIM = 8
runner = CliRunner()
SIZES = [5, 9, 3, 7]


def infer(model: Path, folder: Path, out: Path, *extra: str):
    """``momkd infer`` in-process; one slide per pack, so that a slide's probability never depends on which
    other slides a run holds (packs of other slides may differ in the last float32 bits)."""
    return runner.invoke(app, ["infer", str(model), str(folder), "--out", str(out), "--workers", "1",
                               "--batch-patches", "1", *extra])


def csv_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def probabilities(out: Path) -> dict[str, str]:
    return {r.slide_id: r.probability for r in read_predictions(out / "predictions.csv") if r.status == "ok"}


def one_error_line(result) -> str:
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture()
def good(tmp_path: Path) -> Path:
    write_slide_folder(tmp_path / "in", SIZES, DIM)
    return tmp_path / "in"


@pytest.fixture()
def clean(toy_model_dir: Path, good: Path, tmp_path: Path) -> dict[str, str]:
    """The good slides' probabilities from a clean run."""
    result = infer(toy_model_dir, good, tmp_path / "clean", "-q")
    assert result.exit_code == 0, result.output
    return probabilities(tmp_path / "clean")


# -- 1. one run per output folder ------------------------------------------------------------------------------

def test_a_busy_output_folder_is_refused_and_left_untouched(toy_model_dir: Path, good: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out):
        result = infer(toy_model_dir, good, out, "-q")
        assert result.exit_code == 2
        line = one_error_line(result)
        assert f"{out} is in use by another momkd infer (pid {os.getpid()}, started " in line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    assert list(out.iterdir()) == []                        # released: the lock file is gone
    assert infer(toy_model_dir, good, out, "-q").exit_code == 0
    assert not (out / LOCK_FILE).exists()


def test_a_lock_left_by_a_killed_run_does_not_block(toy_model_dir: Path, good: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    code = ("import sys, time; from pathlib import Path; from momkd.runtime.outdir import OutputLock; "
            "OutputLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    with reaped(proc):
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        assert infer(toy_model_dir, good, out, "-q").exit_code == 2       # alive: refused
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (out / LOCK_FILE).read_text().startswith(f"pid {proc.pid}, started ")   # left behind by the kill
    result = infer(toy_model_dir, good, out, "-q")
    assert result.exit_code == 0, result.output
    assert len(csv_rows(out)) == len(SIZES)


def test_resume_refuses_another_input_folder(toy_model_dir: Path, good: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert infer(toy_model_dir, good, out, "-q").exit_code == 0
    write_slide_folder(tmp_path / "other", [4], DIM)
    result = infer(toy_model_dir, tmp_path / "other", out, "-q", "--resume")
    assert result.exit_code == 2 and "made for another input folder" in one_error_line(result)
    assert len(csv_rows(out)) == len(SIZES)                  # the earlier rows stand


# -- 2. --resume notices a rewritten file ----------------------------------------------------------------------

def test_resume_redoes_a_file_rewritten_with_the_same_size_and_mtime(toy_model_dir: Path, good: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert infer(toy_model_dir, good, out, "-q").exit_code == 0
    before = probabilities(out)
    target = good / "slide_001.h5"
    st = target.stat()
    with h5py.File(target, "r+") as f:                       # same shapes, so the same size: new values
        f["features"][...] = -f["features"][()]
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))    # and the old mtime
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    result = infer(toy_model_dir, good, out, "--resume")
    assert result.exit_code == 0 and f"{len(SIZES) - 1} kept from an earlier run" in result.stdout
    after = probabilities(out)
    assert after["slide_001"] != before["slide_001"]
    assert {k: v for k, v in after.items() if k != "slide_001"} == {k: v for k, v in before.items()
                                                                     if k != "slide_001"}


def test_resume_after_an_older_momkd_redoes_everything_without_error(toy_model_dir: Path, good: Path,
                                                                     clean: dict[str, str], tmp_path: Path) -> None:
    import json

    out = tmp_path / "out"
    assert infer(toy_model_dir, good, out, "-q").exit_code == 0
    info = json.loads((out / "run.json").read_text())
    info["files"] = {rel: stamp[:2] for rel, stamp in info["files"].items()}     # (size, mtime_ns) stamps
    (out / "run.json").write_text(json.dumps(info))
    rows = [line.rsplit(",", 1)[0] for line in (out / "predictions.csv").read_text().splitlines()]
    (out / "predictions.csv").write_text("\n".join(rows) + "\n")                # no threshold column
    assert rows[0] == ",".join(LEGACY_COLUMNS)
    result = infer(toy_model_dir, good, out, "--resume")
    assert result.exit_code == 0 and "kept" not in result.stdout, result.output
    assert probabilities(out) == clean and tuple(csv_rows(out)[0]) == COLUMNS


# -- 3. entries that are not slides, names that cannot be rows as they are -------------------------------------

CONTROL_NAMES = ["cr\rname.h5", "nl\nname.h5", "tab\tname.h5", "esc\x1bname.h5"]


def _hostile_folder(good: Path) -> dict[str, str]:
    """Plant every hostile entry into ``good``; returns the CSV ``file`` value -> expected error code."""
    os.symlink("loop.h5", good / "loop.h5")
    os.symlink("nowhere.h5", good / "dangling.h5")
    os.rename(good / "slide_002.h5", os.path.join(os.fsencode(good), b"bad\xff.h5"))
    expected = {"loop.h5": "unreadable", "dangling.h5": "unreadable", "bad\\xff.h5": "bad_name"}
    for i, name in enumerate(CONTROL_NAMES):
        write_slide_folder(good, [4], DIM, prefix=f"ctl{i}")
        os.rename(good / f"ctl{i}_000.h5", good / name)
        expected[escaped(name)] = "bad_name"
    (good / "folder.h5").mkdir()
    (good / "folder.h5" / "inner.h5").write_bytes(b"")
    (good / "other.hdf5").write_bytes((good / "slide_000.h5").read_bytes())
    return expected


def test_hostile_entries_are_rows_or_notes_and_the_run_goes_on(toy_model_dir: Path, good: Path,
                                                               clean: dict[str, str], tmp_path: Path) -> None:
    expected = _hostile_folder(good)
    out = tmp_path / "out"
    result = infer(toy_model_dir, good, out, "--save-attention")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert f"{len(SIZES) - 1} ok, {len(expected)} failed" in result.stdout
    assert "folder.h5 is a folder, not a slide file" in result.stderr
    assert "other.hdf5 skipped: slide files must end in .h5" in result.stderr
    rows = read_predictions(out / "predictions.csv")
    by_file = {r.file: r for r in rows}
    assert len(rows) == len(by_file) == len(SIZES) - 1 + len(expected)       # one row per .h5 entry
    for file, code in expected.items():
        assert by_file[file].status == "error" and by_file[file].error.startswith(code + ":"), by_file[file]
    assert by_file["cr\\rname.h5"].slide_id == "cr\\rname"
    assert all(c.isprintable() for r in rows for c in r.file + r.slide_id + r.error)
    good_ids = {"slide_000", "slide_001", "slide_003"}
    assert probabilities(out) == {k: v for k, v in clean.items() if k in good_ids}
    assert sorted(p.stem for p in (out / "attention").iterdir()) == sorted(good_ids)
    again = infer(toy_model_dir, good, out, "--save-attention", "--resume")     # our own CSV reads back
    assert again.exit_code == 1 and f"{len(SIZES) - 1} kept" in again.stdout, again.output
    assert read_predictions(out / "predictions.csv") == rows


def test_recursive_notes_symlinked_and_unlisted_folders(toy_model_dir: Path, good: Path, tmp_path: Path) -> None:
    os.symlink(".", good / "self")
    (good / "sub").mkdir()
    write_slide_folder(good / "sub", [4], DIM, prefix="deep")
    notes: list[str] = []
    files = discover_slides(good, recursive=True, note=notes.append)
    assert [f.rel for f in files] == [f"slide_{i:03d}.h5" for i in range(len(SIZES))] + ["sub/deep_000.h5"]
    assert notes == ["note: self is a symlink to a folder: not followed"]
    result = infer(toy_model_dir, good, tmp_path / "out", "-r", "-q")
    assert result.exit_code == 0 and len(csv_rows(tmp_path / "out")) == len(SIZES) + 1


def test_a_name_near_name_max_keeps_its_attention_file(toy_model_dir: Path, good: Path,
                                                      clean: dict[str, str], tmp_path: Path) -> None:
    name_max = os.pathconf(good, "PC_NAME_MAX")
    long_name = "L" * (name_max - 3) + ".h5"                   # fits, and so does its attention file
    os.rename(good / "slide_003.h5", good / long_name)
    out = tmp_path / "out"
    plain = infer(toy_model_dir, good, out, "-q")
    assert plain.exit_code == 0, plain.output
    result = infer(toy_model_dir, good, tmp_path / "att", "--save-attention")
    assert result.exit_code == 0, result.output              # the temporary name is capped (momkd.atomic)
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert probabilities(tmp_path / "att") == probabilities(out)
    assert (tmp_path / "att" / "attention" / long_name).is_file()
    assert [p.name for p in (tmp_path / "att" / "attention").iterdir() if p.name.startswith(".")] == []


# -- 4. a full, read-only or unwritable output folder ----------------------------------------------------------

def test_no_space_for_an_attention_file_is_one_line_and_resumable(toy_model_dir: Path, good: Path,
                                                                 clean: dict[str, str], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    calls = []

    def nearly_full(path):                                   # room for the first two attention files only
        calls.append(path)
        return usage(1 << 30, 1 << 30, 1 << 40) if len(calls) <= 2 else usage(1 << 30, 1 << 30, 1000)

    monkeypatch.setattr(outdir.shutil, "disk_usage", nearly_full)
    out = tmp_path / "out"
    result = infer(toy_model_dir, good, out, "--save-attention")
    assert result.exit_code == 2, result.output
    assert one_error_line(result) == f"error: no space left on {out}; free space and rerun with --resume"
    done = read_predictions(out / "predictions.csv")
    assert [r.slide_id for r in done] == ["slide_000", "slide_001"]
    assert not [p for p in (out / "attention").iterdir() if p.name.startswith(".")]     # no temp file left
    monkeypatch.setattr(outdir.shutil, "disk_usage", real)
    again = infer(toy_model_dir, good, out, "--save-attention", "--resume", "-q")
    assert again.exit_code == 0 and "2 kept" in again.stdout
    assert probabilities(out) == clean


@pytest.mark.parametrize("code,message", [(errno.ENOSPC, "no space left on {out}; free space and rerun with --resume"),
                                          (errno.EDQUOT, "no space left on {out}; free space and rerun with --resume"),
                                          (errno.EROFS, "{out}: read-only file system; choose another --out")])
def test_a_failing_append_is_one_line_naming_out(toy_model_dir: Path, good: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, code: int, message: str) -> None:
    real = os.fsync
    calls = []

    def failing_fsync(fd: int) -> None:                      # the disk fills up after the first append
        calls.append(fd)
        if len(calls) > 6:
            raise OSError(code, os.strerror(code))
        real(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    out = tmp_path / "out"
    result = infer(toy_model_dir, good, out, "-q")
    assert result.exit_code == 2, result.output
    assert one_error_line(result) == "error: " + message.format(out=out)


def test_read_only_output_folder_is_one_line(toy_model_dir: Path, good: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    out.mkdir()
    if os.geteuid() != 0:                                    # a real one (root writes through permissions)
        out.chmod(0o555)
        try:
            result = infer(toy_model_dir, good, out, "-q")
        finally:
            out.chmod(0o755)
        assert result.exit_code == 2
        assert one_error_line(result) == (f"error: {out}: permission denied writing into it; fix its permissions or "
                                          "choose another --out")
    import tempfile

    def read_only(*args, dir=None, **kwargs):               # what a read-only mount answers
        raise OSError(errno.EROFS, "Read-only file system", os.path.join(str(dir), ".predictions.csv.x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    result = infer(toy_model_dir, good, out, "-q")
    assert result.exit_code == 2
    assert one_error_line(result) == f"error: {out}: read-only file system; choose another --out"
    assert ".tmp" not in result.stderr


# -- 5. the read-ahead budget counts decoded bytes -------------------------------------------------------------

def _zipped_folder(folder: Path, n: int = 4096, d: int = 256) -> list:
    folder.mkdir()
    for i in range(4):
        with h5py.File(folder / f"z{i}.h5", "w") as f:       # 4 MiB of features each, a few KiB on disk
            f.create_dataset("features", data=np.zeros((n, d), np.float32), compression="gzip", chunks=(512, d))
            f.create_dataset("coords", data=np.stack([np.arange(n), np.zeros(n)], 1).astype(np.int64))
    files = discover_slides(folder)
    assert all(f.path.stat().st_size < 200_000 for f in files)
    return files


@pytest.mark.parametrize("pool", ["threads", "processes"])
def test_read_ahead_budget_counts_decoded_sizes(tmp_path: Path, pool: str) -> None:
    if pool == "processes" and not processes_supported():
        pytest.skip("the processes pool needs Linux /dev/shm")
    n, d = 4096, 256
    files = _zipped_folder(tmp_path / "zipped", n, d)
    reader = SlideReader(files, ReaderConfig(feature_dim=d, k=8), workers=2, max_inflight_bytes=6 << 20, pool=pool)
    try:
        assert reader._size(files[0]) == n * (4 * d + 16 + 8 * 8)
        assert len(reader._pending) == 2                     # 2 x 4.6 MiB reach the 6 MiB budget; on-disk: all 4
        assert [item.slide_id for item in reader] == ["z0", "z1", "z2", "z3"]
    finally:
        reader.close()


def crash_on_z1_header(path: Path, k: int) -> int:
    """Header function for the crash test: dies like a segfaulting HDF5 on z1's header."""
    if Path(path).name == "z1.h5":
        os._exit(11)
    from momkd.runtime.reader import decoded_size

    return decoded_size(path, k)


class _HeaderCrashingReader(SlideReader):
    @property
    def header_fn(self):
        return crash_on_z1_header


@pytest.mark.skipif(not processes_supported(), reason="the processes pool needs Linux /dev/shm")
def test_a_header_that_crashes_hdf5_costs_only_its_estimate(tmp_path: Path) -> None:
    n, d = 4096, 256
    files = _zipped_folder(tmp_path / "zipped", n, d)
    reader = _HeaderCrashingReader(files, ReaderConfig(feature_dim=d, k=8), workers=2, max_inflight_bytes=6 << 20,
                                   pool="processes")
    try:                                                     # that request's estimates: the sizes on disk
        assert [size for _, _, size in reader._pending] == [f.path.stat().st_size for f in files]
        assert [item.slide_id for item in reader] == ["z0", "z1", "z2", "z3"]                      # all read
    finally:
        reader.close()


# -- 6. SIGTERM stops like Ctrl-C ------------------------------------------------------------------------------

_SLOW_INFER = """
import sys, time
from pathlib import Path
from momkd.runtime import backends

marker = Path(sys.argv.pop(1))
real = backends.OnnxRuntimeBackend.run

def slow(self, *args, **kwargs):
    out = real(self, *args, **kwargs)
    marker.write_text("ran")
    time.sleep(0.4)
    return out

backends.OnnxRuntimeBackend.run = slow
from momkd.cli.main import app
app()
"""


def test_sigterm_exits_143_with_rows_kept_and_resume_completes(toy_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    write_slide_folder(folder, [4] * 12, DIM)
    assert infer(toy_model_dir, folder, tmp_path / "whole", "-q").exit_code == 0
    out, marker = tmp_path / "out", tmp_path / "ran"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_INFER, str(marker), "infer", str(toy_model_dir), str(folder),
                             "--out", str(out), "--batch-patches", "1", "--workers", "1", "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MOMKD_DEBUG": ""})
    with reaped(proc):
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (f"terminated: finished rows are in {out}/predictions.csv; rerun with "
                                               "--resume to finish")
    done = read_predictions(out / "predictions.csv")
    whole = {r.file: r for r in read_predictions(tmp_path / "whole" / "predictions.csv")}
    assert 0 < len(done) < 12 and all(r == whole[r.file] for r in done)
    assert not (out / LOCK_FILE).exists()
    result = infer(toy_model_dir, folder, out, "--resume", "-q")
    assert result.exit_code == 0 and f"{len(done)} kept" in result.stdout
    assert (out / "predictions.csv").read_bytes() == (tmp_path / "whole" / "predictions.csv").read_bytes()


def test_every_command_turns_sigterm_into_its_interrupted_message() -> None:
    import typer

    from momkd.cli.errors import TERMINATED, handle_errors

    before = signal.getsignal(signal.SIGTERM)
    reached_finally = []

    @handle_errors(interrupted="{out} is incomplete; rerun the same command")
    def command(out: str) -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)                                      # the handler raises before this ends
        finally:
            reached_finally.append(True)

    with pytest.raises(typer.Exit) as exit_info:
        command("RUN")
    assert exit_info.value.exit_code == TERMINATED == 143 and reached_finally == [True]
    assert signal.getsignal(signal.SIGTERM) == before           # the handler is only there while a command runs


# -- 7. spreadsheet-safe, exact CSV; outputs honour the umask --------------------------------------------------

def test_formula_cells_are_marked_and_read_back_exactly(tmp_path: Path) -> None:
    w = ResultsWriter(tmp_path, 6)
    values = ["=HYPERLINK(\"x\")", "+1", "-2", "@SUM(A1)", "'quoted", "plain"]
    for i, v in enumerate(values):
        w.set(i, ResultRow.ok(v, v + ".h5", 3, 0.5, "cls\rwith CR" if i == 0 else v, threshold=0.5))
    w.flush()
    with open(tmp_path / "predictions.csv", newline="") as f:
        cells = list(csv.reader(f))[1:]
    assert [c[0] for c in cells] == ["'=HYPERLINK(\"x\")", "'+1", "'-2", "'@SUM(A1)", "''quoted", "plain"]
    assert cells[0][6] == "cls\rwith CR"                     # quoted: the record stays one record
    got = read_predictions(tmp_path / "predictions.csv")
    assert [(r.slide_id, r.file) for r in got] == [(v, v + ".h5") for v in values]
    assert got[0].prediction == "cls\rwith CR"


def test_formula_names_and_class_names_round_trip_through_resume(good: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    build_toy_model_dir(model, feature_dim=DIM, class_names=("-neg", "=pos"), threshold=0.48)
    os.rename(good / "slide_000.h5", good / "=cmd.h5")
    os.rename(good / "slide_001.h5", good / "-dash.h5")
    out = tmp_path / "out"
    assert infer(model, good, out, "-q").exit_code == 0
    raw = (out / "predictions.csv").read_text()
    assert "\n'-dash,'-dash.h5,ok," in raw and "\n'=cmd,'=cmd.h5,ok," in raw
    assert not any(cell.startswith(("=", "+", "-", "@")) for line in raw.splitlines()
                   for cell in next(csv.reader([line])))
    rows = read_predictions(out / "predictions.csv")
    assert {r.slide_id for r in rows} == {"=cmd", "-dash", "slide_002", "slide_003"}
    assert {r.prediction for r in rows} <= {"-neg", "=pos"} and {r.threshold for r in rows} == {"0.48"}
    again = infer(model, good, out, "-q", "--resume")
    assert again.exit_code == 0 and "4 kept" in again.stdout
    assert (out / "predictions.csv").read_text() == raw


def test_outputs_honour_the_umask(toy_model_dir: Path, tmp_path: Path) -> None:
    write_slide_folder(tmp_path / "one", [6], DIM)
    out = tmp_path / "out"
    old = os.umask(0o027)
    try:
        result = infer(toy_model_dir, tmp_path / "one", out, "-q", "--save-attention", "--heatmaps")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    paths = [out, *out.rglob("*")]
    assert {p.name for p in paths} >= {"predictions.csv", "run.json", "attention", "heatmaps", "heatmaps.csv",
                                       "slide_000.h5", "slide_000.png"}
    for p in paths:
        want = 0o750 if p.is_dir() else 0o640
        assert stat.S_IMODE(p.stat().st_mode) == want, p


# -- 8. an empty or mistyped folder; the threshold column ------------------------------------------------------

def test_empty_or_mistyped_folder_is_a_usage_error(toy_model_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = infer(toy_model_dir, empty, tmp_path / "out")
    assert result.exit_code == 2 and one_error_line(result) == f"error: no .h5 files in {empty}"
    nested = tmp_path / "nested"
    write_slide_folder(nested / "batch1", [4], DIM)
    result = infer(toy_model_dir, nested, tmp_path / "out")
    assert result.exit_code == 2
    assert one_error_line(result) == (f"error: no .h5 files in {nested} (did you mean --recursive? its subfolders "
                                      "hold some)")
    result = infer(toy_model_dir, empty, tmp_path / "out", "--recursive")
    assert one_error_line(result) == f"error: no .h5 files in {empty} or its subfolders"
    assert not (tmp_path / "out").exists()


def test_threshold_column(good: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    build_toy_model_dir(model, feature_dim=DIM, threshold=0.48)
    (good / "broken.h5").write_bytes(b"")
    assert infer(model, good, tmp_path / "out", "-q").exit_code == 1
    rows = csv_rows(tmp_path / "out")
    assert tuple(rows[0]) == COLUMNS and COLUMNS[-1] == "threshold"
    for r in rows:
        if r["status"] == "ok":
            assert r["threshold"] == "0.48"
            assert r["prediction"] == ("positive" if float(r["probability"]) >= 0.48 else "negative")
        else:
            assert r["threshold"] == "" and r["probability"] == ""
