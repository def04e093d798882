"""The MoMKD objective (eq. 3-5, 9, 10) and its gradient decoupling.

    phi(F, C)     = (1 / tau_agg) log sum_j exp(tau_agg F . c_j)                               eq. 3
    Delta(F)      = phi(F, C+) - phi(F, C-)                                                    eq. 4
    L_align(F, y) = softplus(beta (margin - Delta)) if y = 1, softplus(beta (margin + Delta)) if y = 0   eq. 5
    L_mem         = mean_i ||F_P,i - sg(c_k*i)||^2 + sum_{i != j} cos^2(c_i, c_j)               eq. 10
    L_total       = l_ce CE + l_mse MSE(omics, recon) + a_wsi L_align(F_N-wsi) + a_omics L_align(F_N-omics)
                    + l_mem L_mem                                                              eq. 9

Gradient routes (paper §3.3.2), all guaranteed by construction and proven by tests/test_decoupling.py:

* CE never reaches the memory (the attention head uses the memory detached, eq. 6).
* The omics terms (align_omics, mse) reach only the omics branch and the memory, never the WSI encoder/head.
* The WSI terms (ce, align_wsi, mem) never reach the omics branch.
* The commitment term (both forms) treats the code as a constant (sg); the memory moves only through the alignment
  and orthogonality terms (``memory_update = "gradient"``) or not at all by gradient (``ema``/``fixed``: the
  codes are buffers).

Codes enter every term L2-normalised (``ClassMemory.normalized``), except the authors' VQ commitment form
(``commit_form = "official"``), which uses the raw codes as their vector quantiser does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from momkd.config import LossConfig

LOSS_KEYS = ("total", "ce", "mse", "align_wsi", "align_omics", "mem")


def phi(features: Tensor, codes: Tensor, tau_agg: float = 5.0) -> Tensor:
    """Eq. 3: smooth max similarity of each row of ``features`` (B, D_N) to the codes (n, D_N) -> (B,).

    For unit rows and unit codes it lies in [-1 + ln(n)/tau_agg, 1 + ln(n)/tau_agg] (upper bound attained only
    when all codes coincide with F)."""
    return torch.logsumexp(tau_agg * (features @ codes.t()), dim=-1) / tau_agg


def delta(features: Tensor, codes_pos: Tensor, codes_neg: Tensor, tau_agg: float = 5.0) -> Tensor:
    """Eq. 4: memory differential phi(F, C+) - phi(F, C-) -> (B,), in [-2, 2] for unit vectors and equal n."""
    return phi(features, codes_pos, tau_agg) - phi(features, codes_neg, tau_agg)


def align_loss(features: Tensor, label: Tensor, codes_pos: Tensor, codes_neg: Tensor, beta: float = 20.0,
               margin: float = 0.3, tau_agg: float = 5.0) -> Tensor:
    """Eq. 5 averaged over the batch: softplus(beta (margin - s Delta)) with s = +1 for y = 1, -1 for y = 0."""
    sign = 2.0 * label.reshape(-1).to(features.dtype) - 1.0
    return F.softplus(beta * (margin - sign * delta(features, codes_pos, codes_neg, tau_agg))).mean()


def nearest_euclidean(points: Tensor, codes: Tensor) -> Tensor:
    """argmin_j ||x_i - c_j||_2 for each row (N,), without an (N, n, D) temporary."""
    d2 = (codes * codes).sum(dim=1).unsqueeze(0) - 2.0 * (points @ codes.t())  # + ||x||^2, constant per row
    return d2.argmin(dim=1)


def vq_nearest(points: Tensor, codes: Tensor, eps: float = 1e-8) -> Tensor:
    """argmin_j of the authors' VQ distance sqrt(max(||x_i||^2 + ||c_j||^2 - 2 x_i . c_j, eps)) per row (N,).

    The same ordering as :func:`nearest_euclidean` except where the clamp at ``eps`` makes near-coincident codes
    tie (then the first index wins, as ``argmax`` of the negated distance in their vector quantiser)."""
    d2 = ((points * points).sum(dim=1).unsqueeze(1) + (codes * codes).sum(dim=1).unsqueeze(0)
          - 2.0 * (points @ codes.t()))
    return d2.clamp(min=eps).argmin(dim=1)


def commitment_loss(patch_proj: Tensor, codes: Tensor, form: str = "paper") -> Tensor:
    """Eq. 10 first term, with ``codes`` the label's bank (n, D_N) as stored (raw).

    ``paper``: codes L2-normalised and stop-gradded; mean over patches of ||F_P,i - sg(c_k*)||^2 (sum over
    dimensions), k* = argmin Euclidean. ``official``: raw codes, k* = :func:`vq_nearest`, MSE(sg(c_k*), F_P)
    averaged over all elements: the authors' VectorQuantize is built with ``learnable_codebook=False``, so its
    quantised codes are detached in the commitment term and the codes get no gradient from it (their only
    gradients come from the orthogonality and alignment terms). In both forms the memory gets no gradient here."""
    if form == "paper":
        target_codes = F.normalize(codes.detach(), dim=-1)
        index = nearest_euclidean(patch_proj.detach(), target_codes)
        return (patch_proj - target_codes[index]).pow(2).sum(dim=1).mean()
    if form == "official":
        codes = codes.detach()
        index = vq_nearest(patch_proj.detach().to(codes.dtype), codes)
        return F.mse_loss(codes[index], patch_proj)
    raise ValueError(f"unknown commitment form {form!r}")


def orthogonality_loss(codes: Tensor, form: str = "paper") -> Tensor:
    """Eq. 10 second term on one bank (n, D_N): ``paper`` sum_{i != j} cos^2(c_i, c_j);
    ``official`` sum_{i, j} cos^2(c_i, c_j) / n^2 - 1 / n (the authors' regulariser, before its weight)."""
    unit = F.normalize(codes, dim=-1)
    gram_sq = (unit @ unit.t()).pow(2)
    n = codes.shape[0]
    if form == "paper":
        return gram_sq.sum() - torch.diagonal(gram_sq).sum()
    if form == "official":
        return gram_sq.sum() / (n * n) - 1.0 / n
    raise ValueError(f"unknown orthogonality form {form!r}")


def memory_loss(patch_proj: Tensor, label_codes: Tensor, banks: Sequence[Tensor], cfg: LossConfig) -> Tensor:
    """Eq. 10: commitment of the patch projections to the label's bank + ``cfg.orth_weight`` x orthogonality.

    Args:
        patch_proj: (N, D_N) unit patch projections F_P-wsi of one slide.
        label_codes: (n, D_N) raw codes of the bank of the slide's label.
        banks: every bank's raw codes, (C-, C+): the ``paper`` orthogonality sums over each bank separately;
            the ``official`` one (the authors' VQ regulariser) is on the label's bank only.
        cfg: forms and weights.
    """
    commit = commitment_loss(patch_proj, label_codes, cfg.commit_form)
    if cfg.orth_form == "paper":
        orth = sum((orthogonality_loss(bank, "paper") for bank in banks), patch_proj.new_zeros(()))
    else:
        orth = orthogonality_loss(label_codes, "official")
    return commit + cfg.orth_weight * orth


class MoMKDLoss(nn.Module):
    """Eq. 9. ``loss_fn(out, label, omics, memory) -> {"total", "ce", "mse", "align_wsi", "align_omics", "mem"}``.

    Every value is a scalar tensor; ``total`` is the weighted sum, the others are the unweighted terms (zero
    when not applicable: ABMIL or ``memory is None`` -> only ce; no omics -> no align_omics / mse;
    ``reconstruction`` off -> mse 0). Memory terms need one slide per call (as ``MoMKD.forward``).
    """

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, out, label: Tensor, omics: Tensor | None, memory) -> dict[str, Tensor]:  # noqa: ANN001
        cfg = self.cfg
        label = label.reshape(-1).long()
        ce = F.cross_entropy(out.logits, label)
        zero = ce.new_zeros(())
        terms = {"ce": ce, "mse": zero, "align_wsi": zero, "align_omics": zero, "mem": zero}
        if memory is not None and out.patch_proj is not None:
            codes_neg, codes_pos = memory.normalized()
            if cfg.align_detach_memory:
                codes_neg, codes_pos = codes_neg.detach(), codes_pos.detach()
            if out.slide_proj is not None:
                terms["align_wsi"] = align_loss(out.slide_proj, label, codes_pos, codes_neg, cfg.beta, cfg.margin,
                                                cfg.tau_agg)
            if out.omics_proj is not None:
                terms["align_omics"] = align_loss(out.omics_proj, label, codes_pos, codes_neg, cfg.beta,
                                                  cfg.margin, cfg.tau_agg)
            if out.logits.shape[0] != 1:
                raise ValueError("the memory loss (eq. 10) is defined per slide: pass one slide per call")
            # label bank selected on device (no host sync): y = 1 -> C+, y = 0 -> C-
            label_codes = torch.where(label[0].bool(), memory.positive, memory.negative)
            terms["mem"] = memory_loss(out.patch_proj, label_codes, (memory.negative, memory.positive), cfg)
        if cfg.reconstruction and out.recon is not None and omics is not None:
            terms["mse"] = F.mse_loss(out.recon, omics.to(out.recon.dtype))
        total = (cfg.lambda_ce * terms["ce"] + cfg.lambda_mse * terms["mse"] + cfg.alpha_wsi * terms["align_wsi"]
                 + cfg.alpha_omics * terms["align_omics"] + cfg.lambda_mem * terms["mem"])
        return {"total": total, **terms}
