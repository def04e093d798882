"""A toy model folder with the exported model's exact contract, for testing and benchmarking the runtime
without a trained model (needs ``onnx``; the TorchScript twin needs ``torch``).

Graph (packed slides, membership-mask trick, no scatter ops)::

    h        = features                                   (hidden = 0)
             | relu((relu(features @ W1) + mean_{j in nb(i)} relu(features @ W1)_j) @ W2)   (hidden = H)
    s0       = h @ w_s                                    per-row score
    score_i  = s0_i + 0.5 * mean_{j in nb(i)} s0_j        (nb = valid neighbour rows, global indices)
    alpha    = softmax of score within each slide         (B, N) mask
    pooled_b = sum_i alpha_i * v_i,   v = mean(h, axis=1)
    logit_b  = a * pooled_b + c;  probability = sigmoid(logit);  logits = [-logit/2, logit/2]

``toy_reference`` computes the same in numpy, one slide at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from momkd.synth import grid_coords

OPSET = 17


def toy_params(feature_dim: int, hidden: int = 0, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    d = hidden or feature_dim
    p: dict[str, Any] = {"hidden": hidden, "w_s": (rng.standard_normal((d, 1)) / np.sqrt(d)).astype(np.float32),
                         "a": np.float32(8.0), "c": np.float32(0.1)}
    if hidden:
        p["W1"] = (rng.standard_normal((feature_dim, hidden)) / np.sqrt(feature_dim)).astype(np.float32)
        p["W2"] = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
    return p


def _neighbor_mean(x: np.ndarray, nb: np.ndarray) -> np.ndarray:
    valid = nb >= 0
    g = x[np.maximum(nb, 0)] * (valid[..., None] if x.ndim == 2 else valid)
    cnt = np.maximum(valid.sum(1), 1).astype(np.float32)
    return g.sum(1) / (cnt[:, None] if x.ndim == 2 else cnt)


def toy_reference(features: np.ndarray, neighbors: np.ndarray, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """One slide (local neighbour rows): probability (scalar), attention (n,), patch_score (n,)."""
    x = features.astype(np.float32)
    if params["hidden"]:
        h1 = np.maximum(x @ params["W1"], 0)
        h = np.maximum((h1 + _neighbor_mean(h1, neighbors)) @ params["W2"], 0)
    else:
        h = x
    s0 = (h @ params["w_s"])[:, 0]
    score = s0 + 0.5 * _neighbor_mean(s0, neighbors)
    e = np.exp(score - score.max())
    alpha = e / e.sum()
    pooled = float((alpha * h.mean(1)).sum())
    logit = params["a"] * pooled + params["c"]
    return {"probability": np.float32(1 / (1 + np.exp(-logit))), "attention": alpha.astype(np.float32),
            "patch_score": score.astype(np.float32)}


def build_toy_onnx(path: str | Path, feature_dim: int, hidden: int = 0, seed: int = 0) -> dict[str, Any]:
    """Write the toy graph to ``path``; returns its parameters (for ``toy_reference``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    p = toy_params(feature_dim, hidden, seed)
    F, I64 = TensorProto.FLOAT, TensorProto.INT64
    inits = [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in p.items() if k != "hidden"]
    consts: dict[str, np.ndarray] = {
              "zero_i": np.array(0, np.int64), "one_i": np.array(1, np.int64),
              "one_f": np.array(1, np.float32), "half_f": np.array(0.5, np.float32),
              "neg_big": np.array(-1e30, np.float32),
              "ax0": np.array([0], np.int64), "ax1": np.array([1], np.int64), "axm1": np.array([-1], np.int64),
              "big": np.array([np.iinfo(np.int64).max], np.int64), "neg_half": np.array(-0.5, np.float32)}
    inits += [numpy_helper.from_array(v, k) for k, v in consts.items()]
    n = helper.make_node
    nodes = [
        n("GreaterOrEqual", ["neighbors", "zero_i"], ["valid"]),
        n("Max", ["neighbors", "zero_i"], ["nb_idx"]),
        n("Cast", ["valid"], ["valid_f"], to=F),
        n("ReduceSum", ["valid_f", "ax1"], ["cnt0"], keepdims=0),
        n("Max", ["cnt0", "one_f"], ["cnt"]),                                    # (N,)
        n("Unsqueeze", ["cnt", "ax1"], ["cnt_c"]),                              # (N, 1)
    ]
    if hidden:
        nodes += [
            n("MatMul", ["features", "W1"], ["h1p"]), n("Relu", ["h1p"], ["h1"]),
            n("Gather", ["h1", "nb_idx"], ["g1"], axis=0),                      # (N, W, H)
            n("Unsqueeze", ["valid_f", "axm1"], ["valid_f3"]),
            n("Mul", ["g1", "valid_f3"], ["g1m"]),
            n("ReduceSum", ["g1m", "ax1"], ["g1s"], keepdims=0),
            n("Div", ["g1s", "cnt_c"], ["agg1"]),
            n("Add", ["h1", "agg1"], ["h1a"]), n("MatMul", ["h1a", "W2"], ["h2p"]), n("Relu", ["h2p"], ["h"]),
        ]
    else:
        nodes.append(n("Identity", ["features"], ["h"]))
    nodes += [
        n("MatMul", ["h", "w_s"], ["s0c"]), n("Squeeze", ["s0c", "ax1"], ["s0"]),   # (N,)
        n("Gather", ["s0", "nb_idx"], ["gs"], axis=0),                              # (N, W)
        n("Mul", ["gs", "valid_f"], ["gsm"]),
        n("ReduceSum", ["gsm", "ax1"], ["gss"], keepdims=0),
        n("Div", ["gss", "cnt"], ["sagg"]), n("Mul", ["sagg", "half_f"], ["sagg2"]),
        n("Add", ["s0", "sagg2"], ["patch_score"]),
        # membership mask (B, N)
        n("Shape", ["features"], ["fshape"]), n("Gather", ["fshape", "zero_i"], ["n_rows"], axis=0),
        n("Range", ["zero_i", "n_rows", "one_i"], ["rows"]),
        n("Slice", ["slide_offsets", "ax0", "axm1"], ["starts"]), n("Slice", ["slide_offsets", "ax1", "big"], ["ends"]),
        n("Unsqueeze", ["starts", "ax1"], ["starts_c"]), n("Unsqueeze", ["ends", "ax1"], ["ends_c"]),
        n("GreaterOrEqual", ["rows", "starts_c"], ["ge"]), n("Less", ["rows", "ends_c"], ["lt"]),
        n("And", ["ge", "lt"], ["mask"]), n("Cast", ["mask"], ["mask_f"], to=F),
        n("Unsqueeze", ["patch_score", "ax0"], ["score_r"]),
        n("Where", ["mask", "score_r", "neg_big"], ["masked"]),
        n("Softmax", ["masked"], ["sm"], axis=1), n("Mul", ["sm", "mask_f"], ["alpha_b"]),
        n("ReduceSum", ["alpha_b", "ax0"], ["attention"], keepdims=0),
        n("ReduceMean", ["h"], ["v"], axes=[1], keepdims=1),                       # (N, 1)
        n("MatMul", ["alpha_b", "v"], ["pooled_c"]), n("Squeeze", ["pooled_c", "ax1"], ["pooled"]),
        n("Mul", ["pooled", "a"], ["pa"]), n("Add", ["pa", "c"], ["logit"]),
        n("Sigmoid", ["logit"], ["probability"]),
        n("Unsqueeze", ["logit", "ax1"], ["logit_c"]), n("Mul", ["logit_c", "neg_half"], ["l0"]),
        n("Mul", ["logit_c", "half_f"], ["l1"]), n("Concat", ["l0", "l1"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "momkd_toy",
        [helper.make_tensor_value_info("features", F, ["N", feature_dim]),
         helper.make_tensor_value_info("neighbors", I64, ["N", "W"]),
         helper.make_tensor_value_info("slide_offsets", I64, ["B1"])],
        [helper.make_tensor_value_info("probability", F, ["B"]), helper.make_tensor_value_info("logits", F, ["B", 2]),
         helper.make_tensor_value_info("attention", F, ["N"]), helper.make_tensor_value_info("patch_score", F, ["N"])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="momkd-toy")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return p


def build_toy_torchscript(path: str | Path, params: dict[str, Any]) -> None:
    """The same toy as a TorchScript module (for the torch backend)."""
    import torch

    class Toy(torch.nn.Module):
        if TYPE_CHECKING:   # the buffers registered below (hidden from torch.jit.script, which cannot resolve them)
            w_s: torch.Tensor
            W1: torch.Tensor
            W2: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.hidden = int(params["hidden"])
            for k in ("w_s", "W1", "W2"):
                self.register_buffer(k, torch.from_numpy(np.asarray(params.get(k, np.zeros((1, 1), np.float32)))))
            self.a, self.c = float(params["a"]), float(params["c"])

        def forward(self, features: torch.Tensor, neighbors: torch.Tensor, slide_offsets: torch.Tensor):
            valid = neighbors >= 0
            idx = neighbors.clamp(min=0)
            vf = valid.float()
            cnt = vf.sum(1).clamp(min=1.0)
            h = features
            if self.hidden > 0:
                h1 = torch.relu(features @ self.W1)
                agg = (h1[idx] * vf.unsqueeze(-1)).sum(1) / cnt.unsqueeze(1)
                h = torch.relu((h1 + agg) @ self.W2)
            s0 = (h @ self.w_s).squeeze(1)
            score = s0 + 0.5 * (s0[idx] * vf).sum(1) / cnt
            rows = torch.arange(features.shape[0], device=features.device)
            mask = ((rows.unsqueeze(0) >= slide_offsets[:-1].unsqueeze(1))
                    & (rows.unsqueeze(0) < slide_offsets[1:].unsqueeze(1)))
            masked = torch.where(mask, score.unsqueeze(0), torch.full_like(score.unsqueeze(0), -1e30))
            alpha_b = torch.softmax(masked, dim=1) * mask.float()
            pooled = (alpha_b @ h.mean(1, keepdim=True)).squeeze(1)
            logit = self.a * pooled + self.c
            logits = torch.stack([-0.5 * logit, 0.5 * logit], dim=1)
            return {"probability": torch.sigmoid(logit), "logits": logits, "attention": alpha_b.sum(0),
                    "patch_score": score}

    torch.jit.save(torch.jit.script(Toy()), str(path))


def build_toy_model_dir(model_dir: str | Path, feature_dim: int = 32, hidden: int = 0, seed: int = 0, *,
                        k: int = 8, direction: str = "paper", threshold: float = 0.5,
                        class_names: tuple[str, str] = ("negative", "positive"), torchscript: bool = False
                        ) -> dict[str, Any]:
    """A complete model folder (``model.onnx`` [+ ``model.pt``], ``manifest.json``); returns the toy parameters."""
    from momkd.manifest import write_manifest

    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    params = build_toy_onnx(root / "model.onnx", feature_dim, hidden, seed)
    if torchscript:
        build_toy_torchscript(root / "model.pt", params)
    write_manifest(root, {
        "model": {"feature_dim": feature_dim, "encoder": "toy", "k": k, "graph_direction": direction,
                  "class_names": list(class_names), "threshold": threshold, "preset": "toy", "folds": [0],
                  "cv_metrics": {}},
        "onnx": {"file": "model.onnx", "opset": OPSET, "precision": "fp32",
                 "inputs": {"features": ["N", feature_dim], "neighbors": ["N", "W"], "slide_offsets": ["B+1"]},
                 "outputs": {"probability": ["B"], "logits": ["B", 2], "attention": ["N"], "patch_score": ["N"]}},
        "tensorrt": None,
        "torch": {"file": "model.pt"} if torchscript else None,
        "verification": {"toy": True},
    })
    return params


def write_trident_slide(path: str | Path, features: np.ndarray, coords: np.ndarray, *, encoder: str = "toy",
                        patch_size: int = 256, chunk_rows: int | None = 1, dtype: Any = np.float32) -> Path:
    """A TRIDENT-layout ``.h5``: ``features`` (N, D) and ``coords`` (N, 2) int64 stored in one-row chunks (as
    TRIDENT writes them; ``chunk_rows=None`` stores them contiguously), with TRIDENT's attributes."""
    path = Path(path)
    n = len(features)
    chunks_f = (chunk_rows, features.shape[1]) if chunk_rows and n else None
    chunks_c = (chunk_rows, 2) if chunk_rows and n else None
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("features", data=np.asarray(features, dtype=dtype), chunks=chunks_f,
                              maxshape=(None, features.shape[1]) if chunks_f else None)
        ds.attrs["encoder"] = encoder
        c = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64), chunks=chunks_c,
                             maxshape=(None, 2) if chunks_c else None)
        c.attrs["patch_size_level0"] = patch_size
        c.attrs["patch_size"] = patch_size
        c.attrs["target_magnification"] = 20
    return path


def write_slide_folder(folder: str | Path, sizes: list[int], feature_dim: int, seed: int = 0, prefix: str = "slide",
                       chunk_rows: int | None = 1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """TRIDENT-layout files ``{prefix}_{i:03d}.h5`` with ``sizes[i]`` patches.

    Returns {slide_id: (features, coords)}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for i, n in enumerate(sizes):
        sid = f"{prefix}_{i:03d}"
        feats = rng.standard_normal((n, feature_dim)).astype(np.float32)
        coords = grid_coords(n, seed=seed + i)
        write_trident_slide(folder / f"{sid}.h5", feats, coords, chunk_rows=chunk_rows)
        out[sid] = (feats, coords)
    return out
