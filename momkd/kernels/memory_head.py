"""Fused memory head (eq. 6-8) for packed slides: one Triton pass over the encoder rows.

What it computes is exactly ``momkd.kernels.reference.head_reference`` (the torch reference), minus the (N, D_N)
projections it does not return::

    p_i     = W e_i + b                                   (D_N,)    patch projection
    s_i     = (max_j p_i . c+_j - max_j p_i . c-_j) / max(||p_i||, 1e-12)    eq. 6 on the unit projection
    a_i     = softmax_{i in slide}(s_i / tau)                                   eq. 7, per slide
    pooled  = sum_{i in slide} a_i e_i                    (B, D)    eq. 8

Three launches, none of which writes an (N, D_N) or (N, 2n) tensor:

1. ``_head_partials_kernel``: one program per block of ``BLOCK_N`` rows of ONE slide (blocks never straddle
   slides; the block -> slide table is built on the device, no host sync). It projects the rows (a tiled
   ``tl.dot`` over D), scores them against both banks, stores the scores, and keeps an online-softmax partial
   per block: the block max ``m``, ``l = sum exp(z - m)`` and ``acc = sum exp(z - m) e_i`` (D,), with
   ``z = s / tau``. Every exponent is ``<= 0``, so any tau is safe.
2. ``_head_combine_kernel``: per slide (and D tile), ``M = max m``, ``L = sum l exp(m - M)``,
   ``pooled = sum acc exp(m - M) / L``; an empty slide pools to zeros.
3. ``_head_attention_kernel``: ``a_i = exp(z_i - M) / L`` for every row (reads and writes N floats).

Precision: fp32 embeddings use fp32 ``tl.dot`` operands with ``input_precision`` "tf32x3" by default (three
TF32 tensor-core products, about fp32 accuracy), "tf32" when PyTorch allows TF32 matmuls, or "ieee" on request.
fp16/bf16 embeddings, or an active ``torch.autocast`` of that dtype, run the projection with fp16/bf16
operands (fp32 accumulation), as autocast runs the reference's linear layer. Softmax, norms and sums are fp32.

Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` set before this module is imported, Triton's interpreter
runs it on CPU tensors (tests). The kernel is forward-only (inference); :mod:`momkd.kernels.ops` decides when
it is used.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

PRECISIONS = ("ieee", "tf32", "tf32x3")
_HALF_CODES = {torch.float16: 1, torch.bfloat16: 2}
BLOCK_P = 64   # partials combined per step (combine kernel)
BLOCK_D = 32   # pooled columns per combine program
MIN_DOT = 16   # tl.dot needs every tile dimension >= 16


@triton.jit
def _slide_blocks(slide, offsets_ptr, cum_ptr, BLOCK_N: tl.constexpr):
    """Rows [start, end) of ``slide``, and its partial blocks ``first .. first + n_blocks - 1``."""
    start = tl.load(offsets_ptr + slide)
    end = tl.load(offsets_ptr + slide + 1)
    n_blocks = (end - start + BLOCK_N - 1) // BLOCK_N
    first = tl.load(cum_ptr + slide) - n_blocks
    return start, end, n_blocks, first


@triton.jit
def _block_rows(pid, slide, offsets_ptr, cum_ptr, BLOCK_N: tl.constexpr):
    """The ``BLOCK_N`` row indices of block ``pid`` (one of ``slide``'s) and which of them are rows of the slide."""
    start, end, n_blocks, first = _slide_blocks(slide, offsets_ptr, cum_ptr, BLOCK_N)
    rows = start + (pid - first) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, rows < end


@triton.jit
def _head_partials_kernel(
    emb_ptr, w_ptr, bias_ptr, pos_ptr, neg_ptr, tau_ptr, offsets_ptr, cum_ptr, block_slide_ptr,
    score_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
    n_slides, proj_dim, n_pos, n_neg,
    stride_emb, stride_w, stride_pos, stride_neg, stride_acc,
    DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DN: tl.constexpr,
    BLOCK_C: tl.constexpr, HALF: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    slide = tl.load(block_slide_ptr + pid)
    if slide < n_slides:
        rows, row_ok = _block_rows(pid, slide, offsets_ptr, cum_ptr, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        dn = tl.arange(0, BLOCK_DN)
        dn_ok = dn < proj_dim

        # p = W e + b for BLOCK_N rows, tiled over D
        proj = tl.zeros((BLOCK_N, BLOCK_DN), dtype=tl.float32)
        for k0 in range(0, DIM, BLOCK_K):
            k = k0 + cols
            k_ok = k < DIM
            e = tl.load(emb_ptr + rows[:, None] * stride_emb + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            wt = tl.load(w_ptr + dn[None, :] * stride_w + k[:, None], mask=k_ok[:, None] & dn_ok[None, :],
                         other=0.0)  # (BLOCK_K, BLOCK_DN) = W^T tile
            if HALF == 1:
                proj += tl.dot(e.to(tl.float16), wt.to(tl.float16))
            elif HALF == 2:
                proj += tl.dot(e.to(tl.bfloat16), wt.to(tl.bfloat16))
            else:
                proj += tl.dot(e.to(tl.float32), wt.to(tl.float32), input_precision=PRECISION)
        proj += tl.load(bias_ptr + dn, mask=dn_ok, other=0.0).to(tl.float32)[None, :]
        norm = tl.maximum(tl.sqrt(tl.sum(proj * proj, axis=1)), 1e-12)

        # eq. 6: best code of each bank; max commutes with the positive 1 / ||p||
        c = tl.arange(0, BLOCK_C)
        pos_ok = c < n_pos
        neg_ok = c < n_neg
        cpos = tl.load(pos_ptr + c[None, :] * stride_pos + dn[:, None], mask=dn_ok[:, None] & pos_ok[None, :],
                       other=0.0).to(tl.float32)
        cneg = tl.load(neg_ptr + c[None, :] * stride_neg + dn[:, None], mask=dn_ok[:, None] & neg_ok[None, :],
                       other=0.0).to(tl.float32)
        best_pos = tl.max(tl.where(pos_ok[None, :], tl.dot(proj, cpos, input_precision=PRECISION), float("-inf")),
                          axis=1)
        best_neg = tl.max(tl.where(neg_ok[None, :], tl.dot(proj, cneg, input_precision=PRECISION), float("-inf")),
                          axis=1)
        score = (best_pos - best_neg) / norm
        tl.store(score_ptr + rows, score, mask=row_ok)

        # online-softmax partial of this block: m, l = sum exp(z - m), acc = sum exp(z - m) e
        tau = tl.load(tau_ptr)
        z = tl.where(row_ok, score / tau, float("-inf"))
        m = tl.max(z, axis=0)
        p = tl.exp(z - m)  # padding rows: exp(-inf) = 0
        tl.store(part_m_ptr + pid, m)
        tl.store(part_l_ptr + pid, tl.sum(p, axis=0))
        for k0 in range(0, DIM, BLOCK_K):
            k = k0 + cols
            k_ok = k < DIM
            e = tl.load(emb_ptr + rows[:, None] * stride_emb + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0).to(tl.float32)
            tl.store(part_acc_ptr + pid * stride_acc + k, tl.sum(e * p[:, None], axis=0), mask=k_ok)


@triton.jit
def _head_combine_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, offsets_ptr, cum_ptr, pooled_ptr, slide_m_ptr, slide_l_ptr,
    stride_acc, stride_pooled,
    DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    slide = tl.program_id(0)
    d_tile = tl.program_id(1)
    start, end, n_blocks, first = _slide_blocks(slide, offsets_ptr, cum_ptr, BLOCK_N)
    j = tl.arange(0, BLOCK_P)
    running = tl.full((BLOCK_P,), float("-inf"), dtype=tl.float32)
    for j0 in range(0, n_blocks, BLOCK_P):
        running = tl.maximum(running, tl.load(part_m_ptr + first + j0 + j, mask=j0 + j < n_blocks,
                                              other=float("-inf")))
    slide_max = tl.max(running, axis=0)
    d = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < DIM
    total = tl.zeros((BLOCK_P,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j0 in range(0, n_blocks, BLOCK_P):
        ok = j0 + j < n_blocks
        w = tl.where(ok, tl.exp(tl.load(part_m_ptr + first + j0 + j, mask=ok, other=0.0) - slide_max), 0.0)
        total += w * tl.load(part_l_ptr + first + j0 + j, mask=ok, other=0.0)
        a = tl.load(part_acc_ptr + (first + j0 + j)[:, None] * stride_acc + d[None, :],
                    mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(a * w[:, None], axis=0)
    denom = tl.sum(total, axis=0)
    pooled = tl.where(denom > 0, acc / tl.where(denom > 0, denom, 1.0), 0.0)  # empty slide -> zeros
    tl.store(pooled_ptr + slide * stride_pooled + d, pooled, mask=d_ok)
    if d_tile == 0:
        tl.store(slide_m_ptr + slide, slide_max)
        tl.store(slide_l_ptr + slide, denom)


@triton.jit
def _head_attention_kernel(
    score_ptr, tau_ptr, offsets_ptr, cum_ptr, block_slide_ptr, slide_m_ptr, slide_l_ptr, attention_ptr,
    n_slides, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    slide = tl.load(block_slide_ptr + pid)
    if slide < n_slides:
        rows, row_ok = _block_rows(pid, slide, offsets_ptr, cum_ptr, BLOCK_N)
        z = tl.load(score_ptr + rows, mask=row_ok, other=0.0) / tl.load(tau_ptr)
        attention = tl.exp(z - tl.load(slide_m_ptr + slide)) / tl.load(slide_l_ptr + slide)
        tl.store(attention_ptr + rows, attention, mask=row_ok)


def _pow2(n: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(max(int(n), 1)))


def dot_mode(embeddings: Tensor, input_precision: str | None = None) -> tuple[int, str]:
    """(half code, fp32 input precision) for these embeddings: 1/2 = fp16/bf16 projection operands (the
    embeddings' dtype, else an active autocast dtype on their device), 0 = fp32 operands."""
    half = _HALF_CODES.get(embeddings.dtype, 0)
    device_type = embeddings.device.type
    if not half and torch.is_autocast_enabled(device_type):
        half = _HALF_CODES.get(torch.get_autocast_dtype(device_type), 0)
    if input_precision is None:
        tf32 = device_type == "cuda" and torch.backends.cuda.matmul.allow_tf32
        input_precision = "tf32" if tf32 else "tf32x3"
    if input_precision not in PRECISIONS:
        raise ValueError(f"input_precision must be one of {', '.join(PRECISIONS)} (got {input_precision!r})")
    return half, input_precision


def _check(embeddings: Tensor, weight: Tensor, bias: Tensor, codes_pos: Tensor, codes_neg: Tensor,
           slide_offsets: Tensor) -> None:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be (N, D), got shape {tuple(embeddings.shape)}")
    dim = embeddings.shape[1]
    if weight.dim() != 2 or weight.shape[1] != dim or bias.shape != (weight.shape[0],):
        raise ValueError(f"projection must be weight (D_N, {dim}) and bias (D_N,), got {tuple(weight.shape)} and "
                         f"{tuple(bias.shape)}")
    for name, codes in (("codes_pos", codes_pos), ("codes_neg", codes_neg)):
        if codes.dim() != 2 or codes.shape[1] != weight.shape[0] or codes.shape[0] < 1:
            raise ValueError(f"{name} must be (n, {weight.shape[0]}) with n >= 1, got {tuple(codes.shape)}")
    if slide_offsets.dim() != 1 or slide_offsets.shape[0] < 2:
        raise ValueError(f"slide_offsets must be (B+1,) with B >= 1, got shape {tuple(slide_offsets.shape)}")
    if embeddings.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"embeddings must be float32, float16 or bfloat16 (got {embeddings.dtype})")


def fused_memory_head(embeddings: Tensor, weight: Tensor, bias: Tensor, codes_pos: Tensor, codes_neg: Tensor,
                      slide_offsets: Tensor, tau: Tensor | float, *, input_precision: str | None = None,
                      block_n: int = 64, block_k: int = 64, num_warps: int = 4, num_stages: int = 3,
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """The memory head of ``B`` packed slides in one pass over the encoder rows (no autograd).

    Args:
        embeddings: (N, D) encoder output rows F_wsi (float32/float16/bfloat16).
        weight, bias: the patch projection W_proj, (D_N, D) and (D_N,).
        codes_pos, codes_neg: (n+, D_N) and (n-, D_N) unit memory codes.
        slide_offsets: (B+1,) int64 row offsets (first 0, last N, non-decreasing).
        tau: softmax temperature (float or 0-dim tensor).
        input_precision: fp32 ``tl.dot`` mode ("ieee", "tf32", "tf32x3"; default: see ``dot_mode``).
        block_n, block_k, num_warps, num_stages: launch configuration of the main kernel.

    Returns:
        score (N,) eq. 6, attention (N,) eq. 7 (sums to 1 within each slide), pooled (B, D) eq. 8, in the
        embeddings' dtype.
    """
    _check(embeddings, weight, bias, codes_pos, codes_neg, slide_offsets)
    for name, value in (("block_n", block_n), ("block_k", block_k)):
        if value < MIN_DOT or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= {MIN_DOT} (got {value})")
    half, precision = dot_mode(embeddings, input_precision)
    device = embeddings.device
    n, dim = embeddings.shape
    n_slides = slide_offsets.shape[0] - 1
    emb = embeddings.contiguous()
    weight, bias = weight.contiguous(), bias.contiguous()
    codes_pos, codes_neg = codes_pos.contiguous(), codes_neg.contiguous()
    offsets = slide_offsets.to(device=device, dtype=torch.int64)
    tau_t = (tau.detach().to(device=device, dtype=torch.float32) if isinstance(tau, Tensor)
             else torch.full((), float(tau), dtype=torch.float32, device=device))

    # block -> slide table, on the device: slide b owns blocks cum[b] - nblocks[b] .. cum[b] - 1
    n_blocks = torch.div(offsets[1:] - offsets[:-1] + (block_n - 1), block_n, rounding_mode="floor")
    cum = torch.cumsum(n_blocks, 0)
    grid_blocks = triton.cdiv(n, block_n) + n_slides  # upper bound: each slide adds at most one partial block
    block_slide = torch.searchsorted(cum, torch.arange(grid_blocks, device=device), right=True)

    f32: dict[str, Any] = dict(dtype=torch.float32, device=device)
    score = torch.empty(n, **f32)
    attention = torch.empty(n, **f32)
    pooled = torch.empty(n_slides, dim, **f32)
    part_m = torch.empty(grid_blocks, **f32)
    part_l = torch.empty(grid_blocks, **f32)
    part_acc = torch.empty(grid_blocks, dim, **f32)
    slide_m = torch.empty(n_slides, **f32)
    slide_l = torch.empty(n_slides, **f32)

    _head_partials_kernel[(grid_blocks,)](
        emb, weight, bias, codes_pos, codes_neg, tau_t, offsets, cum, block_slide,
        score, part_m, part_l, part_acc,
        n_slides, weight.shape[0], codes_pos.shape[0], codes_neg.shape[0],
        emb.stride(0), weight.stride(0), codes_pos.stride(0), codes_neg.stride(0), part_acc.stride(0),
        DIM=dim, BLOCK_N=block_n, BLOCK_K=min(block_k, _pow2(dim)), BLOCK_DN=_pow2(weight.shape[0]),
        BLOCK_C=_pow2(max(codes_pos.shape[0], codes_neg.shape[0])), HALF=half, PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    _head_combine_kernel[(n_slides, triton.cdiv(dim, BLOCK_D))](
        part_m, part_l, part_acc, offsets, cum, pooled, slide_m, slide_l, part_acc.stride(0), pooled.stride(0),
        DIM=dim, BLOCK_N=block_n, BLOCK_P=BLOCK_P, BLOCK_D=BLOCK_D,
    )
    _head_attention_kernel[(grid_blocks,)](
        score, tau_t, offsets, cum, block_slide, slide_m, slide_l, attention, n_slides, BLOCK_N=block_n,
    )
    out_dtype = embeddings.dtype
    if out_dtype != torch.float32:
        return score.to(out_dtype), attention.to(out_dtype), pooled.to(out_dtype)
    return score, attention, pooled
