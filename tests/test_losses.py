"""Eq. 3, 4, 5, 9 and 10 against values computed by hand on tiny inputs (fp64)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from momkd.config import LossConfig, preset  # noqa: E402
from momkd.losses import (  # noqa: E402
    LOSS_KEYS,
    MoMKDLoss,
    align_loss,
    commitment_loss,
    delta,
    memory_loss,
    orthogonality_loss,
    phi,
)
from momkd.models.memory import ClassMemory  # noqa: E402
from momkd.models.momkd import TrainOutput  # noqa: E402

F64 = torch.float64


def t(rows) -> torch.Tensor:  # noqa: ANN001
    return torch.tensor(rows, dtype=F64)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# Two unit codes per bank in 2-D, one unit feature.
C_POS = t([[1.0, 0.0], [0.6, 0.8]])
C_NEG = t([[0.0, 1.0], [-0.8, 0.6]])
FEAT = t([[0.8, 0.6]])
# F.c+ = (0.8, 0.96), F.c- = (0.6, -0.28)
PHI_POS = math.log(math.exp(5 * 0.8) + math.exp(5 * 0.96)) / 5
PHI_NEG = math.log(math.exp(5 * 0.6) + math.exp(5 * -0.28)) / 5


def test_phi_by_hand() -> None:
    assert float(phi(FEAT, C_POS, 5.0)) == pytest.approx(PHI_POS, abs=1e-12)
    assert float(phi(FEAT, C_NEG, 5.0)) == pytest.approx(PHI_NEG, abs=1e-12)
    # a batch of two features gives one value each
    assert phi(t([[0.8, 0.6], [1.0, 0.0]]), C_POS, 5.0).shape == (2,)


def test_delta_by_hand() -> None:
    assert float(delta(FEAT, C_POS, C_NEG, 5.0)) == pytest.approx(PHI_POS - PHI_NEG, abs=1e-12)


def test_align_loss_by_hand_for_both_labels() -> None:
    d = PHI_POS - PHI_NEG
    y1 = align_loss(FEAT, torch.tensor([1]), C_POS, C_NEG, beta=20.0, margin=0.3, tau_agg=5.0)
    y0 = align_loss(FEAT, torch.tensor([0]), C_POS, C_NEG, beta=20.0, margin=0.3, tau_agg=5.0)
    assert float(y1) == pytest.approx(softplus(20 * (0.3 - d)), abs=1e-10)
    assert float(y0) == pytest.approx(softplus(20 * (0.3 + d)), abs=1e-10)
    both = align_loss(t([[0.8, 0.6], [0.8, 0.6]]), torch.tensor([1, 0]), C_POS, C_NEG)
    assert float(both) == pytest.approx((float(y1) + float(y0)) / 2, abs=1e-12)  # batch mean


def test_align_loss_is_the_softplus_form() -> None:
    """softplus(beta (margin - s Delta)) = log(1 + exp(.)) with s = +-1, and it decreases with s Delta."""
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(6, 4, generator=g, dtype=F64), dim=1)
    pos = torch.nn.functional.normalize(torch.randn(3, 4, generator=g, dtype=F64), dim=1)
    neg = torch.nn.functional.normalize(torch.randn(3, 4, generator=g, dtype=F64), dim=1)
    labels = torch.tensor([1, 0, 1, 1, 0, 0])
    d = delta(feats, pos, neg)
    sign = 2.0 * labels.to(F64) - 1
    expected = torch.log1p(torch.exp(20 * (0.3 - sign * d))).mean()
    assert float(align_loss(feats, labels, pos, neg)) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("n", [1, 4, 16])
def test_phi_and_delta_bounds(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    feats = torch.nn.functional.normalize(torch.randn(500, 8, generator=g, dtype=F64), dim=1)
    codes = torch.nn.functional.normalize(torch.randn(n, 8, generator=g, dtype=F64), dim=1)
    other = torch.nn.functional.normalize(torch.randn(n, 8, generator=g, dtype=F64), dim=1)
    values = phi(feats, codes, 5.0)
    lo, hi = -1 + math.log(n) / 5, 1 + math.log(n) / 5  # eq. 3
    assert float(values.min()) >= lo - 1e-12 and float(values.max()) <= hi + 1e-12
    d = delta(feats, codes, other, 5.0)  # eq. 4
    assert float(d.abs().max()) <= 2.0 + 1e-12
    # extremes: F equal to every code (n copies) attains the upper bound
    assert float(phi(codes[:1], codes[:1].expand(n, -1), 5.0)) == pytest.approx(hi, abs=1e-12)


def test_commitment_paper_form_by_hand() -> None:
    patches = t([[1.0, 0.0], [0.0, 1.0]])
    codes = t([[2.0, 0.0], [0.6, 0.8]])  # raw; the paper form uses the unit codes (1, 0) and (0.6, 0.8)
    # patch 0 -> (1, 0): 0; patch 1 -> (0.6, 0.8): 0.36 + 0.04 = 0.4; mean over patches
    assert float(commitment_loss(patches, codes, "paper")) == pytest.approx(0.2, abs=1e-12)


def test_commitment_official_form_by_hand() -> None:
    patches = t([[1.0, 0.0], [0.0, 1.0]])
    codes = t([[2.0, 0.0], [0.6, 0.8]])  # raw codes, Euclidean nearest
    # patch 0: |(1,0)-(2,0)|^2 = 1 vs |(1,0)-(.6,.8)|^2 = 0.8 -> code 1, error 0.8
    # patch 1: 5 vs 0.4 -> code 1, error 0.4; MSE over all 4 elements
    assert float(commitment_loss(patches, codes, "official")) == pytest.approx(0.3, abs=1e-12)


def test_nearest_code_is_euclidean() -> None:
    """k* = argmin ||F - c||: with raw codes of different norms this differs from the max dot product."""
    patches = t([[1.0, 0.0]])
    codes = t([[3.0, 0.0], [0.9, 0.1]])  # dot: 3 vs 0.9 -> code 0; distance: 2 vs ~0.14 -> code 1
    expected = (1 - 0.9) ** 2 + 0.1**2
    assert float(commitment_loss(patches, codes, "official")) == pytest.approx(expected / 2, abs=1e-12)


def test_orthogonality_by_hand() -> None:
    codes = t([[1.0, 0.0], [0.0, 2.0], [0.6, 0.8]])  # cosines: (1,2) 0, (1,3) 0.6, (2,3) 0.8
    assert float(orthogonality_loss(codes, "paper")) == pytest.approx(2 * (0.36 + 0.64), abs=1e-12)
    assert float(orthogonality_loss(codes, "official")) == pytest.approx((3 + 2.0) / 9 - 1 / 3, abs=1e-12)
    assert float(orthogonality_loss(torch.eye(3, dtype=F64), "paper")) == 0.0


def test_memory_loss_combines_terms_per_form() -> None:
    patches = t([[1.0, 0.0], [0.0, 1.0]])
    label_bank = t([[2.0, 0.0], [0.6, 0.8]])
    other_bank = t([[1.0, 0.0], [1.0, 0.0]])  # cos^2 = 1 twice (paper), ignored by the official form
    paper = LossConfig(orth_weight=0.5)
    expected = 0.2 + 0.5 * (2 * 0.36 + 2.0)
    assert float(memory_loss(patches, label_bank, (other_bank, label_bank), paper)) == pytest.approx(expected)
    official = preset("official")[1]
    expected = 0.3 + 10.0 * ((2 + 2 * 0.36) / 4 - 0.5)
    assert float(memory_loss(patches, label_bank, (other_bank, label_bank), official)) == pytest.approx(expected)


def fake_output(memory: ClassMemory, with_omics: bool = True) -> TrainOutput:
    g = torch.Generator().manual_seed(0)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g, dtype=F64), dim=-1)  # noqa: E731
    n = 5
    return TrainOutput(
        embeddings=torch.randn(n, 6, generator=g, dtype=F64), patch_proj=unit(n, 2),
        patch_score=torch.zeros(n, dtype=F64), attention=torch.full((n,), 0.2, dtype=F64),
        pooled=torch.randn(1, 6, generator=g, dtype=F64), logits=t([[0.3, -0.2]]), slide_proj=unit(1, 2),
        omics_proj=unit(1, 2) if with_omics else None,
        recon=torch.randn(1, 4, generator=g, dtype=F64) if with_omics else None,
    )


def test_momkd_loss_total_is_eq_9() -> None:
    mem = ClassMemory(2, 2).double().requires_grad_(False)  # values only
    cfg = preset("paper")[1]
    out = fake_output(mem)
    label, omics = torch.tensor([1]), torch.zeros(1, 4, dtype=F64)
    losses = MoMKDLoss(cfg)(out, label, omics, mem)
    assert set(losses) == set(LOSS_KEYS) and all(v.dim() == 0 for v in losses.values())
    c_neg, c_pos = mem.normalized()
    assert float(losses["ce"]) == pytest.approx(math.log(1 + math.exp(0.5)), abs=1e-12)
    assert float(losses["mse"]) == pytest.approx(float(out.recon.pow(2).mean()), abs=1e-12)
    assert float(losses["align_wsi"]) == pytest.approx(float(align_loss(out.slide_proj, label, c_pos, c_neg)))
    assert float(losses["align_omics"]) == pytest.approx(float(align_loss(out.omics_proj, label, c_pos, c_neg)))
    expected_mem = memory_loss(out.patch_proj, mem.positive, (mem.negative, mem.positive), cfg)
    assert float(losses["mem"]) == pytest.approx(float(expected_mem))
    total = (0.5 * losses["ce"] + 0.01 * losses["mse"] + 0.2 * losses["align_wsi"] + 0.05 * losses["align_omics"]
             + 0.1 * losses["mem"])
    assert float(losses["total"]) == pytest.approx(float(total), abs=1e-12)


def test_momkd_loss_switches() -> None:
    mem = ClassMemory(2, 2).double().requires_grad_(False)  # values only
    omics = torch.zeros(1, 4, dtype=F64)
    no_recon = MoMKDLoss(LossConfig(reconstruction=False))(fake_output(mem), torch.tensor([0]), omics, mem)
    assert float(no_recon["mse"]) == 0.0
    no_omics = MoMKDLoss(LossConfig())(fake_output(mem, with_omics=False), torch.tensor([0]), None, mem)
    assert float(no_omics["align_omics"]) == 0.0 and float(no_omics["mse"]) == 0.0
    weights0 = MoMKDLoss(LossConfig(alpha_wsi=0.0, alpha_omics=0.0, lambda_mse=0.0, lambda_mem=0.0))
    losses = weights0(fake_output(mem), torch.tensor([0]), omics, mem)
    assert float(losses["total"]) == pytest.approx(0.5 * float(losses["ce"]))
    assert float(losses["align_omics"]) > 0  # still reported for monitoring
    no_memory = MoMKDLoss(LossConfig())(fake_output(mem), torch.tensor([0]), omics, None)
    assert float(no_memory["mem"]) == 0.0 and float(no_memory["align_wsi"]) == 0.0
    packed = fake_output(mem)._replace(logits=t([[0.1, 0.2], [0.3, 0.4]]))
    with pytest.raises(ValueError, match="one slide"):
        MoMKDLoss(LossConfig())(packed, torch.tensor([0, 1]), omics, mem)
