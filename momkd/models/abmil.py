"""ABMIL baseline (Ilse et al., ICML 2018): gated attention MIL, histology only.

    h_i = dropout(ReLU(W_in x_i))                                      (N, dim)
    a_i = w^T (tanh(V h_i) * sigmoid(U h_i))                           attention logit
    alpha = softmax of a within each slide;  pooled_b = sum_i alpha_i h_i;  logits = W_out pooled

It shares MoMKD's ``forward_wsi(features, neighbors, slide_offsets)`` contract (neighbours are ignored) and
its ``forward`` returns a :class:`~momkd.models.momkd.TrainOutput` with the memory/omics fields set to None, so
training, evaluation and export treat both models alike.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from momkd.kernels.reference import segment_softmax_pool
from momkd.models.momkd import N_CLASSES, TrainOutput, WSIOutput, single_slide_offsets


class ABMIL(nn.Module):
    """Gated-attention MIL.

    Args:
        in_dim: patch feature size.
        dim: embedding size (the attention MLP has dim // 2 hidden units, as Ilse et al.'s 500 -> 128 ratio
            is not meaningful here; at least 1).
        dropout: dropout after the input layer.
    """

    memory = None  # no class memory: the training loop skips k-means, EMA and memory diagnostics

    def __init__(self, in_dim: int, dim: int = 256, dropout: float = 0.25) -> None:
        super().__init__()
        self.in_dim, self.dim = in_dim, dim
        att_dim = max(1, dim // 2)
        self.fc = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(dim, att_dim)
        self.attention_u = nn.Linear(dim, att_dim)
        self.attention_w = nn.Linear(att_dim, 1)
        self.classifier = nn.Linear(dim, N_CLASSES)

    def forward_wsi(self, features: Tensor, neighbors: Tensor | None, slide_offsets: Tensor) -> WSIOutput:
        """features (N, in_dim), neighbors ignored, slide_offsets (B+1,) -> WSIOutput (patch_proj None)."""
        h = self.fc(features)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        logit = self.attention_w(gate).squeeze(-1)
        attention, pooled = segment_softmax_pool(logit, h, slide_offsets, 1.0)
        return WSIOutput(h, None, logit, attention, pooled, self.classifier(pooled))

    def forward(self, features: Tensor, neighbors: Tensor | None = None, omics: Tensor | None = None,
                label: Tensor | None = None) -> TrainOutput:
        """One slide; omics and label are accepted and ignored (uniform training interface)."""
        wsi = self.forward_wsi(features, neighbors, single_slide_offsets(features.shape[0], features.device))
        return TrainOutput(*wsi, slide_proj=None, omics_proj=None, recon=None)
