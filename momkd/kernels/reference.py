"""The memory head in torch ops (eq. 6-8) over packed slides: THE implementation of the head.

Packed layout: the rows of slide ``b`` are ``slide_offsets[b]:slide_offsets[b+1]``, with ``slide_offsets[0] = 0``
and ``slide_offsets[-1] = N``. The per-slide softmax and weighted sum use a ``(B, N)`` membership mask built
with ``arange``/compare, ``where`` and matmuls (NaN-safe across slides, see :func:`segment_softmax_pool`): no
scatter, ``index_add``, ``nonzero`` or Python loops, so the same code exports to ONNX/TensorRT with dynamic ``N``
and ``B``.

``momkd.models.head.MemoryAttentionHead`` runs :func:`head_reference`, or on CUDA inference the
``momkd::memory_head`` operator (:mod:`momkd.kernels.ops`), whose CUDA implementation is the fused Triton kernel
(:mod:`momkd.kernels.memory_head`) and whose implementation elsewhere is :func:`head_reference`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def membership(slide_offsets: Tensor, n: int | Tensor, device: torch.device | None = None) -> Tensor:
    """(B, N) bool: ``member[b, i]`` is True when row ``i`` belongs to slide ``b``."""
    # torch.arange takes a 0-dim tensor too (a traced row count); its stubs say a Python number only
    rows = torch.arange(n, device=device if device is not None else slide_offsets.device)  # type: ignore[arg-type]
    offsets = slide_offsets.to(rows.device).long()
    return (rows.unsqueeze(0) >= offsets[:-1].unsqueeze(1)) & (rows.unsqueeze(0) < offsets[1:].unsqueeze(1))


def _one_slide_eager(slide_offsets: Tensor) -> bool:
    """True for a single slide outside any graph capture (a captured graph must hold the many-slide path)."""
    capturing = (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export()
                 or torch.compiler.is_compiling() or torch.compiler.is_exporting())
    return not capturing and slide_offsets.shape[0] == 2


def segment_softmax_pool(score: Tensor, values: Tensor, slide_offsets: Tensor, tau: float | Tensor = 1.0,
                         ) -> tuple[Tensor, Tensor]:
    """Per-slide ``softmax(score / tau)`` and attention-weighted sum of ``values``.

    Args:
        score: (N,) patch scores.
        values: (N, D) patch embeddings.
        slide_offsets: (B+1,) int64 row offsets (first 0, last N).
        tau: temperature (float or 0-dim tensor).

    Returns:
        attention (N,) summing to 1 within each slide, pooled (B, D). An empty slide pools to zeros.

    Slides are isolated from each other's values: a slide with a non-finite score or value (features beyond
    the encoder's range overflow to inf/NaN) gets NaN attention and a NaN pooled row, and the other slides of
    the pack get exactly the outputs they get alone. Every product with the 0/1 membership mask therefore only
    ever meets finite numbers (``0 * inf`` would be NaN): a slide's maximum is selected with ``where`` and
    gathered back per row, non-finite rows are zeroed before the matmuls (bit-identical to the plain products
    for finite input), and the slides holding such rows are then set to NaN.
    """
    member = membership(slide_offsets, score.shape[0], score.device)              # (B, N) bool
    memberf = member.to(score.dtype)
    z = score / tau
    # Per-slide max for a numerically safe softmax (a constant shift per slide: detached, exact); an empty
    # slide's max is -finfo.max, finite, and is never gathered. A NaN row makes its own slide's max NaN only.
    lowest = torch.finfo(score.dtype).max
    slide_max = torch.where(member, z.detach().unsqueeze(0), -lowest).amax(dim=1)   # (B,)
    row_slide = (member * torch.arange(member.shape[0], device=member.device).unsqueeze(1)).sum(dim=0)  # (N,)
    ex = torch.exp(z - slide_max.index_select(0, row_slide))
    finite_ex = torch.where(torch.isnan(ex), torch.zeros_like(ex), ex)             # (N,), in [0, 1]
    denom = memberf @ finite_ex                                                    # (B,)
    attention = ex / (denom @ memberf)
    # a row is bad when its score or a value is not finite: one sum per row finds the values (it also flags a
    # row whose values, finite, add up beyond the dtype's range; such a slide is out of range all the same)
    row_bad = torch.isnan(ex) | ~torch.isfinite(values.sum(dim=1))                # (N,)
    # (N, D) pass (and its backward) only where there are other slides to protect: not in eager one-slide
    # training and evaluation, where a bad row makes its slide NaN either way
    finite_values = values if _one_slide_eager(slide_offsets) else torch.where(row_bad.unsqueeze(1), 0.0, values)
    slide_bad = (memberf @ row_bad.to(score.dtype)) > 0                            # (B,)
    finite_attention = torch.where(row_bad, 0.0, attention)
    pooled = (memberf * finite_attention.unsqueeze(0)) @ finite_values
    pooled = torch.where(slide_bad.unsqueeze(1), torch.full_like(pooled, float("nan")), pooled)
    return attention, pooled


def memory_scores(patch_proj: Tensor, codes_pos: Tensor, codes_neg: Tensor) -> Tensor:
    """Eq. 6: ``max_j F_P,i . c+_j - max_j F_P,i . c-_j`` (N,), one matmul against both banks."""
    n_pos = codes_pos.shape[0]
    sims = patch_proj @ torch.cat([codes_pos, codes_neg], dim=0).t()
    return sims[:, :n_pos].amax(dim=1) - sims[:, n_pos:].amax(dim=1)


class HeadOutput(NamedTuple):
    patch_proj: Tensor | None  # (N, D_N) unit rows, F_P-wsi (None from the fused operator, which never forms it)
    score: Tensor  # (N,) eq. 6
    attention: Tensor  # (N,) eq. 7
    pooled: Tensor  # (B, D) eq. 8, F_C-wsi


def project_rows(embeddings: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F_P-wsi = normalize(W_proj F_wsi): (N, D) rows, (D_N, D) weight, (D_N,) bias -> (N, D_N) unit rows."""
    return F.normalize(F.linear(embeddings, weight, bias), dim=-1)


def head_reference(embeddings: Tensor, weight: Tensor, bias: Tensor | None, codes_pos: Tensor, codes_neg: Tensor,
                   slide_offsets: Tensor, tau: float | Tensor) -> HeadOutput:
    """The head in torch ops (eq. 6-8): embeddings (N, D), projection (D_N, D) + (D_N,), unit codes (n, D_N)
    each, offsets (B+1,), temperature -> HeadOutput (patch_proj (N, D_N), score, attention (N,), pooled (B, D))."""
    patch_proj = project_rows(embeddings, weight, bias)
    score = memory_scores(patch_proj, codes_pos, codes_neg)
    attention, pooled = segment_softmax_pool(score, embeddings, slide_offsets, tau)
    return HeadOutput(patch_proj, score, attention, pooled)
