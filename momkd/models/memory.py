"""Class-conditional memory (§3.3.1): a positive and a negative bank of ``n`` unit codes in D_N.

Update modes:

* ``gradient`` (paper): the banks are parameters, moved by the alignment (eq. 5) and orthogonality (eq. 10)
  terms only; the classifier's loss never reaches them (the attention head detaches the memory).
* ``ema``: the banks are buffers; after every step the training loop calls :meth:`ClassMemory.ema_update`,
  which moves each code of the label's bank toward the mean of the patch projections assigned to it.
* ``fixed``: buffers that stay as the k-means initialisation left them.

Every consumer uses :meth:`ClassMemory.normalized` (unit rows), so a code's raw norm never matters except in
the authors' VQ commitment form (``LossConfig.commit_form = "official"``), which uses the raw codes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

UPDATES = ("gradient", "ema", "fixed")


def _label_int(label: int | Tensor) -> int:
    value = int(label.reshape(-1)[0]) if isinstance(label, Tensor) else int(label)
    if value not in (0, 1):
        raise ValueError(f"label must be 0 or 1 (got {value})")
    return value


def nearest_code(points: Tensor, codes: Tensor) -> Tensor:
    """Index (N,) of each point's nearest code by cosine similarity (= Euclidean for unit vectors)."""
    return (F.normalize(points, dim=-1) @ F.normalize(codes, dim=-1).t()).argmax(dim=1)


KMEANS_FORMS = ("paper", "official")


def spherical_kmeans(points: Tensor, n_codes: int, iters: int = 20, generator: torch.Generator | None = None,
                     form: str = "paper") -> Tensor:
    """Spherical k-means: (M, D) points -> (n_codes, D) unit centroids (deterministic given ``generator``).

    Points are L2-normalised; centroids start at ``n_codes`` distinct random points (the first ``n_codes`` of a
    ``randperm(M)``); each iteration assigns every point to its most similar centroid and moves the centroid to
    the normalised mean of its points. A centroid left without points is, in the ``paper`` form, re-seeded with
    the point worst represented by its centroid; in the ``official`` form (the authors' ``bootstrap_codebooks``)
    it keeps its previous value.

    With fewer points than codes (``M < n_codes``) clustering is meaningless: every point becomes a code once,
    the rest are points drawn with replacement, and all get small Gaussian noise (std 0.01 before
    re-normalisation) so no two codes coincide. (The authors' code fails on such input.)
    """
    if form not in KMEANS_FORMS:
        raise ValueError(f"form must be one of {', '.join(KMEANS_FORMS)} (got {form!r})")
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"k-means needs a non-empty (M, D) tensor of points (got shape {tuple(points.shape)})")
    device = points.device
    x = F.normalize(points.detach().to(torch.float32), dim=-1)
    m, d = x.shape
    if m < n_codes:
        extra = torch.randint(m, (n_codes - m,), generator=generator)
        idx = torch.cat([torch.randperm(m, generator=generator), extra]).to(device)
        noise = torch.randn(n_codes, d, generator=generator).to(device) * 0.01
        return F.normalize(x[idx] + noise, dim=-1)
    centroids = x[torch.randperm(m, generator=generator)[:n_codes].to(device)].clone()
    for _ in range(iters):
        sim = x @ centroids.t()
        best, assign = sim.max(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=n_codes)
        empty = torch.nonzero(counts == 0).flatten()
        new = F.normalize(sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype), dim=-1)
        if empty.numel():
            if form == "paper":  # re-seed empty clusters with the worst-represented points (deterministic)
                new[empty] = x[torch.argsort(best, stable=True)[: empty.numel()]]
            else:
                new[empty] = centroids[empty]
        if torch.equal(new, centroids):  # a fixed point: every further iteration would return it
            break
        centroids = new
    return centroids


class ClassMemory(nn.Module):
    """Positive (C+) and negative (C-) banks of ``n_codes`` unit vectors of size ``dim``.

    Args:
        n_codes: codes per bank (n).
        dim: code size (D_N).
        update: "gradient" (parameters), "ema" or "fixed" (buffers).
        momentum: EMA momentum m (``ema`` mode).
    """

    def __init__(self, n_codes: int, dim: int, update: str = "gradient", momentum: float = 0.99) -> None:
        super().__init__()
        if update not in UPDATES:
            raise ValueError(f"update must be one of {', '.join(UPDATES)} (got {update!r})")
        self.n_codes, self.dim, self.update, self.momentum = n_codes, dim, update, float(momentum)
        pos = F.normalize(torch.randn(n_codes, dim), dim=-1)
        neg = F.normalize(torch.randn(n_codes, dim), dim=-1)
        if update == "gradient":
            self.positive = nn.Parameter(pos)
            self.negative = nn.Parameter(neg)
        else:
            self.register_buffer("positive", pos)
            self.register_buffer("negative", neg)

    def bank(self, label: int | Tensor) -> Tensor:
        """The raw codes of the label's bank (1 -> positive, 0 -> negative)."""
        return self.positive if _label_int(label) == 1 else self.negative

    def normalized(self) -> tuple[Tensor, Tensor]:
        """(C-, C+) with unit rows (differentiable w.r.t. the codes in ``gradient`` mode)."""
        return F.normalize(self.negative, dim=-1), F.normalize(self.positive, dim=-1)

    @torch.no_grad()
    def init_kmeans(self, proj_neg: Tensor, proj_pos: Tensor, iters: int = 20, seed: int = 0,
                    form: str = "paper") -> None:
        """Initialise each bank by spherical k-means of its class's patch projections (see spherical_kmeans), from
        one generator: the negative bank draws first, except in the ``official`` form, which clusters the positive
        bank first as the authors' ``bootstrap_codebooks`` does."""
        generator = torch.Generator().manual_seed(int(seed))
        banks = [(self.negative, proj_neg), (self.positive, proj_pos)]
        for bank, points in banks[::-1] if form == "official" else banks:
            bank.copy_(spherical_kmeans(points, self.n_codes, iters, generator, form).to(bank.device, bank.dtype))

    @torch.no_grad()
    def ema_update(self, patch_proj: Tensor, label: int | Tensor) -> None:
        """Move each code of the label's bank toward the mean of its assigned patch projections.

        ``c_k <- normalize(m c_k + (1 - m) mean_{i: k*(i) = k} F_P,i)`` for every code with at least one patch
        (nearest by cosine); codes with no patch and the other bank are unchanged.
        """
        if self.update != "ema":
            raise RuntimeError(f"ema_update called on a memory in {self.update!r} mode")
        bank = self.bank(label)
        codes = F.normalize(bank, dim=-1)
        proj = patch_proj.detach().to(codes.dtype)
        assign = nearest_code(proj, codes)
        sums = torch.zeros_like(codes).index_add_(0, assign, proj)
        counts = torch.bincount(assign, minlength=self.n_codes).to(codes.dtype).unsqueeze(1)
        mean = sums / counts.clamp(min=1)
        moved = F.normalize(self.momentum * codes + (1.0 - self.momentum) * mean, dim=-1)
        bank.copy_(torch.where(counts > 0, moved, bank))

    @torch.no_grad()
    def code_counts(self, patch_proj: Tensor, label: int | Tensor) -> Tensor:
        """(n,) number of patches whose nearest code (in the label's bank) is each code."""
        assign = nearest_code(patch_proj.detach().to(self.positive.dtype), self.bank(label))
        return torch.bincount(assign, minlength=self.n_codes)

    @torch.no_grad()
    def diagnostics(self, patch_proj: Tensor, label: int | Tensor) -> dict[str, float]:
        """Active-memory ratio and perplexity of the label bank's code usage by these patches (paper Fig. 3)."""
        return usage_stats(self.code_counts(patch_proj, label).cpu().double())


def usage_stats(counts: Tensor) -> dict[str, float]:
    """{"active": fraction of codes used at least once, "perplexity": exp(entropy of the usage distribution)}."""
    total = float(counts.sum())
    if total == 0:
        return {"active": math.nan, "perplexity": math.nan}
    p = counts.double() / total
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    return {"active": float((counts > 0).double().mean()), "perplexity": math.exp(entropy)}


class MemoryUsage:
    """Accumulates code usage over an epoch: per bank, counts of nearest-code assignments of the patches of
    slides with that bank's label. ``summary()`` gives the active ratio and perplexity of the pooled counts
    (NaN for a bank that saw no slide)."""

    def __init__(self, n_codes: int) -> None:
        self.n_codes = n_codes
        self.counts = {0: torch.zeros(n_codes, dtype=torch.float64), 1: torch.zeros(n_codes, dtype=torch.float64)}

    def update(self, patch_proj: Tensor, label: int | Tensor, memory: ClassMemory) -> None:
        key = _label_int(label)
        self.counts[key] += memory.code_counts(patch_proj, key).cpu().double()

    def summary(self) -> dict[str, float]:
        pos, neg = usage_stats(self.counts[1]), usage_stats(self.counts[0])
        return {"pos_active": pos["active"], "pos_perplexity": pos["perplexity"],
                "neg_active": neg["active"], "neg_perplexity": neg["perplexity"]}
