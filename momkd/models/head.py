"""Memory-guided attention (eq. 6-8) as a module: patch projection, memory scores, per-slide softmax pooling.

The math is :mod:`momkd.kernels.reference` (packed-slide layout, no scatter ops, exportable); for inference on
CUDA (no autograd, nothing exported) :class:`MemoryAttentionHead` calls the ``momkd::memory_head`` operator
instead (:mod:`momkd.kernels.ops`), whose CUDA implementation is a fused Triton kernel.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from momkd.kernels import ops
from momkd.kernels.reference import HeadOutput, head_reference, project_rows


class MemoryAttentionHead(nn.Module):
    """Patch projection, memory scores (eq. 6, memory detached), per-slide softmax (eq. 7), pooling (eq. 8).

    Args:
        dim: embedding size D.
        proj_dim: projection size D_N.
        tau: softmax temperature (eq. 7).
        learnable_tau: learn ``tau = exp(log_tau)`` (initialised at ``tau``), clamped to [tau_min, tau_max].
    """

    def __init__(self, dim: int, proj_dim: int, tau: float = 0.2, learnable_tau: bool = False,
                 tau_min: float = 0.01, tau_max: float = 2.0) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, proj_dim)
        self.learnable_tau = learnable_tau
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        if learnable_tau:
            self.log_tau = nn.Parameter(torch.tensor(math.log(tau)))
        else:
            self.fixed_tau = float(tau)

    def temperature(self) -> float | Tensor:
        """The current tau (a 0-dim tensor when learnable)."""
        if self.learnable_tau:
            return self.log_tau.exp().clamp(self.tau_min, self.tau_max)
        return self.fixed_tau

    def project(self, embeddings: Tensor) -> Tensor:
        """F_P-wsi = normalize(W_proj F_wsi), (N, D_N)."""
        return project_rows(embeddings, self.proj.weight, self.proj.bias)

    def forward(self, embeddings: Tensor, codes_pos: Tensor, codes_neg: Tensor, slide_offsets: Tensor) -> HeadOutput:
        """embeddings (N, D); unit codes (n, D_N) each (detached here); offsets (B+1,).

        Inference on CUDA (and TorchScript tracing, so that the traced module dispatches by device when it runs)
        goes through the ``momkd::memory_head`` operator and returns ``patch_proj=None``; see ``ops.use_operator``.
        """
        tau = self.temperature()
        codes_pos, codes_neg = codes_pos.detach(), codes_neg.detach()
        if ops.use_operator(embeddings, self.proj.weight, tau):
            score, attention, pooled = ops.memory_head(embeddings, self.proj.weight, self.proj.bias, codes_pos,
                                                       codes_neg, slide_offsets, ops.tau_tensor(tau, embeddings))
            return HeadOutput(None, score, attention, pooled)
        return head_reference(embeddings, self.proj.weight, self.proj.bias, codes_pos, codes_neg, slide_offsets, tau)
