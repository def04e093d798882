"""``momkd export``: frozen ensemble -> single-file ONNX (+ TorchScript twin, TensorRT where present), manifest,
self-verification on held-out slides.

The run folders here are built directly (random-initialised tiny models saved with ``save_checkpoint``, a tiny
cohort of TRIDENT-style .h5 files), so the tests do not depend on training; one ``slow`` test goes through real
training and ``momkd evaluate``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from typer.testing import CliRunner  # noqa: E402

from momkd.cli.main import app  # noqa: E402
from momkd.config import preset  # noqa: E402
from momkd.errors import ModelFolderError  # noqa: E402
from momkd.export.folder import export_run  # noqa: E402
from momkd.export.frozen import FrozenEnsemble, load_run  # noqa: E402
from momkd.export.onnx import FORBIDDEN_OPS, TRT_ALLOWED_OPS, graph_ops  # noqa: E402
from momkd.data.batch import GraphSlide, pack_slides  # noqa: E402
from momkd.export.verify import ExportVerificationError, verify_export  # noqa: E402
from momkd.manifest import load_manifest, sha256_file  # noqa: E402
from momkd.models import build_model  # noqa: E402
from momkd.train.checkpoint import save_checkpoint  # noqa: E402

runner = CliRunner()
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
IN_DIM, K = 16, 8
TINY = dict(dim=8, heads=2, proj_dim=4, n_codes=3, classifier_hidden=8, omics_hidden=8)
OUTPUTS = ("probability", "logits", "attention", "patch_score")


# --------------------------------------------------------------------------- a tiny finished run, built directly
def _grid_coords(rng: np.random.Generator, n: int) -> np.ndarray:
    side = int(np.ceil(np.sqrt(n)))
    cells = rng.permutation(side * side)[:n]
    return np.stack([cells % side, cells // side], axis=1).astype(np.int64) * 256


def make_run(root: Path, *, model: str = "momkd", preset_name: str = "paper", folds: int = 3, gat_impl: str = "dense",
             with_data: bool = True, seed: int = 0, in_dim: int = IN_DIM, sizes: list[int] | None = None,
             dims: dict | None = None) -> Path:
    """A finished run folder (config, splits, summary, fold_K checkpoints) over a tiny cohort of .h5 slides."""
    from momkd.synth import write_slide_h5

    rng = np.random.default_rng(seed)
    run = root / "run"
    data = root / "data"
    (data / "features").mkdir(parents=True)
    sizes = sizes or [40, 1, 5, 23, 60, 3, 17, 33, 9, 12, 28, 7]
    cases = [f"CASE-{i:02d}" for i in range(len(sizes))]
    labels = [i % 2 for i in range(len(sizes))]
    with (data / "cohort.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "slide_id", "status"])
        for case, label, n in zip(cases, labels, sizes):
            slide_id = f"{case}-DX1"
            feats = (rng.standard_normal((n, in_dim)) * 2 + (1.5 * label)).astype(np.float32)
            write_slide_h5(data / "features" / f"{slide_id}.h5", feats, _grid_coords(rng, n), encoder="tiny_enc")
            w.writerow([case, f"{slide_id}.svs", "pos" if label else "neg"])

    base, _ = preset(preset_name)
    cfg = base.replace(model=model, gat_impl=gat_impl, **(TINY if dims is None else dims))
    run.mkdir(parents=True)
    (run / "splits").mkdir()
    for k in range(folds):
        test = set(cases[k::folds])
        val = set(cases[(k + 1) % folds::folds]) - test
        with (run / "splits" / f"fold_{k}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case_id", "split", "label"])
            for case, label in zip(cases, labels):
                w.writerow([case, "test" if case in test else "val" if case in val else "train", label])
    (run / "config.json").write_text(json.dumps({
        "momkd_version": "0.1.0", "preset": preset_name,
        "data": {"cohort": str(data / "cohort.csv"), "features": str(data / "features"), "omics": None,
                 "label_col": "status", "positive": "pos"},
        "class_names": ["neg", "pos"], "feature_dim": in_dim, "encoder": "tiny_enc", "model": cfg.to_dict(),
    }))
    records = []
    for k in range(folds):
        torch.manual_seed(1000 * seed + k)
        net = build_model(cfg, in_dim, 5)
        with torch.no_grad():  # spread the logits so thresholds and flips mean something
            for p in net.parameters():
                p.mul_(1.5)
        threshold = [0.45, 0.5, 0.58, 0.4, 0.6][k % 5]
        metrics = {"auc": 0.5 + 0.1 * k, "acc": 0.6, "f1": 0.55 + 0.05 * k}
        record = {"fold": k, "threshold": threshold, "val": metrics, "test": metrics}
        records.append(record)
        save_checkpoint(run / f"fold_{k}", net.state_dict(), {
            "momkd_version": "0.1.0", "fold": k, "preset": preset_name, "model_config": cfg.to_dict(),
            "in_dim": in_dim, "omics_dim": 5, "class_names": ["neg", "pos"], "encoder": "tiny_enc",
            "threshold": threshold})
        (run / f"fold_{k}" / "metrics.json").write_text(json.dumps(record))
    keys = ("auc", "acc", "f1")
    mean = {key: float(np.mean([r["test"][key] for r in records])) for key in keys}
    std = {key: float(np.std([r["test"][key] for r in records], ddof=1)) if folds > 1 else 0.0 for key in keys}
    (run / "summary.json").write_text(json.dumps({"model": model, "preset": preset_name, "folds": records,
                                                  "mean": mean, "std": std}))
    if not with_data:
        shutil.rmtree(data)
    return run


def slide_batch(seed: int, sizes: list[int], width: int = K, direction: str = "paper") -> tuple[np.ndarray, ...]:
    """A packed batch of random slides with real neighbour tables (1-patch and < k+1-patch slides included)."""
    from momkd.graph import neighbor_table

    rng = np.random.default_rng(seed)
    slides = []
    for n in sizes:
        nb = neighbor_table(_grid_coords(rng, n), k=K, direction=direction)
        if nb.shape[1] < width:
            nb = np.concatenate([nb, np.full((n, width - nb.shape[1]), -1, np.int64)], axis=1)
        slides.append(GraphSlide(f"s{len(slides)}", (rng.standard_normal((n, IN_DIM)) * 2).astype(np.float32), nb, n))
    pack = pack_slides(slides)
    return pack.features, pack.neighbors, pack.slide_offsets


def run_onnx(path: Path, features: np.ndarray, neighbors: np.ndarray, offsets: np.ndarray,
             session: object | None = None) -> dict[str, np.ndarray]:
    session = session or ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values = session.run(list(OUTPUTS), {"features": features, "neighbors": neighbors, "slide_offsets": offsets})
    return dict(zip(OUTPUTS, values))


def run_torch(module: object, features: np.ndarray, neighbors: np.ndarray, offsets: np.ndarray
              ) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = module(torch.from_numpy(features), torch.from_numpy(neighbors), torch.from_numpy(offsets))
    return {k: v.numpy() for k, v in zip(OUTPUTS, out)}


# --------------------------------------------------------------------------- fixtures (one export each)
@pytest.fixture(scope="module")
def paper_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("paper"))


@pytest.fixture(scope="module")
def exported(paper_run: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("models") / "all"
    manifest = export_run(paper_run, out)
    return out, manifest


@pytest.fixture(scope="module")
def ensemble(paper_run: Path) -> FrozenEnsemble:
    return load_run(paper_run).ensemble()


@pytest.fixture(scope="module")
def session(exported):
    return ort.InferenceSession(str(exported[0] / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def fold1_cli(paper_run: Path, tmp_path_factory):
    """``momkd export RUN --format trt --fold 1``: without TensorRT it writes the ONNX folder and exits 2."""
    out = tmp_path_factory.mktemp("models") / "fold1"
    result = runner.invoke(app, ["export", str(paper_run), "--format", "trt", "--fold", "1", "--out", str(out)])
    return out, result


# --------------------------------------------------------------------------- the all-folds export
def test_manifest_describes_the_model(exported, paper_run: Path) -> None:
    out, manifest = exported
    loaded = load_manifest(out)  # verifies every checksum
    m = manifest["model"]
    assert m["feature_dim"] == IN_DIM and m["encoder"] == "tiny_enc"
    assert m["k"] == K and m["graph_direction"] == "paper" and m["preset"] == "paper"
    assert m["class_names"] == ["neg", "pos"]
    assert m["folds"] == [0, 1, 2]
    assert m["threshold"] == pytest.approx(np.mean([0.45, 0.5, 0.58]))
    summary = json.loads((paper_run / "summary.json").read_text())
    assert m["cv_metrics"]["mean"] == pytest.approx(summary["mean"])
    assert m["cv_metrics"]["std"] == pytest.approx(summary["std"])
    assert set(m["cv_metrics"]["folds"]) == {"0", "1", "2"}
    assert manifest["onnx"]["file"] == "model.onnx" and manifest["onnx"]["opset"] == 18
    assert manifest["onnx"]["precision"] == "fp32"
    assert manifest["onnx"]["inputs"] == {"features": ["N", IN_DIM], "neighbors": ["N", "W"], "slide_offsets": ["B+1"]}
    assert manifest["onnx"]["outputs"] == {"probability": ["B"], "logits": ["B", 2], "attention": ["N"],
                                           "patch_score": ["N"]}
    assert manifest["torch"]["file"] == "model.pt" and manifest["tensorrt"] is None
    assert loaded.format_version == 1 and loaded.model.folds == (0, 1, 2)


def test_verified_on_held_out_test_slides(exported, paper_run: Path) -> None:
    v = exported[1]["verification"]
    assert v["passed"] and v["source"] == "test_split" and not v["warnings"]
    test_cases = set()
    for k in range(3):
        with (paper_run / "splits" / f"fold_{k}.csv").open() as f:
            test_cases |= {r["case_id"] for r in csv.DictReader(f) if r["split"] == "test"}
    real = [s for s in v["slides"] if "edge case" not in s["note"]]
    assert real and all(s["slide_id"].rsplit("-DX", 1)[0] in test_cases for s in real)
    assert {s["n_patches"] for s in v["slides"]} >= {1, K}  # the edge-case crops
    assert v["onnx"]["max_abs_diff"]["probability"] <= 1e-5
    assert v["onnx"]["decision_flips"] == 0
    assert v["torch"]["max_abs_diff"]["probability"] <= 1e-6


def test_checksums_cover_every_file(exported, tmp_path: Path) -> None:
    out, manifest = exported
    files = {p.name for p in out.iterdir() if p.name not in ("manifest.json", "manifest.json.sha256")}
    assert files == {"model.onnx", "model.pt"} == set(manifest["artifacts"])
    for name, digest in manifest["artifacts"].items():
        assert sha256_file(out / name) == digest
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with (copy / "model.onnx").open("r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ModelFolderError, match="checksum"):
        load_manifest(copy)


def test_graph_is_single_file_and_tensorrt_friendly(exported) -> None:
    path = exported[0] / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    ops = set(graph_ops(model))
    assert not ops & {"ScatterElements", "ScatterND", "NonZero", "If", "Loop"}
    assert not ops & FORBIDDEN_OPS
    assert ops <= TRT_ALLOWED_OPS, ops - TRT_ALLOWED_OPS
    onnx.checker.check_model(model, full_check=True)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.input) + list(model.graph.output)}
    assert dims == {"features": ["N", IN_DIM], "neighbors": ["N", "W"], "slide_offsets": ["B+1"],
                    "probability": ["B"], "logits": ["B", 2], "attention": ["N"], "patch_score": ["N"]}


def test_onnx_matches_torch_on_packed_batches(session, ensemble) -> None:
    for seed, sizes in enumerate([[30, 1, 5, 8, 9, 47], [1], [3, 1, 1, 2], [250, 40, 7]]):
        batch = slide_batch(seed, sizes)
        got, want = run_onnx(None, *batch, session=session), run_torch(ensemble, *batch)
        assert got["probability"].shape == (len(sizes),) and got["logits"].shape == (len(sizes), 2)
        assert got["attention"].shape == (sum(sizes),)
        np.testing.assert_allclose(got["probability"], want["probability"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(got["attention"], want["attention"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got["patch_score"], want["patch_score"], atol=1e-4, rtol=0)
        sums = np.add.reduceat(got["attention"].astype(np.float64), batch[2][:-1])
        np.testing.assert_allclose(sums, 1.0, atol=1e-5)


def test_dynamic_shapes_and_padding_width(session) -> None:
    """One session serves any N, W and B; extra all -1 columns in the neighbour table change nothing."""
    seen = []
    for n_slides in (1, 2, 7):
        batch = slide_batch(10 + n_slides, [5 + 11 * i for i in range(n_slides)])
        base = run_onnx(None, *batch, session=session)
        wide = run_onnx(None, *slide_batch(10 + n_slides, [5 + 11 * i for i in range(n_slides)], width=K + 5),
                        session=session)
        np.testing.assert_allclose(wide["probability"], base["probability"], atol=1e-6)
        seen.append(base["probability"].shape[0])
    assert seen == [1, 2, 7]


def test_packed_equals_one_slide_at_a_time(session) -> None:
    sizes = [12, 1, 4, 30]
    packed = run_onnx(None, *slide_batch(3, sizes), session=session)["probability"]
    rng_batch = slide_batch(3, sizes)
    alone = []
    for b in range(len(sizes)):
        lo, hi = rng_batch[2][b], rng_batch[2][b + 1]
        nb = rng_batch[1][lo:hi]
        nb = np.where(nb >= 0, nb - lo, -1)
        alone.append(run_onnx(None, rng_batch[0][lo:hi], nb, np.array([0, hi - lo]), session=session)["probability"][0])
    np.testing.assert_allclose(packed, alone, atol=1e-6)


def test_tiny_slides_alone_match_the_eager_models(session, ensemble) -> None:
    """Packs of 1..9 rows (fewer rows than the exported attention's row blocks included) == the eager models."""
    for n in range(1, 10):
        batch = slide_batch(40 + n, [n])
        got, want = run_onnx(None, *batch, session=session), run_torch(ensemble, *batch)
        for name in OUTPUTS:
            np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=f"N={n} {name}")


def test_probability_is_the_mean_of_fold_probabilities(session, paper_run: Path) -> None:
    """What `momkd evaluate` reports: mean over folds of softmax(logits)[:, 1] (not softmax of mean logits)."""
    run = load_run(paper_run)
    batch = slide_batch(7, [20, 9, 1])
    tensors = [torch.from_numpy(a) for a in batch]
    with torch.no_grad():
        per_fold = [torch.softmax(m.forward_wsi(*tensors).logits.double(), -1)[:, 1].numpy() for m in run.models]
    np.testing.assert_allclose(run_onnx(None, *batch, session=session)["probability"], np.mean(per_fold, 0), atol=1e-5)


def test_torchscript_twin_matches(exported, ensemble) -> None:
    ts = torch.jit.load(str(exported[0] / "model.pt"))
    graph = str(ts.inlined_graph)
    assert 'value="cpu"' not in graph and "prim::device" in graph  # follows its inputs' device (CUDA too)
    # a traced repeat_interleave takes its count as a CPU tensor (from aten::size) and fails on CUDA inputs
    assert "aten::repeat_interleave" not in graph
    for seed, sizes in enumerate([[31, 1, 6], [2], [90, 90, 3, 4]]):
        batch = slide_batch(seed, sizes, width=K + seed)
        got, want = run_torch(ts, *batch), run_torch(ensemble, *batch)
        for name in OUTPUTS:
            np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_momkd_infer_runs_the_exported_folder(exported, paper_run: Path, ensemble, backend: str,
                                              tmp_path: Path) -> None:
    """The runtime reads the folder as exported: every slide of the cohort, probabilities == the PyTorch ensemble."""
    from momkd.data.slide import read_slide
    from momkd.graph import neighbor_table

    features_dir = Path(json.loads((paper_run / "config.json").read_text())["data"]["features"])
    result = runner.invoke(app, ["infer", str(exported[0]), str(features_dir), "--out", str(tmp_path / "pred"),
                                 "--backend", backend, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with (tmp_path / "pred" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows)
    threshold = exported[1]["model"]["threshold"]
    for row in rows:
        slide = read_slide(features_dir / row["file"])
        nb = neighbor_table(slide.coords, k=K, direction="paper")
        want = run_torch(ensemble, slide.features, nb, np.array([0, len(slide.features)]))["probability"][0]
        assert float(row["probability"]) == pytest.approx(float(want), abs=1e-5)
        assert row["prediction"] == ("pos" if float(row["probability"]) >= threshold else "neg")


def test_verification_fails_on_a_wrong_graph(exported, paper_run: Path) -> None:
    other = load_run(make_run(paper_run.parent / "other", seed=5)).ensemble()
    from momkd.export.verify import synthetic_slides

    slides = synthetic_slides(IN_DIM, K, "paper")
    with pytest.raises(ExportVerificationError, match="does not match"):
        verify_export(other, exported[0] / "model.onnx", None, slides, "synthetic", [], 0.5)


# --------------------------------------------------------------------------- --fold K through the CLI, trt path
def test_fold_k_export(fold1_cli, paper_run: Path, ensemble) -> None:
    out, result = fold1_cli
    manifest = load_manifest(out).raw
    assert manifest["model"]["folds"] == [1]
    assert manifest["model"]["threshold"] == pytest.approx(0.5)
    assert manifest["model"]["cv_metrics"]["folds"]["1"]["test"]["auc"] == pytest.approx(0.6)
    assert manifest["verification"]["passed"]
    fold1 = load_run(paper_run, 1).ensemble()
    batch = slide_batch(4, [14, 1, 6])
    got = run_onnx(out / "model.onnx", *batch)["probability"]
    np.testing.assert_allclose(got, run_torch(fold1, *batch)["probability"], atol=1e-5)
    assert not np.allclose(got, run_torch(ensemble, *batch)["probability"], atol=1e-4)


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the engine is built instead")
def test_trt_without_tensorrt_says_so(fold1_cli) -> None:
    out, result = fold1_cli
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "--format trt needs the 'tensorrt' package and a CUDA GPU (pip install momkd[gpu])" in lines[0]
    assert f"the ONNX model was still written to {out}" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert (out / "model.onnx").is_file() and not (out / "model.plan").exists()


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs the tensorrt package and a CUDA GPU")
def test_tensorrt_engine(paper_run: Path, tmp_path: Path) -> None:
    from momkd.export.tensorrt import Profile

    out = tmp_path / "trt"
    manifest = export_run(paper_run, out, fmt="trt", profile=Profile(rows=(1, 2000, 20000), width=(1, K, 16),
                                                                       slides=(1, 4, 16)))
    assert (out / "model.plan").is_file() and (out / "timing.cache").is_file()
    trt = manifest["tensorrt"]
    assert trt["file"] == "model.plan" and trt["precision"] == "fp32" and trt["tensorrt_version"]
    assert trt["profiles"][0]["features"]["max"] == [20000, IN_DIM]
    assert manifest["verification"]["tensorrt"]["max_abs_diff"]["probability"] <= 1e-4
    assert set(manifest["artifacts"]) == {"model.onnx", "model.pt", "model.plan", "timing.cache"}
    load_manifest(out)


class _FakeTensorRT:
    """Just enough of the TensorRT 10 Python API to record what ``build_engine`` asks of it."""

    __version__ = "10.fake"

    def __init__(self) -> None:
        fake = self
        self.calls: list[tuple] = []

        class Logger:
            WARNING = 2

            def __init__(self, level: int) -> None:
                fake.calls.append(("Logger", level))

        class BuilderFlag:
            FP16, TF32 = "FP16", "TF32"

        class MemoryPoolType:
            WORKSPACE = "WORKSPACE"

        class Profile:
            def set_shape(self, name, lo, opt, hi):  # noqa: ANN001, ANN201
                fake.calls.append(("set_shape", name, lo, opt, hi))

        class TimingCache:
            def serialize(self) -> bytes:
                return b"timing-cache"

        class Config:
            def set_flag(self, flag):  # noqa: ANN001, ANN201
                fake.calls.append(("set_flag", flag))

            def clear_flag(self, flag):  # noqa: ANN001, ANN201
                fake.calls.append(("clear_flag", flag))

            def set_memory_pool_limit(self, pool, size):  # noqa: ANN001, ANN201
                fake.calls.append(("pool", pool, size))

            def add_optimization_profile(self, profile):  # noqa: ANN001, ANN201
                return 0

            def create_timing_cache(self, data):  # noqa: ANN001, ANN201
                fake.calls.append(("create_timing_cache", bytes(data)))
                return TimingCache()

            def set_timing_cache(self, cache, ignore_mismatch):  # noqa: ANN001, ANN201
                return True

            def get_timing_cache(self):  # noqa: ANN201
                return TimingCache()

        class Builder:
            def __init__(self, logger) -> None:  # noqa: ANN001
                pass

            def create_network(self, flags):  # noqa: ANN001, ANN201
                fake.calls.append(("create_network", flags))
                return object()

            def create_builder_config(self):  # noqa: ANN201
                return Config()

            def create_optimization_profile(self):  # noqa: ANN201
                return Profile()

            def build_serialized_network(self, network, config):  # noqa: ANN001, ANN201
                return b"serialized-engine"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger) -> None:  # noqa: ANN001
                pass

            def parse_from_file(self, path):  # noqa: ANN001, ANN201
                fake.calls.append(("parse_from_file", path))
                return True

        self.Logger, self.BuilderFlag, self.MemoryPoolType = Logger, BuilderFlag, MemoryPoolType
        self.Builder, self.OnnxParser = Builder, OnnxParser


def test_tensorrt_build_path_with_a_stand_in_api(exported, paper_run: Path, tmp_path: Path, monkeypatch) -> None:
    """The engine build calls the TensorRT 10 API as documented (network from OnnxParser, one optimisation profile
    over N, W, B, FP16 flag, timing cache beside the plan) and the manifest gains its ``tensorrt`` entry. The
    engine is 'run' by ONNX Runtime here: only the orchestration is under test, not TensorRT."""
    import sys

    from momkd.export import folder, tensorrt as trt_mod
    from momkd.export.verify import synthetic_slides

    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    out = tmp_path / "trt"
    shutil.copytree(exported[0], out)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    monkeypatch.setattr(trt_mod, "engine_runner", lambda plan: lambda *batch: run_onnx(None, *batch, session=session))
    profile = trt_mod.Profile(rows=(1, 500, 5000), width=(1, K, 32), slides=(1, 4, 16))
    run = load_run(paper_run)
    manifest = folder._add_tensorrt(out, run, run.ensemble(), synthetic_slides(IN_DIM, K, "paper"), True, profile,
                                    lambda msg: None)
    assert (out / "model.plan").read_bytes() == b"serialized-engine"
    assert (out / "timing.cache").read_bytes() == b"timing-cache"
    assert ("set_flag", "FP16") in fake.calls and ("create_network", 0) in fake.calls
    assert ("set_shape", "features", (1, IN_DIM), (500, IN_DIM), (5000, IN_DIM)) in fake.calls
    assert ("set_shape", "neighbors", (1, 1), (500, K), (5000, 32)) in fake.calls
    assert ("set_shape", "slide_offsets", (2,), (5,), (17,)) in fake.calls
    loaded = load_manifest(out)
    trt = loaded.raw["tensorrt"]
    assert trt["file"] == "model.plan" and trt["precision"] == "fp16" and trt["tensorrt_version"] == "10.fake"
    assert trt["profiles"][0]["slide_offsets"] == {"min": [2], "opt": [5], "max": [17]}
    assert set(loaded.artifacts) == {"model.onnx", "model.pt", "model.plan", "timing.cache"}
    assert manifest["verification"]["tensorrt"]["passed"]


# --------------------------------------------------------------------------- other runs
def test_official_preset_pyg_run_exports(tmp_path_factory) -> None:
    """Reverse-kNN graph (variable W) and a run trained with PyG's GATv2Conv: exported through the dense layer,
    verified against the PyG model itself."""
    root = tmp_path_factory.mktemp("official")
    run = make_run(root, preset_name="official", gat_impl="pyg", folds=2)
    out = root / "model"
    manifest = export_run(run, out, fold=0, opset=20)
    assert manifest["onnx"]["opset"] == 20
    assert manifest["model"]["graph_direction"] == "official" and manifest["model"]["preset"] == "official"
    assert "converted from the PyG" in manifest["model"]["gat_impl"]
    assert manifest["verification"]["source"] == "test_split"
    assert manifest["verification"]["onnx"]["max_abs_diff"]["probability"] <= 1e-5
    reference = load_run(run, 0).ensemble()  # as trained: torch_geometric GATv2Conv
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for seed, sizes in enumerate([[50, 1, 6, 9], [3, 120]]):
        batch = slide_batch(seed, sizes, direction="official")
        got = run_onnx(None, *batch, session=session)
        want = run_torch(reference, *batch)
        np.testing.assert_allclose(got["probability"], want["probability"], atol=1e-5)
        np.testing.assert_allclose(got["attention"], want["attention"], atol=1e-5)


def test_abmil_run_exports_and_data_gone_is_reported(tmp_path_factory) -> None:
    root = tmp_path_factory.mktemp("abmil")
    run = make_run(root, model="abmil", folds=2, with_data=False)
    out = root / "model"
    result = runner.invoke(app, ["export", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "verified on synthetic inputs only" in " ".join(result.output.split())
    manifest = load_manifest(out).raw
    v = manifest["verification"]
    assert v["source"] == "synthetic" and v["passed"]
    assert any("cohort data not found" in w for w in v["warnings"])
    assert manifest["model"]["architecture"] == "abmil" and manifest["model"]["folds"] == [0, 1]
    batch = slide_batch(1, [25, 1, 4])
    np.testing.assert_allclose(run_onnx(out / "model.onnx", *batch)["probability"],
                               run_torch(load_run(run).ensemble(), *batch)["probability"], atol=1e-5)


def test_fp16_export_reports_deviation_and_flips(paper_run: Path, tmp_path: Path, ensemble) -> None:
    out = tmp_path / "fp16"
    manifest = export_run(paper_run, out, fold=0, fp16=True)
    assert manifest["onnx"]["precision"] == "fp16"
    v = manifest["verification"]["onnx"]
    assert v["precision"] == "fp16" and v["passed"]
    assert 0 < v["max_abs_diff"]["probability"] <= v["tolerance_probability"]
    assert isinstance(v["decision_flips"], int)
    model = onnx.load(str(out / "model.onnx"))
    f16 = onnx.TensorProto.FLOAT16
    assert any(t.data_type == f16 for t in model.graph.initializer)  # weights stored in fp16
    io_types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    assert io_types["features"] == onnx.TensorProto.FLOAT and io_types["probability"] == onnx.TensorProto.FLOAT
    batch = slide_batch(2, [40, 1, 7])
    fold0 = load_run(paper_run, 0).ensemble()
    np.testing.assert_allclose(run_onnx(out / "model.onnx", *batch)["probability"],
                               run_torch(fold0, *batch)["probability"], atol=2e-2)


# --------------------------------------------------------------------------- bad input
def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_missing_run_folder(tmp_path: Path) -> None:
    line = _one_line_error(runner.invoke(app, ["export", str(tmp_path / "nope"), "--out", str(tmp_path / "m")]))
    assert "does not exist" in line
    assert not (tmp_path / "m").exists()


def test_not_a_run_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    line = _one_line_error(runner.invoke(app, ["export", str(tmp_path / "empty"), "--out", str(tmp_path / "m")]))
    assert "no config.json" in line


def test_unfinished_run_folder(paper_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(paper_run, run)
    (run / "summary.json").unlink()
    line = _one_line_error(runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "m")]))
    assert "unfinished run" in line
    assert not (tmp_path / "m").exists()


def test_unknown_fold_and_bad_fold_value(paper_run: Path, tmp_path: Path) -> None:
    line = _one_line_error(runner.invoke(app, ["export", str(paper_run), "--fold", "7", "--out", str(tmp_path / "m")]))
    assert "no trained fold 7" in line
    line = _one_line_error(runner.invoke(app, ["export", str(paper_run), "--fold", "x", "--out", str(tmp_path / "m")]))
    assert "--fold" in line


def test_unsupported_opset(paper_run: Path, tmp_path: Path) -> None:
    line = _one_line_error(runner.invoke(app, ["export", str(paper_run), "--opset", "11",
                                               "--out", str(tmp_path / "m")]))
    assert "--opset 11 is not supported" in line
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.export-*"))


def test_refuses_a_non_empty_out_folder(exported, paper_run: Path) -> None:
    out = exported[0]
    line = _one_line_error(runner.invoke(app, ["export", str(paper_run), "--out", str(out)]))
    assert "not empty" in line and "--overwrite" in line
    load_manifest(out)  # untouched


# --------------------------------------------------------------------------- through real training
@pytest.mark.slow
def test_export_of_a_trained_run_matches_evaluate(tmp_path: Path, make_bad_slide_files) -> None:
    """Train 2 folds for 1 epoch on a synthetic cohort, evaluate, export: ONNX == evaluate's probability; then
    `momkd infer` with torch blocked over those slides plus every bad-file kind: one correct row per file."""
    pytest.importorskip("torch_geometric")
    from momkd.synth import make_synthetic_cohort

    synth = make_synthetic_cohort(tmp_path / "cohort", cases=16, feature_dim=IN_DIM, genes=40, patches=(20, 60))
    common = ["--cohort", str(synth.cohort_csv), "--features", str(synth.features_dir), "--label-col",
              synth.label_col, "--positive", synth.positive, "--device", "cpu"]
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", *common, "--omics", str(synth.omics_path), "--out", str(run), "--folds", "2",
                                 "--epochs", "1", "--memory-size", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["evaluate", str(run), *common, "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    out = tmp_path / "model"
    result = runner.invoke(app, ["export", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(out).raw
    assert manifest["verification"]["source"] == "test_split"
    assert manifest["verification"]["onnx"]["max_abs_diff"]["probability"] <= 1e-4

    from momkd.data.slide import read_slide
    from momkd.graph import neighbor_table

    with (tmp_path / "eval" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for row in rows[:6]:
        slide = read_slide(synth.features_dir / f"{row['slide_id']}.h5")
        nb = neighbor_table(slide.coords, k=manifest["model"]["k"], direction=manifest["model"]["graph_direction"])
        p = run_onnx(None, slide.features, nb, np.array([0, len(slide.features)]), session=session)["probability"][0]
        assert p == pytest.approx(float(row["probability"]), abs=1e-5)
        expected = manifest["model"]["class_names"][int(p >= manifest["model"]["threshold"])]
        assert expected == row["prediction"] or abs(p - manifest["model"]["threshold"]) < 1e-5

    # the exported folder in the lean runtime, torch blocked, over the good slides plus every bad-file kind
    mixed = tmp_path / "mixed"
    shutil.copytree(synth.features_dir, mixed)
    bad = make_bad_slide_files(mixed, IN_DIM)
    before = {p.name: p.read_bytes() for p in mixed.iterdir()}
    code = "import sys; sys.modules['torch'] = None; from momkd.cli.main import app; app()"
    cmd = [sys.executable, "-c", code, "infer", str(out), str(mixed), "--out", str(tmp_path / "pred"), "--quiet"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 1, first.stderr
    assert "Traceback" not in first.stderr + first.stdout
    with (tmp_path / "pred" / "predictions.csv").open() as f:
        inferred = {r["file"]: r for r in csv.DictReader(f)}
    assert sorted(inferred) == sorted(before)
    evaluated = {row["slide_id"]: row for row in rows}
    for name, row in inferred.items():
        if name.startswith("bad_"):
            assert row["status"] == "error" and row["probability"] == ""
            assert row["error"].split(":")[0] == next(k for k, p in bad.items() if p.name == name).split("/")[0]
        else:
            assert row["status"] == "ok", row
            assert float(row["probability"]) == pytest.approx(float(evaluated[row["slide_id"]]["probability"]),
                                                              abs=1e-4)
            assert row["prediction"] == evaluated[row["slide_id"]]["prediction"]
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 1, again.stderr
    assert f"{len(evaluated)} kept from an earlier run" in again.stdout
    with (tmp_path / "pred" / "predictions.csv").open() as f:
        assert sorted(r["file"] for r in csv.DictReader(f)) == sorted(before)
    assert {p.name: p.read_bytes() for p in mixed.iterdir()} == before  # inputs untouched


def test_work_folders_of_killed_exports_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    """A kill -9 leaves the hidden work folder beside the model folder; the next export to that name removes it,
    but never the work folder of an export still running (it holds the folder's lock), nor another name's."""
    import os

    from momkd.export.folder import _lock_folder, remove_stale_work

    out = tmp_path / "model[1]"   # glob characters in the name are taken literally
    stale, live, other = (tmp_path / name for name in (".model[1].export-dead", ".model[1].export-live",
                                                      ".model.export-x"))
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"partial")
    fd = _lock_folder(live)
    assert fd is not None
    try:
        lines: list[str] = []
        assert remove_stale_work(out, lines.append) == [stale]
        assert not stale.exists() and live.is_dir() and other.is_dir()
        assert lines == [f"removed {stale} (left by an export that was killed)"]
    finally:
        os.close(fd)
    assert remove_stale_work(out, lambda _m: None) == [live]   # its export ended without cleaning up


@pytest.mark.slow
def test_an_export_killed_mid_run_leaves_nothing_the_next_one_keeps(paper_run: Path, tmp_path: Path) -> None:
    """`kill -9` of a real `momkd export` while it works: no model folder appears, and the next export to the same
    --out removes the hidden work folder it left."""
    import signal
    import time

    from momkd.testing.process import reaped

    out = tmp_path / "m"
    cmd = [sys.executable, "-c", "from momkd.cli.main import app; app()", "export", str(paper_run), "--out", str(out)]
    with reaped(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)) as proc:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".m.export-*/model.onnx")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the export ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    left = list(tmp_path.glob(".m.export-*"))
    assert len(left) == 1 and not out.exists()
    result = runner.invoke(app, ["export", str(paper_run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"removed {left[0]} (left by an export that was killed)" in " ".join(result.output.split())
    assert not list(tmp_path.glob(".m.export-*")) and (out / "manifest.json").is_file()
