"""The ``official`` preset's training decisions, each as the authors' released code makes it (issue 10).

The side-by-side check against their code itself is ``benchmarks/parity`` (it needs a checkout of it); these
tests pin the same rules on their own: early stopping, the k-means bootstrap, the omics encoder layout, the raw
omics input and the preset's wiring.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from momkd.config import preset  # noqa: E402
from momkd.data.cohort import SlideLabel  # noqa: E402
from momkd.data.omics import OmicsTable, OmicsTransform  # noqa: E402
from momkd.models import build_model  # noqa: E402
from momkd.models.memory import spherical_kmeans  # noqa: E402
from momkd.models.omics import OmicsAutoencoder  # noqa: E402
from momkd.train.config import TrainConfig  # noqa: E402
from momkd.train.stopping import OfficialStopping, PaperStopping, make_stopping  # noqa: E402


def run_rule(rule, aucs: list[float], ces: list[float] | None = None) -> tuple[int, int]:  # noqa: ANN001
    """(kept epoch, last epoch run), epochs counted from 1, for a scripted validation AUC sequence."""
    kept = 0
    for epoch, auc in enumerate(aucs, start=1):
        decision = rule.update(epoch, auc, ces[epoch - 1] if ces else 0.0)
        kept = epoch if decision.keep else kept
        if decision.stop:
            return kept, epoch
    return kept, len(aucs)


@pytest.mark.parametrize(("aucs", "expected"), [
    ([0.6, 0.7, 0.8, 0.7, 0.9], (3, 4)),           # first drop at 0-indexed epoch 3 (> 1): stop there
    ([0.6, 0.5, 0.7, 0.8, 0.6, 0.9], (4, 5)),      # a drop at 0-indexed epoch 1 does not stop
    ([0.6, 0.5, 0.4, 0.9], (1, 3)),                # ...but the counter is not reset: the next drop stops
    ([0.6, 0.6, 0.6, 0.5], (3, 4)),                # ties count as improvements: the later checkpoint is kept
    ([0.5, 0.4, 0.7, 0.7, 0.7, 0.71], (6, 6)),     # never drops after epoch 1: runs to the end
    ([math.nan, 0.5, 0.4, 0.3], (2, 3)),           # undefined AUC is 0.5 (their validation loop)
])
def test_official_early_stopping(aucs: list[float], expected: tuple[int, int]) -> None:
    assert run_rule(OfficialStopping(patience=1, stop_epoch=1), aucs) == expected
    assert run_rule(make_stopping("official", 1, 5), aucs) == expected


def test_paper_early_stopping_is_strict_with_a_loss_tie_breaker() -> None:
    aucs = [0.6, 0.7, 0.7, 0.7, 0.6, 0.6, 0.6]
    ces = [0.7, 0.6, 0.5, 0.55, 0.5, 0.5, 0.5]
    assert run_rule(PaperStopping(patience=3, min_epochs=5), aucs, ces) == (3, 6)
    assert run_rule(PaperStopping(patience=1, min_epochs=5), [0.6, 0.5, 0.4, 0.3, 0.2, 0.1], [0.0] * 6) == (1, 5)
    with pytest.raises(ValueError, match="paper, official"):
        make_stopping("other", 1, 1)


def test_official_kmeans_keeps_empty_clusters_and_paper_reseeds() -> None:
    # duplicated points: two starting centroids coincide, the second never wins a point (argmax takes the first)
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    start = x[torch.randperm(4, generator=gen())[:3]]
    assert (start == torch.tensor([1.0, 0.0])).all(dim=1).sum() >= 2
    official = spherical_kmeans(x, 3, iters=5, generator=gen(), form="official")
    paper = spherical_kmeans(x, 3, iters=5, generator=gen(), form="paper")
    assert torch.equal(official, start)                        # the empty centroid kept its place
    assert (paper == torch.tensor([1.0, 0.0])).all(dim=1).sum() == (start == torch.tensor([1.0, 0.0])).all(dim=1).sum()
    with pytest.raises(ValueError, match="form"):
        spherical_kmeans(x, 3, form="other")


def test_official_omics_encoder_is_one_block_then_linear() -> None:
    auto = OmicsAutoencoder(768, 512, 512, 0.25, layout="official")
    kinds = [type(m).__name__ for m in auto.encoder]
    assert kinds == ["Linear", "LayerNorm", "ReLU", "Dropout", "Linear"]
    assert [type(m).__name__ for m in auto.decoder] == kinds
    assert [type(m).__name__ for m in OmicsAutoencoder(8, 4, 4).encoder] == kinds[:4] * 2
    model_cfg, _ = preset("official")
    assert model_cfg.omics_layout == "official"
    model = build_model(model_cfg, 1536, 768)
    assert model.omics.encoder[4].weight.shape == (512, 512)
    assert sum(p.numel() for p in model.parameters()) == 4_372_803   # the authors' MKD with run.sh dims has 4,372,803


def test_raw_omics_transform_is_the_identity(tmp_path: Path) -> None:
    values = np.array([[1.5, -2.0, 3.0], [0.0, 4.25, -1.0]])
    table = OmicsTable(case_ids=["a", "b"], genes=["g1", "g2", "g3"], values=values, source="t")
    transform = OmicsTransform(log2=False, raw=True).fit(table, ["a"])
    np.testing.assert_array_equal(transform.transform(table, ["b", "a"]), values[[1, 0]].astype(np.float32))
    transform.save(tmp_path / "t.json")
    again = OmicsTransform.load(tmp_path / "t.json")
    assert again.raw and np.array_equal(again.transform(table, ["a"]), transform.transform(table, ["a"]))
    with pytest.raises(ValueError, match="raw"):
        OmicsTransform(log2=True, raw=True)


class _Store:
    """Slides of fixed sizes with random features (what the bootstrap reads through ``store.get``)."""

    def __init__(self, sizes: dict[str, int], dim: int) -> None:
        from momkd.data.batch import graph_slide

        rng = np.random.default_rng(0)
        self.graphs = {}
        for sid, n in sizes.items():
            coords = np.stack(np.divmod(np.arange(n), 7), axis=1) * 256
            self.graphs[sid] = graph_slide(sid, rng.standard_normal((n, dim)), coords, 8, "official")
        self.calls: list[str] = []

    def get(self, slide_id: str):  # noqa: ANN201
        self.calls.append(slide_id)
        return self.graphs[slide_id]


def test_official_bootstrap_takes_whole_sampled_slides_until_both_classes_have_enough() -> None:
    from momkd.train.fit import FoldTrainer

    model_cfg, loss_cfg = preset("official")
    model_cfg = model_cfg.replace(dim=16, proj_dim=8, n_codes=4, omics_hidden=8, classifier_hidden=8)
    items = [SlideLabel(f"s{i}", f"c{i}", int(i % 3 == 0)) for i in range(12)]
    store = _Store({it.slide_id: 30 + 5 * i for i, it in enumerate(items)}, 12)
    model = build_model(model_cfg, 12, 0)
    cfg = TrainConfig(protocol="official", kmeans_patches=100)
    trainer = FoldTrainer(model, torch.nn.Identity(), store, {}, cfg, torch.device("cpu"))
    neg, pos = trainer._bootstrap_points(items, np.random.default_rng(3))
    drawn = [items[int(s[1:])] for s in store.calls]
    assert neg.shape[0] == sum(store.graphs[it.slide_id].features.shape[0] for it in drawn if it.label == 0)
    assert pos.shape[0] == sum(store.graphs[it.slide_id].features.shape[0] for it in drawn if it.label == 1)
    assert min(neg.shape[0], pos.shape[0]) >= 100                      # stopped once both had enough...
    last = drawn[-1]
    before = [it for it in drawn[:-1]]
    sizes = {c: sum(store.graphs[it.slide_id].features.shape[0] for it in before if it.label == c) for c in (0, 1)}
    assert min(sizes.values()) < 100                                   # ...and not a slide earlier
    assert last.label == min(sizes, key=sizes.get)


def test_official_preset_sets_the_authors_training_loop() -> None:
    from momkd.train.setup import build_configs

    _, loss_cfg, train_cfg = build_configs("official")
    assert ((train_cfg.protocol, train_cfg.patience, train_cfg.grad_clip, train_cfg.lr_plateau)
            == ("official", 1, 16.0, True))
    assert (train_cfg.epochs, train_cfg.kmeans_patches) == (100, 50000)
    assert loss_cfg.commit_form == "official"
    assert build_configs("paper")[2].protocol == "paper"
    assert json.loads(json.dumps(train_cfg.to_dict()))["protocol"] == "official"
