"""MoMKD (§3): graph WSI encoder + class memory + memory-guided attention + classifier, and the omics branch.

One implementation serves training, evaluation and export:

* :meth:`MoMKD.forward_wsi` is histology only and takes packed slides (``slide_offsets``); it is what
  evaluation and the exported inference graph run.
* :meth:`MoMKD.forward` is the training step's forward (one slide, as in the paper and the authors' code):
  the WSI outputs plus the slide projection F_N-wsi (eq. 1) and, when omics are given, F_N-omics (eq. 2) and
  the reconstruction.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from momkd.config import ModelConfig
from momkd.models.encoder import GraphEncoder
from momkd.models.head import MemoryAttentionHead
from momkd.models.memory import ClassMemory
from momkd.models.omics import OmicsAutoencoder

N_CLASSES = 2


class WSIOutput(NamedTuple):
    """Histology-only outputs for ``B`` packed slides with ``N`` rows in all."""

    embeddings: Tensor  # (N, D)    F_wsi, encoder output rows
    patch_proj: Tensor | None  # (N, D_N)  F_P-wsi, L2-normalised (MoMKD only; ABMIL: None)
    patch_score: Tensor  # (N,)      eq. 6 score (ABMIL: attention logit)
    attention: Tensor  # (N,)      eq. 7, softmax within each slide
    pooled: Tensor  # (B, D)    F_C-wsi, eq. 8
    logits: Tensor  # (B, 2)


class TrainOutput(NamedTuple):
    """:class:`WSIOutput` fields plus the cross-modal projections (None where not computed)."""

    embeddings: Tensor
    patch_proj: Tensor | None
    patch_score: Tensor
    attention: Tensor
    pooled: Tensor
    logits: Tensor
    slide_proj: Tensor | None  # (B, D_N)  F_N-wsi = normalize(W_C F_C), eq. 1 (ABMIL: None)
    omics_proj: Tensor | None  # (1, D_N)  F_N-omics = normalize(W_omics F_omics), eq. 2 (None without omics)
    recon: Tensor | None  # (1, G)    decoder(F_omics) (None without omics)

    @property
    def wsi(self) -> WSIOutput:
        return WSIOutput(*self[:6])


def make_classifier(cfg: ModelConfig) -> nn.Module:
    """g: ``linear`` D -> 2, or ``mlp`` LayerNorm -> Linear(D, hidden) -> ReLU -> Dropout -> Linear(hidden, 2)."""
    if cfg.classifier == "linear":
        return nn.Linear(cfg.dim, N_CLASSES)
    return nn.Sequential(
        nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, cfg.classifier_hidden), nn.ReLU(),
        nn.Dropout(cfg.classifier_dropout), nn.Linear(cfg.classifier_hidden, N_CLASSES),
    )


def single_slide_offsets(n: int, device: torch.device) -> Tensor:
    return torch.tensor([0, n], dtype=torch.long, device=device)


class MoMKD(nn.Module):
    """Momentum Memory Knowledge Distillation model.

    Args:
        cfg: the model configuration (``cfg.model`` must be "momkd").
        in_dim: patch feature size.
        omics_dim: number of omics inputs G (0: no omics branch, e.g. a model rebuilt for inference only).

    Submodules: ``encoder`` (GraphEncoder), ``memory`` (ClassMemory), ``head`` (MemoryAttentionHead),
    ``classifier`` (g), ``slide_proj`` (W_C-wsi; absent when ``separate_slide_proj`` is False and the patch
    projection W_proj is shared), ``omics`` (OmicsAutoencoder) and ``omics_proj`` (W_omics).
    """

    def __init__(self, cfg: ModelConfig, in_dim: int, omics_dim: int = 0) -> None:
        super().__init__()
        if cfg.model != "momkd":
            raise ValueError(f"MoMKD needs cfg.model == 'momkd' (got {cfg.model!r}); use build_model()")
        self.cfg, self.in_dim, self.omics_dim = cfg, in_dim, omics_dim
        self.encoder = GraphEncoder(in_dim, cfg.dim, cfg.heads, cfg.dropout, cfg.attn_dropout, cfg.gat_impl)
        self.memory = ClassMemory(cfg.n_codes, cfg.proj_dim, cfg.memory_update, cfg.ema_momentum)
        self.head = MemoryAttentionHead(cfg.dim, cfg.proj_dim, cfg.tau, cfg.learnable_tau, cfg.tau_min, cfg.tau_max)
        self.classifier = make_classifier(cfg)
        self.slide_proj = nn.Linear(cfg.dim, cfg.proj_dim) if cfg.separate_slide_proj else None
        self.omics: OmicsAutoencoder | None
        self.omics_proj: nn.Linear | None
        if omics_dim > 0:
            self.omics = OmicsAutoencoder(omics_dim, cfg.omics_hidden, cfg.dim, cfg.omics_dropout, cfg.omics_layout)
            self.omics_proj = nn.Linear(cfg.dim, cfg.proj_dim)
        else:
            self.omics = None
            self.omics_proj = None

    def forward_wsi(self, features: Tensor, neighbors: Tensor, slide_offsets: Tensor) -> WSIOutput:
        """Histology-only forward over packed slides.

        Args:
            features: (N, in_dim) patch features of B slides, concatenated.
            neighbors: (N, W) int64 global row indices of each row's neighbours, -1 padded (no self).
            slide_offsets: (B+1,) int64 row offsets.
        """
        embeddings = self.encoder(features, neighbors)
        codes_neg, codes_pos = self.memory.normalized()
        head = self.head(embeddings, codes_pos, codes_neg, slide_offsets)
        logits = self.classifier(head.pooled)
        return WSIOutput(embeddings, head.patch_proj, head.score, head.attention, head.pooled, logits)

    def project_slide(self, pooled: Tensor) -> Tensor:
        """F_N-wsi = normalize(W_C-wsi F_C-wsi) (eq. 1), (B, D_N)."""
        lin = self.slide_proj if self.slide_proj is not None else self.head.proj
        return F.normalize(lin(pooled), dim=-1)

    def forward(self, features: Tensor, neighbors: Tensor, omics: Tensor | None = None,
                label: Tensor | None = None) -> TrainOutput:
        """Training forward of ONE slide (offsets [0, N]).

        Args:
            features: (N, in_dim); neighbors: (N, W) int64 -1 padded.
            omics: (1, G) transformed omics of the slide's case, or None (no omics terms).
            label: (1,) class label; accepted for a uniform interface (the losses use it, the model does not).
        """
        offsets = single_slide_offsets(features.shape[0], features.device)
        wsi = self.forward_wsi(features, neighbors, offsets)
        slide_proj = self.project_slide(wsi.pooled)
        omics_proj = recon = None
        if omics is not None:
            if self.omics is None or self.omics_proj is None:
                raise ValueError("this model was built without an omics branch (omics_dim = 0)")
            embedding, recon = self.omics(omics)
            omics_proj = F.normalize(self.omics_proj(embedding), dim=-1)
        return TrainOutput(*wsi, slide_proj=slide_proj, omics_proj=omics_proj, recon=recon)

    @torch.no_grad()
    def patch_projections(self, features: Tensor, neighbors: Tensor) -> Tensor:
        """F_P-wsi (N, D_N) of one slide (for the k-means initialisation of the memory)."""
        return self.head.project(self.encoder(features, neighbors))
