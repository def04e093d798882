"""Gradient decoupling (paper §3.3.2), each route proven by exactly-zero (or absent) gradients.

* CE never reaches the memory.
* The omics terms (align_omics, mse) never reach the WSI encoder, attention head, slide projection or classifier.
* The WSI terms (ce, align_wsi, mem) never reach the omics encoder, decoder or projection.
* The commitment term never reaches the memory, in the paper form (stop-gradient) and in the official VQ form
  (the authors' VectorQuantize detaches the quantised codes: learnable_codebook=False).
* The alignment terms do reach the memory in ``gradient`` mode; in ``ema``/``fixed`` mode nothing does.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")

from momkd.config import preset  # noqa: E402
from momkd.losses import MoMKDLoss, commitment_loss  # noqa: E402
from momkd.models import build_model  # noqa: E402

IN_DIM, GENES, N = 10, 7, 15
TINY = {"dim": 8, "heads": 2, "proj_dim": 4, "n_codes": 3, "omics_hidden": 6, "classifier_hidden": 5}


def setup(name: str = "paper", label: int = 1, **over):  # noqa: ANN201
    torch.manual_seed(label)
    model_cfg, loss_cfg = preset(name)
    model = build_model(model_cfg.replace(**{**TINY, **over}), IN_DIM, GENES).train()
    rng = np.random.default_rng(label)
    features = torch.from_numpy(rng.standard_normal((N, IN_DIM)).astype(np.float32))
    neighbors = torch.from_numpy(rng.integers(-1, N, size=(N, 4)))
    neighbors = torch.where(neighbors == torch.arange(N).unsqueeze(1), -1, neighbors)
    omics = torch.randn(1, GENES)
    y = torch.tensor([label])
    out = model(features, neighbors, omics, y)
    losses = MoMKDLoss(loss_cfg)(out, y, omics, model.memory)
    return model, out, losses


def groups(model) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:  # noqa: ANN001
    named = list(model.named_parameters())
    pick = lambda *prefixes: [(n, p) for n, p in named if n.startswith(prefixes)]  # noqa: E731
    return {
        "memory": pick("memory."),
        "wsi": pick("encoder.", "head.", "slide_proj.", "classifier."),
        "omics": pick("omics.", "omics_proj."),
    }


def grads(loss: torch.Tensor, params: list[tuple[str, torch.nn.Parameter]]) -> dict[str, torch.Tensor | None]:
    values = torch.autograd.grad(loss, [p for _, p in params], retain_graph=True, allow_unused=True)
    return {name: g for (name, _), g in zip(params, values)}


def assert_zero(loss: torch.Tensor, params) -> None:  # noqa: ANN001
    assert params
    for name, g in grads(loss, params).items():
        assert g is None or torch.count_nonzero(g) == 0, f"gradient leaked into {name}"


def assert_reaches(loss: torch.Tensor, params) -> None:  # noqa: ANN001
    found = [name for name, g in grads(loss, params).items() if g is not None and torch.count_nonzero(g) > 0]
    assert found, "expected a non-zero gradient"


def test_parameter_groups_cover_the_model() -> None:
    model, _, _ = setup()
    g = groups(model)
    assert sum(len(v) for v in g.values()) == len(list(model.parameters()))
    assert {n for n, _ in g["memory"]} == {"memory.positive", "memory.negative"}


@pytest.mark.parametrize("label", [0, 1])
@pytest.mark.parametrize("name", ["paper", "official"])
def test_ce_never_reaches_the_memory(name: str, label: int) -> None:
    model, _, losses = setup(name, label)
    g = groups(model)
    assert_zero(losses["ce"], g["memory"])
    assert_zero(losses["ce"], g["omics"])
    assert_reaches(losses["ce"], g["wsi"])


@pytest.mark.parametrize("name", ["paper", "official"])
def test_omics_losses_never_reach_the_wsi_branch(name: str) -> None:
    model, _, losses = setup(name)
    g = groups(model)
    omics_terms = losses["align_omics"] + losses["mse"]
    assert_zero(omics_terms, g["wsi"])
    assert_reaches(omics_terms, g["omics"])


@pytest.mark.parametrize("name", ["paper", "official"])
def test_wsi_losses_never_reach_the_omics_branch(name: str) -> None:
    model, _, losses = setup(name)
    g = groups(model)
    wsi_terms = losses["ce"] + losses["align_wsi"] + losses["mem"]
    assert_zero(wsi_terms, g["omics"])
    assert_reaches(wsi_terms, g["wsi"])


def test_total_loss_reaches_omics_only_through_omics_terms() -> None:
    model, _, losses = setup()
    g = groups(model)["omics"]
    cfg = preset("paper")[1]
    full = grads(losses["total"], g)
    own = grads(cfg.lambda_mse * losses["mse"] + cfg.alpha_omics * losses["align_omics"], g)
    for name in full:
        assert torch.equal(full[name], own[name]), name


@pytest.mark.parametrize("name", ["paper", "official"])
@pytest.mark.parametrize("label", [0, 1])
def test_commitment_never_reaches_the_memory(name: str, label: int) -> None:
    model, out, _ = setup(name, label)
    g = groups(model)
    commit = commitment_loss(out.patch_proj, model.memory.bank(label), name)
    assert_zero(commit, g["memory"])
    assert_reaches(commit, g["wsi"])


def test_official_memory_loss_reaches_only_the_label_bank_through_orthogonality() -> None:
    from momkd.losses import memory_loss

    model, out, _ = setup("official", 1)
    cfg = preset("official")[1]
    mem = memory_loss(out.patch_proj, model.memory.positive, (model.memory.negative, model.memory.positive), cfg)
    got = grads(mem, groups(model)["memory"])
    assert torch.count_nonzero(got["memory.positive"]) > 0
    assert got["memory.negative"] is None


@pytest.mark.parametrize("name", ["paper", "official"])
def test_alignment_terms_reach_the_memory(name: str) -> None:
    model, _, losses = setup(name)
    g = groups(model)
    for term in ("align_wsi", "align_omics"):
        found = {n for n, x in grads(losses[term], g["memory"]).items() if x is not None and torch.count_nonzero(x)}
        assert found == {"memory.positive", "memory.negative"}, term


def test_align_detach_memory_option() -> None:
    model, loss_cfg = preset("paper")
    model = build_model(model.replace(**TINY), IN_DIM, GENES)
    loss_fn = MoMKDLoss(loss_cfg.replace(align_detach_memory=True))
    features = torch.randn(6, IN_DIM)
    out = model(features, torch.full((6, 2), -1), torch.randn(1, GENES), torch.tensor([0]))
    losses = loss_fn(out, torch.tensor([0]), torch.randn(1, GENES), model.memory)
    assert_zero(losses["align_wsi"] + losses["align_omics"], groups(model)["memory"])


@pytest.mark.parametrize("mode", ["ema", "fixed"])
def test_no_gradient_reaches_the_memory_in_ema_or_fixed_mode(mode: str) -> None:
    model, out, losses = setup("paper", memory_update=mode)
    assert not list(model.memory.parameters())
    assert not model.memory.positive.requires_grad and not model.memory.negative.requires_grad
    losses["total"].backward()
    assert model.memory.positive.grad is None and model.memory.negative.grad is None
    before = model.memory.positive.clone()
    if mode == "ema":
        model.memory.ema_update(out.patch_proj.detach(), 1)
        assert not torch.equal(before, model.memory.positive)
    else:
        with pytest.raises(RuntimeError):
            model.memory.ema_update(out.patch_proj.detach(), 1)
