"""Graph-based WSI encoder (§3.2): two GATv2 layers with LayerNorm, ELU, dropout, residuals, max(h1, h2).

    h1  = dropout(ELU(LN(gat1(x)))) + res1(x)          res1: Linear(in_dim, dim)
    h2  = dropout(ELU(LN(gat2(h1)))) + h1
    out = max(h1, h2)                                  elementwise, (N, dim)

``impl="dense"`` uses :class:`~momkd.models.gatv2.DenseGATv2Conv` (no scatter ops, exportable);
``impl="pyg"`` uses ``torch_geometric.nn.GATv2Conv``. Both have identical parameter names, so a state_dict
moves between them unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from momkd.models.gatv2 import DenseGATv2Conv, dropout_mask, is_tracing, neighbor_plan


def table_to_edge_index(neighbors: Tensor) -> Tensor:
    """(N, W) -1-padded neighbour table -> (2, E) [source, target] (target gathers from source), row-major.

    Same semantics as ``momkd.graph.to_edge_index`` (torch ops; uses boolean masking, so not for export).
    """
    neighbors = neighbors.long()
    n, w = neighbors.shape
    target = torch.arange(n, device=neighbors.device).unsqueeze(1).expand(n, w)
    keep = neighbors >= 0
    return torch.stack([neighbors[keep], target[keep]])


class _Maximum(torch.autograd.Function):
    """``torch.maximum(a, b)`` with a cheap backward: ``(g * w, g - g * w)``, ``w`` = 1 where a > b, 0 where
    a < b and 1/2 at ties, as the stock op splits them (``w = (sign(a - b) + 1) / 2``).

    The stock backward of ``maximum`` (and of ``where``) runs ``masked_fill``/``where`` kernels that are an order
    of magnitude slower than a multiply on CPU; at N = 20000, D = 256 this saves ~50 ms per training step. Exact
    ties do occur in fp32 (a residual branch below half a rounding step of the other leaves it unchanged) and
    are where a different tie rule shows up in parity with the authors' code (``benchmarks/parity``).
    """

    @staticmethod
    def forward(ctx, a, b):  # noqa: ANN001, ANN205
        ctx.save_for_backward(torch.sign(a - b).mul_(0.5).add_(0.5))
        return torch.maximum(a, b)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (take_a,) = ctx.saved_tensors
        grad_a = grad * take_a
        return grad_a, grad - grad_a


def elementwise_max(a: Tensor, b: Tensor) -> Tensor:
    """max(a, b); the custom backward only where autograd records and nothing is traced/exported."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad) and not is_tracing():
        return _Maximum.apply(a, b)
    return torch.maximum(a, b)


def _block(h: Tensor, norm: nn.LayerNorm, p: float, training: bool, residual: Tensor) -> Tensor:
    """dropout(ELU(LayerNorm(h))) + residual, with the ELU in place and dropout fused into the residual add."""
    y = F.elu(norm(h), inplace=True)
    if not training or p == 0.0:
        return y + residual
    if y.device.type != "cpu":
        return F.dropout(y, p, training=True) + residual
    return torch.addcmul(residual, y, dropout_mask(tuple(y.shape), p, y.dtype, y.device))


class GraphEncoder(nn.Module):
    """Two-layer GATv2 encoder producing contextualised patch embeddings F_wsi (N, dim).

    Args:
        in_dim: patch feature size (e.g. 1536 for UNI v2).
        dim: output size D (= heads x channels per head).
        heads: attention heads per layer (concatenated).
        dropout: feature dropout after each block.
        attn_dropout: dropout on the GATv2 attention coefficients.
        impl: "dense" or "pyg".
    """

    def __init__(self, in_dim: int, dim: int, heads: int, dropout: float = 0.0, attn_dropout: float = 0.0,
                 impl: str = "dense") -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        if impl not in ("dense", "pyg"):
            raise ValueError(f"impl must be 'dense' or 'pyg' (got {impl!r})")
        self.impl = impl
        self.in_dim, self.dim, self.heads = in_dim, dim, heads
        channels = dim // heads
        if impl == "dense":
            self.gat1 = DenseGATv2Conv(in_dim, channels, heads=heads, dropout=attn_dropout)
            self.gat2 = DenseGATv2Conv(dim, channels, heads=heads, dropout=attn_dropout)
        else:
            from torch_geometric.nn import GATv2Conv

            self.gat1 = GATv2Conv(in_dim, channels, heads=heads, dropout=attn_dropout, add_self_loops=True,
                                  share_weights=False)
            self.gat2 = GATv2Conv(dim, channels, heads=heads, dropout=attn_dropout, add_self_loops=True,
                                  share_weights=False)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.res1 = nn.Linear(in_dim, dim)
        self.dropout = float(dropout)

    def forward(self, x: Tensor, neighbors: Tensor) -> Tensor:
        """x (N, in_dim), neighbors (N, W) int64 -1-padded global row indices -> (N, dim)."""
        if self.impl == "dense":
            plan = neighbor_plan(neighbors, x.dtype)
            xl, xr, res = self.gat1.project(x, (self.res1,))  # lin_l, lin_r and the residual: one matmul
            g1 = self.gat1.propagate(xl, xr, plan)
            h1 = _block(g1, self.norm1, self.dropout, self.training, res)
            g2 = self.gat2(h1, neighbors, plan)
        else:
            edge_index = table_to_edge_index(neighbors)
            h1 = _block(self.gat1(x, edge_index), self.norm1, self.dropout, self.training, self.res1(x))
            g2 = self.gat2(h1, edge_index)
        h2 = _block(g2, self.norm2, self.dropout, self.training, h1)
        return elementwise_max(h1, h2)
