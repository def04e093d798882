"""Attention and memory diagnostics of a trained run on a study cohort (RESULTS.md §3 and §4).

    python benchmarks/learning_study/diagnose.py RUN_DIR COHORT_DIR

Per fold and split (train / test, histology only, eval mode): the median effective number of attended patches
exp(H(alpha)) and its share of the slide, the median largest weight, the mean attention mass on the synthetic
signal regions (``signal_masks.npz``; chance = the region fraction), the softmax logits z (MoMKD: eq. 6 score /
tau; ABMIL: attention logit): their median within-slide std and the mean gap z(regions) - z(rest), and the AUC
of the slide-mean patch score against the label (MoMKD; "-" for ABMIL). For MoMKD also the memory: the
largest |cos| between two codes of a bank, code pairs across the banks with cos > 0.9 / < -0.9, each bank's
code usage by the patches of its class on the training slides (active share, perplexity, as history.csv), the
perplexity of the generator's tissue-type shares among those patches (``patch_tissue.npz``), the share of the
non-region patches that sit on their tissue type's majority code, and the effective rank of the projections.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import torch

from momkd.config import ModelConfig
from momkd.data.cohort import load_splits
from momkd.metrics import roc_auc
from momkd.models.memory import nearest_code, usage_stats
from momkd.train.checkpoint import load_checkpoint
from momkd.train.data import SlideStore
from momkd.train.predict import slide_tensors
from momkd.train.runfolder import WEIGHTS


def effective_rank(x: np.ndarray) -> float:
    s = np.linalg.svd(x, compute_uv=False) ** 2
    p = s / s.sum()
    return float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))


@torch.no_grad()
def main(run: Path, cohort: Path) -> None:
    rows = list(csv.DictReader((cohort / "cohort.csv").open()))
    slides = {r["case_id"]: [] for r in rows}
    labels = {}
    for r in rows:
        slides[r["case_id"]].append(r["slide_id"])
        labels[r["case_id"]] = int(r["her2_status"] == "Positive")
    masks = dict(np.load(cohort / "signal_masks.npz"))
    tissue = dict(np.load(cohort / "patch_tissue.npz"))
    n_types = 1 + max(int(t.max()) for t in tissue.values())
    splits = load_splits(run / "splits")
    print("| fold | split | eff. patches | eff./N | max weight | attention on regions | logit std "
          "| logit gap regions - rest | AUC slide-mean score |")
    print("|---|---|---|---|---|---|---|---|---|")
    memory_rows = []
    for fold_path in sorted(run.glob("fold_*")):   # trained folds, also of a run still training
        if not (fold_path / WEIGHTS).is_file():
            continue
        fold = int(fold_path.name.split("_")[1])
        model, meta = load_checkpoint(fold_path)
        cfg = ModelConfig.from_dict(meta["model_config"])
        store = SlideStore({s: cohort / "features" / f"{s}.h5" for ss in slides.values() for s in ss}, k=cfg.k,
                           direction=cfg.graph_direction, expected_dim=meta["in_dim"])
        memory = getattr(model, "memory", None)
        counts = {y: np.zeros((n_types + 1, memory.n_codes)) for y in (0, 1)} if memory is not None else {}
        projections = {0: [], 1: []}
        for split in ("train", "test"):
            eff, share, top, on_region, spread, gap, mean_score, y_split = [], [], [], [], [], [], [], []
            for case in getattr(splits[fold], split):
                for sid in slides[case]:
                    features, neighbors = slide_tensors(store.get(sid), torch.device("cpu"))
                    out = model.forward_wsi(features, neighbors, torch.tensor([0, len(features)]))
                    a = out.attention.double().numpy()
                    h = -(a[a > 0] * np.log(a[a > 0])).sum()
                    eff.append(np.exp(h))
                    share.append(np.exp(h) / len(a))
                    top.append(a.max())
                    on_region.append(a[masks[sid]].sum())
                    tau = float(model.head.temperature()) if memory is not None else 1.0
                    z = out.patch_score.double().numpy() / tau
                    spread.append(z.std())
                    gap.append(z[masks[sid]].mean() - z[~masks[sid]].mean())
                    mean_score.append(out.patch_score.mean().item())
                    y_split.append(labels[case])
                    if memory is not None and split == "train":
                        y = labels[case]
                        assign = nearest_code(out.patch_proj, memory.bank(y)).numpy()
                        kind = np.where(masks[sid], n_types, tissue[sid])   # last row: region patches
                        np.add.at(counts[y], (kind, assign), 1)
                        projections[y].append(out.patch_proj.numpy())
            score_auc = f"{roc_auc(np.array(y_split), np.array(mean_score)):.3f}" if memory is not None else "-"
            print(f"| {fold} | {split} | {np.median(eff):.1f} | {np.median(share):.3f} | {np.median(top):.3f} "
                  f"| {np.mean(on_region):.3f} | {np.median(spread):.2f} | {np.mean(gap):+.2f} | {score_auc} |")
        if memory is not None:
            neg, pos = (c.numpy() for c in memory.normalized())
            within = [np.abs(b @ b.T - np.eye(len(b))).max() for b in (pos, neg)]
            cross = pos @ neg.T
            use = {y: usage_stats(torch.from_numpy(counts[y].sum(0))) for y in (0, 1)}
            types = {y: usage_stats(torch.from_numpy(counts[y][:-1].sum(1)))["perplexity"] for y in (0, 1)}
            purity = {y: counts[y][:-1].max(1).sum() / counts[y][:-1].sum() for y in (0, 1)}
            ranks = {y: effective_rank(np.concatenate(projections[y])) for y in (0, 1)}
            memory_rows.append(f"| {fold} | {within[0]:.3f} / {within[1]:.3f} | {(cross > 0.9).sum()} / "
                               f"{(cross < -0.9).sum()} | {use[1]['active']:.3f}, {use[1]['perplexity']:.2f} | "
                               f"{use[0]['active']:.3f}, {use[0]['perplexity']:.2f} | "
                               f"{types[1]:.2f} / {types[0]:.2f} | "
                               f"{purity[1]:.3f} / {purity[0]:.3f} | {ranks[1]:.1f} / {ranks[0]:.1f} |")
    if memory_rows:
        print("\n| fold | max within-bank abs cos (C+ / C-) | cross pairs cos > .9 / < -.9 | C+ usage (active, "
              "perplexity) | C- usage | tissue-share perplexity (pos / neg slides) | patches on their type's code | "
              "patch-projection eff. rank |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(memory_rows))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
