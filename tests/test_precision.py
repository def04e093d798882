"""Reduced precision on the CPU: host flags and usable CPUs (``momkd.runtime.cpu``), the int8 twin
(``momkd.export.quantize``), its accuracy gates (``momkd.export.gates``) and the manifest section, and the
runtime's choice (``--precision auto|fp32|int8|bf16``, recorded in run.json; ``momkd bench`` rows).

Torch-free except the one ``slow`` end-to-end export: the model is the toy graph (``momkd.testing.toy``, two
MatMuls with constant weights), the cohort a few .h5 slides with a fold split written here.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from momkd.errors import ModelFolderError  # noqa: E402
from momkd.export.gates import (GateError, GateLimits, GateSlide, fold_slides, gate_report,  # noqa: E402
                                slide_probabilities)
from momkd.export.quantize import (INT8_NAME, QuantizationError, add_reduced_graphs, check_precisions,  # noqa: E402
                                   gemms_as_matmuls, large_products, quantize_int8)
from momkd.manifest import load_manifest, write_manifest  # noqa: E402
from momkd.runtime import cpu  # noqa: E402
from momkd.runtime.backends import BackendError, OnnxRuntimeBackend, choose_precision  # noqa: E402
from momkd.synth import grid_coords, write_slide_h5  # noqa: E402
from momkd.testing.toy import build_toy_model_dir, write_slide_folder  # noqa: E402

DIM, HIDDEN, K = 16, 32, 8
LOOSE = GateLimits(max_abs_dp=1.0, max_flips=1000, max_abs_dauc=1.0)
TIGHT = GateLimits(max_abs_dp=0.0, max_flips=0, max_abs_dauc=0.0)
VNNI_HOST = cpu.CpuInfo("Test CPU with VNNI", frozenset({"avx2", "avx512f", "avx512_vnni"}), 4, None)
OLD_HOST = cpu.CpuInfo("Test CPU without VNNI", frozenset({"avx2"}), 4, None)


# --------------------------------------------------------------------------- helpers
def cohort_run(root: Path, n_cases: int = 8, dim: int = DIM) -> tuple[Path, dict[str, Any]]:
    """A run folder with one fold split (train / val / test cases) over a cohort of .h5 slides; (run, config)."""
    rng = np.random.default_rng(0)
    features, run = root / "features", root / "run"
    features.mkdir(parents=True)
    (run / "splits").mkdir(parents=True)
    split = ["train", "train", "val", "val", "test", "test", "test", "val"]
    with (root / "cohort.csv").open("w", newline="") as f, (run / "splits" / "fold_0.csv").open("w", newline="") as g:
        cohort, splits = csv.writer(f), csv.writer(g)
        cohort.writerow(["case_id", "slide_id", "status"])
        splits.writerow(["case_id", "split", "label"])
        for i in range(n_cases):
            n, label = 30 + 7 * i, i % 2
            write_slide_h5(features / f"CASE-{i}-DX1.h5",
                           (rng.standard_normal((n, dim)) + label).astype(np.float32), grid_coords(n, i))
            cohort.writerow([f"CASE-{i}", f"CASE-{i}-DX1.svs", "pos" if label else "neg"])
            splits.writerow([f"CASE-{i}", split[i % len(split)], label])
    config = {"data": {"cohort": str(root / "cohort.csv"), "features": str(features), "label_col": "status",
                       "positive": "pos"}}
    return run, config


def fake_run(config: dict[str, Any], threshold: float = 0.5) -> SimpleNamespace:
    """The attributes of a loaded run that the gates read."""
    return SimpleNamespace(config=config, folds=[0], k=K, graph_direction="paper", feature_dim=DIM,
                           threshold=threshold)


def toy_folder_with_int8(root: Path, limits: GateLimits = LOOSE, force: bool = False) -> tuple[Path, list[str]]:
    """A toy model folder plus its int8 twin, gated on a cohort's val/test slides as export does it."""
    model = root / "model"
    build_toy_model_dir(model, feature_dim=DIM, hidden=HIDDEN)
    run, config = cohort_run(root / "cohort")
    manifest = dict(load_manifest(model).raw)
    failures = add_reduced_graphs(model, "model.onnx", fake_run(config), run, manifest, ["fp32", "int8"], limits,
                                  force, [], lambda _m: None)
    write_manifest(model, manifest)
    return model, failures


@pytest.fixture(scope="module")
def int8_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, failures = toy_folder_with_int8(tmp_path_factory.mktemp("int8"))
    assert failures == []
    return model


# --------------------------------------------------------------------------- host CPU
def test_cpuinfo_flags_and_isa() -> None:
    text = "processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_tile amx_int8\n" \
           "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n"
    name, flags = cpu.parse_cpuinfo(text)
    assert name == "Some Xeon" and {"avx512_vnni", "amx_int8"} <= flags and "fpu" in flags
    info = cpu.CpuInfo(name, frozenset(f for f in cpu.REPORTED_FLAGS if f in flags), 2, None)
    assert info.isa == "amx" and info.int8_isa == "amx_int8" and info.bf16_isa is None
    assert OLD_HOST.isa == "avx2" and OLD_HOST.int8_isa is None
    assert cpu.parse_cpuinfo("") == ("", frozenset())
    assert cpu.cpu_info().usable_cpus >= 1


def test_cgroup_quota_v2_and_v1(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    (v2 / "job" / "step").mkdir(parents=True)
    (v2 / "cpu.max").write_text("max 100000\n")
    (v2 / "job" / "cpu.max").write_text("250000 100000\n")
    (v2 / "job" / "step" / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "cgroup2"
    proc.write_text("0::/job/step\n")
    assert cpu.cgroup_cpu_quota(v2, proc) == 2.5       # the tightest ancestor counts

    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "box").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "box" / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu,cpuacct" / "box" / "cpu.cfs_period_us").write_text("100000\n")
    proc1 = tmp_path / "cgroup1"
    proc1.write_text("4:memory:/x\n1:cpu,cpuacct:/box\n")
    assert cpu.cgroup_cpu_quota(v1, proc1) == 0.5
    (v1 / "cpu,cpuacct" / "box" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu.cgroup_cpu_quota(v1, proc1) is None
    assert cpu.cgroup_cpu_quota(v1, tmp_path / "missing") is None


def test_usable_cpus_rounds_the_quota_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu, "affinity_cpus", lambda: 8)
    monkeypatch.setattr(cpu, "cgroup_cpu_quota", lambda: 2.5)
    assert cpu.usable_cpus() == 3
    monkeypatch.setattr(cpu, "cgroup_cpu_quota", lambda: 0.2)
    assert cpu.usable_cpus() == 1
    monkeypatch.setattr(cpu, "cgroup_cpu_quota", lambda: None)
    assert cpu.usable_cpus() == 8


def test_thread_environment_keeps_the_users_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    applied = cpu.apply_thread_environment(threads=4)
    assert applied == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


# --------------------------------------------------------------------------- the int8 graph
def test_gemm_rewrite_is_exact(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w, b = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="g", transB=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    assert large_products(model) == ["g"]
    assert gemms_as_matmuls(model, {"g"}) == {"g": "g__matmul"}
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add"]
    onnx.checker.check_model(model)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ w.T + b, rtol=1e-5, atol=1e-5)


def test_split_product_becomes_one_product_per_part() -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from momkd.export.quantize import split_products

    rng = np.random.default_rng(2)
    w, b = rng.standard_normal((6, 5)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="g", transB=1),
             helper.make_node("Split", ["y", "sizes"], ["y0", "y1"], name="s", axis=1),
             helper.make_node("Mul", ["y0", "y1"], ["out"], name="m")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
                               numpy_helper.from_array(np.array([3, 3], np.int64), "sizes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    x = rng.standard_normal((6, 5)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert split_products(model, {"g"}) == {"g": ["g__part0", "g__part1"]}
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Gemm", "Mul"]
    onnx.checker.check_model(model)
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(after[0], before[0], rtol=1e-6, atol=1e-6)
    assert split_products(model, {"m"}) == {}   # not a product feeding a split: left alone


def test_int8_graph_is_quantised_and_close(tmp_path: Path) -> None:
    import onnx

    build_toy_model_dir(tmp_path / "m", feature_dim=DIM, hidden=HIDDEN)
    info = quantize_int8(tmp_path / "m" / "model.onnx", tmp_path / INT8_NAME)
    assert len(info["quantized_nodes"]) == 2          # W1 (16 x 32) and W2 (32 x 32); not the (32 x 1) score
    ops = {n.op_type for n in onnx.load(str(tmp_path / INT8_NAME)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    rng = np.random.default_rng(1)
    features = rng.standard_normal((50, DIM)).astype(np.float32)
    from momkd.graph import neighbor_table

    nb = neighbor_table(grid_coords(50, 0), k=K, direction="paper")
    offsets = np.array([0, 50], np.int64)
    fp32 = OnnxRuntimeBackend(tmp_path / "m" / "model.onnx").run(features, nb, offsets)
    int8 = OnnxRuntimeBackend(tmp_path / INT8_NAME).run(features, nb, offsets)
    assert 0 < abs(float(int8["probability"][0]) - float(fp32["probability"][0])) < 0.05
    with pytest.raises(QuantizationError, match="no such product"):
        quantize_int8(tmp_path / "m" / "model.onnx", tmp_path / "x.onnx", nodes=["not_a_node"])


def edge_graph(path: Path, dim: int = DIM, channels: int = HIDDEN) -> None:
    """A small graph with the momkd inputs and one per-edge block as the GATv2 attention has it: x_l gathered
    by the neighbour table, + x_r[i], relu, summed over the slots; a sigmoid score as its output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    weights = {"wl": rng.standard_normal((dim, channels)), "wr": rng.standard_normal((dim, channels)),
               "wo": rng.standard_normal((channels, 1)) / channels}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    inits += [numpy_helper.from_array(np.array([-1], np.int64), "flat"),
              numpy_helper.from_array(np.array([channels], np.int64), "c"),
              numpy_helper.from_array(np.array([1], np.int64), "one"),
              numpy_helper.from_array(np.array([0], np.int64), "zero")]
    nodes = [helper.make_node("MatMul", ["features", "wl"], ["xl"], name="lin_l"),
             helper.make_node("MatMul", ["features", "wr"], ["xr"], name="lin_r"),
             helper.make_node("Reshape", ["neighbors", "flat"], ["index"], name="flatten_index"),
             helper.make_node("Gather", ["xl", "index"], ["xj"], name="gather"),
             helper.make_node("Shape", ["neighbors"], ["nw"], name="shape"),
             helper.make_node("Concat", ["nw", "c"], ["nwc"], name="concat", axis=0),
             helper.make_node("Reshape", ["xj", "nwc"], ["xj3"], name="view"),
             helper.make_node("Unsqueeze", ["xr", "one"], ["xr3"], name="unsqueeze"),
             helper.make_node("Add", ["xj3", "xr3"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r"], name="relu"),
             helper.make_node("ReduceSum", ["r", "one"], ["pooled_rows"], name="sum_slots", keepdims=0),
             helper.make_node("MatMul", ["pooled_rows", "wo"], ["score"], name="score"),
             helper.make_node("ReduceMean", ["score", "zero"], ["mean"], name="mean", keepdims=0),
             helper.make_node("Sigmoid", ["mean"], ["probability"], name="sigmoid")]
    graph = helper.make_graph(nodes, "edges", [
        helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", dim]),
        helper.make_tensor_value_info("neighbors", TensorProto.INT64, ["N", "W"]),
        helper.make_tensor_value_info("slide_offsets", TensorProto.INT64, ["B_plus_1"])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, [1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))


def edge_slides(n_slides: int, dim: int = DIM) -> list[SimpleNamespace]:
    from momkd.graph import neighbor_table

    rng = np.random.default_rng(5)
    slides = []
    for i in range(n_slides):
        n = 40 + 9 * i
        slides.append(SimpleNamespace(features=rng.standard_normal((n, dim)).astype(np.float32), n=n,
                                      neighbors=neighbor_table(grid_coords(n, i), k=K, direction="paper")))
    return slides


def test_per_edge_nodes_are_found_by_shape(tmp_path: Path) -> None:
    import onnx

    from momkd.export.quantize import per_edge_nodes

    edge_graph(tmp_path / "edges.onnx")
    # the float tensors with a row per neighbour slot: gathered x_l, its (N, W, C) view, + x_r, relu; not the
    # int64 index, not the per-row projections or the pooled rows
    assert per_edge_nodes(onnx.load(str(tmp_path / "edges.onnx"))) == ["gather", "view", "add", "relu"]
    build_toy_model_dir(tmp_path / "toy", feature_dim=DIM, hidden=HIDDEN)
    toy = onnx.load(str(tmp_path / "toy" / "model.onnx"))
    for i, node in enumerate(toy.graph.node):
        node.name = f"{node.op_type}_{i}"
    found = per_edge_nodes(toy)   # the toy's neighbour mean: one (N, W, hidden) Gather; its (N, W) score gather
    assert len(found) == 1 and found[0].startswith("Gather")   # is too narrow to count
    build_toy_model_dir(tmp_path / "linear", feature_dim=DIM)
    assert per_edge_nodes(onnx.load(str(tmp_path / "linear" / "model.onnx"))) == []   # no neighbour features


def test_per_edge_work_is_quantised_statically_with_calibration(tmp_path: Path) -> None:
    import onnx

    edge_graph(tmp_path / "edges.onnx")
    calibration = edge_slides(4)
    info = quantize_int8(tmp_path / "edges.onnx", tmp_path / "int8.onnx", calibration=calibration,
                         calibration_source="4 test slides")
    assert info["per_edge_static"]["nodes"] == 4 and info["calibration"] == "4 test slides"
    assert info["per_edge_static"]["calibration_slides"] == 4
    ops = [n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node]
    assert ops.count("QuantizeLinear") >= 2 and "DynamicQuantizeLinear" in ops
    without = quantize_int8(tmp_path / "edges.onnx", tmp_path / "dynamic.onnx")   # no calibration: dynamic only
    assert without["per_edge_static"] is None and without["calibration"] is None
    assert "QuantizeLinear" not in {n.op_type for n in onnx.load(str(tmp_path / "dynamic.onnx")).graph.node}
    fp32, int8 = (ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
                  for name in ("edges.onnx", "int8.onnx"))
    for slide in edge_slides(3):   # other slides than the calibration ones (same sizes, other values)
        feeds = {"features": slide.features + 0.1, "neighbors": slide.neighbors,
                 "slide_offsets": np.array([0, slide.n], np.int64)}
        (p32,), (p8,) = fp32.run(None, feeds), int8.run(None, feeds)
        assert 0 < abs(float(p8[0]) - float(p32[0])) < 0.05


def test_export_precisions_are_checked() -> None:
    assert check_precisions(["fp32", "int8", "int8"]) == ["int8"]
    with pytest.raises(QuantizationError, match="bf16"):
        check_precisions(["bf16"])


# --------------------------------------------------------------------------- gates
def _items(labels: list[int | None]) -> list[GateSlide]:
    return [GateSlide(f"s{i}", y, ["fold 0 val" if i % 2 else "fold 0 test"]) for i, y in enumerate(labels)]


def test_gate_report_passes_and_fails_each_limit() -> None:
    items = _items([0, 0, 1, 1, 0, 1])       # test: slides 0, 2, 4; val: 1, 3, 5; both classes in each
    p = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    ok = gate_report(items, p, p + 0.001, 0.5, GateLimits())
    assert ok["passed"] and ok["decision_flips"] == 0 and ok["max_abs_dauc"] == 0.0
    assert set(ok["groups"]) == {"fold 0 test", "fold 0 val"} and ok["groups"]["fold 0 val"]["auc_fp32"] == 1.0

    far = gate_report(items, p, p + 0.03, 0.5, GateLimits())
    assert not far["passed"] and far["failed"] == ["max |dp| 0.03 > 0.02"]
    flipped = p.copy()
    flipped[4] = 0.85                      # a negative crosses the threshold and passes a positive of its set
    bad = gate_report(items, p, flipped, 0.5, GateLimits(max_abs_dp=1.0))
    assert not bad["passed"] and any("flip" in f for f in bad["failed"]) and any("dAUC" in f for f in bad["failed"])
    unlabelled = gate_report(_items([None, None]), p[:2], p[:2], 0.5, GateLimits())
    assert unlabelled["passed"] and unlabelled["max_abs_dauc"] is None
    with pytest.raises(GateError):
        GateLimits(max_abs_dp=-1)


def test_gates_run_on_each_folds_val_and_test_slides(tmp_path: Path) -> None:
    run, config = cohort_run(tmp_path)
    items, notes = fold_slides(run, config, [0])
    assert notes == [] and len(items) == 6     # 3 val + 3 test cases; the train cases are left out
    assert {g for it in items for g in it.groups} == {"fold 0 val", "fold 0 test"}
    assert {it.label for it in items} == {0, 1}
    ran, probs, skipped = slide_probabilities(items, [lambda f, n, o: {"probability": np.array([f.mean()])}], K,
                                              "paper", DIM)
    assert len(ran) == 6 and probs.shape == (6, 1) and skipped == []
    gone, notes = fold_slides(run, {"data": {}}, [0])
    assert gone == [] and notes


def test_int8_twin_in_the_manifest(int8_model: Path) -> None:
    manifest = load_manifest(int8_model)
    info = manifest.reduced["int8"]
    assert info.file == INT8_NAME and info.passed and not info.forced and "avx512_vnni" in info.requires_isa
    assert INT8_NAME in manifest.artifacts
    gates = manifest.raw["reduced_precision"]["int8"]["gates"]
    assert gates["n_slides"] == 6 and gates["limits"] == {"max_abs_dp": 1.0, "max_flips": 1000, "max_abs_dauc": 1.0}
    assert gates["source"].startswith("validation and test slides")


def test_failing_gates_write_no_graph_unless_forced(tmp_path: Path) -> None:
    model, failures = toy_folder_with_int8(tmp_path / "tight", TIGHT)
    assert failures and "max |dp|" in failures[0]
    assert not (model / INT8_NAME).exists()
    info = load_manifest(model).reduced["int8"]
    assert info.file is None and not info.passed

    forced, failures = toy_folder_with_int8(tmp_path / "forced", TIGHT, force=True)
    assert failures == [] and (forced / INT8_NAME).is_file()
    info = load_manifest(forced).reduced["int8"]
    assert info.forced and not info.passed
    assert choose_precision(load_manifest(forced), "auto", device="cpu", host=VNNI_HOST).precision == "fp32"
    explicit = choose_precision(load_manifest(forced), "int8", device="cpu", host=VNNI_HOST)
    assert explicit.precision == "int8" and "forced" in explicit.reason


def test_an_injected_bad_graph_fails_the_gates(tmp_path: Path) -> None:
    """A 'reduced' graph that inverts the probability: every decision flips, AUC falls to 1 - AUC."""
    run, config = cohort_run(tmp_path)
    items, _ = fold_slides(run, config, [0])
    build_toy_model_dir(tmp_path / "m", feature_dim=DIM, hidden=HIDDEN)
    good = OnnxRuntimeBackend(tmp_path / "m" / "model.onnx").run

    def inverted(f: np.ndarray, n: np.ndarray, o: np.ndarray) -> dict[str, np.ndarray]:
        return {"probability": 1.0 - good(f, n, o)["probability"]}

    ran, probs, _ = slide_probabilities(items, [good, inverted], K, "paper", DIM)
    report = gate_report(ran, probs[:, 0], probs[:, 1], 0.5, GateLimits())
    assert not report["passed"] and report["decision_flips"] == len(ran)


def test_a_per_edge_graph_failing_its_gates_falls_back_to_fp32_attention(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 with the per-edge attention quantised is tried first; when it fails its gates (here: its probability
    inverted), the graph that keeps the attention in fp32 is tried, gated and written; both attempts recorded."""
    import onnx
    from onnx import helper, numpy_helper

    import momkd.export.quantize as quantize

    real = quantize.quantize_int8

    def per_edge_attempt_inverted(fp32_path: Path, out_path: Path, **kw: Any) -> dict[str, Any]:
        method = real(fp32_path, out_path, **kw)
        if method["per_edge_static"] is not None:   # the calibrated attempt: make it fail every decision
            model = onnx.load(str(out_path))
            for node in model.graph.node:
                node.output[:] = [f"{o}__raw" if o == "probability" else o for o in node.output]
            model.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "one__f"))
            model.graph.node.append(helper.make_node("Sub", ["one__f", "probability__raw"], ["probability"]))
            onnx.save(model, str(out_path))
        return method

    monkeypatch.setattr(quantize, "quantize_int8", per_edge_attempt_inverted)
    lines: list[str] = []
    model = tmp_path / "model"
    build_toy_model_dir(model, feature_dim=DIM, hidden=HIDDEN)
    run, config = cohort_run(tmp_path / "cohort")
    manifest = dict(load_manifest(model).raw)
    failures = quantize.add_reduced_graphs(model, "model.onnx", fake_run(config), run, manifest, ["int8"],
                                           GateLimits(max_abs_dp=0.2), False, [], lines.append)
    assert failures == []
    section = manifest["reduced_precision"]["int8"]
    first, second = section["attempts"]
    assert first["per_edge_static"] and not first["passed"] and first["decision_flips"] > 0
    assert not second["per_edge_static"] and second["passed"]
    assert section["passed"] and section["file"] == INT8_NAME and section["method"]["per_edge_static"] is None
    assert (model / INT8_NAME).is_file()
    assert any("trying again with the per-edge attention kept in fp32" in line for line in lines)


def test_manifest_refuses_a_bad_reduced_section(int8_model: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(int8_model, copy)
    raw = json.loads((copy / "manifest.json").read_text())
    del raw["reduced_precision"]["int8"]["passed"]
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ModelFolderError, match="reduced_precision.int8.passed"):
        load_manifest(copy)
    shutil.copytree(int8_model, tmp_path / "t")
    (tmp_path / "t" / INT8_NAME).write_bytes((tmp_path / "t" / INT8_NAME).read_bytes()[:-8])
    with pytest.raises(ModelFolderError, match="checksum mismatch"):
        load_manifest(tmp_path / "t")


# --------------------------------------------------------------------------- the runtime's choice
def test_auto_picks_int8_only_where_it_passed_and_the_cpu_has_vnni(int8_model: Path, toy_model_dir: Path) -> None:
    m = load_manifest(int8_model)
    fast = choose_precision(m, "auto", device="cpu", host=VNNI_HOST)
    assert fast.precision == "int8" and "avx512_vnni" in fast.reason
    old = choose_precision(m, "auto", device="cpu", host=OLD_HOST)
    assert old.precision == "fp32" and "not faster here" in old.reason and "Test CPU without VNNI" in old.reason
    assert choose_precision(m, "int8", device="cpu", host=OLD_HOST).precision == "int8"
    assert choose_precision(m, "auto", backend="torch", device="cpu", host=VNNI_HOST).precision == "fp32"
    assert choose_precision(m, "fp32", host=VNNI_HOST).precision == "fp32"
    plain = load_manifest(toy_model_dir)
    assert "no int8 graph" in choose_precision(plain, "auto", device="cpu", host=VNNI_HOST).reason
    with pytest.raises(BackendError, match="no int8 graph"):
        choose_precision(plain, "int8", device="cpu", host=VNNI_HOST)
    with pytest.raises(BackendError, match="bf16"):
        choose_precision(m, "bf16", device="cpu")
    with pytest.raises(BackendError, match="for CPUs"):
        choose_precision(m, "int8", device="cuda", host=VNNI_HOST)
    with pytest.raises(BackendError, match="unknown precision"):
        choose_precision(m, "int4")


def test_infer_runs_and_records_the_precision(int8_model: Path, tmp_path: Path) -> None:
    from momkd.runtime.pipeline import run_inference

    folder = tmp_path / "slides"
    write_slide_folder(folder, [40, 25], DIM)
    summary = run_inference(int8_model, folder, tmp_path / "out8", precision="int8", device="cpu")
    assert summary.n_ok == 2 and summary.precision == "int8" and "int8" in summary.line()
    info = json.loads((tmp_path / "out8" / "run.json").read_text())
    assert info["precision"] == "int8" and info["precision_reason"].startswith("asked for")
    fp32 = run_inference(int8_model, folder, tmp_path / "out32", precision="fp32", device="cpu")
    assert json.loads((tmp_path / "out32" / "run.json").read_text())["precision"] == "fp32"
    assert fp32.precision == "fp32"
    auto = run_inference(int8_model, folder, tmp_path / "auto", device="cpu")
    expected = choose_precision(load_manifest(int8_model), "auto", device="cpu")
    assert auto.precision == expected.precision
    assert json.loads((tmp_path / "auto" / "run.json").read_text())["precision"] == expected.precision


def test_bench_has_a_row_per_precision(int8_model: Path) -> None:
    from momkd.runtime.bench import run_bench

    records = run_bench(int8_model, [200], [1], ["onnxruntime"], ["cpu"], ["fp32", "int8", "bf16"], repeat=1,
                        warmup=0)
    by_precision = {r.precision: r for r in records}
    assert by_precision["fp32"].status == "ok" and by_precision["int8"].status == "ok"
    assert by_precision["bf16"].status == "skipped" and "bf16" in by_precision["bf16"].note
    assert "int8" in by_precision["int8"].note and by_precision["int8"].machine["isa"] == cpu.cpu_info().isa


def test_export_cli_refuses_bf16_before_loading(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from momkd.cli.main import app

    result = CliRunner().invoke(app, ["export", str(tmp_path / "no_run"), "--out", str(tmp_path / "m"),
                                      "--precision", "bf16"])
    assert result.exit_code == 2 and "bf16" in result.output


@pytest.mark.slow
def test_export_int8_end_to_end(tmp_path: Path) -> None:
    """`momkd export --precision int8` on a trained-looking run: the folder has the gated int8 twin, and with
    impossible gates the export fails with exit 2, leaving a valid fp32 folder."""
    pytest.importorskip("torch")
    from typer.testing import CliRunner

    from momkd.cli.main import app
    from momkd.export.synthetic import random_run

    run = random_run(tmp_path / "run", "paper", 32, folds=1, dims={"dim": 16, "proj_dim": 8, "n_codes": 4})
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "m"), "--precision", "int8",
                                      "--gate-max-dp", "1", "--gate-max-flips", "100", "--gate-max-dauc", "1"])
    assert result.exit_code == 0, result.output
    manifest = load_manifest(tmp_path / "m")
    assert manifest.reduced["int8"].passed
    static = manifest.raw["reduced_precision"]["int8"]["method"]["per_edge_static"]
    assert static["nodes"] > 0 and {"Gather", "Add", "Relu", "MatMul"} <= set(static["ops"])
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "t"), "--precision", "int8",
                                      "--gate-max-dp", "0"])
    assert result.exit_code == 2 and "gates failed" in result.output
    assert load_manifest(tmp_path / "t").reduced["int8"].file is None
