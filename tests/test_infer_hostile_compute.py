"""Hostile slides at compute time (issue 12): each bad slide is one error row, bounded in time, and the good
slides of its folder and pack get exactly the rows of a clean run.

* overflow: finite features so large that the network overflows (NaN) must not contaminate the other slides
  of the pack, in the model graph (``segment_softmax_pool``, GATv2 padding) and in the runtime (a pack with a
  non-finite slide is re-run slide by slide, which also rescues older exported graphs: the toy model here
  still multiplies by a 0/1 mask);
* repeated coordinates are refused in O(N log N) instead of a quadratic neighbour search;
* ``--slide-timeout``: a stuck read (thread or process pool) or model call becomes a ``timeout`` row;
* a slide whose ``encoder`` attribute names another encoder than the model's is refused.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from momkd.cli.main import app
from momkd.data.batch import GraphSlide, graph_slide, load_graph_slide, pack_slides, same_encoder
from momkd.errors import SlideDuplicateCoordsError
from momkd.runtime.backends import OnnxRuntimeBackend
from momkd.runtime.pipeline import NON_FINITE_OUTPUT, run_inference
from momkd.runtime.reader import SlideReader
from momkd.synth import grid_coords
from momkd.testing.toy import build_toy_model_dir, write_slide_folder, write_trident_slide

from hostile_load import RELEASE, stuck_load

DIM = 16
SIZES = [30, 7, 55, 12]
runner = CliRunner()


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("toy") / "model"
    build_toy_model_dir(d, feature_dim=DIM, seed=3)
    return d


@pytest.fixture(scope="module")
def clean(tmp_path_factory, toy: Path) -> tuple[Path, dict[str, dict[str, str]]]:
    """The good slides alone, every slide in its own pack: (folder, rows by slide id)."""
    folder = tmp_path_factory.mktemp("clean")
    write_slide_folder(folder, SIZES, DIM, seed=1)
    out = tmp_path_factory.mktemp("clean_out")
    run_inference(toy, folder, out, batch_patches=1, reader="threads")
    return folder, rows(out)


def rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "predictions.csv", newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def hostile_folder(tmp_path: Path, name: str, features: np.ndarray, coords: np.ndarray, **attrs) -> Path:
    """The clean slides plus one hostile slide ``name`` (sorted between them)."""
    folder = tmp_path / "slides"
    write_slide_folder(folder, SIZES, DIM, seed=1)
    write_trident_slide(folder / f"{name}.h5", features, coords, **attrs)
    return folder


def assert_good_rows_are_clean(got: dict[str, dict[str, str]], clean_rows: dict[str, dict[str, str]]) -> None:
    for slide_id, want in clean_rows.items():
        assert got[slide_id]["status"] == "ok", got[slide_id]
        assert got[slide_id]["probability"] == want["probability"], slide_id


# --------------------------------------------------------------------------- 1. overflow inside the network
def test_overflowing_slide_is_one_row_and_its_pack_is_rescued(toy: Path, clean, tmp_path: Path) -> None:
    """The toy graph multiplies by a 0/1 mask (an old export): a 1e38 slide makes its whole pack NaN. The
    runtime re-runs that pack slide by slide: the good slides get exactly their clean rows, across --resume."""
    folder = hostile_folder(tmp_path, "slide_0015_overflow", np.full((20, DIM), 1e38, np.float32),
                            grid_coords(20, 9))
    args = ["infer", str(toy), str(folder), "--out", str(tmp_path / "out"), "--batch-patches", "100000",
            "--reader", "threads"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    got = rows(tmp_path / "out")
    bad = got.pop("slide_0015_overflow")
    assert bad["status"] == "error" and bad["error"] == f"inference: {NON_FINITE_OUTPUT}"
    assert_good_rows_are_clean(got, clean[1])
    again = runner.invoke(app, [*args, "--resume"])
    assert again.exit_code == 1 and "Traceback" not in again.output
    assert rows(tmp_path / "out")["slide_0015_overflow"] == bad


@pytest.mark.parametrize("preset_name", ["paper", "official"])
def test_model_masking_keeps_an_overflowing_slide_to_itself(preset_name: str) -> None:
    """In the MoMKD graph itself (per-slide softmax/pooling, GATv2 padding of the official reverse graph):
    a slide of 1e30 features is NaN, the others of its pack keep their alone-outputs (fp32 rounding)."""
    torch = pytest.importorskip("torch")
    from momkd.config import preset
    from momkd.models import build_model

    cfg = preset(preset_name)[0].replace(dim=16, heads=2, proj_dim=8, n_codes=4, classifier_hidden=8)
    torch.manual_seed(0)
    model = build_model(cfg, 24, 0).eval()
    rng = np.random.default_rng(0)
    goods = [graph_slide(f"g{i}", rng.standard_normal((n, 24)).astype(np.float32), grid_coords(n, i), 8,
                         cfg.graph_direction) for i, n in enumerate([30, 3, 50])]
    bad = graph_slide("bad", np.full((20, 24), 1e30, np.float32), grid_coords(20, 7), 8, cfg.graph_direction)

    def probabilities(slides: list[GraphSlide]) -> tuple[np.ndarray, np.ndarray]:
        p = pack_slides(slides)
        with torch.no_grad():
            out = model.forward_wsi(torch.from_numpy(p.features), torch.from_numpy(p.neighbors),
                                    torch.from_numpy(p.slide_offsets))
        return torch.softmax(out.logits, -1)[:, 1].numpy(), out.attention.numpy()

    packed, attention = probabilities([bad, *goods])   # the bad slide holds row 0: GATv2's old padding target
    assert np.isnan(packed[0]) and np.isnan(attention[:20]).all()
    assert np.isfinite(attention[20:]).all()
    alone = np.array([probabilities([g])[0][0] for g in goods])
    np.testing.assert_allclose(packed[1:], alone, rtol=0, atol=1e-6)


def test_segment_softmax_pool_is_bit_identical_and_nan_safe() -> None:
    torch = pytest.importorskip("torch")
    from momkd.kernels.reference import membership, segment_softmax_pool

    def multiplied(score, values, offsets, tau):   # the former formulation: products with the 0/1 mask
        m = membership(offsets, score.shape[0]).to(score.dtype)
        z = score / tau
        big = torch.finfo(score.dtype).max
        ex = torch.exp(z - (z.unsqueeze(0) * m + (m - 1.0) * big).amax(dim=1) @ m)
        attention = ex / ((m @ ex) @ m)
        return attention, (m * attention.unsqueeze(0)) @ values

    g = torch.Generator().manual_seed(0)
    score, values = torch.randn(900, generator=g), torch.randn(900, 32, generator=g)
    offsets = torch.tensor([0, 100, 100, 600, 900])
    for a, b in zip(multiplied(score, values, offsets, 0.3), segment_softmax_pool(score, values, offsets, 0.3)):
        assert torch.equal(a, b)
    single = torch.tensor([0, 900])
    for a, b in zip(multiplied(score, values, single, 0.3), segment_softmax_pool(score, values, single, 0.3)):
        assert torch.equal(a, b)
    hostile_score, hostile_values = score.clone(), values.clone()
    hostile_score[150] = float("nan")          # slide 2 (rows 100:600)
    hostile_values[700, 3] = float("inf")      # slide 3 (rows 600:900)
    attention, pooled = segment_softmax_pool(hostile_score, hostile_values, offsets, 0.3)
    clean_attention, clean_pooled = segment_softmax_pool(score, values, offsets, 0.3)
    assert torch.equal(attention[:100], clean_attention[:100]) and torch.equal(pooled[:2], clean_pooled[:2])
    assert torch.isnan(attention[100:600]).all() and torch.isnan(pooled[2:]).all()


def test_gatv2_padding_gathers_the_row_itself() -> None:
    torch = pytest.importorskip("torch")
    from momkd.models.gatv2 import neighbor_plan

    plan = neighbor_plan(torch.tensor([[1, -1], [0, -1], [-1, -1]]))
    assert plan.index.tolist() == [[0, 1, 0], [1, 0, 1], [2, 2, 2]]


# --------------------------------------------------------------------------- 2. repeated coordinates
@pytest.mark.parametrize("direction", ["paper", "official"])
def test_all_zero_coords_are_refused_in_seconds(toy: Path, clean, tmp_path: Path, direction: str) -> None:
    if direction == "official":
        pytest.importorskip("sklearn")
    model = tmp_path / "model"
    build_toy_model_dir(model, feature_dim=DIM, seed=3, direction=direction)
    folder = hostile_folder(tmp_path, "slide_0015_zeros", np.zeros((100_000, DIM), np.float32),
                            np.zeros((100_000, 2), np.int64), chunk_rows=None)
    t0 = time.perf_counter()
    summary = run_inference(model, folder, tmp_path / "out", batch_patches=1, reader="threads")
    assert time.perf_counter() - t0 < 30 and summary.exit_code == 1
    got = rows(tmp_path / "out")
    bad = got.pop("slide_0015_zeros")
    assert bad["error"] == ("duplicate_coords: coords repeat: 99999 of 100000 rows sit at the position of another "
                            "row (TRIDENT/CLAM write every patch once; a neighbour graph needs distinct patch "
                            "positions)")
    assert all(r["status"] == "ok" for r in got.values())
    if direction == "paper":
        assert_good_rows_are_clean(got, clean[1])


def test_training_refuses_repeated_coords_too(tmp_path: Path) -> None:
    """load_graph_slide is the training data path as well: the same refusal, naming the file."""
    coords = grid_coords(50, 0)
    coords[10] = coords[3]
    path = write_trident_slide(tmp_path / "dup.h5", np.ones((50, DIM), np.float32), coords)
    with pytest.raises(SlideDuplicateCoordsError, match=r"dup\.h5: coords repeat: 1 of 50 rows"):
        load_graph_slide(path, 8, "paper")


# --------------------------------------------------------------------------- 3. slide timeout
@pytest.mark.parametrize("pool,budget", [("threads", 1.0), pytest.param("processes", 5.0, marks=pytest.mark.slow)])
def test_a_stuck_read_becomes_a_timeout_row(toy: Path, clean, tmp_path: Path, monkeypatch, pool: str,
                                             budget: float) -> None:
    from momkd.runtime.reader import processes_supported

    if pool == "processes" and not processes_supported():
        pytest.skip("process pool needs Linux /dev/shm")
    monkeypatch.setattr(SlideReader, "load_fn", property(lambda self: stuck_load))
    folder = hostile_folder(tmp_path, "slide_0015_stuck", np.ones((5, DIM), np.float32), grid_coords(5, 0))
    notes: list[str] = []
    RELEASE.clear()
    try:
        t0 = time.perf_counter()
        summary = run_inference(toy, folder, tmp_path / "out", batch_patches=1, reader=pool,
                                workers=2 if pool == "threads" else 1, slide_timeout=budget, log=notes.append)
        elapsed = time.perf_counter() - t0
    finally:
        RELEASE.set()
    assert summary.exit_code == 1 and elapsed < budget + 20
    got = rows(tmp_path / "out")
    assert got.pop("slide_0015_stuck")["error"] == f"timeout: slide took more than {budget:g} s (reading)"
    assert_good_rows_are_clean(got, clean[1])
    abandoned = [n for n in notes if "still runs in a reader thread" in n]
    assert len(abandoned) == (1 if pool == "threads" else 0)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["slide_timeout_s"] == budget


def test_a_stuck_neighbour_graph_is_named(toy: Path, clean, tmp_path: Path, monkeypatch) -> None:
    import momkd.data.batch as batch

    real = batch.neighbor_table

    def stuck_on_13_rows(coords, k=8, direction="paper"):  # noqa: ANN001, ANN202
        if len(coords) == 13:
            RELEASE.wait(120)
        return real(coords, k, direction)

    monkeypatch.setattr(batch, "neighbor_table", stuck_on_13_rows)
    folder = hostile_folder(tmp_path, "slide_0015_graph", np.ones((13, DIM), np.float32), grid_coords(13, 0))
    RELEASE.clear()
    try:
        summary = run_inference(toy, folder, tmp_path / "out", batch_patches=1, reader="threads",
                                slide_timeout=1.0)
    finally:
        RELEASE.set()
    assert summary.exit_code == 1
    got = rows(tmp_path / "out")
    assert got.pop("slide_0015_graph")["error"] == "timeout: slide took more than 1 s (graph)"
    assert_good_rows_are_clean(got, clean[1])


class _SlowOnStuck:
    """The toy ONNX backend, but a call holding the ``stuck`` slide spins until cancelled (run_options)."""

    def __init__(self, inner: OnnxRuntimeBackend, stuck_rows: int) -> None:
        self.inner, self.stuck_rows = inner, stuck_rows
        self.name, self.device, self.detail = inner.name, inner.device, inner.detail
        self.max_rows = self.max_slides = None
        self.calls: list[int] = []

    def run_options(self):  # noqa: ANN201
        return self.inner.run_options()

    def run(self, features, neighbors, slide_offsets, run_options=None):  # noqa: ANN001, ANN201
        self.calls.append(len(slide_offsets) - 1)
        if self.stuck_rows in np.diff(slide_offsets):
            while not run_options.terminate:
                time.sleep(0.01)
            raise RuntimeError("Exiting due to terminate flag being set to true")
        return self.inner.run(features, neighbors, slide_offsets, run_options)

    def close(self) -> None:
        self.inner.close()


def test_a_model_call_past_the_budget_is_cancelled(toy: Path, clean, tmp_path: Path) -> None:
    folder = hostile_folder(tmp_path, "slide_0015_stuck", np.ones((17, DIM), np.float32), grid_coords(17, 0))
    be = _SlowOnStuck(OnnxRuntimeBackend(toy / "model.onnx"), stuck_rows=17)
    t0 = time.perf_counter()
    summary = run_inference(toy, folder, tmp_path / "out", batch_patches=100_000, backend_obj=be,
                            slide_timeout=0.5, reader="threads")
    assert summary.exit_code == 1 and time.perf_counter() - t0 < 20
    got = rows(tmp_path / "out")
    assert got.pop("slide_0015_stuck")["error"] == "timeout: slide took more than 0.5 s (model)"
    assert be.calls == [5, 1, 1, 1, 1, 1]   # the cancelled pack, then slide by slide (each with its own budget)
    for slide_id, want in clean[1].items():   # re-run alone: exactly the clean (one slide per pack) rows
        assert got[slide_id]["probability"] == want["probability"]


def test_onnxruntime_run_options_terminate_cancels_a_call(toy: Path) -> None:
    be = OnnxRuntimeBackend(toy / "model.onnx")
    p = pack_slides([graph_slide("s", np.ones((9, DIM), np.float32), grid_coords(9, 0), 8, "paper")])
    options = be.run_options()
    options.terminate = True
    with pytest.raises(Exception, match="terminate"):
        be.run(p.features, p.neighbors, p.slide_offsets, run_options=options)
    assert be.run(p.features, p.neighbors, p.slide_offsets, run_options=be.run_options())["probability"].shape == (1,)


def test_slide_timeout_must_not_be_negative(toy: Path, clean, tmp_path: Path) -> None:
    result = runner.invoke(app, ["infer", str(toy), str(clean[0]), "--out", str(tmp_path / "o"),
                                 "--slide-timeout", "-1"])
    assert result.exit_code == 2 and "Traceback" not in result.output


# --------------------------------------------------------------------------- 4. encoder mismatch
def test_same_encoder_ignores_case_and_punctuation() -> None:
    assert same_encoder("uni_v2", "UNI-v2") and same_encoder("Prov-GigaPath", "prov_gigapath")
    assert not same_encoder("gigapath", "uni_v2") and not same_encoder("conch_v15", "conch_v1")


def test_a_slide_from_another_encoder_is_refused(toy: Path, clean, tmp_path: Path) -> None:
    folder = hostile_folder(tmp_path, "slide_0015_gigapath", np.ones((6, DIM), np.float32), grid_coords(6, 0),
                            encoder="gigapath")
    write_trident_slide(folder / "slide_0016_upper.h5", np.ones((6, DIM), np.float32), grid_coords(6, 0),
                        encoder="TOY")
    base = ["infer", str(toy), str(folder), "--batch-patches", "1", "--reader", "threads"]
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    got = rows(tmp_path / "out")
    assert got.pop("slide_0015_gigapath")["error"].startswith(
        "encoder: encoder 'gigapath' does not match the model's 'toy'")
    assert got.pop("slide_0016_upper")["status"] == "ok"
    assert_good_rows_are_clean(got, clean[1])
    assert json.loads((tmp_path / "out" / "run.json").read_text())["allow_encoder_mismatch"] is False
    allowed = runner.invoke(app, [*base, "--out", str(tmp_path / "out2"), "--allow-encoder-mismatch"])
    assert allowed.exit_code == 0, allowed.output
    assert rows(tmp_path / "out2")["slide_0015_gigapath"]["status"] == "ok"
    assert json.loads((tmp_path / "out2" / "run.json").read_text())["allow_encoder_mismatch"] is True


def test_a_slide_without_an_encoder_attribute_is_accepted(toy: Path, tmp_path: Path) -> None:
    import h5py

    folder = tmp_path / "clam"
    folder.mkdir()
    with h5py.File(folder / "clam.h5", "w") as h5:   # CLAM: no attributes at all
        h5["features"] = np.ones((6, DIM), np.float32)
        h5["coords"] = grid_coords(6, 0).astype(np.int32)
    assert run_inference(toy, folder, tmp_path / "out", reader="threads").exit_code == 0
