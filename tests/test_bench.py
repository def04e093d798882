"""``momkd bench`` and its FLOP count: the ONNX Runtime profile count equals FlopCounterMode on the PyTorch model,
the table and JSON on CPU (ONNX Runtime and torch backends), the run without PyTorch, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from momkd.cli.main import app
from momkd.errors import MomkdError
from momkd.runtime.flops import FlopCountError, count_matmul_flops, product_flops

runner = CliRunner()
IN_DIM = 24
TINY = dict(dim=16, heads=2, proj_dim=8, n_codes=4, classifier_hidden=8)
RECORD_KEYS = {"backend", "device", "precision", "n_patches", "slides_per_pack", "rows", "median_ms", "p90_ms",
               "slides_per_s", "gflop_per_slide", "gflop_per_s", "max_abs_dprob", "status", "note", "machine"}


def _export(root: Path, preset_name: str, folds: int) -> tuple[Path, Path]:
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from momkd.export.folder import export_run
    from momkd.export.synthetic import random_run

    run = random_run(root / "run", preset_name, IN_DIM, folds, dims=TINY)
    export_run(run, root / "model")
    return run, root / "model"


@pytest.fixture(scope="module")
def paper_model(tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, exported model folder): paper preset, 2 folds, tiny dims, random weights."""
    return _export(tmp_path_factory.mktemp("bench_paper"), "paper", 2)


def _pack(sizes: list[int], direction: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from momkd.runtime.bench import synthetic_pack
    from momkd.data.batch import GraphSlide, pack_slides

    slides = []
    for i, n in enumerate(sizes):
        one = synthetic_pack(n, 1, IN_DIM, 8, direction, seed=i)
        slides.append(GraphSlide(f"s{i}", one.features, one.neighbors, n, index=i))
    pack = pack_slides(slides)
    return pack.features, pack.neighbors, pack.slide_offsets


# --------------------------------------------------------------------------- FLOP count
def torch_flops(module, features: np.ndarray, neighbors: np.ndarray, offsets: np.ndarray) -> int:  # noqa: ANN001
    """FlopCounterMode's count of one eager call, matrix-vector products included (it leaves them out)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    def mv_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
        return 2 * a_shape[0] * a_shape[1]

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.mv: mv_flop}) as counter, torch.no_grad():
        module(torch.from_numpy(features), torch.from_numpy(neighbors), torch.from_numpy(offsets))
    return counter.get_total_flops()


def score_permutation_flops(module, n: int, width: int) -> int:  # noqa: ANN001
    """The exported attention permutes each row's (k+1, H) slot scores with a 0/1 product (``gatv2._transposer``)
    where the eager model transposes them: 2 n ((k+1) H)^2 FLOPs per GATv2 layer that ONNX Runtime counts."""
    from momkd.models.gatv2 import DenseGATv2Conv

    return sum(2 * n * ((width + 1) * conv.heads) ** 2 for conv in module.modules() if isinstance(conv, DenseGATv2Conv))


@pytest.mark.parametrize("preset_name", ["paper", "official"])
def test_flop_count_equals_flop_counter_mode(preset_name: str, paper_model, tmp_path: Path) -> None:
    """Same inputs, same model: the ONNX Runtime profile count == FlopCounterMode on the eager fold models."""
    pytest.importorskip("torch")
    from momkd.export.frozen import load_run

    run, model = paper_model if preset_name == "paper" else _export(tmp_path, "official", 1)
    # 96 rows, a multiple of EXPORT_ROW_BLOCKS: otherwise the graph's attention also runs its few padded rows
    features, neighbors, offsets = _pack([60, 3, 33], "paper" if preset_name == "paper" else "official")
    counted = count_matmul_flops(model / "model.onnx", features, neighbors, offsets)
    ensemble = load_run(run).ensemble()
    permutation = score_permutation_flops(ensemble, len(features), neighbors.shape[1])
    assert permutation > 0
    assert counted == torch_flops(ensemble, features, neighbors, offsets) + permutation
    if preset_name == "paper":  # two folds: twice one fold's count
        one = load_run(run, 0).ensemble()
        assert counted == 2 * (torch_flops(one, features, neighbors, offsets)
                               + score_permutation_flops(one, len(features), neighbors.shape[1]))


def test_product_flops_reads_k_from_the_listed_operand() -> None:
    assert product_flops("Gemm", [(100, 64), (32,)], (100, 32)) == 2 * 100 * 32 * 64        # B pre-packed, bias listed
    assert product_flops("MatMul", [(100, 64)], (100, 8)) == 2 * 100 * 8 * 64                # only A listed
    assert product_flops("MatMul", [(64, 8)], (100, 8)) == 2 * 100 * 8 * 64                  # only B listed
    assert product_flops("MatMul", [(100, 8)], (100, 8)) == 2 * 100 * 8 * 8                   # square: A
    assert product_flops("FusedMatMul", [(50, 9, 2), (50, 9, 16)], (50, 2, 16)) == 2 * 50 * 2 * 16 * 9   # transA
    assert product_flops("MatMul", [(3,), (3, 40)], (40,)) == 2 * 40 * 3                      # 1-D A
    assert product_flops("MatMul", [(3, 40), (40,)], (3,)) == 2 * 3 * 40                      # 1-D B
    assert product_flops("MatMul", [(7, 1, 40), (40, 5)], (7, 1, 5)) == 2 * 7 * 5 * 40        # batched A
    with pytest.raises(FlopCountError, match="cannot count FLOPs of Gemm"):
        product_flops("Gemm", [], (4, 4))


# --------------------------------------------------------------------------- momkd bench on CPU
def test_bench_cpu_table_and_json(paper_model, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench", str(paper_model[1]), "--patches", "40,7", "--slides-per-pack", "1,3",
                                 "--precision", "fp32,bf16", "--repeat", "2", "--warmup", "1", "--json", str(out),
                                 "-q"])
    assert result.exit_code == 0, result.output
    for column in ("backend", "device", "precision", "median ms", "p90 ms", "slides/s", "GFLOP/s", "max |Δp|",
                   "status"):
        assert column in result.output
    assert "fp32 matmul roofline" in result.output
    records = json.loads(out.read_text())
    assert all(RECORD_KEYS <= set(r) for r in records)
    ok = [r for r in records if r["status"] == "ok"]
    targets = {(r["backend"], r["device"], r["precision"]) for r in ok}
    assert targets == {("onnxruntime", "cpu", "fp32"), ("torch", "cpu", "fp32"), ("torch", "cpu", "bf16")}
    assert len(ok) == 3 * 4
    for r in ok:
        assert r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"] * 0.5 and r["slides_per_s"] > 0
        assert r["rows"] == r["n_patches"] * r["slides_per_pack"] and r["gflop_per_s"] > 0
        tolerance = 2e-2 if r["precision"] == "bf16" else 1e-5
        assert r["max_abs_dprob"] <= tolerance, r
    by_shape: dict = {}
    for r in ok:  # one FLOP count per pack shape, the same for every backend
        by_shape.setdefault((r["n_patches"], r["slides_per_pack"]), set()).add(r["gflop_per_slide"])
    assert all(len(v) == 1 for v in by_shape.values())
    # per slide, packing adds only the (B, N) membership products of the per-slide softmax and pooling
    assert min(by_shape[(40, 1)]) < min(by_shape[(40, 3)]) < 1.2 * min(by_shape[(40, 1)])
    skipped = {(r["backend"], r["device"], r["precision"]): r["note"] for r in records if r["status"] == "skipped"}
    assert "model.onnx is fp32" in skipped[("onnxruntime", "cpu", "bf16")]
    assert "TensorRT" in skipped[("tensorrt", "cuda", "fp32")]


def test_bench_without_torch_runs_onnx_without_dprob(paper_model, tmp_path: Path) -> None:
    code = ("import sys; sys.modules['torch'] = None\n"
            "from momkd.cli.main import app\n"
            "app()\n")
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-c", code, "bench", str(paper_model[1]), "--patches", "30",
                        "--slides-per-pack", "2", "--repeat", "2", "--warmup", "0", "--precision", "fp32",
                        "--json", str(out), "-q"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    records = json.loads(out.read_text())
    ort = [x for x in records if x["backend"] == "onnxruntime" and x["status"] == "ok"]
    assert len(ort) == 1 and ort[0]["max_abs_dprob"] is None and ort[0]["gflop_per_slide"] > 0
    assert [x["note"] for x in records if x["backend"] == "torch"] == ["PyTorch is not installed"] * 2
    assert "not checked" in r.stdout


def test_bench_max_rows_and_failed_targets(paper_model, monkeypatch) -> None:
    from momkd.runtime import bench

    records = bench.run_bench(paper_model[1], [50], [2], ["onnxruntime"], ["cpu"], ["fp32"], repeat=1, warmup=0,
                              max_rows=60)
    assert [(r.status, r.note) for r in records] == [("skipped", "pack of 100 rows > --max-rows 60")]

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise MomkdError("backend would not start")

    monkeypatch.setattr(bench, "open_backend", broken)
    result = runner.invoke(app, ["bench", str(paper_model[1]), "--patches", "5", "--slides-per-pack", "1",
                                 "--backends", "onnxruntime", "--devices", "cpu", "--precision", "fp32", "-q"])
    assert result.exit_code == 1
    assert "failed: backend would not start" in result.output


@pytest.mark.parametrize("args,message", [
    (["--patches", "10,abc"], "--patches: 'abc' is not a positive integer"),
    (["--slides-per-pack", "0"], "--slides-per-pack: '0' is not a positive integer"),
    (["--backends", "onnx"], "--backends: unknown value 'onnx'"),
    (["--precision", "fp8"], "--precision: unknown value 'fp8'"),
    (["--devices", "tpu"], "--devices: unknown value 'tpu'"),
])
def test_bench_bad_options_are_one_line_errors(paper_model, args: list[str], message: str) -> None:
    result = runner.invoke(app, ["bench", str(paper_model[1]), *args])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output


def test_bench_missing_model_folder_and_json_folder(paper_model, tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "error:" in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["bench", str(paper_model[1]), "--json", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output


# --------------------------------------------------------------------------- benchmarks/report.py
def test_report_script_tables_and_plot(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report",
                                                  Path(__file__).parents[1] / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    bench = [{"backend": "onnxruntime", "device": "cpu", "precision": "fp32", "n_patches": n, "slides_per_pack": 1,
              "median_ms": n / 100, "gflop_per_s": 50.0, "max_abs_dprob": 1e-7, "status": "ok"} for n in (100, 1000)]
    bench.append({"backend": "torch", "device": "cuda", "precision": "fp32", "n_patches": None, "status": "skipped"})
    stats = {"median": 0.002, "rounds": 5}
    pytest_json = {"benchmarks": [
        {"name": "lat", "stats": stats, "extra_info": {"suite": "latency", "backend": "torch", "device": "cpu",
                                                       "precision": "fp32", "n_patches": 100, "transfers": True}},
        {"name": "h1", "stats": stats, "extra_info": {"suite": "head", "impl": "unfused", "precision": "fp32",
                                                      "preset": "paper", "n_patches": 100, "device": "cuda",
                                                      "device_ms": 1.0}},
        {"name": "h2", "stats": stats, "extra_info": {"suite": "head", "impl": "fused", "input_precision": "tf32x3",
                                                      "precision": "fp32", "preset": "paper", "n_patches": 100,
                                                      "device": "cuda", "device_ms": 0.25}},
        {"name": "train", "fullname": "test_train_step[20000-paper]", "stats": stats, "extra_info": {}},
        {"name": "roof", "stats": stats, "extra_info": {
            "suite": "roofline", "n_patches": 20000, "feature_dim": 1536, "median_ms": 500.0, "gflop": 50.0,
            "achieved_gflop_per_s": 100.0, "roofline_gflop_per_s": 200.0, "roofline_fraction": 0.5,
            "roofline_engines": {"numpy": 200.0}, "matrix_products_ms": 300.0, "profiled_ms": 490.0,
            "top_ops_ms": {"Gemm": 250.0}, "products_only_fraction": 0.83, "neighbourhood_ms": 150.0,
            "without_neighbourhood_fraction": 0.7,
            "largest_product": {"shape": [20000, 1536, 768], "ms": 250.0, "gflop": 47.2,
                                "roofline_fraction": 0.94}}},
    ]}
    (tmp_path / "b.json").write_text(json.dumps(bench))
    (tmp_path / "p.json").write_text(json.dumps(pytest_json))
    argv = [str(tmp_path / "p.json"), f"second={tmp_path / 'b.json'}", "--md", str(tmp_path / "r.md")]
    if importlib.util.find_spec("matplotlib"):
        argv += ["--png", str(tmp_path / "r.png")]
    assert report.main(argv) == 0
    text = (tmp_path / "r.md").read_text()
    assert "| onnxruntime cpu fp32 [second] | 1000 | 10.00 |" in text
    assert "| torch cpu fp32 | 100 | 2.00 |" in text
    assert "| paper | fp32 | cuda | 100 | fused tf32x3 0.250, unfused 1.000 | 4.00 |" in text
    assert "test_train_step[20000-paper]" in text
    assert "**50%** of 200.0 GFLOP/s" in text
    assert "With every non-product node free: 83%" in text
    assert "per-edge (W+1) nodes 150.0 ms (if they took no time: 70%)" in text
    if "--png" in argv:
        assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "bad.json").write_text("{}")
    assert report.main([str(tmp_path / "bad.json")]) == 2
