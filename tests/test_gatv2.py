"""DenseGATv2Conv: identical to torch_geometric's GATv2Conv (same state_dict), exact backward, exportable."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")

from torch_geometric.nn import GATv2Conv  # noqa: E402

from momkd.models.encoder import table_to_edge_index  # noqa: E402
from momkd.synth import grid_coords  # noqa: E402
from momkd.models.gatv2 import (  # noqa: E402
    _POOL,
    DenseGATv2Conv,
    _attend,
    _DenseGATv2Attention,
    dropout_mask,
    neighbor_plan,
)

K = 8
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def random_table(n: int, w: int, seed: int = 0, pad: float = 0.3) -> torch.Tensor:
    """(n, w) neighbour table: distinct rows != self, -1 padded (some rows fully padded)."""
    rng = np.random.default_rng(seed)
    table = np.full((n, w), -1, dtype=np.int64)
    for i in range(n):
        others = np.delete(np.arange(n), i)
        m = min(len(others), int(rng.integers(0, w + 1)) if rng.random() < pad else w)
        table[i, :m] = rng.choice(others, size=m, replace=False)
    return torch.from_numpy(table)


def pair(in_ch: int = 12, out_ch: int = 5, heads: int = 2, concat: bool = True, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    dense = DenseGATv2Conv(in_ch, out_ch, heads=heads, concat=concat).to(dtype)
    with torch.no_grad():
        for p in dense.parameters():  # non-trivial biases and attention vector
            p.add_(0.1 * torch.randn_like(p))
    pyg = GATv2Conv(in_ch, out_ch, heads=heads, concat=concat, add_self_loops=True, share_weights=False).to(dtype)
    pyg.load_state_dict(dense.state_dict())
    return dense, pyg


def compare(dense, pyg, x: torch.Tensor, table: torch.Tensor, edge_index: torch.Tensor, tol: float) -> None:
    x = x.clone().requires_grad_(True)
    out_d = dense(x, table)
    out_p = pyg(x, edge_index)
    assert out_d.shape == out_p.shape
    assert torch.allclose(out_d, out_p, atol=tol, rtol=0), (out_d - out_p).abs().max()
    g = torch.randn_like(out_d)
    grads_d = torch.autograd.grad(out_d, [x, *dense.parameters()], g)
    grads_p = torch.autograd.grad(out_p, [x, *pyg.parameters()], g)
    for (name, _), a, b in zip([("x", None), *dense.named_parameters()], grads_d, grads_p):
        scale = max(1.0, float(b.abs().max()))
        assert torch.allclose(a, b, atol=tol * scale, rtol=0), (name, (a - b).abs().max())


def test_parameters_named_and_shaped_as_pyg() -> None:
    dense, pyg = pair(heads=3, out_ch=4)
    assert {k: tuple(v.shape) for k, v in dense.state_dict().items()} == {
        k: tuple(v.shape) for k, v in pyg.state_dict().items()
    }
    assert tuple(dense.att.shape) == (1, 3, 4) and tuple(dense.bias.shape) == (12,)
    pyg.load_state_dict(dense.state_dict(), strict=True)
    dense.load_state_dict(pyg.state_dict(), strict=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("direction", ["paper", "official"])
@pytest.mark.parametrize("n", [1, 2, K, K + 1, 3000])
def test_dense_equals_pyg_on_slide_graphs(n: int, direction: str, dtype) -> None:
    graph = pytest.importorskip("momkd.graph")
    coords = grid_coords(n, seed=n)
    table = graph.neighbor_table(coords, k=K, direction=direction)
    edge_index = torch.from_numpy(graph.to_edge_index(table))
    table = torch.from_numpy(table)
    if n <= K:
        assert (table < 0).any() or n == 1 or direction == "official"
    dense, pyg = pair(in_ch=16, out_ch=6, heads=2, dtype=dtype, seed=n)
    x = torch.randn(n, 16, dtype=dtype, generator=torch.Generator().manual_seed(n))
    compare(dense, pyg, x, table, edge_index, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("heads,concat", [(1, True), (2, True), (3, False)])
def test_dense_equals_pyg_on_padded_tables(heads: int, concat: bool, dtype) -> None:
    n, w = 60, 7
    table = random_table(n, w, seed=heads)
    dense, pyg = pair(in_ch=9, out_ch=4, heads=heads, concat=concat, dtype=dtype, seed=heads)
    x = torch.randn(n, 9, dtype=dtype, generator=torch.Generator().manual_seed(1))
    compare(dense, pyg, x, table, table_to_edge_index(table), TOL[dtype])


def test_table_to_edge_index_semantics() -> None:
    table = torch.tensor([[1, 2], [-1, -1], [0, -1]])
    assert table_to_edge_index(table).tolist() == [[1, 2, 0], [0, 0, 2]]  # [source, target]


@pytest.mark.parametrize("heads", [1, 2, 3])
def test_hand_written_backward_equals_autograd(heads: int) -> None:
    """The training path's custom backward against autograd through the same forward ops (fp64)."""
    torch.manual_seed(heads)
    n, w, c = 30, 5, 4
    plan = neighbor_plan(random_table(n, w, seed=7), torch.float64)
    xl = torch.randn(n, heads * c, dtype=torch.float64, requires_grad=True)
    xr = torch.randn(n, heads * c, dtype=torch.float64, requires_grad=True)
    att = torch.randn(1, heads, c, dtype=torch.float64, requires_grad=True)
    for drop in (None, dropout_mask((n, w + 1, heads), 0.5, torch.float64, torch.device("cpu"))):
        fused = _DenseGATv2Attention.apply(xl, xr, att, plan.index, plan.mask, 0.2, drop)
        plain = _attend(xl, xr, att, plan.index, plan.mask, 0.2, drop)[0]
        assert torch.allclose(fused, plain, atol=1e-12, rtol=0)   # the exported score product sums in another order
        g = torch.randn_like(fused)
        for a, b in zip(torch.autograd.grad(fused, (xl, xr, att), g), torch.autograd.grad(plain, (xl, xr, att), g)):
            assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_second_backward_is_refused() -> None:
    """The custom backward reuses its saved buffers; a retained graph must not silently give wrong grads."""
    dense, _ = pair()
    x = torch.randn(10, 12, dtype=torch.float64, requires_grad=True)
    out = dense(x, random_table(10, 3)).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def test_inference_path_equals_training_path_and_reuses_buffers() -> None:
    dense, _ = pair(dtype=torch.float32)
    table = random_table(200, 8, seed=3)
    x = torch.randn(200, 12)
    with torch.no_grad():
        first = dense(x, table)
        idle = len(_POOL._free)
        second = dense(x, table)
        assert len(_POOL._free) == idle  # taken and given back
    assert torch.equal(first, second)
    assert torch.allclose(first, dense(x.requires_grad_(True), table), atol=1e-6)


def test_attention_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    layer = DenseGATv2Conv(6, 3, heads=2, dropout=0.5).double()
    x, table = torch.randn(40, 6, dtype=torch.float64), random_table(40, 6)
    layer.eval()
    assert torch.equal(layer(x, table), layer(x, table))
    layer.train()
    a, b = layer(x, table), layer(x, table)
    assert not torch.equal(a, b) and torch.isfinite(a).all()


def test_dropout_mask_rate_and_scale() -> None:
    torch.manual_seed(0)
    mask = dropout_mask((1000, 100), 0.25, torch.float32, torch.device("cpu"))
    assert torch.unique(mask).tolist() == pytest.approx([0.0, 1 / 0.75])
    assert float((mask == 0).float().mean()) == pytest.approx(0.25, abs=0.01)


def test_forward_exports_without_scatter_or_data_dependent_ops() -> None:
    """The inference graph (what ONNX/TensorRT get, via torch.export as the exporter uses it, with dynamic N
    and W): gathers, matmuls and a softmax; no scatter, index_add or nonzero."""
    dense, _ = pair(dtype=torch.float32)
    dense.eval()
    for p in dense.parameters():
        p.requires_grad_(False)
    # captured as the ONNX exporter does (runtime asserts instead of guards: the row-block padding of the exported
    # attention makes guards sympy cannot prove); tests/test_export.py checks the ONNX graph for N = 1..9
    n, w = torch.export.Dim("N", min=2), torch.export.Dim("W", min=2)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(dense, (torch.randn(20, 12), random_table(20, 5)),
                                      dynamic_shapes=({0: n}, {0: n, 1: w}),
                                      prefer_deferred_runtime_asserts_over_guards=True)
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not {op for op in ops if any(bad in op for bad in ("scatter", "index_add", "index_put", "nonzero"))}
    other, x = random_table(33, 9, seed=5), torch.randn(33, 12)
    assert torch.allclose(program.module()(x, other), dense(x, other), atol=1e-6)
