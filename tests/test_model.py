"""Configs and presets, MoMKD / ABMIL shapes and packing, the encoder, eq. 6-8, and the class memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")

from momkd.config import ConfigError, LossConfig, ModelConfig, ablation, preset  # noqa: E402
from momkd.errors import MomkdError  # noqa: E402
from momkd.losses import MoMKDLoss  # noqa: E402
from momkd.models import build_model  # noqa: E402
from momkd.models.abmil import ABMIL  # noqa: E402
from momkd.models.encoder import GraphEncoder  # noqa: E402
from momkd.kernels.reference import segment_softmax_pool  # noqa: E402
from momkd.models.head import MemoryAttentionHead  # noqa: E402
from momkd.models.memory import ClassMemory, MemoryUsage, spherical_kmeans  # noqa: E402
from momkd.models.momkd import MoMKD, TrainOutput, WSIOutput  # noqa: E402

IN_DIM, GENES = 10, 7
TINY = {"dim": 8, "heads": 2, "proj_dim": 4, "n_codes": 3, "omics_hidden": 6, "classifier_hidden": 5}


def tiny(name: str = "paper", **over) -> tuple[ModelConfig, LossConfig]:
    model, loss = preset(name)
    return model.replace(**{**TINY, **over}), loss


def knn_table(coords: np.ndarray, k: int = 8, direction: str = "paper") -> torch.Tensor:
    """Brute-force reference: k nearest by (distance, row), -1 padded; "official" = reverse kNN."""
    n = len(coords)
    d = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1).astype(np.float64)
    table = np.full((n, k), -1, dtype=np.int64)
    for i in range(n):
        order = [j for j in np.lexsort((np.arange(n), d[i])) if j != i][:k]
        table[i, : len(order)] = order
    if direction == "official":
        lists = [sorted(j for j in range(n) if i in table[j]) for i in range(n)]
        w = max(1, max(len(x) for x in lists))
        rev = np.full((n, w), -1, dtype=np.int64)
        for i, row in enumerate(lists):
            rev[i, : len(row)] = row
        table = rev
    return torch.from_numpy(table)


def slide(n: int, seed: int = 0, direction: str = "paper", dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    coords = rng.integers(0, 12, size=(n, 2)) * 256
    features = torch.from_numpy(rng.standard_normal((n, IN_DIM))).to(dtype)
    return features, knn_table(coords, 8, direction)


def pack(slides: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate slides; neighbour indices become global rows (padding stays -1); (B+1,) offsets."""
    feats, tables, offsets, start = [], [], [0], 0
    width = max(t.shape[1] for _, t in slides)
    for f, t in slides:
        t = torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1)
        tables.append(torch.where(t >= 0, t + start, t))
        feats.append(f)
        start += f.shape[0]
        offsets.append(start)
    return torch.cat(feats), torch.cat(tables), torch.tensor(offsets)


# ----------------------------------------------------------------------------------------------- configs
def test_presets() -> None:
    m, loss = preset("paper")
    assert (m.dim, m.heads, m.proj_dim, m.n_codes, m.tau, m.learnable_tau) == (256, 2, 128, 16, 0.2, False)
    assert (m.graph_direction, m.memory_update, m.dropout, m.kmeans_patches, m.classifier) == (
        "paper", "gradient", 0.25, 10000, "linear")
    assert ((loss.lambda_ce, loss.lambda_mse, loss.alpha_wsi, loss.alpha_omics, loss.lambda_mem)
            == (0.5, 0.01, 0.2, 0.05, 0.1))
    assert ((loss.tau_agg, loss.beta, loss.margin, loss.orth_form, loss.commit_form)
            == (5.0, 20.0, 0.3, "paper", "paper"))
    o, lo = preset("official")
    assert (o.dim, o.heads, o.proj_dim, o.omics_hidden, o.dropout, o.attn_dropout) == (512, 2, 64, 512, 0.5, 0.5)
    assert (o.learnable_tau, o.tau, o.tau_min, o.tau_max, o.graph_direction) == (True, 0.2, 0.01, 2.0, "official")
    assert (o.classifier, o.classifier_hidden, o.kmeans_patches, o.separate_slide_proj) == ("mlp", 128, 50000, True)
    assert (lo.lambda_mse, lo.orth_form, lo.orth_weight, lo.commit_form) == (0.05, "official", 10.0, "official")
    assert preset("paper")[0] is not preset("paper")[0]  # fresh objects


def test_config_json_round_trip_and_validation() -> None:
    for name in ("paper", "official"):
        m, loss = preset(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(m.to_dict()))) == m
        assert LossConfig.from_dict(json.loads(json.dumps(loss.to_dict()))) == loss
    with pytest.raises(ConfigError, match="unknown key"):
        ModelConfig.from_dict({"dim": 8, "bogus": 1})
    for bad in ({"dim": 10, "heads": 3}, {"memory_update": "momentum"}, {"gat_impl": "sparse"}, {"tau": 5.0},
                {"dropout": 1.0}, {"graph_direction": "up"}):
        with pytest.raises(MomkdError):
            ModelConfig(**bad)
    with pytest.raises(ConfigError):
        LossConfig(orth_form="both")
    with pytest.raises(ConfigError):
        preset("cvpr")
    m, loss = preset("paper")
    assert ablation(m, loss, "no_align_omics")[1].alpha_omics == 0.0
    assert ablation(m, loss, "no_align_wsi")[1].alpha_wsi == 0.0
    assert ablation(m, loss, "no_recon")[1].reconstruction is False
    assert ablation(m, loss, "fixed_memory")[0].memory_update == "fixed"


def test_config_imports_without_torch() -> None:
    code = "import sys; sys.modules['torch'] = None; import momkd.config as c; c.preset('official')"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", ["paper", "official"])
def test_momkd_shapes(name: str) -> None:
    m, _ = tiny(name)
    model = build_model(m, IN_DIM, GENES)
    assert isinstance(model, MoMKD)
    features, neighbors = slide(13, direction=m.graph_direction)
    out = model(features, neighbors, torch.randn(1, GENES), torch.tensor([1]))
    assert isinstance(out, TrainOutput) and isinstance(out.wsi, WSIOutput)
    shapes = {k: tuple(v.shape) for k, v in out._asdict().items()}
    assert shapes == {"embeddings": (13, 8), "patch_proj": (13, 4), "patch_score": (13,), "attention": (13,),
                      "pooled": (1, 8), "logits": (1, 2), "slide_proj": (1, 4), "omics_proj": (1, 4),
                      "recon": (1, GENES)}
    for unit in (out.patch_proj, out.slide_proj, out.omics_proj):
        assert torch.allclose(unit.norm(dim=-1), torch.ones(unit.shape[0]), atol=1e-5)
    no_omics = model(features, neighbors, None, torch.tensor([0]))
    assert no_omics.omics_proj is None and no_omics.recon is None and no_omics.slide_proj is not None
    proj = model.patch_projections(features, neighbors)
    assert proj.shape == (13, 4) and not proj.requires_grad


def test_abmil_shapes_and_uniform_interface() -> None:
    m, loss = tiny(model="abmil")
    model = build_model(m, IN_DIM, GENES)
    assert isinstance(model, ABMIL) and model.memory is None
    features, neighbors = slide(9)
    out = model(features, neighbors, torch.randn(1, GENES), torch.tensor([1]))
    assert isinstance(out, TrainOutput)
    assert (out.patch_proj, out.slide_proj, out.omics_proj, out.recon) == (None, None, None, None)
    assert out.embeddings.shape == (9, 8) and out.logits.shape == (1, 2) and out.attention.shape == (9,)
    losses = MoMKDLoss(loss)(out, torch.tensor([1]), torch.randn(1, GENES), model.memory)
    values = {k: float(v.detach()) for k, v in losses.items()}
    assert values["ce"] > 0 and all(values[k] == 0 for k in ("mse", "align_wsi", "align_omics", "mem"))
    losses["total"].backward()


def test_shared_slide_projection_option() -> None:
    model = build_model(tiny(separate_slide_proj=False)[0], IN_DIM, GENES).eval()
    assert model.slide_proj is None
    features, neighbors = slide(6)
    out = model(features, neighbors, None, torch.tensor([1]))
    expected = torch.nn.functional.normalize(model.head.proj(out.pooled), dim=-1)  # W_C-wsi = W_proj
    assert torch.allclose(out.slide_proj, expected)


def test_model_without_omics_branch_refuses_omics() -> None:
    model = build_model(tiny()[0], IN_DIM, 0)
    assert model.omics is None
    features, neighbors = slide(5)
    with pytest.raises(ValueError, match="omics"):
        model(features, neighbors, torch.randn(1, GENES), torch.tensor([0]))


@pytest.mark.parametrize("n", [1, 2, 5, 9])
@pytest.mark.parametrize("name", ["paper", "official", "abmil"])
def test_small_slides(n: int, name: str) -> None:
    """1 patch and fewer than k + 1 patches: the neighbour table is -1 padded (all -1 for N = 1)."""
    m, loss = tiny("paper", model="abmil") if name == "abmil" else tiny(name)
    model = build_model(m, IN_DIM, GENES).train()
    features, neighbors = slide(n, seed=n, direction=m.graph_direction)
    if n <= 8 and name != "official":
        assert (neighbors == -1).any()
    out = model(features, neighbors, torch.randn(1, GENES), torch.tensor([n % 2]))
    assert all(torch.isfinite(t).all() for t in out if t is not None)
    assert float(out.attention.detach().sum()) == pytest.approx(1.0, abs=1e-6)
    MoMKDLoss(loss)(out, torch.tensor([n % 2]), torch.randn(1, GENES), model.memory)["total"].backward()


@pytest.mark.parametrize("name", ["paper", "official", "abmil"])
def test_packed_forward_equals_per_slide(name: str) -> None:
    m, _ = tiny("paper", model="abmil") if name == "abmil" else tiny(name)
    torch.manual_seed(0)
    model = build_model(m, IN_DIM, GENES).double().eval().requires_grad_(False)
    slides = [slide(n, seed=n, direction=m.graph_direction, dtype=torch.float64) for n in (7, 1, 12, 3)]
    features, neighbors, offsets = pack(slides)
    packed = model.forward_wsi(features, neighbors, offsets)
    assert packed.logits.shape == (4, 2) and packed.pooled.shape == (4, 8)
    for b, (f, t) in enumerate(slides):
        single = model.forward_wsi(f, t, torch.tensor([0, f.shape[0]]))
        rows = slice(int(offsets[b]), int(offsets[b + 1]))
        assert torch.allclose(packed.logits[b], single.logits[0], atol=1e-12)
        assert torch.allclose(packed.attention[rows], single.attention, atol=1e-12)
        assert torch.allclose(packed.patch_score[rows], single.patch_score, atol=1e-12)
        assert torch.allclose(packed.embeddings[rows], single.embeddings, atol=1e-12)
        assert float(packed.attention[rows].sum()) == pytest.approx(1.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------- encoder
def test_encoder_dense_equals_pyg_on_same_weights() -> None:
    torch.manual_seed(0)
    dense = GraphEncoder(IN_DIM, 8, 2, dropout=0.0, attn_dropout=0.0, impl="dense").double()
    pyg = GraphEncoder(IN_DIM, 8, 2, dropout=0.0, attn_dropout=0.0, impl="pyg").double()
    assert set(dense.state_dict()) == set(pyg.state_dict())
    pyg.load_state_dict(dense.state_dict(), strict=True)
    for direction in ("paper", "official"):
        features, neighbors = slide(40, seed=3, direction=direction, dtype=torch.float64)
        a, b = dense(features, neighbors), pyg(features, neighbors)
        assert torch.allclose(a, b, atol=1e-10, rtol=0)
        ga = torch.autograd.grad(a.square().sum(), list(dense.parameters()))
        gb = torch.autograd.grad(b.square().sum(), list(pyg.parameters()))
        for x, y in zip(ga, gb):
            assert torch.allclose(x, y, atol=1e-9, rtol=0)


def test_encoder_max_gradient_splits_ties_like_torch_maximum() -> None:
    """The encoder's cheap max backward gives the stock op's gradient everywhere, exact ties (1/2 each) included."""
    from momkd.models.encoder import elementwise_max

    a = torch.tensor([1.0, 2.0, 3.0, -0.5], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([1.0, 5.0, 1.0, -0.5], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([0.3, -1.0, 2.0, 4.0], dtype=torch.float64)
    ours = torch.autograd.grad(elementwise_max(a, b), (a, b), g)
    stock = torch.autograd.grad(torch.maximum(a, b), (a, b), g)
    for x, y in zip(ours, stock):
        assert torch.equal(x, y)
    assert ours[0].tolist() == [0.15, 0.0, 2.0, 2.0]


def test_model_state_dict_moves_between_gat_impls() -> None:
    m, _ = tiny()
    torch.manual_seed(1)
    dense = build_model(m, IN_DIM, GENES).eval()
    pyg = build_model(m.replace(gat_impl="pyg"), IN_DIM, GENES).eval()
    pyg.load_state_dict(dense.state_dict(), strict=True)
    features, neighbors = slide(25, seed=2)
    offsets = torch.tensor([0, 25])
    assert torch.allclose(dense.forward_wsi(features, neighbors, offsets).logits,
                          pyg.forward_wsi(features, neighbors, offsets).logits, atol=1e-5)


# ----------------------------------------------------------------------------------------------- eq. 6-8
def test_attention_head_by_hand() -> None:
    """3 patches, 2 codes per bank, identity projection, tau = 0.2."""
    head = MemoryAttentionHead(2, 2, tau=0.2).double()
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(2))
        head.proj.bias.zero_()
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=torch.float64)
    c_pos = torch.tensor([[1.0, 0.0], [0.8, 0.6]], dtype=torch.float64)
    c_neg = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    out = head(h, c_pos, c_neg, torch.tensor([0, 3]))
    scores = [1.0 - 0.0, 0.6 - 1.0, 0.96 - 0.8]  # max_j F.c+_j - max_j F.c-_j  (eq. 6)
    weights = [math.exp(s / 0.2) for s in scores]
    alpha = [w / sum(weights) for w in weights]  # eq. 7
    pooled = [sum(a * h[i, d].item() for i, a in enumerate(alpha)) for d in range(2)]  # eq. 8
    assert out.score.tolist() == pytest.approx(scores, abs=1e-12)
    assert out.attention.tolist() == pytest.approx(alpha, abs=1e-12)
    assert out.pooled[0].tolist() == pytest.approx(pooled, abs=1e-12)
    assert torch.equal(out.patch_proj, h)


def test_segment_softmax_pool_is_safe_and_per_slide() -> None:
    score = torch.tensor([1e4, 1e4 - 1, -3.0, 0.5, 2.0, 80.0], dtype=torch.float64, requires_grad=True)
    values = torch.arange(12, dtype=torch.float64).view(6, 2)
    offsets = torch.tensor([0, 2, 2, 6])  # slide 1 is empty
    attention, pooled = segment_softmax_pool(score, values, offsets, 0.5)
    assert torch.isfinite(attention).all() and torch.isfinite(pooled).all()
    for lo, hi, b in ((0, 2, 0), (2, 6, 2)):
        expected = torch.softmax(score[lo:hi] / 0.5, dim=0)
        assert torch.allclose(attention[lo:hi], expected, atol=1e-15)
        assert torch.allclose(pooled[b], expected @ values[lo:hi], atol=1e-12)
    assert pooled[1].tolist() == [0.0, 0.0]
    pooled.sum().backward()
    assert torch.isfinite(score.grad).all()


def test_learnable_temperature_is_clamped() -> None:
    head = MemoryAttentionHead(4, 2, tau=0.2, learnable_tau=True, tau_min=0.01, tau_max=2.0)
    assert float(head.temperature().detach()) == pytest.approx(0.2)
    with torch.no_grad():
        head.log_tau.fill_(10.0)
    assert float(head.temperature().detach()) == pytest.approx(2.0)
    with torch.no_grad():
        head.log_tau.fill_(-10.0)
    assert float(head.temperature().detach()) == pytest.approx(0.01)


# ----------------------------------------------------------------------------------------------- memory
def test_memory_parameters_or_buffers() -> None:
    assert {n for n, _ in ClassMemory(4, 3, "gradient").named_parameters()} == {"positive", "negative"}
    for mode in ("ema", "fixed"):
        mem = ClassMemory(4, 3, mode)
        assert not list(mem.parameters()) and {n for n, _ in mem.named_buffers()} == {"positive", "negative"}
    neg, pos = ClassMemory(5, 3).normalized()
    assert torch.allclose(pos.norm(dim=1), torch.ones(5)) and torch.allclose(neg.norm(dim=1), torch.ones(5))


def test_kmeans_init_is_unit_and_deterministic() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=1)
    pts = torch.cat([c + 0.05 * torch.randn(50, 6, generator=g) for c in centers])
    a, b = ClassMemory(4, 6), ClassMemory(4, 6)
    a.init_kmeans(pts[:100], pts[100:], iters=20, seed=3)
    b.init_kmeans(pts[:100], pts[100:], iters=20, seed=3)
    assert torch.equal(a.positive, b.positive) and torch.equal(a.negative, b.negative)
    assert torch.allclose(a.positive.norm(dim=1), torch.ones(4), atol=1e-6)
    # negative bank: points around centres 0 and 1 -> every centroid near one of them
    sims = a.negative @ centers[:2].t()
    assert (sims.max(dim=1).values > 0.99).all()
    assert set(sims.argmax(dim=1).tolist()) == {0, 1}


def test_kmeans_with_fewer_points_than_codes() -> None:
    pts = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    codes = spherical_kmeans(pts, 5, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (5, 3) and torch.allclose(codes.norm(dim=1), torch.ones(5), atol=1e-6)
    assert len({tuple(c) for c in codes.tolist()}) == 5  # noise keeps them distinct
    assert (codes @ pts.t()).max(dim=1).values.min() > 0.95  # each is (near) one of the points
    with pytest.raises(ValueError):
        spherical_kmeans(torch.zeros(0, 3), 2)


def test_ema_update_moves_only_assigned_codes_of_the_label_bank() -> None:
    mem = ClassMemory(3, 2, "ema", momentum=0.5)
    with torch.no_grad():
        mem.positive.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    neg_before, pos_before = mem.negative.clone(), mem.positive.clone()
    proj = torch.tensor([[0.8, 0.6], [0.6, -0.8], [0.28, 0.96]])  # nearest codes: 0, 0, 1
    mem.ema_update(proj, torch.tensor([1]))
    assert torch.equal(mem.negative, neg_before)  # other bank untouched
    assert torch.equal(mem.positive[2], pos_before[2])  # no patch assigned to code 2
    expect0 = torch.nn.functional.normalize(0.5 * pos_before[0] + 0.5 * proj[:2].mean(0), dim=0)
    expect1 = torch.nn.functional.normalize(0.5 * pos_before[1] + 0.5 * proj[2], dim=0)
    assert torch.allclose(mem.positive[0], expect0, atol=1e-6) and not torch.allclose(expect0, pos_before[0])
    assert torch.allclose(mem.positive[1], expect1, atol=1e-6)
    assert torch.allclose(mem.positive.norm(dim=1), torch.ones(3), atol=1e-6)
    with pytest.raises(RuntimeError):
        ClassMemory(3, 2, "gradient").ema_update(proj, 1)


def test_memory_diagnostics_by_hand() -> None:
    mem = ClassMemory(4, 2, "fixed")
    with torch.no_grad():
        mem.negative.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    proj = torch.tensor([[1.0, 0.1], [0.9, -0.1], [0.1, 1.0], [0.2, 0.9]])
    # usage of the negative bank: code 0 twice, code 1 twice -> active 2/4, perplexity exp(ln 2) = 2
    d = mem.diagnostics(proj, 0)
    assert d["active"] == pytest.approx(0.5) and d["perplexity"] == pytest.approx(2.0)
    usage = MemoryUsage(4)
    usage.update(proj, 0, mem)
    usage.update(proj[:1], torch.tensor([0]), mem)  # code 0 once more: counts (3, 2, 0, 0)
    summary = usage.summary()
    p = np.array([3, 2]) / 5
    assert summary["neg_active"] == pytest.approx(0.5)
    assert summary["neg_perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert math.isnan(summary["pos_active"]) and math.isnan(summary["pos_perplexity"])


def test_official_preset_trains_at_tiny_size() -> None:
    m, loss = tiny("official")
    model = build_model(m, IN_DIM, GENES).train()
    features, neighbors = slide(20, direction="official")
    out = model(features, neighbors, torch.randn(1, GENES), torch.tensor([1]))
    losses = MoMKDLoss(loss)(out, torch.tensor([1]), torch.randn(1, GENES), model.memory)
    losses["total"].backward()
    assert model.head.log_tau.grad is not None and model.memory.positive.grad is not None
    assert isinstance(model.classifier, torch.nn.Sequential)
