"""A synthetic paired cohort in the real formats: TRIDENT ``.h5`` slides, an omics CSV and a cohort CSV.

The label (``her2_status``: Positive / Negative, about 40 % positive) is learnable from both modalities:

* omics, strongly: a few fixed "signal" genes are several-fold higher in positive cases;
* histology, more weakly: most positive slides hold one or two spatially compact clusters of patches whose
  features are shifted along a fixed random "signal" direction; about half the negative slides hold such
  clusters along another direction, some negatives mimic a weak positive cluster and some positives show
  none. On the default cohort a gated-attention MIL model reaches a 5-fold test AUC of about 0.8-0.9 and
  an oracle that knows the signal direction about 0.83-0.93 (seeds 0-2): learnable, not trivial.

The "biology" (signal directions, tissue prototypes, signal genes, gene baselines) depends only on
``feature_dim`` and ``genes``, never on ``seed``: cohorts with different seeds are independent samples of the
same task (a model trained on one can be evaluated on another). Everything is a pure function of the
arguments.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

LABEL_COL = "her2_status"
POSITIVE = "Positive"
NEGATIVE = "Negative"
PATCH_SIZE = 256
ENCODER = "synthetic"
_BIOLOGY_SEED = 20260315
_N_TISSUE_TYPES = 4
_N_SIGNAL_GENES = 6
_N_PROGRAMS = 3


@dataclass(frozen=True)
class SyntheticCohort:
    """Where a synthetic cohort was written, and how to read its labels."""

    cohort_csv: Path
    features_dir: Path
    omics_path: Path
    label_col: str = LABEL_COL
    positive: str = POSITIVE


def write_slide_h5(
    path: str | os.PathLike[str],
    features: np.ndarray,
    coords: np.ndarray,
    *,
    fmt: str = "trident",
    encoder: str = ENCODER,
    patch_size_level0: int = PATCH_SIZE,
    magnification: float = 20.0,
) -> Path:
    """Write one slide feature file the way TRIDENT or CLAM does.

    Args:
        features: (N, D), written in its own dtype (float32 or float16), one-row chunks.
        coords: (N, 2) level-0 top-left corners; int64 for ``"trident"``, int32 for ``"clam"``.
        fmt: ``"trident"`` (with ``coords``/``features`` attributes) or ``"clam"`` (no attributes).
    """
    if fmt not in ("trident", "clam"):
        raise ValueError(f"fmt must be 'trident' or 'clam', got {fmt!r}")
    path = Path(path)
    features = np.asarray(features)
    coords = np.asarray(coords, dtype=np.int64 if fmt == "trident" else np.int32)
    with h5py.File(path, "w") as h5:
        f, c = (h5.create_dataset(name, data=data, chunks=(1,) + data.shape[1:], maxshape=(None,) + data.shape[1:])
                for name, data in (("features", features), ("coords", coords)))
        if fmt == "trident":
            c.attrs.update({"patch_size": patch_size_level0, "patch_size_level0": patch_size_level0,
                            "level0_magnification": magnification, "target_magnification": magnification,
                            "overlap": 0, "name": path.stem})
            f.attrs.update({"encoder": encoder, "name": path.stem})
    return path


def make_synthetic_cohort(
    out_dir: str | os.PathLike[str],
    cases: int = 60,
    feature_dim: int = 64,
    genes: int = 200,
    seed: int = 0,
    slides_per_case: tuple[int, int] = (1, 2),
    patches: tuple[int, int] = (150, 600),
) -> SyntheticCohort:
    """Write ``out_dir/cohort.csv``, ``out_dir/features/*.h5`` (TRIDENT) and ``out_dir/omics.csv``.

    Args:
        cases: number of cases (patients), about 40 % positive (at least one of each class).
        feature_dim: D of the patch features.
        genes: number of omics genes (raw non-negative counts).
        seed: sampling seed (cases, slides, patches, noise); the same seed gives the same files.
        slides_per_case: inclusive range of slides per case.
        patches: inclusive range of patches per slide.
    """
    if cases < 2 or feature_dim < 2 or genes < _N_SIGNAL_GENES + 2:
        raise ValueError(f"need cases >= 2, feature_dim >= 2, genes >= {_N_SIGNAL_GENES + 2}")
    if not 1 <= slides_per_case[0] <= slides_per_case[1] or not 1 <= patches[0] <= patches[1]:
        raise ValueError("slides_per_case and patches must be ranges (lo, hi) with 1 <= lo <= hi")
    out = Path(out_dir)
    features_dir = out / "features"
    features_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    histology = _Histology(feature_dim)

    n_pos = min(max(1, round(0.4 * cases)), cases - 1)
    labels = rng.permutation(np.arange(cases) < n_pos).astype(np.int64)
    case_ids = [f"SYN-{i + 1:04d}" for i in range(cases)]

    rows = []
    for case, label in zip(case_ids, labels):
        phenotype = _phenotype(rng, label)
        for j in range(int(rng.integers(slides_per_case[0], slides_per_case[1] + 1))):
            slide_id = f"{case}-DX{j + 1}"
            n = int(rng.integers(patches[0], patches[1] + 1))
            shows = phenotype is not None and (j == 0 or rng.random() < 0.6)
            features, coords = histology.slide(rng, n, phenotype if shows else None)
            write_slide_h5(features_dir / f"{slide_id}.h5", features, coords)
            name = f"{slide_id}.svs" if len(rows) % 2 == 0 else slide_id
            rows.append([case, name, POSITIVE if label else NEGATIVE])

    cohort_csv = out / "cohort.csv"
    with cohort_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "slide_id", LABEL_COL])
        writer.writerows(rows)

    omics_path = out / "omics.csv"
    counts = _omics(rng, labels, genes)
    with omics_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id"] + [f"GENE{j + 1:04d}" for j in range(genes)])
        writer.writerows([case] + row for case, row in zip(case_ids, counts.tolist()))
    return SyntheticCohort(cohort_csv=cohort_csv, features_dir=features_dir, omics_path=omics_path)


def _phenotype(rng: np.random.Generator, label: int) -> tuple[int, float] | None:
    """A case's histology signal: (direction 0 = positive / 1 = other, strength in noise units) or none."""
    u = rng.random()
    if label:
        if u < 0.8:
            return 0, float(rng.uniform(3.5, 5.5))   # typical positive
        return (0, float(rng.uniform(0.5, 1.0))) if u < 0.9 else None   # faint or silent positive
    if u < 0.5:
        return 1, float(rng.uniform(3.5, 5.5))       # negative with its own kind of cluster
    return (0, float(rng.uniform(0.8, 1.5))) if u < 0.65 else None   # positive mimic, or plain


class _Histology:
    """Fixed tissue prototypes and signal directions for a feature dim; samples slides."""

    def __init__(self, feature_dim: int) -> None:
        biology = np.random.default_rng([_BIOLOGY_SEED, feature_dim])
        q, _ = np.linalg.qr(biology.standard_normal((feature_dim, 2)))
        self.directions = q.T           # (2, D) orthonormal: positive signal, other signal
        prototypes = biology.standard_normal((_N_TISSUE_TYPES, feature_dim))
        along = prototypes @ self.directions.T @ self.directions
        self.prototypes = prototypes - 0.8 * along   # tissue types vary little along the signal directions
        self.dim = feature_dim

    def slide(self, rng: np.random.Generator, n: int,
              signal: tuple[int, float] | None) -> tuple[np.ndarray, np.ndarray]:
        """(features (n, D) float32, coords (n, 2) int64) of one tissue blob, raster order."""
        grid = _blob(rng, n)
        seeds = grid[rng.choice(n, size=min(3, n), replace=False)]
        tissue = rng.integers(0, _N_TISSUE_TYPES, size=len(seeds))
        nearest = np.argmin(((grid[:, None, :] - seeds[None]) ** 2).sum(-1), axis=1)
        features = self.prototypes[tissue[nearest]] + rng.standard_normal((n, self.dim))
        features += 0.2 * rng.standard_normal(self.dim)                      # slide-level stain/batch effect
        if signal is not None:
            direction, strength = signal
            for _ in range(int(rng.integers(1, 3))):
                centre = grid[rng.integers(n)]
                radius = max(1.5, np.sqrt(rng.uniform(0.08, 0.18) * n / np.pi))
                d = np.sqrt(((grid - centre) ** 2).sum(1))
                inside = d <= radius
                weight = strength * (1.0 - 0.4 * d[inside] / radius)
                features[inside] += weight[:, None] * self.directions[direction]
        origin = rng.integers(20, 60, size=2)
        coords = (grid + origin) * PATCH_SIZE
        return features.astype(np.float32), coords.astype(np.int64)


def _blob(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 2) int grid cells (x, y) of an irregular elliptic tissue blob, in raster (y, then x) order."""
    side = int(np.ceil(2.6 * np.sqrt(n))) + 4
    y, x = np.mgrid[0:side, 0:side]
    cx = cy = (side - 1) / 2
    angle, aspect = rng.uniform(0, np.pi), rng.uniform(0.55, 1.0)
    dx, dy = x - cx, y - cy
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / aspect
    theta = np.arctan2(v, u)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    wobble = 1 + 0.15 * np.sin(3 * theta + phase[0]) + 0.08 * np.sin(5 * theta + phase[1])
    r = np.sqrt(u**2 + v**2) / wobble + 0.3 * rng.random(u.shape)
    keep = np.sort(np.argsort(r.ravel(), kind="stable")[:n])   # raster order
    return np.stack([x.ravel()[keep], y.ravel()[keep]], axis=1)


def _omics(rng: np.random.Generator, labels: np.ndarray, genes: int) -> np.ndarray:
    """(cases, genes) int64 counts: gene baselines, a few co-expression programs, strong signal genes."""
    biology = np.random.default_rng([_BIOLOGY_SEED + 1, genes])
    baseline = biology.normal(3.5, 1.2, size=genes)
    spread = biology.uniform(0.2, 0.6, size=genes)
    loadings = biology.normal(0.0, 0.5, size=(_N_PROGRAMS, genes)) * (biology.random((_N_PROGRAMS, genes)) < 0.3)
    signal_genes = biology.choice(genes, size=_N_SIGNAL_GENES, replace=False)

    n = len(labels)
    log_mean = baseline + spread * rng.standard_normal((n, genes)) + rng.standard_normal((n, _N_PROGRAMS)) @ loadings
    activity = np.where(labels == 1, rng.uniform(0.6, 1.4, size=n), rng.uniform(0.0, 0.25, size=n))
    log_mean[:, signal_genes] += np.log(8.0) * activity[:, None]
    return rng.poisson(np.exp(log_mean)).astype(np.int64)


def grid_coords(n: int, seed: int = 0, patch: int = 256) -> np.ndarray:
    """(n, 2) int64 TRIDENT-like level-0 patch grid with holes: ``n`` cells of a square grid (80 % filled), in
    row-major order, times ``patch``."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(max(n, 1) / 0.8)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2)
    keep = np.sort(rng.permutation(len(grid))[:n])
    return grid[keep].astype(np.int64) * patch
