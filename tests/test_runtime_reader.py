"""The reader pools: file order, bounded read-ahead, threads and processes give identical results, the
process pool's shared memory never outlives its arrays, and a worker that crashes costs only its own file."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np
import pytest

from momkd.runtime.discover import discover_slides
from momkd.data.batch import GraphSlide
from momkd.runtime.pipeline import run_inference
from momkd.runtime.reader import ReaderConfig, SlideFailure, SlideReader, load_shared, processes_supported
from momkd.testing.toy import build_toy_model_dir, write_slide_folder

DIM = 8
needs_shm = pytest.mark.skipif(not processes_supported(), reason="process reader needs Linux /dev/shm")


def _leftovers() -> list[str]:
    return glob.glob(f"/dev/shm/momkd-{os.getpid()}-*")


def crash_on_crash_files(file, cfg):
    """Worker function for the crash test: dies like a segfaulting HDF5 on files named crash*."""
    if file.slide_id.startswith("crash"):
        os._exit(11)
    return load_shared(file, cfg)


class CrashingReader(SlideReader):
    @property
    def load_fn(self):
        return crash_on_crash_files


@pytest.fixture()
def folder(tmp_path: Path) -> tuple[Path, dict]:
    return tmp_path / "in", write_slide_folder(tmp_path / "in", [5, 30, 2, 17, 9, 11], DIM)


@pytest.mark.parametrize("pool", ["threads", pytest.param("processes", marks=needs_shm)])
def test_file_order_and_contents(folder, pool: str) -> None:
    path, data = folder
    files = discover_slides(path)
    reader = SlideReader(files, ReaderConfig(DIM), workers=2, max_inflight_bytes=1, pool=pool)  # 1 in flight
    got = list(reader)
    assert [g.slide_id for g in got] == sorted(data)
    for g in got:
        assert isinstance(g, GraphSlide)
        np.testing.assert_array_equal(g.features, data[g.slide_id][0])
        assert g.neighbors.shape == (g.n, 8) and g.neighbors.dtype == np.int64
    del got
    assert _leftovers() == []


@needs_shm
def test_processes_and_threads_write_the_same_csv(folder, tmp_path: Path) -> None:
    model = tmp_path / "model"
    build_toy_model_dir(model, feature_dim=DIM)
    a = run_inference(model, folder[0], tmp_path / "a", reader="threads", batch_patches=40)
    b = run_inference(model, folder[0], tmp_path / "b", reader="processes", batch_patches=40)
    assert (a.reader, b.reader) == ("threads", "processes")
    assert (tmp_path / "a" / "predictions.csv").read_bytes() == (tmp_path / "b" / "predictions.csv").read_bytes()
    assert _leftovers() == []


@needs_shm
def test_a_crashing_worker_costs_only_its_file(tmp_path: Path) -> None:
    path = tmp_path / "in"
    write_slide_folder(path, [4, 6, 8], DIM, prefix="a")
    write_slide_folder(path, [5], DIM, prefix="crash")
    write_slide_folder(path, [7, 3], DIM, prefix="z")
    files = discover_slides(path)
    got = list(CrashingReader(files, ReaderConfig(DIM), workers=2, pool="processes"))
    ids = [g.file.slide_id if isinstance(g, SlideFailure) else g.slide_id for g in got]
    assert ids == [f.slide_id for f in files]
    kinds = dict(zip(ids, (type(g).__name__ for g in got)))
    assert kinds.pop("crash_000") == "SlideFailure" and set(kinds.values()) == {"GraphSlide"}
    failure = next(g for g in got if isinstance(g, SlideFailure))
    assert failure.code == "crashed" and "crashed" in failure.message
    del got
    assert _leftovers() == []


@needs_shm
def test_closing_early_frees_shared_memory(folder) -> None:
    import time

    reader = SlideReader(discover_slides(folder[0]), ReaderConfig(DIM), workers=2, pool="processes")
    first = reader.take()
    assert isinstance(first, GraphSlide)
    reader.close()
    deadline = time.time() + 20
    while _leftovers() and time.time() < deadline:   # results still arriving are freed as they land
        time.sleep(0.05)
    assert _leftovers() == []
