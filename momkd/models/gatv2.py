"""Dense fixed-degree GATv2 (Brody et al., ICLR 2022) with torch_geometric-compatible parameters.

Every node ``i`` attends to itself and to the rows listed in ``neighbors[i]`` (a ``(N, W)`` int64 table, ``-1``
padded). With ``x_l = lin_l(x)`` (source side) and ``x_r = lin_r(x)`` (target side), per head::

    e_ij   = att . leaky_relu(x_l[j] + x_r[i])          j in {i} u neighbors(i)
    a_ij   = softmax_j(e_ij)                             (padding slots masked out; self is always present)
    out_i  = sum_j a_ij x_l[j] + bias

which is exactly ``torch_geometric.nn.GATv2Conv(in, out, heads, add_self_loops=True, share_weights=False)`` on
the edge list of the table (``momkd.graph.to_edge_index``); the parameters carry the same names and shapes
(``lin_l.weight/bias``, ``lin_r.weight/bias``, ``att`` (1, H, C), ``bias``), so a state_dict loads into either.

Implementation notes (speed and export):

* ``lin_l`` and ``lin_r`` run as ONE matmul on concatenated weights (:meth:`DenseGATv2Conv.project`, which can
  also fuse extra Linear layers on the same input, e.g. the encoder's residual).
* No scatter ops and no data-dependent control flow in the forward pass: a gather of the ``W + 1`` rows (padding
  slots gather the row itself), an additive ``-inf`` mask, a softmax over the ``W + 1`` axis and a batched
  matmul. It exports to ONNX/TensorRT with dynamic ``N`` and ``W``.
* ``leaky_relu(z) = s z + (1 - s) relu(z)``: the linear part of the score is computed on ``(N, H)`` rows
  before the gather, so the ``(N, W+1, H*C)`` pre-activation is formed and rectified in one pass.
* During training a hand-written backward (:class:`_DenseGATv2Attention`) keeps two ``(N, W+1, H*C)`` tensors
  (the gathered ``x_l`` and the relu output), reuses them in place as its gradient buffers, and folds the
  score and aggregation gradients into one ``index_add``. It is used only when autograd is recording and
  nothing is being traced or exported; otherwise the same forward runs as plain tensor ops. On CPU those
  two tensors come from a small pool of reused buffers (:class:`BufferPool`): fresh multi-hundred-MB
  allocations cost page faults on every step.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


EXPORT_ROW_BLOCKS = 4  # row blocks of the traced (exported) attention: bounds the runtime's peak memory


@dataclass(frozen=True)
class NeighborPlan:
    """Gather plan shared by every GATv2 layer of one forward pass."""

    index: Tensor  # (N, W+1) int64: column 0 is the row itself, then the neighbours (-1 replaced by the row itself)
    mask: Tensor  # (N, W+1, 1) additive mask: 0 for real slots, -inf for padding


def neighbor_plan(neighbors: Tensor, dtype: torch.dtype = torch.float32) -> NeighborPlan:
    """Build the gather index (self first, padding pointing at the row itself) and the additive padding mask.

    Padding gathers the row's own values, never another row's: a masked slot still enters the weighted sum as
    ``0 * value``, so pointing it at a row of another slide (an overflowing one: ``0 * inf = NaN``) would leak
    that slide into this one; the row itself contributes nothing new (the sum is unchanged bit for bit)."""
    if neighbors.dim() != 2:
        raise ValueError(f"neighbors must be (N, W), got shape {tuple(neighbors.shape)}")
    neighbors = neighbors.long()
    n = neighbors.shape[0]
    self_index = torch.arange(n, device=neighbors.device, dtype=torch.long).unsqueeze(1)
    index = torch.cat([self_index, torch.where(neighbors < 0, self_index, neighbors)], dim=1)
    missing = torch.cat([torch.zeros_like(self_index, dtype=torch.bool), neighbors < 0], dim=1)
    mask = torch.zeros(missing.shape, dtype=dtype, device=neighbors.device).masked_fill(missing, float("-inf"))
    return NeighborPlan(index, mask.unsqueeze(-1))


class BufferPool:
    """Reusable CPU buffers for the ``(N, W+1, H*C)`` temporaries of the attention.

    A fresh multi-hundred-megabyte CPU tensor costs page faults on first touch every step (PyTorch's CPU
    allocator does not cache and glibc hands blocks this large back to the OS); on our 2-core machines that
    made a fresh (N, W+1, H*C) pass 2-4x slower than one into a reused buffer.
    Buffers are handed out exclusively and come back when the forward (inference) or the backward (training)
    is done with them; at most ``max_free`` idle buffers are kept (largest first). CUDA tensors bypass the pool
    (PyTorch's caching allocator already does this). :func:`release_buffers` frees the idle ones.
    """

    def __init__(self, max_free: int = 4) -> None:
        self.max_free = max_free
        self._free: list[Tensor] = []
        self._lock = threading.Lock()

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A 1-D tensor with at least ``numel`` elements (contents undefined)."""
        if device.type == "cpu":
            with self._lock:
                fits = [b for b in self._free if b.dtype == dtype and b.numel() >= numel]
                if fits:
                    best = min(fits, key=Tensor.numel)
                    self._free = [b for b in self._free if b is not best]
                    return best
        return torch.empty(numel, dtype=dtype, device=device)

    def give(self, *buffers: Tensor) -> None:
        """Return buffers obtained from :meth:`take` (no view of them may be used afterwards)."""
        with self._lock:
            for buf in buffers:
                # inference tensors (made under torch.inference_mode) cannot serve autograd later: drop them
                if buf.device.type == "cpu" and not buf.is_inference():
                    self._free.append(buf)
            self._free.sort(key=Tensor.numel, reverse=True)
            del self._free[self.max_free:]

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


_POOL = BufferPool()


def release_buffers() -> None:
    """Free the idle attention buffers kept for reuse (e.g. after training, before a long idle period)."""
    _POOL.clear()


def dropout_mask(shape: tuple[int, ...], p: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Inverted-dropout mask: 0 with probability ``p``, else ``1 / (1 - p)``.

    On CPU the Bernoulli draws come from 16-bit slices of 64-bit random words (4 draws per generator call;
    ``p`` is resolved to 1/65536), about 5x faster than ``bernoulli_``; elsewhere ``bernoulli_``. Both use
    PyTorch's default generator, so ``torch.manual_seed`` makes them reproducible.
    """
    keep = 1.0 - p
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device).bernoulli_(keep).div_(keep)
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    draws = words.view(torch.int16)[:numel].view(shape)
    threshold = round(p * 65536) - 32768
    return (draws >= threshold).to(dtype).mul_(1.0 / keep)  # (torch.where is ~10x slower here on CPU)


def _head_mask(heads: int, channels: int, like: Tensor) -> Tensor:
    """(H*C, H) 0/1 matrix: row h*C + c has a 1 in column h."""
    # expand + reshape rather than repeat_interleave: a traced repeat_interleave keeps its repeat count as a CPU
    # tensor constant, which breaks the TorchScript twin on CUDA
    eye = torch.eye(heads, dtype=like.dtype, device=like.device)
    return eye.unsqueeze(1).expand(heads, channels, heads).reshape(heads * channels, heads)


def _transposer(rows: int, cols: int, like: Tensor) -> Tensor:
    """(rows*cols, cols*rows) 0/1 matrix P: ``x.reshape(-1) @ P == x.t().reshape(-1)`` for x (rows, cols)."""
    source = torch.arange(rows * cols, device=like.device).view(rows, cols).t().reshape(1, rows * cols)
    return (torch.arange(rows * cols, device=like.device).view(rows * cols, 1) == source).to(like.dtype)


def is_tracing() -> bool:
    """True while TorchScript tracing/scripting, ONNX export or torch.compile/torch.export is capturing."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    if torch.onnx.is_in_onnx_export():
        return True
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def _attend(
    xl: Tensor, xr: Tensor, att: Tensor, index: Tensor, mask: Tensor, slope: float, drop_scale: Tensor | None,
    pool: BufferPool | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, tuple[Tensor, ...]]:
    """Forward of the neighbourhood attention.

    Returns (out (N, H*C), xj, r, alpha, alpha_dropped, buffers): xj = x_l gathered (N, K, HC);
    r = relu(xj + x_r) (N, K, HC); alpha (N, K, H) softmax over K. With ``pool`` (only where autograd is not
    recording and nothing is being traced) xj and r live in pooled buffers, returned in ``buffers`` for the
    caller to give back, and faster non-differentiable ops are used; without it, only standard exportable ops.
    """
    n, k = index.shape
    heads, channels = att.shape[-2], att.shape[-1]
    hc = heads * channels
    att_bd = att.reshape(hc, 1) * _head_mask(heads, channels, att)  # (HC, H) block-diagonal
    flat = index.reshape(-1)
    buffers: tuple[Tensor, ...] = ()
    if pool is None:
        xj = xl.index_select(0, flat).view(n, k, hc)
        r = torch.relu(xj + xr.unsqueeze(1))
    else:
        buffers = (pool.take(n * k * hc, xl.dtype, xl.device), pool.take(n * k * hc, xl.dtype, xl.device))
        xj = torch.index_select(xl, 0, flat, out=buffers[0][: n * k * hc].view(n * k, hc)).view(n, k, hc)
        r = buffers[1][: n * k * hc].view(n, k, hc)
        if xl.device.type == "cpu":  # fused add + relu (one pass; CPU kernel only)
            torch.ops.aten._add_relu.out(xj, xr.unsqueeze(1), out=r)
        else:
            torch.add(xj, xr.unsqueeze(1), out=r).relu_()
    # e = att . leaky_relu(xj + xr) = slope * (att.xj + att.xr) + (1 - slope) * att.relu(xj + xr)
    linear = (xl @ att_bd).index_select(0, flat).view(n, k, heads) + (xr @ att_bd).unsqueeze(1)
    if pool is None:
        # exported graphs: the score product with a constant weight (quantisable, no transposed operand), and the
        # softmax in (N, H, K) layout, so that the aggregation's (quantisable) input needs no transpose. The scores
        # are permuted by a product with a 0/1 matrix (exact for finite values; ONNX Runtime's Transpose of this
        # shape is ~40x slower), the -inf padding mask added after.
        relu_part = (r.view(n * k, hc) @ att_bd).view(n, k, heads)
        scores = (slope * linear + (1.0 - slope) * relu_part).reshape(n, k * heads)
        e_t = (scores @ _transposer(k, heads, scores)).view(n, heads, k) + mask.view(n, 1, k)
        alpha = torch.softmax(e_t, dim=2).transpose(1, 2)
    else:  # eager CPU inference: this orientation of the score product reads r faster
        relu_part = (att_bd.t() @ r.view(n * k, hc).t()).t().view(n, k, heads)
        alpha = torch.softmax(slope * linear + (1.0 - slope) * relu_part + mask, dim=1)
    alpha_d = alpha if drop_scale is None else alpha * drop_scale
    out = torch.bmm(alpha_d.transpose(1, 2), xj)  # (N, H, HC): head h's weights applied to every channel
    if heads > 1:  # keep the diagonal blocks (head h's weights on head h's channels)
        if pool is None:  # one gather of the H diagonal blocks 0, H+1, 2(H+1), ... (a single Gather when exported)
            diagonal = torch.arange(heads, device=out.device) * (heads + 1)
            out = out.view(n, heads * heads, channels).index_select(1, diagonal)
        else:
            out = torch.diagonal(out.view(n, heads, heads, channels), dim1=1, dim2=2).transpose(1, 2)
    return out.reshape(n, hc), xj, r, alpha, alpha_d, buffers


class _DenseGATv2Attention(torch.autograd.Function):
    """The attention of :func:`_attend` with a memory- and pass-saving hand-written backward."""

    @staticmethod
    def forward(ctx, xl, xr, att, index, mask, slope, drop_scale):  # noqa: ANN001, ANN205
        out, xj, r, alpha, alpha_d, buffers = _attend(xl, xr, att, index, mask, slope, drop_scale, _POOL)
        ctx.slope = slope
        ctx.buffers = buffers
        ctx.save_for_backward(xl, xr, att, index, xj, r, alpha, alpha_d, drop_scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        # The two saved (N, K, HC) tensors are reused in place as gradient buffers, so the backward allocates
        # no tensor of that size. Running backward twice (retain_graph=True) is therefore refused by
        # autograd's saved-tensor version check.
        xl, xr, att, index, xj, r, alpha, alpha_d, drop_scale = ctx.saved_tensors
        slope = ctx.slope
        n, k = index.shape
        heads, channels = att.shape[-2], att.shape[-1]
        hc = heads * channels
        head_mask = _head_mask(heads, channels, att)
        att_bd = att.reshape(hc, 1) * head_mask
        flat = index.reshape(-1)
        g = grad_out.reshape(n, hc)
        # d alpha[n, k, h] = <g[n, head h], xj[n, k, head h]>: a batched mat-vec per head (strided views)
        d_alpha = torch.cat([
            torch.bmm(xj[:, :, h * channels:(h + 1) * channels], g[:, h * channels:(h + 1) * channels].unsqueeze(2))
            for h in range(heads)
        ], dim=2)  # (N, K, H)
        if drop_scale is not None:
            d_alpha = d_alpha * drop_scale
        de = alpha * (d_alpha - (alpha * d_alpha).sum(dim=1, keepdim=True))  # softmax backward, (N, K, H)
        de_flat = de.reshape(n * k, heads)
        r_flat = r.view(n * k, hc)
        d_att = None
        if ctx.needs_input_grad[2]:
            # e = att . lrelu(s), lrelu(s) = (1 - slope) relu(s) + slope (x_l[j] + x_r[i])
            d_el = torch.stack([  # per source row: sum of de over the edges it feeds (bincount: a fast scatter)
                torch.bincount(flat, weights=de_flat[:, h].contiguous(), minlength=n) for h in range(heads)
            ], dim=1).to(de.dtype)
            d_att_bd = ((1.0 - slope) * (de_flat.t() @ r_flat).t()
                        + slope * (xl.t() @ d_el + xr.t() @ de.sum(dim=1)))
            d_att = (d_att_bd * head_mask).sum(dim=1).view_as(att)
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            _release(ctx)
            return None, None, d_att, None, None, None, None
        # d s = de * att * lrelu'(s), with lrelu'(s) = 1 where r = relu(s) > 0 else slope. Written into the
        # saved buffers: xj (no longer needed) receives de * att, r receives d s.
        d_lrelu = torch.mm(de_flat, att_bd.t(), out=xj.view(n * k, hc))
        ds = torch.ops.aten.leaky_relu_backward.grad_input(d_lrelu, r_flat, slope, True, grad_input=r_flat)
        ds3 = ds.view(n, k, hc)
        d_xr = None
        if ctx.needs_input_grad[1]:  # s = x_l[j] + x_r[i]: sum over the K slots (a bmm with ones is faster)
            d_xr = torch.bmm(ds3.new_ones(n, 1, k), ds3).view(n, hc)
        d_xl = None
        if ctx.needs_input_grad[0]:
            # + aggregation gradient alpha_ij * g_i (per head), in place; then scatter to the source rows
            ds.view(n, k, heads, channels).addcmul_(alpha_d.unsqueeze(-1), g.view(n, 1, heads, channels))
            d_xl = torch.zeros(n, hc, dtype=ds.dtype, device=ds.device).index_add_(0, flat, ds)
        _release(ctx)
        return d_xl, d_xr, d_att, None, None, None, None


def _release(ctx) -> None:  # noqa: ANN001
    if ctx.buffers:
        _POOL.give(*ctx.buffers)
        ctx.buffers = ()


class DenseGATv2Conv(nn.Module):
    """GATv2 on a fixed-degree neighbour table; parameters as ``torch_geometric.nn.GATv2Conv``.

    Args:
        in_channels: input feature size.
        out_channels: channels per head (C).
        heads: number of heads (H).
        concat: concatenate heads (output H*C) or average them (output C).
        negative_slope: leaky-ReLU slope in the attention score.
        dropout: dropout on the attention coefficients (training only).
        bias: learnable output bias and Linear biases.
        fused_backward: use the hand-written backward during training (identical gradients, less memory).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int = 1,
        concat: bool = True,
        negative_slope: float = 0.2,
        dropout: float = 0.0,
        bias: bool = True,
        fused_backward: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.heads = heads
        self.concat = concat
        self.negative_slope = float(negative_slope)
        self.dropout = float(dropout)
        self.fused_backward = fused_backward
        self.lin_l = nn.Linear(in_channels, heads * out_channels, bias=bias)
        self.lin_r = nn.Linear(in_channels, heads * out_channels, bias=bias)
        self.att = nn.Parameter(torch.empty(1, heads, out_channels))
        if bias:
            self.bias = nn.Parameter(torch.empty(heads * out_channels if concat else out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyG's initialisation: glorot weights and attention, Linear biases U(+-1/sqrt(in)), zero bias."""
        for lin in (self.lin_l, self.lin_r):
            bound = math.sqrt(6.0 / (lin.weight.shape[0] + lin.weight.shape[1]))
            nn.init.uniform_(lin.weight, -bound, bound)
            if lin.bias is not None:
                nn.init.uniform_(lin.bias, -1.0 / math.sqrt(self.in_channels), 1.0 / math.sqrt(self.in_channels))
        bound = math.sqrt(6.0 / (self.heads + self.out_channels))
        nn.init.uniform_(self.att, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def project(self, x: Tensor, extra: tuple[nn.Linear, ...] = ()) -> tuple[Tensor, ...]:
        """``(lin_l(x), lin_r(x), *[lin(x) for lin in extra])`` computed as one matmul."""
        linears = (self.lin_l, self.lin_r, *extra)
        weight = torch.cat([lin.weight for lin in linears], dim=0)
        if all(lin.bias is None for lin in linears):
            bias = None
        else:
            bias = torch.cat([
                lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0]) for lin in linears
            ])
        y = F.linear(x, weight, bias)
        return y.split([lin.weight.shape[0] for lin in linears], dim=1)

    def propagate(self, xl: Tensor, xr: Tensor, plan: NeighborPlan) -> Tensor:
        """Attention over each node's self + neighbours, given the projected ``x_l`` and ``x_r``."""
        mask = plan.mask if plan.mask.dtype == xl.dtype else plan.mask.to(xl.dtype)
        drop_scale = None
        if self.training and self.dropout > 0:
            shape = (plan.index.shape[0], plan.index.shape[1], self.heads)
            drop_scale = dropout_mask(shape, self.dropout, xl.dtype, xl.device)
        tracing = is_tracing()
        recording = torch.is_grad_enabled() and (xl.requires_grad or xr.requires_grad or self.att.requires_grad)
        if recording and self.fused_backward and not tracing:
            out = _DenseGATv2Attention.apply(xl, xr, self.att, plan.index, mask, self.negative_slope, drop_scale)
        elif recording:
            out = _attend(xl, xr, self.att, plan.index, mask, self.negative_slope, drop_scale)[0]
        elif tracing:  # exported graph: row blocks, so one block's (rows, W+1, H*C) temporaries live at a time
            n = xr.shape[0]
            rows = (n + EXPORT_ROW_BLOCKS - 1) // EXPORT_ROW_BLOCKS  # every block the same size (the last padded)
            pad = rows * EXPORT_ROW_BLOCKS - n
            xr_p = F.pad(xr, (0, 0, 0, pad)).view(EXPORT_ROW_BLOCKS, rows, -1)
            index_p = F.pad(plan.index, (0, 0, 0, pad)).view(EXPORT_ROW_BLOCKS, rows, -1)
            mask_p = F.pad(mask, (0, 0, 0, 0, 0, pad)).view(EXPORT_ROW_BLOCKS, rows, -1, 1)
            out = torch.cat([_attend(xl, xr_p[b], self.att, index_p[b], mask_p[b], self.negative_slope, None)[0]
                             for b in range(EXPORT_ROW_BLOCKS)])[:n]
        else:  # inference: pooled temporaries, given back at once
            out, *_, buffers = _attend(xl, xr, self.att, plan.index, mask, self.negative_slope, drop_scale, _POOL)
            _POOL.give(*buffers)
        if not self.concat:
            out = out.view(-1, self.heads, self.out_channels).mean(dim=1)
        if self.bias is not None:
            out = out + self.bias
        return out

    def forward(self, x: Tensor, neighbors: Tensor, plan: NeighborPlan | None = None) -> Tensor:
        """x (N, in_channels), neighbors (N, W) int64 -1-padded (no self) -> (N, H*C) (or (N, C) if not concat)."""
        if plan is None:
            plan = neighbor_plan(neighbors, x.dtype)
        xl, xr = self.project(x)
        return self.propagate(xl, xr, plan)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, heads={self.heads})"
